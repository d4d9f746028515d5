"""Triton chunked linear attention with optional decay (Lightning Attention-2 tiling).

Conventions are those of :mod:`seqpar.kernels.linear_reference` (the oracle): q, k [B, T, H, Dk],
v [B, T, H, Dv] (any strides), log gates ``g`` [B, T, H] per token or ``g_gamma`` [H] per head or
neither, recurrence S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = scale * S_t^T q_t, states
[B, H, Dk, Dv] fp32; outputs and gradients fp32.

Kernels (after flash-linear-attention's ``chunk_simple_gla``), chunk length BT (64):

* ``_lin_fwd_h``: one program per (Dk tile, Dv tile, b*h) walks the chunks in order and writes
  the state at the start of every chunk (and the final state):
  S_{c+1} = exp(b_last) S_c + (K * exp(b_last - b))^T V, with b the chunk-local cumulative
  log-gate (every exponent is <= 0 for gates <= 0).
* ``_lin_fwd_o``: fully parallel over (Dv tile, chunk, b*h): O = scale * [(Q K^T * D) V +
  (Q * exp(b)) S_c], D_ij = exp(b_i - b_j) for j <= i (0 above the diagonal).
* :class:`TritonChunkedRun` exposes these launches as the stages of the reference's
  ``ChunkedRun`` (what the sequence-parallel strategies call); the two functions at the end are
  those stages in a row.
* backward: ``_lin_bwd_dh`` walks the chunks in reverse and writes dS at the end of every chunk
  (starting from ``dht``; the value left at the start is dh0); ``_lin_bwd_dv`` and
  ``_lin_bwd_dqk`` are parallel over chunks and recompute the intra-chunk terms. The gate
  gradient dg_t = sum_{i>=t} (q_i.dq_i - k_i.dk_i) + <dht, S_T> is a reverse cumsum in torch.

The per-chunk states are kept in fp32 (bf16 for bf16 inputs, as fla does). float64 inputs fall
back to the reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqpar.kernels.linear_transitions import ScalarDecay
from seqpar.kernels import custom_ops
from seqpar.kernels.triton_common import check_int32_offsets, check_launch_device, interpreting, strides4

from seqpar.kernels.linear_reference import (
    ChunkStateGrads,
    ChunkStates,
    chunk_linear_attention_backward_reference,
    chunk_linear_attention_forward_reference,
    default_scale,
    grads_dict,
    shift_state_grads,
    shift_states,
)

__all__ = ["TritonChunkedRun", "chunk_linear_attention_forward_triton", "chunk_linear_attention_backward_triton"]

DEFAULT_CHUNK = 64


def _configs():
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3, 4)]


_KEY = ["DK", "DV", "BT", "BK", "BV"]


@triton.jit
def _lin_fwd_h(K, V, GC, H0, HS, HT,
               stride_kb, stride_kt, stride_kh, stride_kd,
               stride_vb, stride_vt, stride_vh, stride_vd,
               T, H, NT,
               DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               USE_G: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    i_k = tl.program_id(0)
    i_v = tl.program_id(1)
    i_bh = tl.program_id(2)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    offs_t0 = tl.arange(0, BT)
    state_off = offs_k[:, None] * DV + offs_v[None, :]
    state_mask = k_ok[:, None] & v_ok[None, :]
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(H0 + i_bh.to(tl.int64) * DK * DV + state_off, mask=state_mask, other=0.0)
    k_base = K + i_b * stride_kb + i_h * stride_kh
    v_base = V + i_b * stride_vb + i_h * stride_vh
    g_base = GC + i_bh.to(tl.int64) * NT * BT
    hs_base = HS + i_bh.to(tl.int64) * NT * DK * DV
    for c in range(0, NT):
        tl.store(hs_base + c * DK * DV + state_off, b_h.to(HS.dtype.element_ty), mask=state_mask)
        offs_t = c * BT + offs_t0
        t_ok = offs_t < T
        k = tl.load(k_base + offs_t[:, None] * stride_kt + offs_k[None, :] * stride_kd,
                    mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        v = tl.load(v_base + offs_t[:, None] * stride_vt + offs_v[None, :] * stride_vd,
                    mask=t_ok[:, None] & v_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if USE_G:
            b_g = tl.load(g_base + offs_t)
            b_last = tl.load(g_base + c * BT + BT - 1)
            b_h *= tl.exp(b_last)
            k = (k * tl.exp(b_last - b_g)[:, None]).to(v.dtype)
        b_h = tl.dot(tl.trans(k), v, b_h, input_precision=PRECISION)
    if STORE_HT:
        tl.store(HT + i_bh.to(tl.int64) * DK * DV + state_off, b_h, mask=state_mask)


@triton.jit
def _lin_fwd_o(Q, K, V, GC, HS, O,
               stride_qb, stride_qt, stride_qh, stride_qd,
               stride_kb, stride_kt, stride_kh, stride_kd,
               stride_vb, stride_vt, stride_vh, stride_vd,
               stride_ob, stride_ot, stride_oh, stride_od,
               T, H, NT, scale,
               DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               USE_G: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
               PRECISION_H: tl.constexpr):
    i_v = tl.program_id(0)
    c = tl.program_id(1)
    i_bh = tl.program_id(2)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    offs_t = c * BT + tl.arange(0, BT)
    t_ok = offs_t < T
    offs_v = i_v * BV + tl.arange(0, BV)
    v_ok = offs_v < DV
    q_base = Q + i_b * stride_qb + i_h * stride_qh
    k_base = K + i_b * stride_kb + i_h * stride_kh
    h_base = HS + i_bh.to(tl.int64) * NT * DK * DV + c * DK * DV
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_a = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(DK, BK)):
        offs_k = i_k * BK + tl.arange(0, BK)
        k_ok = offs_k < DK
        q = tl.load(q_base + offs_t[:, None] * stride_qt + offs_k[None, :] * stride_qd,
                    mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        k = tl.load(k_base + offs_t[:, None] * stride_kt + offs_k[None, :] * stride_kd,
                    mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        h = tl.load(h_base + offs_k[:, None] * DV + offs_v[None, :], mask=k_ok[:, None] & v_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            k = k.to(tl.float32)
            h = h.to(tl.float32)
        b_o = tl.dot(q.to(h.dtype), h, b_o, input_precision=PRECISION_H)
        b_a = tl.dot(q, tl.trans(k), b_a, input_precision=PRECISION)
    causal = offs_t[:, None] >= offs_t[None, :]
    if USE_G:
        b_g = tl.load(GC + i_bh.to(tl.int64) * NT * BT + offs_t)
        b_o *= tl.exp(b_g)[:, None]
        b_a *= tl.exp(tl.where(causal, b_g[:, None] - b_g[None, :], float("-inf")))
    b_a = tl.where(causal, b_a, 0.0)
    v = tl.load(V + i_b * stride_vb + i_h * stride_vh + offs_t[:, None] * stride_vt + offs_v[None, :] * stride_vd,
                mask=t_ok[:, None] & v_ok[None, :], other=0.0)
    if UPCAST:
        v = v.to(tl.float32)
    b_o = tl.dot(b_a.to(v.dtype), v, b_o, input_precision=PRECISION)
    tl.store(O + i_b * stride_ob + i_h * stride_oh + offs_t[:, None] * stride_ot + offs_v[None, :] * stride_od,
             b_o * scale, mask=t_ok[:, None] & v_ok[None, :])


@triton.jit
def _lin_bwd_dh(Q, DO, GC, DHT, DHS, DH0,
                stride_qb, stride_qt, stride_qh, stride_qd,
                stride_db, stride_dt, stride_dh, stride_dd,
                T, H, NT, scale,
                DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                USE_G: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    i_k = tl.program_id(0)
    i_v = tl.program_id(1)
    i_bh = tl.program_id(2)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    offs_t0 = tl.arange(0, BT)
    state_off = offs_k[:, None] * DV + offs_v[None, :]
    state_mask = k_ok[:, None] & v_ok[None, :]
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_dh += tl.load(DHT + i_bh.to(tl.int64) * DK * DV + state_off, mask=state_mask, other=0.0)
    q_base = Q + i_b * stride_qb + i_h * stride_qh
    do_base = DO + i_b * stride_db + i_h * stride_dh
    g_base = GC + i_bh.to(tl.int64) * NT * BT
    dhs_base = DHS + i_bh.to(tl.int64) * NT * DK * DV
    for cc in range(0, NT):
        c = NT - 1 - cc
        tl.store(dhs_base + c * DK * DV + state_off, b_dh.to(DHS.dtype.element_ty), mask=state_mask)
        offs_t = c * BT + offs_t0
        t_ok = offs_t < T
        q = tl.load(q_base + offs_t[:, None] * stride_qt + offs_k[None, :] * stride_qd,
                    mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        do = tl.load(do_base + offs_t[:, None] * stride_dt + offs_v[None, :] * stride_dd,
                     mask=t_ok[:, None] & v_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        q = q * scale
        if USE_G:
            b_g = tl.load(g_base + offs_t)
            b_last = tl.load(g_base + c * BT + BT - 1)
            b_dh *= tl.exp(b_last)
            q = q * tl.exp(b_g)[:, None]
        b_dh = tl.dot(tl.trans(q.to(do.dtype)), do, b_dh, input_precision=PRECISION)
    if STORE_DH0:
        tl.store(DH0 + i_bh.to(tl.int64) * DK * DV + state_off, b_dh, mask=state_mask)


@triton.jit
def _lin_bwd_dv(Q, K, DO, GC, DHS, DVo,
                stride_qb, stride_qt, stride_qh, stride_qd,
                stride_kb, stride_kt, stride_kh, stride_kd,
                stride_db, stride_dt, stride_dh, stride_dd,
                stride_vb, stride_vt, stride_vh, stride_vd,
                T, H, NT, scale,
                DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                USE_G: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                PRECISION_H: tl.constexpr):
    i_v = tl.program_id(0)
    c = tl.program_id(1)
    i_bh = tl.program_id(2)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    offs_t = c * BT + tl.arange(0, BT)
    t_ok = offs_t < T
    offs_v = i_v * BV + tl.arange(0, BV)
    v_ok = offs_v < DV
    q_base = Q + i_b * stride_qb + i_h * stride_qh
    k_base = K + i_b * stride_kb + i_h * stride_kh
    dh_base = DHS + i_bh.to(tl.int64) * NT * DK * DV + c * DK * DV
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    b_at = tl.zeros([BT, BT], dtype=tl.float32)  # [j, t] = k_j . q_t
    for i_k in range(0, tl.cdiv(DK, BK)):
        offs_k = i_k * BK + tl.arange(0, BK)
        k_ok = offs_k < DK
        q = tl.load(q_base + offs_t[:, None] * stride_qt + offs_k[None, :] * stride_qd,
                    mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        k = tl.load(k_base + offs_t[:, None] * stride_kt + offs_k[None, :] * stride_kd,
                    mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        dh = tl.load(dh_base + offs_k[:, None] * DV + offs_v[None, :], mask=k_ok[:, None] & v_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            k = k.to(tl.float32)
            dh = dh.to(tl.float32)
        b_dv = tl.dot(k.to(dh.dtype), dh, b_dv, input_precision=PRECISION_H)
        b_at = tl.dot(k, tl.trans(q), b_at, input_precision=PRECISION)
    causal = offs_t[:, None] <= offs_t[None, :]  # j <= t
    if USE_G:
        g_base = GC + i_bh.to(tl.int64) * NT * BT
        b_g = tl.load(g_base + offs_t)
        b_last = tl.load(g_base + c * BT + BT - 1)
        b_dv *= tl.exp(b_last - b_g)[:, None]
        b_at *= tl.exp(tl.where(causal, b_g[None, :] - b_g[:, None], float("-inf")))
    b_at = tl.where(causal, b_at, 0.0) * scale
    do = tl.load(DO + i_b * stride_db + i_h * stride_dh + offs_t[:, None] * stride_dt + offs_v[None, :] * stride_dd,
                 mask=t_ok[:, None] & v_ok[None, :], other=0.0)
    if UPCAST:
        do = do.to(tl.float32)
    b_dv = tl.dot(b_at.to(do.dtype), do, b_dv, input_precision=PRECISION)
    tl.store(DVo + i_b * stride_vb + i_h * stride_vh + offs_t[:, None] * stride_vt + offs_v[None, :] * stride_vd,
             b_dv, mask=t_ok[:, None] & v_ok[None, :])


@triton.jit
def _lin_bwd_dqk(Q, K, V, DO, GC, HS, DHS, DQ, DKo, DGP,
                 stride_qb, stride_qt, stride_qh, stride_qd,
                 stride_kb, stride_kt, stride_kh, stride_kd,
                 stride_vb, stride_vt, stride_vh, stride_vd,
                 stride_db, stride_dt, stride_dh, stride_dd,
                 stride_gb, stride_gt, stride_gh, stride_gd,
                 T, H, NT, scale,
                 DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 USE_G: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                 PRECISION_H: tl.constexpr, STORE_DG: tl.constexpr):
    i_k = tl.program_id(0)
    c = tl.program_id(1)
    i_bh = tl.program_id(2)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    offs_t = c * BT + tl.arange(0, BT)
    t_ok = offs_t < T
    offs_k = i_k * BK + tl.arange(0, BK)
    k_ok = offs_k < DK
    v_base = V + i_b * stride_vb + i_h * stride_vh
    do_base = DO + i_b * stride_db + i_h * stride_dh
    state = i_bh.to(tl.int64) * NT * DK * DV + c * DK * DV
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_da = tl.zeros([BT, BT], dtype=tl.float32)  # [t, j] = do_t . v_j
    for i_v in range(0, tl.cdiv(DV, BV)):
        offs_v = i_v * BV + tl.arange(0, BV)
        v_ok = offs_v < DV
        v = tl.load(v_base + offs_t[:, None] * stride_vt + offs_v[None, :] * stride_vd,
                    mask=t_ok[:, None] & v_ok[None, :], other=0.0)
        do = tl.load(do_base + offs_t[:, None] * stride_dt + offs_v[None, :] * stride_dd,
                     mask=t_ok[:, None] & v_ok[None, :], other=0.0)
        hmask = k_ok[:, None] & v_ok[None, :]
        h = tl.load(HS + state + offs_k[:, None] * DV + offs_v[None, :], mask=hmask, other=0.0)
        dh = tl.load(DHS + state + offs_k[:, None] * DV + offs_v[None, :], mask=hmask, other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
            do = do.to(tl.float32)
            h = h.to(tl.float32)
            dh = dh.to(tl.float32)
        b_dq = tl.dot(do.to(h.dtype), tl.trans(h), b_dq, input_precision=PRECISION_H)
        b_dk = tl.dot(v.to(dh.dtype), tl.trans(dh), b_dk, input_precision=PRECISION_H)
        b_da = tl.dot(do, tl.trans(v), b_da, input_precision=PRECISION)
    causal = offs_t[:, None] >= offs_t[None, :]  # t >= j
    if USE_G:
        g_base = GC + i_bh.to(tl.int64) * NT * BT
        b_g = tl.load(g_base + offs_t)
        b_last = tl.load(g_base + c * BT + BT - 1)
        b_dq *= tl.exp(b_g)[:, None]
        b_dk *= tl.exp(b_last - b_g)[:, None]
        b_da *= tl.exp(tl.where(causal, b_g[:, None] - b_g[None, :], float("-inf")))
    b_da = tl.where(causal, b_da, 0.0) * scale
    q = tl.load(Q + i_b * stride_qb + i_h * stride_qh + offs_t[:, None] * stride_qt + offs_k[None, :] * stride_qd,
                mask=t_ok[:, None] & k_ok[None, :], other=0.0)
    k = tl.load(K + i_b * stride_kb + i_h * stride_kh + offs_t[:, None] * stride_kt + offs_k[None, :] * stride_kd,
                mask=t_ok[:, None] & k_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        k = k.to(tl.float32)
    b_dq = b_dq * scale
    b_dq = tl.dot(b_da.to(k.dtype), k, b_dq, input_precision=PRECISION)
    b_dk = tl.dot(tl.trans(b_da).to(q.dtype), q, b_dk, input_precision=PRECISION)
    out = offs_t[:, None] * stride_gt + offs_k[None, :] * stride_gd
    omask = t_ok[:, None] & k_ok[None, :]
    tl.store(DQ + i_b * stride_gb + i_h * stride_gh + out, b_dq, mask=omask)
    tl.store(DKo + i_b * stride_gb + i_h * stride_gh + out, b_dk, mask=omask)
    if STORE_DG:
        # this Dk tile's share of q.dq - k.dk per token (the gate gradient before its reverse cumsum)
        dgp = tl.sum(q.to(tl.float32) * b_dq - k.to(tl.float32) * b_dk, 1)
        row = i_k.to(tl.int64) * tl.num_programs(2) + i_bh  # DGP is [NK, B*H, NT*BT]
        tl.store(DGP + row * NT * BT + offs_t, dgp, mask=t_ok)


def _state_configs():
    # the sequential state kernels: more, smaller (BK, BV) tiles mean more programs in flight
    return [triton.Config({"BK": bk, "BV": bv}, num_warps=w, num_stages=s)
            for bk in (32, 64) for bv in (32, 64) for w in (4, 8) for s in (2, 3)]


def _prune_state(configs, named_args, **kwargs):
    dk, dv = kwargs["DK"], kwargs["DV"]
    kept = [c for c in configs
            if c.kwargs["BK"] <= max(32, triton.next_power_of_2(dk)) and c.kwargs["BV"] <= max(32, triton.next_power_of_2(dv))]
    return kept or configs[:1]


_STATE_KERNELS = ("fwd_h", "bwd_dh")
_raw = {"fwd_h": _lin_fwd_h, "fwd_o": _lin_fwd_o, "bwd_dh": _lin_bwd_dh, "bwd_dv": _lin_bwd_dv,
        "bwd_dqk": _lin_bwd_dqk}
_tuned = {
    name: (triton.autotune(configs=_state_configs(), key=["DK", "DV", "BT"],
                           prune_configs_by={"early_config_prune": _prune_state})(fn)
           if name in _STATE_KERNELS else triton.autotune(configs=_configs(), key=_KEY)(fn))
    for name, fn in _raw.items()
}


def _launch(name: str, grid, *args, **meta) -> None:
    """Launch kernel ``name``; ``grid`` is a tuple, or a function of the meta-parameters for the
    state kernels, whose (BK, BV) tiles are autotuned."""
    check_launch_device(args[0])
    if interpreting():
        # Under the interpreter the autotuner would try to time configs (no driver): launch directly.
        _raw[name][grid(meta) if callable(grid) else grid](*args, **meta)
        return
    if name in _STATE_KERNELS:
        meta = {k: v for k, v in meta.items() if k not in ("BK", "BV")}
    with torch.cuda.device(args[0].device):  # launch on the tensors' GPU, not the current one
        _tuned[name][grid](*args, **meta)


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g, g_gamma, initial_state) -> None:
    if q.dim() != 4 or tuple(k.shape) != tuple(q.shape) or v.dim() != 4 or tuple(v.shape[:3]) != tuple(q.shape[:3]):
        raise ValueError(f"expected q, k [B, T, H, Dk] and v [B, T, H, Dv]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"unsupported dtypes {q.dtype}, {k.dtype}, {v.dtype} for the Triton kernel")
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    if g is not None and g_gamma is not None:
        raise ValueError("give either g or g_gamma, not both")
    for name, t in (("k", k), ("v", v), ("g", g), ("g_gamma", g_gamma), ("initial_state", initial_state)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if g is not None and tuple(g.shape) != (B, T, H):
        raise ValueError(f"g must be [B, T, H] = {(B, T, H)}; got {tuple(g.shape)}")
    if g_gamma is not None and tuple(g_gamma.shape) != (H,):
        raise ValueError(f"g_gamma must be [H] = ({H},); got {tuple(g_gamma.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (B, H, Dk, Dv):
        raise ValueError(f"initial_state must be [B, H, Dk, Dv] = {(B, H, Dk, Dv)}; got {tuple(initial_state.shape)}")
    check_int32_offsets(q=q, k=k, v=v)
    if Dk > 256 or Dv > 256:
        raise ValueError(f"head dims up to 256 are supported; got Dk={Dk}, Dv={Dv}")


def _chunk(chunk_size: int | None) -> int:
    # The chunk length changes only the rounding, not the result: use it when it is a tile size.
    if chunk_size is not None and chunk_size in (16, 32, 64, 128):
        return chunk_size
    return DEFAULT_CHUNK


def _meta(q: torch.Tensor, Dk: int, Dv: int, BT: int) -> dict:
    # fp32 (IEEE FMA dots) spills with 64-wide tiles (ptxas, sm_90): 32 there; 64 for 16-bit inputs
    cap = 32 if interpreting() or q.dtype == torch.float32 else 64
    fp32 = q.dtype == torch.float32
    return dict(DK=Dk, DV=Dv, BT=BT,
                BK=max(16, min(cap, triton.next_power_of_2(Dk))),
                BV=max(16, min(cap, triton.next_power_of_2(Dv))),
                UPCAST=interpreting() and q.dtype == torch.bfloat16,
                PRECISION="ieee" if fp32 else "tf32")


def _gate_cumsum(g, g_gamma, B: int, T: int, H: int, NT: int, BT: int, device) -> torch.Tensor | None:
    """Chunk-local cumulative log gate, [B*H, NT*BT] fp32 (zero-padded gates past T keep it flat)."""
    if g is None and g_gamma is None:
        return None
    if g is None:
        g = g_gamma.float().view(1, 1, H).expand(B, T, H)
    gp = torch.zeros(B, H, NT * BT, dtype=torch.float32, device=device)
    gp[:, :, :T] = g.float().transpose(1, 2)
    return gp.view(B * H, NT, BT).cumsum(-1).view(B * H, NT * BT)


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the per-chunk state buffers: bf16 for bf16 inputs on a GPU (fla's choice), else fp32."""
    return torch.bfloat16 if dtype == torch.bfloat16 and not interpreting() else torch.float32


