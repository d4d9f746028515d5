"""Triton chunked gated linear attention with per-key gates (GLA).

Conventions are those of :mod:`seqpar.kernels.gla_reference` (the oracle): q, k [B, T, H, Dk],
v [B, T, H, Dv] (any strides), log gates g [B, T, H, Dk] (<= 0), recurrence
S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = scale * S_t^T q_t; states [B, H, Dk, Dv] fp32,
outputs and gradients fp32. float64 inputs run on the torch reference (:class:`GlaChunkedRun`).

The chunk-local cumulative gate b (per channel, chunks of BT tokens) is computed in torch once per
run, [B*H, NT*BT, Dk] fp32 (zero-padded gates past T keep it flat). Kernels (after
flash-linear-attention's ``chunk_gla``):

* ``_gla_state_pass``: one program per (Dk tile, Dv tile, b*h) walks the chunks and stores the
  state at every chunk boundary. Forward: S_{c+1} = diag(e^(b_last)) S_c + (K e^(b_last - b))^T V;
  reverse (the state gradients): dS_{c-1} = diag(e^(b_last)) dS_c + scale (Q e^b)^T dO.
* ``_gla_fwd_o``, ``_gla_bwd_dv``, ``_gla_bwd_dqk``: one program per sub-chunk of BC (16) rows
  (x a Dv or Dk tile, x b*h). The intra-chunk scores sum_d q_id k_jd e^(b_id - b_jd) (j <= i) are
  computed per pair of sub-chunks: exactly, as a [BC, BC, BK] product, on the diagonal; factorised
  through a reference row r between the two sub-chunks, (Q e^(b - b_r)) (K e^(b_r - b))^T, off it.
  Every exponent is <= 0 for gates <= 0: nothing overflows, whatever the gates.
* the gate gradient dg_t = sum_{i >= t} (q_i dq_i - k_i dk_i) + (dht * S_T).sum(-1): the kernel
  stores q dq - k dk per token and channel, the reverse cumulative sum is torch's.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqpar.kernels.gla_reference import (
    GlaChunkedRun,
    check_gla_inputs,
    key_gate_grad,
)
from seqpar.kernels.linear_reference import ChunkStateGrads, ChunkStates, default_scale, shift_state_grads, shift_states
from seqpar.kernels.linear_transitions import KeyDecay
from seqpar.kernels.softmax_reference import compute_dtype
from seqpar.kernels import custom_ops
from seqpar.kernels.triton_common import check_int32_offsets, check_launch_device, interpreting, strides4

__all__ = ["TritonGlaChunkedRun"]

DEFAULT_CHUNK = 64
SUB_CHUNK = 16  # rows of the intra-chunk sub-blocks (BC)


# --------------------------------------------------------------------------------------------
# shared device helpers (coarse on purpose: the interpreter pays ~10 operations per helper call)
# --------------------------------------------------------------------------------------------


@triton.jit
def _diag_decay(g, BC: tl.constexpr):
    """[BC, BC, BK] e^(g_i - g_j) for rows j <= i of one sub-chunk (index [i, j, d]), 0 above."""
    idx = tl.arange(0, BC)
    causal = (idx[:, None] >= idx[None, :])[:, :, None]
    return tl.exp(tl.where(causal, g[:, None, :] - g[None, :, :], float("-inf")))


@triton.jit
def _diag_scores(q_bh, k_bh, g_bh, rows, t_ok, stride_qt, stride_qd, stride_kt, stride_kd,
                 DK: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr):
    """[BC, BC] sum_d q_id k_jd e^(g_id - g_jd) for j <= i inside one sub-chunk (0 above), exact."""
    acc = tl.zeros([BC, BC], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(DK, BK)):
        cols = i_k * BK + tl.arange(0, BK)
        m = t_ok[:, None] & (cols < DK)[None, :]
        q = tl.load(q_bh + rows[:, None] * stride_qt + cols[None, :] * stride_qd, mask=m, other=0.0).to(tl.float32)
        k = tl.load(k_bh + rows[:, None] * stride_kt + cols[None, :] * stride_kd, mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_bh + rows[:, None] * DK + cols[None, :], mask=(cols < DK)[None, :], other=0.0)
        acc += tl.sum(q[:, None, :] * k[None, :, :] * _diag_decay(g, BC), 2)
    return acc


@triton.jit
def _cross_scores(q_bh, k_bh, g_bh, rows_i, ti_ok, rows_j, tj_ok, ref_row,
                  stride_qt, stride_qd, stride_kt, stride_kd,
                  DK: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr, PRECISION: tl.constexpr):
    """[BC, BC] sum_d q_id k_jd e^(g_id - g_jd) for query rows ``rows_i`` all after key rows
    ``rows_j``, factorised through ``ref_row`` (the first query row): e^(g_i - g_ref) e^(g_ref - g_j),
    both <= 1."""
    acc = tl.zeros([BC, BC], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(DK, BK)):
        cols = i_k * BK + tl.arange(0, BK)
        c_ok = cols < DK
        ref = tl.load(g_bh + ref_row * DK + cols, mask=c_ok, other=0.0)[None, :]
        q = tl.load(q_bh + rows_i[:, None] * stride_qt + cols[None, :] * stride_qd,
                    mask=ti_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        g = tl.load(g_bh + rows_i[:, None] * DK + cols[None, :], mask=c_ok[None, :], other=0.0)
        q = q * tl.exp(g - ref)
        k = tl.load(k_bh + rows_j[:, None] * stride_kt + cols[None, :] * stride_kd,
                    mask=tj_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        g = tl.load(g_bh + rows_j[:, None] * DK + cols[None, :], mask=c_ok[None, :], other=0.0)
        k = k * tl.exp(ref - g)
        acc = tl.dot(q, tl.trans(k), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _value_scores(x_bh, y_bh, rows_i, ti_ok, rows_j, tj_ok, stride_xt, stride_xd, stride_yt, stride_yd,
                  DV: tl.constexpr, BV: tl.constexpr, BC: tl.constexpr, PRECISION: tl.constexpr):
    """[BC, BC] x_i . y_j over the value channels (dO V^T)."""
    acc = tl.zeros([BC, BC], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(DV, BV)):
        cols = i_v * BV + tl.arange(0, BV)
        c_ok = cols < DV
        x = tl.load(x_bh + rows_i[:, None] * stride_xt + cols[None, :] * stride_xd,
                    mask=ti_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        y = tl.load(y_bh + rows_j[:, None] * stride_yt + cols[None, :] * stride_yd,
                    mask=tj_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(x, tl.trans(y), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _decayed_rows_state(x_bh, g_bh, s_c, rows, t_ok, last_row, offs_v, v_ok, stride_xt, stride_xd,
                        DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr,
                        BV: tl.constexpr, TO_END: tl.constexpr, PRECISION: tl.constexpr):
    """[BC, BV] (X * decay) S over all key channels, with S [DK, DV] at ``s_c`` and the decay
    e^g (from the chunk's start) or e^(g_last - g) (to its end, ``TO_END``; g_last at ``last_row``)."""
    acc = tl.zeros([BC, BV], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(DK, BK)):
        cols = i_k * BK + tl.arange(0, BK)
        c_ok = cols < DK
        g = tl.load(g_bh + rows[:, None] * DK + cols[None, :], mask=c_ok[None, :], other=0.0)
        if TO_END:
            g = tl.load(g_bh + last_row * DK + cols, mask=c_ok, other=0.0)[None, :] - g
        x = tl.load(x_bh + rows[:, None] * stride_xt + cols[None, :] * stride_xd,
                    mask=t_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        s = tl.load(s_c + cols[:, None] * DV + offs_v[None, :], mask=c_ok[:, None] & v_ok[None, :], other=0.0)
        acc = tl.dot(x * tl.exp(g), s, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _rows_state_t(x_bh, s_c, rows, t_ok, offs_k, k_ok, stride_xt, stride_xd,
                  DV: tl.constexpr, BV: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                  PRECISION: tl.constexpr):
    """[BC, BK] X S^T over all value channels, with S [DK, DV] at ``s_c``."""
    acc = tl.zeros([BC, BK], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(DV, BV)):
        cols = i_v * BV + tl.arange(0, BV)
        c_ok = cols < DV
        x = tl.load(x_bh + rows[:, None] * stride_xt + cols[None, :] * stride_xd,
                    mask=t_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        s = tl.load(s_c + offs_k[:, None] * DV + cols[None, :], mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(s), acc, input_precision=PRECISION)
    return acc


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _gla_state_pass(X, Y, GC, INIT, HS, HLAST,
                    stride_xb, stride_xt, stride_xh, stride_xd,
                    stride_yb, stride_yt, stride_yh, stride_yd,
                    T, H, NT, scale,
                    DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    REVERSE: tl.constexpr, USE_INIT: tl.constexpr, PRECISION: tl.constexpr):
    """States at every chunk boundary, one (Dk tile, Dv tile, b*h) per program. Forward (X = K,
    Y = V): HS[c] = S at chunk c's start. Reverse (X = Q, Y = dO): HS[c] = dS at chunk c's end.
    HLAST: the state after the pass (the final state / the initial state's gradient)."""
    i_k = tl.program_id(0)
    i_v = tl.program_id(1)
    i_bh = tl.program_id(2)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    state_off = offs_k[:, None] * DV + offs_v[None, :]
    state_mask = k_ok[:, None] & v_ok[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INIT:
        b_h += tl.load(INIT + i_bh.to(tl.int64) * DK * DV + state_off, mask=state_mask, other=0.0)
    x_bh = X + i_b * stride_xb + i_h * stride_xh
    y_bh = Y + i_b * stride_yb + i_h * stride_yh
    g_bh = GC + i_bh.to(tl.int64) * NT * BT * DK
    first_state = i_bh.to(tl.int64) * NT  # HS is [B*H, NT, DK, DV]; int64 offsets
    for cc in range(0, NT):
        if REVERSE:
            c = NT - 1 - cc
        else:
            c = cc
        tl.store(HS + (first_state + c) * DK * DV + state_off, b_h, mask=state_mask)
        rows = c * BT + tl.arange(0, BT)
        t_ok = rows < T
        x = tl.load(x_bh + rows[:, None] * stride_xt + offs_k[None, :] * stride_xd,
                    mask=t_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        y = tl.load(y_bh + rows[:, None] * stride_yt + offs_v[None, :] * stride_yd,
                    mask=t_ok[:, None] & v_ok[None, :], other=0.0).to(tl.float32)
        g = tl.load(g_bh + rows[:, None] * DK + offs_k[None, :], mask=k_ok[None, :], other=0.0)
        g_last = tl.load(g_bh + (c * BT + BT - 1) * DK + offs_k, mask=k_ok, other=0.0)
        b_h *= tl.exp(g_last)[:, None]
        if REVERSE:
            x = x * (tl.exp(g) * scale)
        else:
            x = x * tl.exp(g_last[None, :] - g)
        b_h = tl.dot(tl.trans(x), y, b_h, input_precision=PRECISION)
    tl.store(HLAST + i_bh.to(tl.int64) * DK * DV + state_off, b_h, mask=state_mask)


@triton.jit
def _gla_fwd_o(Q, K, V, GC, HS, O,
               stride_qb, stride_qt, stride_qh, stride_qd,
               stride_kb, stride_kt, stride_kh, stride_kd,
               stride_vb, stride_vt, stride_vh, stride_vd,
               stride_ob, stride_ot, stride_oh, stride_od,
               T, H, NT, scale,
               DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
               BV: tl.constexpr, PRECISION: tl.constexpr):
    """o of one (sub-chunk, Dv tile, b*h): scale [(Q e^b) S_c + sum_{j <= i} A_ij v_j]."""
    NC: tl.constexpr = BT // BC
    i_s = tl.program_id(0)
    i_v = tl.program_id(1)
    i_bh = tl.program_id(2)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    c = i_s // NC
    i_c = i_s % NC
    rows = c * BT + i_c * BC + tl.arange(0, BC)
    t_ok = rows < T
    offs_v = i_v * BV + tl.arange(0, BV)
    v_ok = offs_v < DV
    q_bh = Q + i_b * stride_qb + i_h * stride_qh
    k_bh = K + i_b * stride_kb + i_h * stride_kh
    v_bh = V + i_b * stride_vb + i_h * stride_vh
    g_bh = GC + i_bh.to(tl.int64) * NT * BT * DK
    b_o = _decayed_rows_state(q_bh, g_bh, HS + (i_bh.to(tl.int64) * NT + c) * DK * DV, rows, t_ok, 0,
                              offs_v, v_ok, stride_qt, stride_qd, DK, DV, BK, BC, BV, False, PRECISION)
    a = _diag_scores(q_bh, k_bh, g_bh, rows, t_ok, stride_qt, stride_qd, stride_kt, stride_kd, DK, BK, BC)
    v = tl.load(v_bh + rows[:, None] * stride_vt + offs_v[None, :] * stride_vd,
                mask=t_ok[:, None] & v_ok[None, :], other=0.0).to(tl.float32)
    b_o = tl.dot(a, v, b_o, input_precision=PRECISION)
    for j in range(0, i_c):  # earlier sub-chunks of the chunk
        rows_j = c * BT + j * BC + tl.arange(0, BC)
        a = _cross_scores(q_bh, k_bh, g_bh, rows, t_ok, rows_j, rows_j < T, c * BT + i_c * BC,
                          stride_qt, stride_qd, stride_kt, stride_kd, DK, BK, BC, PRECISION)
        v = tl.load(v_bh + rows_j[:, None] * stride_vt + offs_v[None, :] * stride_vd,
                    mask=(rows_j < T)[:, None] & v_ok[None, :], other=0.0).to(tl.float32)
        b_o = tl.dot(a, v, b_o, input_precision=PRECISION)
    tl.store(O + i_b * stride_ob + i_h * stride_oh + rows[:, None] * stride_ot + offs_v[None, :] * stride_od,
             b_o * scale, mask=t_ok[:, None] & v_ok[None, :])


@triton.jit
def _gla_bwd_dv(Q, K, DO, GC, DHS, DVo,
                stride_qb, stride_qt, stride_qh, stride_qd,
                stride_kb, stride_kt, stride_kh, stride_kd,
                stride_db, stride_dt, stride_dh, stride_dd,
                stride_vb, stride_vt, stride_vh, stride_vd,
                T, H, NT, scale,
                DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                BV: tl.constexpr, PRECISION: tl.constexpr):
    """dv of one (sub-chunk, Dv tile, b*h): (K e^(b_last - b)) dS_c + scale sum_{i >= j} A_ij do_i."""
    NC: tl.constexpr = BT // BC
    i_s = tl.program_id(0)
    i_v = tl.program_id(1)
    i_bh = tl.program_id(2)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    c = i_s // NC
    i_c = i_s % NC
    rows = c * BT + i_c * BC + tl.arange(0, BC)
    t_ok = rows < T
    offs_v = i_v * BV + tl.arange(0, BV)
    v_ok = offs_v < DV
    q_bh = Q + i_b * stride_qb + i_h * stride_qh
    k_bh = K + i_b * stride_kb + i_h * stride_kh
    do_bh = DO + i_b * stride_db + i_h * stride_dh
    g_bh = GC + i_bh.to(tl.int64) * NT * BT * DK
    b_dv = _decayed_rows_state(k_bh, g_bh, DHS + (i_bh.to(tl.int64) * NT + c) * DK * DV, rows, t_ok,
                               c * BT + BT - 1, offs_v, v_ok, stride_kt, stride_kd, DK, DV, BK, BC, BV, True,
                               PRECISION)
    a = _diag_scores(q_bh, k_bh, g_bh, rows, t_ok, stride_qt, stride_qd, stride_kt, stride_kd, DK, BK, BC)
    do = tl.load(do_bh + rows[:, None] * stride_dt + offs_v[None, :] * stride_dd,
                 mask=t_ok[:, None] & v_ok[None, :], other=0.0).to(tl.float32)
    b_dv = tl.dot(tl.trans(a * scale), do, b_dv, input_precision=PRECISION)
    for i in range(i_c + 1, tl.minimum(NC, tl.cdiv(T - c * BT, BC))):  # later sub-chunks holding tokens
        rows_i = c * BT + i * BC + tl.arange(0, BC)
        a = _cross_scores(q_bh, k_bh, g_bh, rows_i, rows_i < T, rows, t_ok, c * BT + i * BC,
                          stride_qt, stride_qd, stride_kt, stride_kd, DK, BK, BC, PRECISION)
        do = tl.load(do_bh + rows_i[:, None] * stride_dt + offs_v[None, :] * stride_dd,
                     mask=(rows_i < T)[:, None] & v_ok[None, :], other=0.0).to(tl.float32)
        b_dv = tl.dot(tl.trans(a * scale), do, b_dv, input_precision=PRECISION)
    tl.store(DVo + i_b * stride_vb + i_h * stride_vh + rows[:, None] * stride_vt + offs_v[None, :] * stride_vd,
             b_dv, mask=t_ok[:, None] & v_ok[None, :])


@triton.jit
def _gla_bwd_dqk(Q, K, V, DO, GC, HS, DHS, DQ, DKo, DGP,
                 stride_qb, stride_qt, stride_qh, stride_qd,
                 stride_kb, stride_kt, stride_kh, stride_kd,
                 stride_vb, stride_vt, stride_vh, stride_vd,
                 stride_db, stride_dt, stride_dh, stride_dd,
                 stride_gb, stride_gt, stride_gh, stride_gd,
                 T, H, NT, scale,
                 DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                 BV: tl.constexpr, PRECISION: tl.constexpr):
    """dq, dk and q dq - k dk of one (sub-chunk, Dk tile, b*h), with dA_ij = scale do_i . v_j (j <= i):
    dq_i = scale e^b_i (dO S_c^T)_i + sum_j dA_ij k_j e^(b_i - b_j),
    dk_j = e^(b_last - b_j) (V dS_c^T)_j + sum_i dA_ij q_i e^(b_i - b_j)."""
    NC: tl.constexpr = BT // BC
    i_s = tl.program_id(0)
    i_k = tl.program_id(1)
    i_bh = tl.program_id(2)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    c = i_s // NC
    i_c = i_s % NC
    first = c * BT + i_c * BC
    rows = first + tl.arange(0, BC)
    t_ok = rows < T
    offs_k = i_k * BK + tl.arange(0, BK)
    k_ok = offs_k < DK
    tile = t_ok[:, None] & k_ok[None, :]
    q_bh = Q + i_b * stride_qb + i_h * stride_qh
    k_bh = K + i_b * stride_kb + i_h * stride_kh
    v_bh = V + i_b * stride_vb + i_h * stride_vh
    do_bh = DO + i_b * stride_db + i_h * stride_dh
    g_bh = GC + i_bh.to(tl.int64) * NT * BT * DK
    state_c = (i_bh.to(tl.int64) * NT + c) * DK * DV
    q = tl.load(q_bh + rows[:, None] * stride_qt + offs_k[None, :] * stride_qd, mask=tile, other=0.0).to(tl.float32)
    k = tl.load(k_bh + rows[:, None] * stride_kt + offs_k[None, :] * stride_kd, mask=tile, other=0.0).to(tl.float32)
    g = tl.load(g_bh + rows[:, None] * DK + offs_k[None, :], mask=k_ok[None, :], other=0.0)
    g_first = tl.load(g_bh + first * DK + offs_k, mask=k_ok, other=0.0)[None, :]
    g_sub_last = tl.load(g_bh + (first + BC - 1) * DK + offs_k, mask=k_ok, other=0.0)[None, :]
    g_last = tl.load(g_bh + (c * BT + BT - 1) * DK + offs_k, mask=k_ok, other=0.0)[None, :]
    # between chunks: the state at the chunk's start and the state gradient at its end
    b_dq = _rows_state_t(do_bh, HS + state_c, rows, t_ok, offs_k, k_ok, stride_dt, stride_dd,
                         DV, BV, BC, BK, PRECISION) * (tl.exp(g) * scale)
    b_dk = _rows_state_t(v_bh, DHS + state_c, rows, t_ok, offs_k, k_ok, stride_vt, stride_vd,
                         DV, BV, BC, BK, PRECISION) * tl.exp(g_last - g)
    # the diagonal sub-block, exactly
    da = _value_scores(do_bh, v_bh, rows, t_ok, rows, t_ok, stride_dt, stride_dd, stride_vt, stride_vd,
                       DV, BV, BC, PRECISION) * scale
    e = _diag_decay(g, BC) * da[:, :, None]
    b_dq += tl.sum(e * k[None, :, :], 1)
    b_dk += tl.sum(e * q[:, None, :], 0)
    # earlier key sub-chunks (dq), factorised through this sub-chunk's first row
    acc = tl.zeros([BC, BK], dtype=tl.float32)
    for j in range(0, i_c):
        rows_j = c * BT + j * BC + tl.arange(0, BC)
        tj = (rows_j < T)[:, None] & k_ok[None, :]
        da = _value_scores(do_bh, v_bh, rows, t_ok, rows_j, rows_j < T, stride_dt, stride_dd, stride_vt, stride_vd,
                           DV, BV, BC, PRECISION)
        kj = tl.load(k_bh + rows_j[:, None] * stride_kt + offs_k[None, :] * stride_kd, mask=tj, other=0.0)
        gj = tl.load(g_bh + rows_j[:, None] * DK + offs_k[None, :], mask=k_ok[None, :], other=0.0)
        acc = tl.dot(da, kj.to(tl.float32) * tl.exp(g_first - gj), acc, input_precision=PRECISION)
    b_dq += acc * (tl.exp(g - g_first) * scale)
    # later query sub-chunks holding tokens (dk), factorised through this sub-chunk's last row
    acc = tl.zeros([BC, BK], dtype=tl.float32)
    for i in range(i_c + 1, tl.minimum(NC, tl.cdiv(T - c * BT, BC))):
        rows_i = c * BT + i * BC + tl.arange(0, BC)
        ti = (rows_i < T)[:, None] & k_ok[None, :]
        da = _value_scores(do_bh, v_bh, rows_i, rows_i < T, rows, t_ok, stride_dt, stride_dd, stride_vt, stride_vd,
                           DV, BV, BC, PRECISION)
        qi = tl.load(q_bh + rows_i[:, None] * stride_qt + offs_k[None, :] * stride_qd, mask=ti, other=0.0)
        gi = tl.load(g_bh + rows_i[:, None] * DK + offs_k[None, :], mask=k_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(da), qi.to(tl.float32) * tl.exp(gi - g_sub_last), acc, input_precision=PRECISION)
    b_dk += acc * (tl.exp(g_sub_last - g) * scale)
    out = i_b * stride_gb + i_h * stride_gh + rows[:, None] * stride_gt + offs_k[None, :] * stride_gd
    tl.store(DQ + out, b_dq, mask=tile)
    tl.store(DKo + out, b_dk, mask=tile)
    tl.store(DGP + out, q * b_dq - k * b_dk, mask=tile)


# launches
# --------------------------------------------------------------------------------------------


def _configs():
    # (2 warps spill: the [BC, BC, BK] diagonal products and the accumulators need the registers)
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2, 3)]


def _state_configs():
    # the sequential state passes: more, smaller (BK, BV) tiles mean more programs in flight
    return [triton.Config({"BK": bk, "BV": bv}, num_warps=w, num_stages=s)
            for bk in (32, 64) for bv in (32, 64) for w in (4, 8) for s in (2, 3)]


def _prune_state(configs, named_args, **kwargs):
    dk, dv = kwargs["DK"], kwargs["DV"]
    kept = [c for c in configs if c.kwargs["BK"] <= max(32, triton.next_power_of_2(dk))
            and c.kwargs["BV"] <= max(32, triton.next_power_of_2(dv))]
    return kept or configs[:1]


_KEY = ["DK", "DV", "BT", "BC", "BK", "BV"]
_raw = {"state": _gla_state_pass, "fwd_o": _gla_fwd_o, "bwd_dv": _gla_bwd_dv, "bwd_dqk": _gla_bwd_dqk}
_tuned = {
    name: (triton.autotune(configs=_state_configs(), key=["DK", "DV", "BT", "REVERSE"],
                           prune_configs_by={"early_config_prune": _prune_state})(fn)
           if name == "state" else triton.autotune(configs=_configs(), key=_KEY)(fn))
    for name, fn in _raw.items()
}


def _launch(name: str, grid, *args, **meta) -> None:
    """Launch kernel ``name``; ``grid`` is a tuple, or a function of the meta-parameters for the
    state pass, whose (BK, BV) tiles are autotuned."""
    check_launch_device(args[0], "GlaChunkedRun")
    if interpreting():  # no driver to time configs: launch directly
        _raw[name][grid(meta) if callable(grid) else grid](*args, **meta)
        return
    if name == "state":
        meta = {k: v for k, v in meta.items() if k not in ("BK", "BV")}
    with torch.cuda.device(args[0].device):  # launch on the tensors' GPU, not the current one
        _tuned[name][grid](*args, **meta)


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> None:
    check_gla_inputs(q, k, v, g)
    ok = (torch.float16, torch.bfloat16, torch.float32)
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in ok or g.dtype not in ok + (torch.float64,):
        raise ValueError(f"unsupported dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}, g {g.dtype} for the Triton "
                         "kernels (q, k, v: one of float16, bfloat16, float32)")
    for name, t in (("k", k), ("v", v), ("g", g)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if q.shape[1] == 0:
        raise ValueError("a run needs at least one token")
    if q.shape[-1] > 256 or v.shape[-1] > 256:
        raise ValueError(f"head dims up to 256 are supported; got Dk={q.shape[-1]}, Dv={v.shape[-1]}")
    check_int32_offsets(q=q, k=k, v=v)


def _check_state(name: str, t: torch.Tensor, shape: tuple, device) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must be [B, H, Dk, Dv] = {shape}; got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")


def _chunk(chunk_size: int | None) -> int:
    # the chunk length changes only the rounding: use it when it is a tile size
    return chunk_size if chunk_size in (16, 32, 64, 128) else DEFAULT_CHUNK


def _gate_cumsum(g: torch.Tensor, NT: int, BT: int) -> torch.Tensor:
    """Chunk-local cumulative log gates [B*H, NT*BT, Dk] fp32, zero-padded past T (flat there)."""
    B, T, H, Dk = g.shape
    gp = torch.zeros(B, H, NT * BT, Dk, dtype=torch.float32, device=g.device)
    gp[:, :, :T] = g.transpose(1, 2)
    return gp.view(B * H, NT, BT, Dk).cumsum(2).view(B * H, NT * BT, Dk)


def _meta(q: torch.Tensor, Dk: int, Dv: int, BT: int) -> dict:
    return dict(DK=Dk, DV=Dv, BT=BT,
                BK=max(16, min(32, triton.next_power_of_2(Dk))),
                BV=max(16, min(32 if interpreting() or q.dtype == torch.float32 else 64, triton.next_power_of_2(Dv))),
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


# The launches, one function per kernel call: ``<stage>_empty`` allocates what ``<stage>`` returns
# (the fake implementation of its ``seqpar::gla_triton_<stage>`` op, seqpar.kernels.custom_ops);
# ``<stage>`` allocates the same and launches. q, k [B, T, H, Dk], v / do [B, T, H, Dv] with any
# strides, gc [B*H, NT*BT, Dk] (:func:`_gate_cumsum`), chunk states flat [B*H, NT, Dk, Dv] fp32
# contiguous, ``chunk`` the tile length BT.


def state_pass_empty(x: torch.Tensor, y: torch.Tensor, gc: torch.Tensor, init: torch.Tensor | None, scale: float,
                     chunk: int, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-chunk states [B*H, NT, Dk, Dv], state after the pass [B, H, Dk, Dv]) fp32, unfilled."""
    B, T, H, Dk = x.shape
    Dv = y.shape[-1]
    return (torch.empty(B * H, triton.cdiv(T, chunk), Dk, Dv, dtype=torch.float32, device=x.device),
            torch.empty(B, H, Dk, Dv, dtype=torch.float32, device=x.device))


def state_pass(x: torch.Tensor, y: torch.Tensor, gc: torch.Tensor, init: torch.Tensor | None, scale: float,
               chunk: int, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``_gla_state_pass``: forward (x, y = k, v) the state at every chunk start and after the run
    from ``init``; ``reverse`` (x, y = q, do) the state gradient at every chunk end and before the
    run from ``init`` = dht (None: zero)."""
    hs, last = state_pass_empty(x, y, gc, init, scale, chunk, reverse)
    B, T, H, Dk = x.shape
    Dv, NT = y.shape[-1], hs.shape[1]
    init_c = init.float().contiguous() if init is not None else hs
    grid = lambda META: (triton.cdiv(Dk, META["BK"]), triton.cdiv(Dv, META["BV"]), B * H)  # noqa: E731
    _launch("state", grid, x, y, gc, init_c, hs, last, *strides4(x), *strides4(y), T, H, NT, float(scale),
            REVERSE=reverse, USE_INIT=init is not None, **_meta(x, Dk, Dv, chunk))
    return hs, last


def fwd_o_empty(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gc: torch.Tensor, hs: torch.Tensor, scale: float,
                chunk: int) -> torch.Tensor:
    """o [B, T, H, Dv] fp32, unfilled."""
    B, T, H, _ = q.shape
    return torch.empty(B, T, H, v.shape[-1], dtype=torch.float32, device=q.device)


def fwd_o(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gc: torch.Tensor, hs: torch.Tensor, scale: float,
          chunk: int) -> torch.Tensor:
    """``_gla_fwd_o``: o from the chunk-start states ``hs``."""
    o = fwd_o_empty(q, k, v, gc, hs, scale, chunk)
    B, T, H, Dk = q.shape
    Dv, NT = v.shape[-1], hs.shape[1]
    meta = _meta(q, Dk, Dv, chunk)
    BC = min(SUB_CHUNK, chunk)
    _launch("fwd_o", (triton.cdiv(T, BC), triton.cdiv(Dv, meta["BV"]), B * H), q, k, v, gc, hs, o,
            *strides4(q), *strides4(k), *strides4(v), *strides4(o), T, H, NT, float(scale), BC=BC, **meta)
    return o


def bwd_empty(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, gc: torch.Tensor,
              hs: torch.Tensor, dhs: torch.Tensor, scale: float, chunk: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, per-channel gate terms [B, T, H, Dk]) fp32, unfilled."""
    B, T, H, Dk = q.shape
    dq = torch.empty(B, T, H, Dk, dtype=torch.float32, device=q.device)
    dk, dgp = torch.empty_like(dq), torch.empty_like(dq)
    return dq, dk, torch.empty(B, T, H, v.shape[-1], dtype=torch.float32, device=q.device), dgp


def bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, gc: torch.Tensor, hs: torch.Tensor,
        dhs: torch.Tensor, scale: float, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_gla_bwd_dv`` and ``_gla_bwd_dqk`` from the chunk-start states ``hs`` and the chunk-end
    state gradients ``dhs`` (the gate terms are turned into dg by the caller)."""
    dq, dk, dv, dgp = bwd_empty(q, k, v, do, gc, hs, dhs, scale, chunk)
    B, T, H, Dk = q.shape
    Dv, NT = v.shape[-1], hs.shape[1]
    meta = _meta(q, Dk, Dv, chunk)
    BC = min(SUB_CHUNK, chunk)
    n_sub = triton.cdiv(T, BC)  # sub-chunks holding tokens: the parallel kernels' first axis
    _launch("bwd_dv", (n_sub, triton.cdiv(Dv, meta["BV"]), B * H), q, k, do, gc, dhs, dv,
            *strides4(q), *strides4(k), *strides4(do), *strides4(dv), T, H, NT, float(scale), BC=BC, **meta)
    _launch("bwd_dqk", (n_sub, triton.cdiv(Dk, meta["BK"]), B * H), q, k, v, do, gc, hs, dhs, dq, dk, dgp,
            *strides4(q), *strides4(k), *strides4(v), *strides4(do), *strides4(dq), T, H, NT, float(scale),
            BC=BC, **meta)
    return dq, dk, dv, dgp


class TritonGlaChunkedRun:
    """One run of tokens of chunked GLA on the Triton kernels, in the stages of the chunked-run
    protocol (same methods and results as :class:`seqpar.kernels.gla_reference.GlaChunkedRun`, up
    to rounding): states (forward state pass) -> outputs (``_gla_fwd_o``); state gradients
    (reverse state pass) -> input gradients (``_gla_bwd_dv``, ``_gla_bwd_dqk``). Chunk states are
    fp32 [B, H, NT, Dk, Dv] views of the kernels' [B*H, NT, Dk, Dv] buffers. float64 inputs run
    on :class:`GlaChunkedRun`. Every launch goes through its ``seqpar::gla_triton_*`` op
    (:mod:`seqpar.kernels.custom_ops`)."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, g: torch.Tensor,
                 scale: float | None = None, chunk_size: int = DEFAULT_CHUNK):
        check_gla_inputs(q, k, v, g)
        self.B, self.T, self.H, self.Dk = q.shape
        self.Dv = v.shape[-1]
        self.cd = compute_dtype(q.dtype)
        self.scale = default_scale(q, scale)
        self._torch = None  # the torch run, for float64 inputs
        if q.dtype == torch.float64:
            self._torch = GlaChunkedRun(q, k, v, g=g, scale=scale, chunk_size=chunk_size)
            return
        _check(q, k, v, g)
        self.q, self.k, self.v = q, k, v
        self.BT = _chunk(chunk_size)
        self.NT = triton.cdiv(self.T, self.BT)
        self.gc = _gate_cumsum(g, self.NT, self.BT)
        self.log_chunk = self.gc.view(self.B, self.H, self.NT, self.BT, self.Dk)[:, :, :, -1].contiguous()

    @property
    def log_total(self) -> torch.Tensor:
        """Log decay of the whole run per key channel [B, H, Dk]."""
        return self._torch.log_total if self._torch is not None else self.log_chunk.sum(2)

    def transition(self) -> KeyDecay:
        """A of the whole run: diag(exp(log_total)) per head."""
        return KeyDecay(self.log_total)

    def _state_shape(self) -> tuple[int, int, int, int]:
        return self.B, self.H, self.Dk, self.Dv

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.B * self.H, self.NT, self.Dk, self.Dv).float().contiguous()

    def _state_pass(self, x: torch.Tensor, y: torch.Tensor, init: torch.Tensor | None, reverse: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        if init is not None:
            _check_state("initial_state" if not reverse else "dht", init, self._state_shape(), x.device)
        hs, last = custom_ops.gla_triton_state(x, y, self.gc, init, float(self.scale), self.BT, reverse)
        return hs.view(self.B, self.H, self.NT, self.Dk, self.Dv), last

    def states(self, initial_state: torch.Tensor | None = None) -> ChunkStates:
        """Stage 1 of the forward: the state at every chunk start and after the run."""
        if self._torch is not None:
            return self._torch.states(initial_state)
        return ChunkStates(*self._state_pass(self.k, self.v, initial_state, reverse=False))

    def with_initial_state(self, states: ChunkStates, initial_state: torch.Tensor) -> ChunkStates:
        """The states of this run started from ``initial_state`` (``states`` were computed from zero)."""
        if self._torch is not None:
            return self._torch.with_initial_state(states, initial_state)
        return shift_states(states, self.log_chunk, initial_state.float())

    def outputs(self, states: ChunkStates) -> torch.Tensor:
        """Stage 2 of the forward: o [B, T, H, Dv] fp32."""
        if self._torch is not None:
            return self._torch.outputs(states)
        return custom_ops.gla_triton_fwd_o(self.q, self.k, self.v, self.gc, self._flat(states.starts),
                                           float(self.scale), self.BT)

    def _grad_input(self, do: torch.Tensor) -> torch.Tensor:
        if tuple(do.shape) != (self.B, self.T, self.H, self.Dv):
            raise ValueError(f"do must be [B, T, H, Dv] = {(self.B, self.T, self.H, self.Dv)}; got {tuple(do.shape)}")
        if do.dtype == torch.float64:
            do = do.float()
        check_int32_offsets(do=do)
        return do

    def state_grads(self, do: torch.Tensor, dht: torch.Tensor | None = None) -> ChunkStateGrads:
        """Stage 1 of the backward: the state gradient at every chunk end and before the run."""
        if self._torch is not None:
            return self._torch.state_grads(do, dht)
        return ChunkStateGrads(*self._state_pass(self.q, self._grad_input(do), dht, reverse=True))

    def with_final_grad(self, grads: ChunkStateGrads, dht: torch.Tensor) -> ChunkStateGrads:
        """The state gradients with final-state gradient ``dht`` (``grads`` were computed with none)."""
        if self._torch is not None:
            return self._torch.with_final_grad(grads, dht)
        return shift_state_grads(grads, self.log_chunk, dht.float())

    def input_grads(self, do: torch.Tensor, states: ChunkStates, grads: ChunkStateGrads,
                    dht: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Stage 2 of the backward: {"q": dq, "k": dk, "v": dv, "g": dg} fp32 from the chunk
        states and state gradients of the run (with its initial state / final-state gradient
        ``dht``, which dg's boundary term needs too)."""
        if self._torch is not None:
            return self._torch.input_grads(do, states, grads, dht)
        dq, dk, dv, dgp = custom_ops.gla_triton_bwd(self.q, self.k, self.v, self._grad_input(do), self.gc,
                                                    self._flat(states.starts), self._flat(grads.ends),
                                                    float(self.scale), self.BT)
        if dht is not None:
            _check_state("dht", dht, self._state_shape(), self.q.device)
        dg = key_gate_grad(dgp, dht, states.final if dht is not None else None)
        return {"q": dq, "k": dk, "v": dv, "g": dg}