def _prec_h(hs: torch.Tensor, q: torch.Tensor, meta: dict) -> str:
    """Dot precision against the chunk states: tf32 for fp32 states of 16-bit inputs."""
    return "tf32" if hs.dtype == torch.float32 and q.dtype != torch.float32 else meta["PRECISION"]


# The launches, one function per kernel call: ``<stage>_empty`` allocates what ``<stage>`` returns
# (the fake implementation of its ``seqpar::linear_triton_<stage>`` op, seqpar.kernels.custom_ops);
# ``<stage>`` allocates the same and launches. q, k [B, T, H, Dk], v / do [B, T, H, Dv] with any
# strides; gc the chunk-local cumulative gate [B*H, NT*BT] or None; chunk states flat
# [B*H, NT, Dk, Dv] contiguous; ``chunk`` the tile length BT (16, 32, 64 or 128).


def fwd_h_empty(k: torch.Tensor, v: torch.Tensor, gc: torch.Tensor | None, h0: torch.Tensor | None,
                chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chunk-start states [B*H, NT, Dk, Dv], final state [B, H, Dk, Dv] fp32), unfilled."""
    B, T, H, Dk = k.shape
    Dv, NT = v.shape[-1], triton.cdiv(T, chunk)
    return (torch.empty(B * H, NT, Dk, Dv, dtype=_state_dtype(k.dtype), device=k.device),
            torch.empty(B, H, Dk, Dv, dtype=torch.float32, device=k.device))


def fwd_h(k: torch.Tensor, v: torch.Tensor, gc: torch.Tensor | None, h0: torch.Tensor | None,
          chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``_lin_fwd_h``: the state at every chunk start from ``h0`` (None: zero) and the final state."""
    hs, ht = fwd_h_empty(k, v, gc, h0, chunk)
    B, T, H, Dk = k.shape
    Dv, NT = v.shape[-1], hs.shape[1]
    h0_c = h0.float().contiguous() if h0 is not None else hs
    grid = lambda META: (triton.cdiv(Dk, META["BK"]), triton.cdiv(Dv, META["BV"]), B * H)  # noqa: E731
    _launch("fwd_h", grid, k, v, gc if gc is not None else hs, h0_c, hs, ht, *strides4(k), *strides4(v), T, H, NT,
            USE_G=gc is not None, USE_H0=h0 is not None, STORE_HT=True, **_meta(k, Dk, Dv, chunk))
    return hs, ht


def fwd_o_empty(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gc: torch.Tensor | None, hs: torch.Tensor,
                scale: float, chunk: int) -> torch.Tensor:
    """o [B, T, H, Dv] fp32, unfilled."""
    B, T, H, _ = q.shape
    return torch.empty(B, T, H, v.shape[-1], dtype=torch.float32, device=q.device)


def fwd_o(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gc: torch.Tensor | None, hs: torch.Tensor,
          scale: float, chunk: int) -> torch.Tensor:
    """``_lin_fwd_o``: o = scale [(Q K^T * D) V + (Q * exp(b)) S_c] from the chunk-start states ``hs``."""
    o = fwd_o_empty(q, k, v, gc, hs, scale, chunk)
    B, T, H, Dk = q.shape
    Dv, NT = v.shape[-1], hs.shape[1]
    meta = _meta(q, Dk, Dv, chunk)
    _launch("fwd_o", (triton.cdiv(Dv, meta["BV"]), NT, B * H), q, k, v, gc if gc is not None else hs, hs, o,
            *strides4(q), *strides4(k), *strides4(v), *strides4(o), T, H, NT, float(scale),
            USE_G=gc is not None, PRECISION_H=_prec_h(hs, q, meta), **meta)
    return o


def bwd_dh_empty(q: torch.Tensor, do: torch.Tensor, gc: torch.Tensor | None, dht: torch.Tensor | None,
                 scale: float, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chunk-end state gradients [B*H, NT, Dk, Dv], initial-state gradient [B, H, Dk, Dv] fp32), unfilled."""
    B, T, H, Dk = q.shape
    Dv, NT = do.shape[-1], triton.cdiv(T, chunk)
    return (torch.empty(B * H, NT, Dk, Dv, dtype=_state_dtype(q.dtype), device=q.device),
            torch.empty(B, H, Dk, Dv, dtype=torch.float32, device=q.device))


def bwd_dh(q: torch.Tensor, do: torch.Tensor, gc: torch.Tensor | None, dht: torch.Tensor | None,
           scale: float, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``_lin_bwd_dh``: the reverse walk from ``dht`` (None: zero); ``do`` in q's dtype."""
    dhs, dh0 = bwd_dh_empty(q, do, gc, dht, scale, chunk)
    B, T, H, Dk = q.shape
    Dv, NT = do.shape[-1], dhs.shape[1]
    dht_c = dht.float().contiguous() if dht is not None else None
    _launch("bwd_dh", lambda META: (triton.cdiv(Dk, META["BK"]), triton.cdiv(Dv, META["BV"]), B * H),
            q, do, gc if gc is not None else dhs, dht_c if dht_c is not None else dhs, dhs, dh0,
            *strides4(q), *strides4(do), T, H, NT, float(scale),
            USE_G=gc is not None, USE_DHT=dht is not None, STORE_DH0=True, **_meta(q, Dk, Dv, chunk))
    return dhs, dh0


def bwd_empty(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, gc: torch.Tensor | None,
              hs: torch.Tensor, dhs: torch.Tensor, scale: float, chunk: int, want_dg: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk [B, T, H, Dk], dv [B, T, H, Dv], per-tile gate terms [NK, B*H, NT*BT] (``want_dg``:
    per-token gates g; else empty)), fp32, zero-filled."""
    B, T, H, Dk = q.shape
    Dv, NT = v.shape[-1], hs.shape[1]
    dq = torch.zeros(B, T, H, Dk, dtype=torch.float32, device=q.device)
    dv = torch.zeros(B, T, H, Dv, dtype=torch.float32, device=q.device)
    NK = triton.cdiv(Dk, _meta(q, Dk, Dv, chunk)["BK"])
    # zero-filled: the kernel writes the tokens < T only (the padding of the last chunk stays 0)
    dgp = (torch.zeros(NK, B * H, NT * chunk, dtype=torch.float32, device=q.device) if want_dg
           else torch.empty(0, dtype=torch.float32, device=q.device))
    return dq, torch.zeros_like(dq), dv, dgp


def bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, gc: torch.Tensor | None,
        hs: torch.Tensor, dhs: torch.Tensor, scale: float, chunk: int, want_dg: bool
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_lin_bwd_dv`` and ``_lin_bwd_dqk`` from the chunk-start states ``hs`` and chunk-end state
    gradients ``dhs``; ``do`` in q's dtype. The gate terms are summed into dg by the caller."""
    dq, dk, dv, dgp = bwd_empty(q, k, v, do, gc, hs, dhs, scale, chunk, want_dg)
    B, T, H, Dk = q.shape
    Dv, NT = v.shape[-1], hs.shape[1]
    meta = _meta(q, Dk, Dv, chunk)
    gptr = gc if gc is not None else hs
    prec_h = _prec_h(hs, q, meta)
    _launch("bwd_dv", (triton.cdiv(Dv, meta["BV"]), NT, B * H), q, k, do, gptr, dhs, dv,
            *strides4(q), *strides4(k), *strides4(do), *strides4(dv), T, H, NT, float(scale),
            USE_G=gc is not None, PRECISION_H=prec_h, **meta)
    NK = triton.cdiv(Dk, meta["BK"])
    _launch("bwd_dqk", (NK, NT, B * H), q, k, v, do, gptr, hs, dhs, dq, dk, dgp if want_dg else hs,
            *strides4(q), *strides4(k), *strides4(v), *strides4(do), *strides4(dq), T, H, NT, float(scale),
            USE_G=gc is not None, PRECISION_H=prec_h, STORE_DG=want_dg, **meta)
    return dq, dk, dv, dgp


class TritonChunkedRun:
    """One run of tokens on the Triton kernels, in the stages of
    :class:`seqpar.kernels.linear_reference.ChunkedRun` (same methods, same results up to the
    kernels' rounding): states (``_lin_fwd_h``) -> outputs (``_lin_fwd_o``); state gradients
    (``_lin_bwd_dh``) -> input gradients (``_lin_bwd_dv``, ``_lin_bwd_dqk``). Chunk states are
    [B, H, NT, Dk, Dv] views of the kernels' [B*H, NT, Dk, Dv] buffers (bf16 for bf16 inputs).
    Every launch goes through its ``seqpar::linear_triton_*`` op (:mod:`seqpar.kernels.custom_ops`)."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, g: torch.Tensor | None = None,
                 g_gamma: torch.Tensor | None = None, scale: float | None = None, chunk_size: int = DEFAULT_CHUNK):
        _check(q, k, v, g, g_gamma, None)
        self.B, self.T, self.H, self.Dk = q.shape
        if self.T == 0:
            raise ValueError("a run needs at least one token")
        self.Dv = v.shape[-1]
        self.q, self.k, self.v = q, k, v
        self.scale = default_scale(q, scale)
        self.want_dg = g is not None
        self.BT = _chunk(chunk_size)
        self.NT = triton.cdiv(self.T, self.BT)
        self.gc = _gate_cumsum(g, g_gamma, self.B, self.T, self.H, self.NT, self.BT, q.device)
        self.log_chunk = (None if self.gc is None
                          else self.gc.view(self.B, self.H, self.NT, self.BT)[..., -1].contiguous())

    @property
    def log_total(self) -> torch.Tensor:
        """Log decay of the whole run [B, H] (fp32)."""
        if self.log_chunk is None:
            return torch.zeros(self.B, self.H, dtype=torch.float32, device=self.q.device)
        return self.log_chunk.sum(-1)

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.B * self.H, self.NT, self.Dk, self.Dv).contiguous()

    def states(self, initial_state: torch.Tensor | None = None) -> ChunkStates:
        hs, ht = custom_ops.linear_triton_fwd_h(self.k, self.v, self.gc, initial_state, self.BT)
        return ChunkStates(hs.view(self.B, self.H, self.NT, self.Dk, self.Dv), ht)

    def with_initial_state(self, states: ChunkStates, initial_state: torch.Tensor) -> ChunkStates:
        return shift_states(states, self.log_chunk, initial_state.float())

    def outputs(self, states: ChunkStates) -> torch.Tensor:
        return custom_ops.linear_triton_fwd_o(self.q, self.k, self.v, self.gc, self._flat(states.starts),
                                              float(self.scale), self.BT)

    def state_grads(self, do: torch.Tensor, dht: torch.Tensor | None = None) -> ChunkStateGrads:
        dhs, dh0 = custom_ops.linear_triton_bwd_dh(self.q, self._grad_input(do), self.gc, dht, float(self.scale),
                                                   self.BT)
        return ChunkStateGrads(dhs.view(self.B, self.H, self.NT, self.Dk, self.Dv), dh0)

    def with_final_grad(self, grads: ChunkStateGrads, dht: torch.Tensor) -> ChunkStateGrads:
        return shift_state_grads(grads, self.log_chunk, dht.float())

    def _grad_input(self, do: torch.Tensor) -> torch.Tensor:
        if tuple(do.shape) != (self.B, self.T, self.H, self.Dv):
            raise ValueError(f"do must be [B, T, H, Dv] = {(self.B, self.T, self.H, self.Dv)}; got {tuple(do.shape)}")
        do = do.to(self.q.dtype)
        check_int32_offsets(do=do)
        return do

    def input_grads(self, do: torch.Tensor, states: ChunkStates, grads: ChunkStateGrads,
                    dht: torch.Tensor | None = None):
        B, T, H = self.B, self.T, self.H
        dq, dk, dv, dgp = custom_ops.linear_triton_bwd(self.q, self.k, self.v, self._grad_input(do), self.gc,
                                                       self._flat(states.starts), self._flat(grads.ends),
                                                       float(self.scale), self.BT, self.want_dg)
        dg = None
        if self.want_dg:
            d = dgp.sum(0)[:, :T].view(B, H, T)  # sum_k (q dq - k dk) per token
            dg = d.flip(-1).cumsum(-1).flip(-1).transpose(1, 2)
            if dht is not None:
                dg = dg + (dht.float() * states.final).sum((-2, -1)).unsqueeze(1)
            dg = dg.contiguous()
        return grads_dict(dq, dk, dv, dg)

    def transition(self) -> ScalarDecay:
        """A of the whole run: exp(log_total) per head."""
        return ScalarDecay(self.log_total)


def chunk_linear_attention_forward_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                                          g: torch.Tensor | None = None, g_gamma: torch.Tensor | None = None,
                                          scale: float | None = None, initial_state: torch.Tensor | None = None,
                                          output_final_state: bool = False, chunk_size: int = DEFAULT_CHUNK
                                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(o fp32 [B, T, H, Dv], final state fp32 [B, H, Dk, Dv] or None) of chunked linear attention."""
    if q.dtype == torch.float64:
        return chunk_linear_attention_forward_reference(q, k, v, g=g, g_gamma=g_gamma, scale=scale,
                                                        initial_state=initial_state,
                                                        output_final_state=output_final_state)
    _check(q, k, v, g, g_gamma, initial_state)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    if T == 0:
        o = torch.empty(B, T, H, Dv, dtype=torch.float32, device=q.device)
        final = initial_state.float().clone() if initial_state is not None else q.new_zeros(B, H, Dk, Dv, dtype=torch.float32)
        return o, (final if output_final_state else None)
    run = TritonChunkedRun(q, k, v, g=g, g_gamma=g_gamma, scale=scale, chunk_size=chunk_size)
    states = run.states(initial_state)
    return run.outputs(states), (states.final if output_final_state else None)


def chunk_linear_attention_backward_triton(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                                           g: torch.Tensor | None = None, g_gamma: torch.Tensor | None = None,
                                           scale: float | None = None, initial_state: torch.Tensor | None = None,
                                           dht: torch.Tensor | None = None, chunk_size: int = DEFAULT_CHUNK
                                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                      torch.Tensor | None, torch.Tensor | None]:
    """(dq, dk, dv, dg or None, dh0 or None) in fp32; ``dht`` is the gradient of the final state.
    dg only when ``g`` is given, dh0 only when ``initial_state`` is given; g_gamma gets none."""
    if q.dtype == torch.float64:
        return chunk_linear_attention_backward_reference(do, q, k, v, g=g, g_gamma=g_gamma, scale=scale,
                                                         initial_state=initial_state, dht=dht)
    _check(q, k, v, g, g_gamma, initial_state)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    if tuple(do.shape) != (B, T, H, Dv):
        raise ValueError(f"do must be [B, T, H, Dv] = {(B, T, H, Dv)}; got {tuple(do.shape)}")
    if dht is not None and tuple(dht.shape) != (B, H, Dk, Dv):
        raise ValueError(f"dht must be [B, H, Dk, Dv] = {(B, H, Dk, Dv)}; got {tuple(dht.shape)}")
    if T == 0:
        zeros = lambda *s: torch.zeros(*s, dtype=torch.float32, device=q.device)  # noqa: E731
        dg = zeros(B, 0, H) if g is not None else None
        dh0 = (dht.float().clone() if dht is not None else zeros(B, H, Dk, Dv)) if initial_state is not None else None
        return zeros(B, 0, H, Dk), zeros(B, 0, H, Dk), zeros(B, 0, H, Dv), dg, dh0
    run = TritonChunkedRun(q, k, v, g=g, g_gamma=g_gamma, scale=scale, chunk_size=chunk_size)
    states = run.states(initial_state)
    grads = run.state_grads(do, dht)
    d = run.input_grads(do, states, grads, dht)
    return d["q"], d["k"], d["v"], d.get("g"), (grads.initial if initial_state is not None else None)
