"""Triton chunked gated delta rule (Gated DeltaNet), in the stages of the chunked-run protocol.

Conventions are those of :mod:`seqpar.kernels.delta_reference` (the oracle): q, k [B, T, H, Dk],
v [B, T, H, Dv] (any strides), beta [B, T, H] in (0, 1], optional log gates g [B, T, H] (<= 0),
recurrence S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = scale * S_t^T q_t,
states [B, H, Dk, Dv] fp32; outputs and gradients fp32.

Chunked WY (UT-transform) form, chunk length BT (64), b the chunk-local cumulative log gate,
gamma = exp(b), lambda = exp(b_last - b), D_ij = exp(b_i - b_j) for j <= i (every exponent <= 0):

    A = (I + strict_tril(diag(beta) (K K^T * D)))^{-1},  W = A diag(beta) (K * gamma),  U = A diag(beta) V
    E = U - W S                          (the chunk's "new values" v_new)
    S' = exp(b_last) S + (K * lambda)^T E
    O = scale * [(Q * gamma) S + (Q K^T * D) E]

Kernels (after flash-linear-attention's ``chunk_gated_delta_rule``; the math is derived afresh):

* ``_delta_wy_fwd``: parallel over (chunk, b*h); K K^T, the unit lower-triangular inverse A in
  registers (forward substitution inside the 16-row diagonal blocks, all blocks at once, then
  the blocks combined by a short Horner series of dots: the strictly block-lower part is
  nilpotent), then W and U ([B*H, NT*BT, .] buffers, chunk-padded).
* ``_delta_fwd_h``: one program per (Dv tile, b*h), all of Dk in one tile, walks the chunks in
  order: stores the chunk-start state S_c, E_c = U_c - W_c S_c, and S_{c+1} (then the final state).
* ``_delta_fwd_o``: parallel over (Dv tile, chunk, b*h): O = scale [(Q gamma) S_c + (Q K^T * D) E_c].
* backward: ``_delta_bwd_dv_local`` (parallel) dE_loc = scale (Q K^T * D)^T dO; ``_delta_bwd_dh``
  walks the chunks in reverse: dS_end(c) is stored, dE_c = dE_loc + (K lambda) dS_end(c),
  dS_end(c-1) = exp(b_last) dS_end(c) + scale (Q gamma)^T dO - W^T dE_c (no state value needed:
  the recurrence is affine in S). ``_delta_bwd_dqk`` (parallel over Dk tile, chunk) gives dq, the
  output/state part of dk, dW = -dE S_c^T and its share of the log-gate gradient;
  ``_delta_bwd_wy`` (parallel over chunks) takes dW and dU = dE through the WY representation:
  dv, dbeta, the rest of dk and of the log-gate gradient (dA = dU (beta V)^T + dW (beta K gamma)^T,
  dM = -A^T dA A^T on the strict lower triangle). The gate gradient per cumulative-gate entry is
  turned into dg by a chunk-local reverse cumsum in torch (exact: nothing crosses chunks but
  the chunk-end term <S_end, dS_end>, which the kernels add to the chunk's last entry).

Dtypes: states, accumulators, A and every gradient are fp32. For 16-bit inputs the matmul operands
are in the input dtype (W, U, v_new and its gradient are stored in it, as fla does); for fp32 inputs
dots use 3-pass tf32 tensor-core products (about fp32 accuracy; single-pass fp32 "ieee" dots run
on FMA units and spill at these tiles). float64 inputs fall back to the torch
:class:`seqpar.kernels.delta_reference.DeltaChunkedRun`. Per-key gates (KDA, g [B, T, H, Dk]) are
torch-only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from seqpar.kernels.delta_reference import L2NORM_EPS, DeltaChunkedRun, check_delta_inputs
from seqpar.kernels.linear_reference import default_scale
from seqpar.kernels.linear_transitions import MatrixTransition
from seqpar.kernels.softmax_reference import compute_dtype
from seqpar.kernels import custom_ops
from seqpar.kernels.triton_common import check_int32_offsets, check_launch_device, interpreting, strides4

__all__ = ["TritonDeltaChunkedRun", "DeltaTritonStates", "DeltaTritonStateGrads"]

DEFAULT_CHUNK = 64
MAX_HEAD_DIM = 128


def _configs():
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2, 3)]


_KEY = ["DK", "DV", "BT", "BK", "BV"]


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _mm(x, P, LOWP: tl.constexpr):
    """``x`` as a matmul operand: in the element type of pointer ``P`` (the 16-bit input dtype)
    when LOWP, else fp32."""
    if LOWP:
        return x.to(P.dtype.element_ty)
    else:
        return x.to(tl.float32)


@triton.jit
def _delta_wy_fwd(K, V, BETA, GC, A, W, U,
                  stride_kb, stride_kt, stride_kh, stride_kd,
                  stride_vb, stride_vt, stride_vh, stride_vd,
                  T, H, NT,
                  DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  DKP: tl.constexpr, USE_G: tl.constexpr, UPCAST: tl.constexpr, LOWP: tl.constexpr,
                  PRECISION: tl.constexpr):
    c = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    rows = tl.arange(0, BT)
    offs_t = c * BT + rows
    t_ok = offs_t < T
    tok = i_bh.to(tl.int64) * NT * BT + offs_t  # rows of the chunk-padded [B*H*NT*BT, .] buffers
    k_base = K + i_b * stride_kb + i_h * stride_kh
    v_base = V + i_b * stride_vb + i_h * stride_vh
    b_beta = tl.load(BETA + tok)
    b_kk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(DK, BK)):
        offs_k = i_k * BK + tl.arange(0, BK)
        k = tl.load(k_base + offs_t[:, None] * stride_kt + offs_k[None, :] * stride_kd,
                    mask=t_ok[:, None] & (offs_k < DK)[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        b_kk = tl.dot(k, tl.trans(k), b_kk, input_precision=PRECISION)
    strict = rows[:, None] > rows[None, :]
    b_n = -b_kk * b_beta[:, None]
    k_scale = b_beta
    if USE_G:
        b_g = tl.load(GC + tok)
        b_n *= tl.exp(tl.where(strict, b_g[:, None] - b_g[None, :], float("-inf")))
        k_scale = b_beta * tl.exp(b_g)
    # (I + M)^{-1} = (I - N)^{-1}, N = -strict_tril(M). Forward substitution inside the 16-row
    # diagonal blocks, all blocks at once (step i: X_r = e_r + sum_j N_rj X_j for every row r = i
    # mod 16), gives Dinv = (I - N_diag)^{-1}; then with P = Dinv N_below (strictly block-lower,
    # P^(BT/16) = 0): (I - N)^{-1} = (I - P)^{-1} Dinv = Dinv + P (Dinv + P (Dinv + ...)).
    b_n = tl.where(strict, b_n, 0.0)
    same_block = (rows[:, None] // 16) == (rows[None, :] // 16)
    b_nd = tl.where(same_block, b_n, 0.0)
    b_dinv = tl.where(rows[:, None] == rows[None, :], 1.0, 0.0)
    for i in range(1, 16):
        b_sel = tl.where((rows % 16)[:, None] == i, b_nd, 0.0)
        b_dinv += tl.dot(b_sel, b_dinv, input_precision=PRECISION)
    b_a = b_dinv
    if BT > 16:
        b_p = tl.dot(b_dinv, b_n - b_nd, input_precision=PRECISION)
        for _ in range(BT // 16 - 1):
            b_a = tl.dot(b_p, b_a, b_dinv, input_precision=PRECISION)
    tl.store(A + tok[:, None] * BT + rows[None, :], b_a)
    b_a = _mm(b_a, K, LOWP)
    for i_k in range(0, tl.cdiv(DK, BK)):
        offs_k = i_k * BK + tl.arange(0, BK)
        k_ok = offs_k < DK
        k = tl.load(k_base + offs_t[:, None] * stride_kt + offs_k[None, :] * stride_kd,
                    mask=t_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        w = tl.dot(b_a, _mm(k * k_scale[:, None], K, LOWP), input_precision=PRECISION)
        tl.store(W + tok[:, None] * DK + offs_k[None, :], w.to(W.dtype.element_ty), mask=k_ok[None, :])
    for i_v in range(0, tl.cdiv(DV, BV)):
        offs_v = i_v * BV + tl.arange(0, BV)
        v_ok = offs_v < DV
        v = tl.load(v_base + offs_t[:, None] * stride_vt + offs_v[None, :] * stride_vd,
                    mask=t_ok[:, None] & v_ok[None, :], other=0.0).to(tl.float32)
        u = tl.dot(b_a, _mm(v * b_beta[:, None], K, LOWP), input_precision=PRECISION)
        tl.store(U + tok[:, None] * DV + offs_v[None, :], u.to(U.dtype.element_ty), mask=v_ok[None, :])


@triton.jit
def _delta_fwd_h(K, W, U, GC, H0, HS, E, HT,
                 stride_kb, stride_kt, stride_kh, stride_kd,
                 T, H, NT,
                 DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 DKP: tl.constexpr, USE_G: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
                 UPCAST: tl.constexpr, LOWP: tl.constexpr, PRECISION: tl.constexpr):
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    offs_k = tl.arange(0, DKP)
    offs_v = i_v * BV + tl.arange(0, BV)
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    rows = tl.arange(0, BT)
    state_off = offs_k[:, None] * DV + offs_v[None, :]
    state_mask = k_ok[:, None] & v_ok[None, :]
    b_h = tl.zeros([DKP, BV], dtype=tl.float32)
    if USE_H0:
        b_h += tl.load(H0 + i_bh.to(tl.int64) * DK * DV + state_off, mask=state_mask, other=0.0)
    k_base = K + i_b * stride_kb + i_h * stride_kh
    row0 = i_bh.to(tl.int64) * NT * BT
    p_hs = HS + i_bh.to(tl.int64) * NT * DK * DV
    for c in range(0, NT):
        tl.store(p_hs + state_off, b_h, mask=state_mask)
        p_hs += DK * DV
        tok = row0 + c * BT + rows
        w = tl.load(W + tok[:, None] * DK + offs_k[None, :], mask=k_ok[None, :], other=0.0)
        u = tl.load(U + tok[:, None] * DV + offs_v[None, :], mask=v_ok[None, :], other=0.0)
        e = u.to(tl.float32) - tl.dot(w, _mm(b_h, K, LOWP), input_precision=PRECISION)
        e = e.to(E.dtype.element_ty)
        tl.store(E + tok[:, None] * DV + offs_v[None, :], e, mask=v_ok[None, :])
        offs_t = c * BT + rows
        k = tl.load(k_base + offs_t[:, None] * stride_kt + offs_k[None, :] * stride_kd,
                    mask=(offs_t < T)[:, None] & k_ok[None, :], other=0.0)
        if USE_G:
            b_g = tl.load(GC + tok)
            b_last = tl.load(GC + row0 + c * BT + BT - 1)
            b_h *= tl.exp(b_last)
            k = k.to(tl.float32) * tl.exp(b_last - b_g)[:, None]
        b_h = tl.dot(tl.trans(_mm(k, K, LOWP)), e, b_h, input_precision=PRECISION)
    if STORE_HT:
        tl.store(HT + i_bh.to(tl.int64) * DK * DV + state_off, b_h, mask=state_mask)


@triton.jit
def _delta_fwd_o(Q, K, GC, HS, E, O,
                 stride_qb, stride_qt, stride_qh, stride_qd,
                 stride_kb, stride_kt, stride_kh, stride_kd,
                 stride_ob, stride_ot, stride_oh, stride_od,
                 T, H, NT, scale,
                 DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                 DKP: tl.constexpr, USE_G: tl.constexpr, UPCAST: tl.constexpr, LOWP: tl.constexpr,
                 PRECISION: tl.constexpr):
    i_v = tl.program_id(0)
    c = tl.program_id(1)
    i_bh = tl.program_id(2)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    rows = tl.arange(0, BT)
    offs_t = c * BT + rows
    t_ok = offs_t < T
    tok = i_bh.to(tl.int64) * NT * BT + offs_t
    offs_v = i_v * BV + tl.arange(0, BV)
    v_ok = offs_v < DV
    q_base = Q + i_b * stride_qb + i_h * stride_qh
    k_base = K + i_b * stride_kb + i_h * stride_kh
    h_base = HS + (i_bh.to(tl.int64) * NT + c) * DK * DV
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
        b_o = tl.dot(_mm(q, K, LOWP), _mm(h, K, LOWP), b_o, input_precision=PRECISION)
        b_a = tl.dot(q, tl.trans(k), b_a, input_precision=PRECISION)
    causal = rows[:, None] >= rows[None, :]
    if USE_G:
        b_g = tl.load(GC + tok)
        b_o *= tl.exp(b_g)[:, None]
        b_a *= tl.exp(tl.where(causal, b_g[:, None] - b_g[None, :], float("-inf")))
    b_a = tl.where(causal, b_a, 0.0)
    e = tl.load(E + tok[:, None] * DV + offs_v[None, :], mask=v_ok[None, :], other=0.0)
    b_o = tl.dot(_mm(b_a, K, LOWP), e, b_o, input_precision=PRECISION)
    tl.store(O + i_b * stride_ob + i_h * stride_oh + offs_t[:, None] * stride_ot + offs_v[None, :] * stride_od,
             b_o * scale, mask=t_ok[:, None] & v_ok[None, :])


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _delta_bwd_dv_local(Q, K, DO, GC, DEL,
                        stride_qb, stride_qt, stride_qh, stride_qd,
                        stride_kb, stride_kt, stride_kh, stride_kd,
                        stride_db, stride_dt, stride_dh, stride_dd,
                        T, H, NT, scale,
                        DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                        BV: tl.constexpr, DKP: tl.constexpr, USE_G: tl.constexpr, UPCAST: tl.constexpr,
                        LOWP: tl.constexpr, PRECISION: tl.constexpr):
    i_v = tl.program_id(0)
    c = tl.program_id(1)
    i_bh = tl.program_id(2)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    rows = tl.arange(0, BT)
    offs_t = c * BT + rows
    t_ok = offs_t < T
    tok = i_bh.to(tl.int64) * NT * BT + offs_t
    offs_v = i_v * BV + tl.arange(0, BV)
    v_ok = offs_v < DV
    q_base = Q + i_b * stride_qb + i_h * stride_qh
    k_base = K + i_b * stride_kb + i_h * stride_kh
    b_at = tl.zeros([BT, BT], dtype=tl.float32)  # [j, t] = k_j . q_t
    for i_k in range(0, tl.cdiv(DK, BK)):
        offs_k = i_k * BK + tl.arange(0, BK)
        k_ok = offs_k < DK
        q = tl.load(q_base + offs_t[:, None] * stride_qt + offs_k[None, :] * stride_qd,
                    mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        k = tl.load(k_base + offs_t[:, None] * stride_kt + offs_k[None, :] * stride_kd,
                    mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            k = k.to(tl.float32)
        b_at = tl.dot(k, tl.trans(q), b_at, input_precision=PRECISION)
    causal = rows[:, None] <= rows[None, :]  # j <= t
    if USE_G:
        b_g = tl.load(GC + tok)
        b_at *= tl.exp(tl.where(causal, b_g[None, :] - b_g[:, None], float("-inf")))
    b_at = tl.where(causal, b_at, 0.0) * scale
    do = tl.load(DO + i_b * stride_db + i_h * stride_dh + offs_t[:, None] * stride_dt + offs_v[None, :] * stride_dd,
                 mask=t_ok[:, None] & v_ok[None, :], other=0.0)
    b_de = tl.dot(_mm(b_at, K, LOWP), _mm(do, K, LOWP), input_precision=PRECISION)
    tl.store(DEL + tok[:, None] * DV + offs_v[None, :], b_de, mask=v_ok[None, :])


@triton.jit
def _delta_bwd_dh(Q, K, W, DO, GC, DEL, DHT, DHS, DE, DH0,
                  stride_qb, stride_qt, stride_qh, stride_qd,
                  stride_kb, stride_kt, stride_kh, stride_kd,
                  stride_db, stride_dt, stride_dh, stride_dd,
                  T, H, NT, scale,
                  DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  DKP: tl.constexpr, USE_G: tl.constexpr, USE_DHT: tl.constexpr, UPCAST: tl.constexpr,
                  LOWP: tl.constexpr, PRECISION: tl.constexpr):
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    offs_k = tl.arange(0, DKP)
    offs_v = i_v * BV + tl.arange(0, BV)
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    rows = tl.arange(0, BT)
    state_off = offs_k[:, None] * DV + offs_v[None, :]
    state_mask = k_ok[:, None] & v_ok[None, :]
    b_dh = tl.zeros([DKP, BV], dtype=tl.float32)
    if USE_DHT:
        b_dh += tl.load(DHT + i_bh.to(tl.int64) * DK * DV + state_off, mask=state_mask, other=0.0)
    q_base = Q + i_b * stride_qb + i_h * stride_qh
    k_base = K + i_b * stride_kb + i_h * stride_kh
    do_base = DO + i_b * stride_db + i_h * stride_dh
    row0 = i_bh.to(tl.int64) * NT * BT
    p_dhs = DHS + (i_bh.to(tl.int64) * NT + NT - 1) * DK * DV
    for cc in range(0, NT):
        c = NT - 1 - cc
        tl.store(p_dhs + state_off, b_dh, mask=state_mask)
        p_dhs -= DK * DV
        offs_t = c * BT + rows
        tk_ok = (offs_t < T)[:, None] & k_ok[None, :]
        tok = row0 + offs_t
        q = tl.load(q_base + offs_t[:, None] * stride_qt + offs_k[None, :] * stride_qd,
                    mask=tk_ok, other=0.0).to(tl.float32) * scale
        k = tl.load(k_base + offs_t[:, None] * stride_kt + offs_k[None, :] * stride_kd, mask=tk_ok, other=0.0)
        w = tl.load(W + tok[:, None] * DK + offs_k[None, :], mask=k_ok[None, :], other=0.0)
        do = tl.load(do_base + offs_t[:, None] * stride_dt + offs_v[None, :] * stride_dd,
                     mask=(offs_t < T)[:, None] & v_ok[None, :], other=0.0)
        de = tl.load(DEL + tok[:, None] * DV + offs_v[None, :], mask=v_ok[None, :], other=0.0)
        if USE_G:
            b_g = tl.load(GC + tok)
            b_last = tl.load(GC + row0 + c * BT + BT - 1)
            k = k.to(tl.float32) * tl.exp(b_last - b_g)[:, None]
            q = q * tl.exp(b_g)[:, None]
        de = tl.dot(_mm(k, K, LOWP), _mm(b_dh, K, LOWP), de, input_precision=PRECISION)
        de = de.to(DE.dtype.element_ty)
        tl.store(DE + tok[:, None] * DV + offs_v[None, :], de, mask=v_ok[None, :])
        if USE_G:
            b_dh *= tl.exp(b_last)
        b_dh = tl.dot(tl.trans(_mm(q, K, LOWP)), _mm(do, K, LOWP), b_dh, input_precision=PRECISION)
        b_dh = tl.dot(tl.trans(-w), de, b_dh, input_precision=PRECISION)
    tl.store(DH0 + i_bh.to(tl.int64) * DK * DV + state_off, b_dh, mask=state_mask)


@triton.jit
def _delta_bwd_dqk(Q, K, DO, GC, HS, DHS, E, DE, DQ, DK1, DW, DBP,
                   stride_qb, stride_qt, stride_qh, stride_qd,
                   stride_kb, stride_kt, stride_kh, stride_kd,
                   stride_db, stride_dt, stride_dh, stride_dd,
                   stride_gb, stride_gt, stride_gh, stride_gd,
                   T, H, NT, scale,
                   DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                   DKP: tl.constexpr, USE_G: tl.constexpr, UPCAST: tl.constexpr, LOWP: tl.constexpr,
                   PRECISION: tl.constexpr):
    i_k = tl.program_id(0)
    c = tl.program_id(1)
    i_bh = tl.program_id(2)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    rows = tl.arange(0, BT)
    offs_t = c * BT + rows
    t_ok = offs_t < T
    tok = i_bh.to(tl.int64) * NT * BT + offs_t
    offs_k = i_k * BK + tl.arange(0, BK)
    k_ok = offs_k < DK
    do_base = DO + i_b * stride_db + i_h * stride_dh
    state = (i_bh.to(tl.int64) * NT + c) * DK * DV
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)   # dO S^T
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)   # dE S^T
    b_dks = tl.zeros([BT, BK], dtype=tl.float32)  # E dS_end^T
    b_ds = tl.zeros([BT, BT], dtype=tl.float32)   # [t, j] = do_t . e_j
    b_sd = tl.zeros([BK], dtype=tl.float32)       # <S, dS_end> of this Dk tile
    for i_v in range(0, tl.cdiv(DV, BV)):
        offs_v = i_v * BV + tl.arange(0, BV)
        v_ok = offs_v < DV
        hmask = k_ok[:, None] & v_ok[None, :]
        s0 = tl.load(HS + state + offs_k[:, None] * DV + offs_v[None, :], mask=hmask, other=0.0)
        dsl = tl.load(DHS + state + offs_k[:, None] * DV + offs_v[None, :], mask=hmask, other=0.0)
        do = tl.load(do_base + offs_t[:, None] * stride_dt + offs_v[None, :] * stride_dd,
                     mask=t_ok[:, None] & v_ok[None, :], other=0.0)
        e = tl.load(E + tok[:, None] * DV + offs_v[None, :], mask=v_ok[None, :], other=0.0)
        de = tl.load(DE + tok[:, None] * DV + offs_v[None, :], mask=v_ok[None, :], other=0.0)
        do = _mm(do, K, LOWP)
        s0_m = _mm(s0, K, LOWP)
        b_dq = tl.dot(do, tl.trans(s0_m), b_dq, input_precision=PRECISION)
        b_dw = tl.dot(de, tl.trans(s0_m), b_dw, input_precision=PRECISION)
        b_dks = tl.dot(e, tl.trans(_mm(dsl, K, LOWP)), b_dks, input_precision=PRECISION)
        b_ds = tl.dot(do, tl.trans(e), b_ds, input_precision=PRECISION)
        b_sd += tl.sum(s0 * dsl, 1)
    causal = rows[:, None] >= rows[None, :]  # t >= j
    if USE_G:
        b_g = tl.load(GC + tok)
        b_last = tl.load(GC + i_bh.to(tl.int64) * NT * BT + c * BT + BT - 1)
        b_dq *= tl.exp(b_g)[:, None]
        b_dks *= tl.exp(b_last - b_g)[:, None]
        b_ds *= tl.exp(tl.where(causal, b_g[:, None] - b_g[None, :], float("-inf")))
    b_ds = _mm(tl.where(causal, b_ds, 0.0) * scale, K, LOWP)
    tk_ok = t_ok[:, None] & k_ok[None, :]
    q = tl.load(Q + i_b * stride_qb + i_h * stride_qh + offs_t[:, None] * stride_qt + offs_k[None, :] * stride_qd,
                mask=tk_ok, other=0.0)
    k = tl.load(K + i_b * stride_kb + i_h * stride_kh + offs_t[:, None] * stride_kt + offs_k[None, :] * stride_kd,
                mask=tk_ok, other=0.0)
    b_dq = tl.dot(b_ds, _mm(k, K, LOWP), b_dq * scale, input_precision=PRECISION)
    b_dk = tl.dot(tl.trans(b_ds), _mm(q, K, LOWP), b_dks, input_precision=PRECISION)
    tl.store(DQ + i_b * stride_gb + i_h * stride_gh + offs_t[:, None] * stride_gt + offs_k[None, :] * stride_gd,
             b_dq, mask=tk_ok)
    tl.store(DK1 + tok[:, None] * DK + offs_k[None, :], b_dk, mask=k_ok[None, :])
    tl.store(DW + tok[:, None] * DK + offs_k[None, :], -b_dw, mask=k_ok[None, :])
    if USE_G:
        # this Dk tile's share of the cumulative-gate gradient: q.dq - k.dk (outputs and state
        # terms), plus, on the chunk's last entry, <S_end, dS_end> = exp(b_last) <S, dS_end> + sum k.dk_state
        q = q.to(tl.float32)
        k = k.to(tl.float32)
        dbp = tl.sum(q * b_dq - k * b_dk, 1)
        end = tl.sum(tl.sum(k * b_dks, 1), 0) + tl.exp(b_last) * tl.sum(b_sd, 0)
        dbp += tl.where(rows == BT - 1, end, 0.0)
        row = i_k.to(tl.int64) * tl.num_programs(2) + i_bh  # DBP is [NK, B*H, NT*BT]
        tl.store(DBP + row * NT * BT + c * BT + rows, dbp)


@triton.jit
def _delta_bwd_wy(K, V, BETA, GC, A, DW, DE, DK1, DKo, DVo, DBETA, DB,
                  stride_kb, stride_kt, stride_kh, stride_kd,
                  stride_vb, stride_vt, stride_vh, stride_vd,
                  stride_gb, stride_gt, stride_gh, stride_gd,
                  stride_ub, stride_ut, stride_uh, stride_ud,
                  T, H, NT,
                  DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  DKP: tl.constexpr, USE_G: tl.constexpr, UPCAST: tl.constexpr, LOWP: tl.constexpr,
                  PRECISION: tl.constexpr):
    c = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    rows = tl.arange(0, BT)
    offs_t = c * BT + rows
    t_ok = offs_t < T
    tok = i_bh.to(tl.int64) * NT * BT + offs_t
    k_base = K + i_b * stride_kb + i_h * stride_kh
    v_base = V + i_b * stride_vb + i_h * stride_vh
    b_beta = tl.load(BETA + tok)
    b_a = _mm(tl.load(A + tok[:, None] * BT + rows[None, :]), K, LOWP)
    b_at = tl.trans(b_a)
    k_scale = b_beta
    if USE_G:
        b_g = tl.load(GC + tok)
        gamma = tl.exp(b_g)
        k_scale = b_beta * gamma
    b_da = tl.zeros([BT, BT], dtype=tl.float32)  # dA = dW (beta K gamma)^T + dU (beta V)^T
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(DK, BK)):
        offs_k = i_k * BK + tl.arange(0, BK)
        k_ok = offs_k < DK
        k = tl.load(k_base + offs_t[:, None] * stride_kt + offs_k[None, :] * stride_kd,
                    mask=t_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        dw = _mm(tl.load(DW + tok[:, None] * DK + offs_k[None, :], mask=k_ok[None, :], other=0.0), K, LOWP)
        atdw = tl.dot(b_at, dw, input_precision=PRECISION)
        if USE_G:
            b_dbeta += tl.sum(atdw * k, 1) * gamma
        else:
            b_dbeta += tl.sum(atdw * k, 1)
        b_da = tl.dot(dw, tl.trans(_mm(k * k_scale[:, None], K, LOWP)), b_da, input_precision=PRECISION)
    for i_v in range(0, tl.cdiv(DV, BV)):
        offs_v = i_v * BV + tl.arange(0, BV)
        v_ok = offs_v < DV
        tv_ok = t_ok[:, None] & v_ok[None, :]
        v = tl.load(v_base + offs_t[:, None] * stride_vt + offs_v[None, :] * stride_vd,
                    mask=tv_ok, other=0.0).to(tl.float32)
        du = tl.load(DE + tok[:, None] * DV + offs_v[None, :], mask=v_ok[None, :], other=0.0)
        atdu = tl.dot(b_at, du, input_precision=PRECISION)
        tl.store(DVo + i_b * stride_ub + i_h * stride_uh + offs_t[:, None] * stride_ut + offs_v[None, :] * stride_ud,
                 atdu * b_beta[:, None], mask=tv_ok)
        b_dbeta += tl.sum(atdu * v, 1)
        b_da = tl.dot(du, tl.trans(_mm(v * b_beta[:, None], K, LOWP)), b_da, input_precision=PRECISION)
    # M = strict_tril(diag(beta) K K^T * D), A = (I + M)^{-1}: dM = -A^T dA A^T (strict lower part)
    strict = rows[:, None] > rows[None, :]
    b_dm = tl.dot(b_at, _mm(b_da, K, LOWP), input_precision=PRECISION)
    b_dm = tl.dot(_mm(b_dm, K, LOWP), b_at, input_precision=PRECISION)
    if USE_G:
        b_dm *= tl.exp(tl.where(strict, b_g[:, None] - b_g[None, :], float("-inf")))
    b_dm = tl.where(strict, -b_dm, 0.0)  # dM * D
    b_kk = tl.zeros([BT, BT], dtype=tl.float32)  # (after dA: fewer tiles live at once)
    for i_k in range(0, tl.cdiv(DK, BK)):
        offs_k = i_k * BK + tl.arange(0, BK)
        k = tl.load(k_base + offs_t[:, None] * stride_kt + offs_k[None, :] * stride_kd,
                    mask=t_ok[:, None] & (offs_k < DK)[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        b_kk = tl.dot(k, tl.trans(k), b_kk, input_precision=PRECISION)
    b_dbeta += tl.sum(b_dm * b_kk, 1)
    b_p = b_dm * b_beta[:, None]  # dK += P K + P^T K
    if USE_G:
        pkk = b_p * b_kk
        b_db = tl.sum(pkk, 1) - tl.sum(pkk, 0)
    b_p = _mm(b_p, K, LOWP)
    for i_k in range(0, tl.cdiv(DK, BK)):
        offs_k = i_k * BK + tl.arange(0, BK)
        k_ok = offs_k < DK
        k = tl.load(k_base + offs_t[:, None] * stride_kt + offs_k[None, :] * stride_kd,
                    mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        dw = _mm(tl.load(DW + tok[:, None] * DK + offs_k[None, :], mask=k_ok[None, :], other=0.0), K, LOWP)
        dk = tl.load(DK1 + tok[:, None] * DK + offs_k[None, :], mask=k_ok[None, :], other=0.0)
        dkw = tl.dot(b_at, dw, input_precision=PRECISION) * k_scale[:, None]
        if USE_G:
            b_db += tl.sum(k.to(tl.float32) * dkw, 1)
        k = _mm(k, K, LOWP)
        dk += dkw
        dk = tl.dot(b_p, k, dk, input_precision=PRECISION)
        dk = tl.dot(tl.trans(b_p), k, dk, input_precision=PRECISION)
        tl.store(DKo + i_b * stride_gb + i_h * stride_gh + offs_t[:, None] * stride_gt + offs_k[None, :] * stride_gd,
                 dk, mask=t_ok[:, None] & k_ok[None, :])
    tl.store(DBETA + tok, b_dbeta)
    if USE_G:
        tl.store(DB + tok, b_db)


# --------------------------------------------------------------------------------------------
# launching
# --------------------------------------------------------------------------------------------


def _state_configs():
    # the sequential state kernels hold all of Dk: more, smaller Dv tiles mean more programs in flight
    return [triton.Config({"BV": bv}, num_warps=w, num_stages=s)
            for bv in (16, 32, 64) for w in (4, 8) for s in (1, 2)]


def _prune_state(configs, named_args, **kwargs):
    # no Dv tile wider than Dv; with 3-pass tf32 (fp32 inputs) a [128, 64] fp32 state tile spills badly
    cap = max(16, triton.next_power_of_2(kwargs["DV"]))
    if kwargs["PRECISION"] == "tf32x3" and kwargs["DKP"] > 64:
        cap = min(cap, 32)
    kept = [c for c in configs if c.kwargs["BV"] <= cap]
    return kept or configs[:1]


_STATE_KERNELS = ("fwd_h", "bwd_dh")
_raw = {"wy_fwd": _delta_wy_fwd, "fwd_h": _delta_fwd_h, "fwd_o": _delta_fwd_o, "bwd_dv_local": _delta_bwd_dv_local,
        "bwd_dh": _delta_bwd_dh, "bwd_dqk": _delta_bwd_dqk, "bwd_wy": _delta_bwd_wy}
_tuned = {
    name: (triton.autotune(configs=_state_configs(), key=["DK", "DV", "BT", "DKP"],
                           prune_configs_by={"early_config_prune": _prune_state})(fn)
           if name in _STATE_KERNELS else triton.autotune(configs=_configs(), key=_KEY)(fn))
    for name, fn in _raw.items()
}


def _launch(name: str, grid, *args, **meta) -> None:
    """Launch kernel ``name``; ``grid`` is a tuple, or a function of the meta-parameters for the
    state kernels, whose Dv tile BV is autotuned. Every kernel writes only fresh buffers (none
    reads what it writes), so the autotuner may run each config on the real arguments."""
    check_launch_device(args[0])
    if interpreting():
        # Under the interpreter the autotuner would try to time configs (no driver): launch directly.
        _raw[name][grid(meta) if callable(grid) else grid](*args, **meta)
        return
    if name in _STATE_KERNELS:
        meta = {k: v for k, v in meta.items() if k != "BV"}
    with torch.cuda.device(args[0].device):  # launch on the tensors' GPU, not the current one
        _tuned[name][grid](*args, **meta)


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, g: torch.Tensor | None) -> None:
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"unsupported dtypes q {q.dtype}, k {k.dtype}, v {v.dtype} for the Triton kernels "
                         "(one of float16, bfloat16, float32 for all three)")
    for name, t in (("k", k), ("v", v), ("beta", beta), ("g", g)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    Dk, Dv = q.shape[-1], v.shape[-1]
    if Dk > MAX_HEAD_DIM or Dv > MAX_HEAD_DIM:
        raise ValueError(f"head dims up to {MAX_HEAD_DIM} are supported by the delta-rule kernels; "
                         f"got Dk={Dk}, Dv={Dv}")
    check_int32_offsets(q=q, k=k, v=v)


def _chunk(chunk_size: int | None) -> int:
    # The chunk length changes only the rounding, not the result: use it when it is a tile size
    # whose triangular inverse fits in registers.
    if chunk_size is not None and chunk_size in (16, 32, 64):
        return chunk_size
    return DEFAULT_CHUNK


def _meta(q: torch.Tensor, Dk: int, Dv: int, BT: int) -> dict:
    # 16-bit inputs: matmul operands in the input dtype, fp32 accumulators (LOWP; the interpreter's
    # bf16 arithmetic is broken, so there bf16 is upcast instead). fp32 inputs: 3-pass tf32 tensor-core
    # dots (about fp32 accuracy; "ieee" fp32 dots run on FMA units and spill at these tile sizes).
    fp32 = q.dtype == torch.float32
    upcast = interpreting() and q.dtype == torch.bfloat16
    cap = 32 if interpreting() or fp32 else 64
    return dict(DK=Dk, DV=Dv, BT=BT,
                BK=max(16, min(cap, triton.next_power_of_2(Dk))),
                BV=max(16, min(cap, triton.next_power_of_2(Dv))),
                DKP=max(16, triton.next_power_of_2(Dk)),
                UPCAST=upcast, LOWP=not fp32 and not upcast,
                PRECISION="tf32x3" if fp32 else "tf32")


def _padded(x: torch.Tensor, B: int, T: int, H: int, NT: int, BT: int) -> torch.Tensor:
    """[B, T, H] -> [B*H, NT*BT] fp32, zero past T."""
    out = torch.zeros(B, H, NT * BT, dtype=torch.float32, device=x.device)
    out[:, :, :T] = x.float().transpose(1, 2)
    return out.view(B * H, NT * BT)


def _l2norm_backward(y: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Gradient through y = x * rstd, rstd = (|x|^2 + eps)^-1/2: rstd (dy - y (y . dy))."""
    return rstd * (dy - y * (y * dy).sum(-1, keepdim=True))


def _operand_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of W, U, the new values and their gradient (only ever matmul operands): the input
    dtype for 16-bit inputs on a GPU (``LOWP``), else fp32."""
    lowp = dtype != torch.float32 and not (interpreting() and dtype == torch.bfloat16)  # _meta's LOWP
    return dtype if lowp else torch.float32


# The launches, one function per kernel call: ``<stage>_empty`` allocates what ``<stage>`` returns
# (the fake implementation of its ``seqpar::delta_triton_<stage>`` op, seqpar.kernels.custom_ops);
# ``<stage>`` allocates the same and launches. q, k [B, T, H, Dk] (normalised when
# ``use_qk_l2norm``), v / do [B, T, H, Dv] with any strides; beta and gc (the chunk-local
# cumulative log gate, or None) [B*H, NT*BT] fp32 (:func:`_padded`); A, W, U, the new values and
# their gradients [B*H, NT*BT, .]; chunk states flat [B*H, NT, Dk, Dv] fp32; ``chunk`` the tile
# length BT. The gates' presence (gc) also switches the gate gradients on.


def wy_fwd_empty(k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, gc: torch.Tensor | None, chunk: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A [B*H, NT*BT, BT] fp32, W [B*H, NT*BT, Dk], U [B*H, NT*BT, Dv]), unfilled."""
    B, T, H, Dk = k.shape
    BH, rows = B * H, triton.cdiv(T, chunk) * chunk
    op = _operand_dtype(k.dtype)
    return (torch.empty(BH, rows, chunk, dtype=torch.float32, device=k.device),
            torch.empty(BH, rows, Dk, dtype=op, device=k.device),
            torch.empty(BH, rows, v.shape[-1], dtype=op, device=k.device))


def wy_fwd(k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, gc: torch.Tensor | None, chunk: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_delta_wy_fwd``: the WY preparation of every chunk, (A, W, U)."""
    A, W, U = wy_fwd_empty(k, v, beta, gc, chunk)
    B, T, H, Dk = k.shape
    NT = triton.cdiv(T, chunk)
    _launch("wy_fwd", (NT, B * H), k, v, beta, gc if gc is not None else A, A, W, U,
            *strides4(k), *strides4(v), T, H, NT, USE_G=gc is not None, **_meta(k, Dk, v.shape[-1], chunk))
    return A, W, U


def fwd_h_empty(k: torch.Tensor, w: torch.Tensor, u: torch.Tensor, gc: torch.Tensor | None,
                h0: torch.Tensor | None, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chunk-start states [B*H, NT, Dk, Dv], new values like U, final state [B, H, Dk, Dv]), unfilled."""
    B, T, H, Dk = k.shape
    Dv = u.shape[-1]
    return (torch.empty(B * H, triton.cdiv(T, chunk), Dk, Dv, dtype=torch.float32, device=k.device),
            torch.empty_like(u), torch.empty(B, H, Dk, Dv, dtype=torch.float32, device=k.device))


def fwd_h(k: torch.Tensor, w: torch.Tensor, u: torch.Tensor, gc: torch.Tensor | None, h0: torch.Tensor | None,
          chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_delta_fwd_h``: states, new values v_new = U - W S and the final state from ``h0``
    (fp32 [B, H, Dk, Dv] contiguous, or None: zero)."""
    hs, e, ht = fwd_h_empty(k, w, u, gc, h0, chunk)
    B, T, H, Dk = k.shape
    Dv, NT = u.shape[-1], hs.shape[1]
    _launch("fwd_h", lambda META: (triton.cdiv(Dv, META["BV"]), B * H), k, w, u, gc if gc is not None else hs,
            h0 if h0 is not None else hs, hs, e, ht, *strides4(k), T, H, NT,
            USE_G=gc is not None, USE_H0=h0 is not None, STORE_HT=True, **_meta(k, Dk, Dv, chunk))
    return hs, e, ht


def fwd_o_empty(q: torch.Tensor, k: torch.Tensor, gc: torch.Tensor | None, hs: torch.Tensor, v_new: torch.Tensor,
                scale: float, chunk: int) -> torch.Tensor:
    """o [B, T, H, Dv] fp32, unfilled."""
    B, T, H, _ = q.shape
    return torch.empty(B, T, H, v_new.shape[-1], dtype=torch.float32, device=q.device)


def fwd_o(q: torch.Tensor, k: torch.Tensor, gc: torch.Tensor | None, hs: torch.Tensor, v_new: torch.Tensor,
          scale: float, chunk: int) -> torch.Tensor:
    """``_delta_fwd_o``: o from the chunk-start states and the new values."""
    o = fwd_o_empty(q, k, gc, hs, v_new, scale, chunk)
    B, T, H, Dk = q.shape
    Dv, NT = v_new.shape[-1], hs.shape[1]
    meta = _meta(q, Dk, Dv, chunk)
    _launch("fwd_o", (triton.cdiv(Dv, meta["BV"]), NT, B * H), q, k, gc if gc is not None else hs, hs, v_new, o,
            *strides4(q), *strides4(k), *strides4(o), T, H, NT, float(scale), USE_G=gc is not None, **meta)
    return o


def bwd_dv_local_empty(q: torch.Tensor, k: torch.Tensor, do: torch.Tensor, gc: torch.Tensor | None, scale: float,
                       chunk: int) -> torch.Tensor:
    """The intra-chunk part of d v_new [B*H, NT*BT, Dv] fp32, unfilled."""
    B, T, H, _ = q.shape
    return torch.empty(B * H, triton.cdiv(T, chunk) * chunk, do.shape[-1], dtype=torch.float32, device=q.device)


def bwd_dv_local(q: torch.Tensor, k: torch.Tensor, do: torch.Tensor, gc: torch.Tensor | None, scale: float,
                 chunk: int) -> torch.Tensor:
    """``_delta_bwd_dv_local``; ``do`` in q's dtype."""
    dv_local = bwd_dv_local_empty(q, k, do, gc, scale, chunk)
    B, T, H, Dk = q.shape
    Dv, NT = do.shape[-1], triton.cdiv(T, chunk)
    meta = _meta(q, Dk, Dv, chunk)
    _launch("bwd_dv_local", (triton.cdiv(Dv, meta["BV"]), NT, B * H), q, k, do, gc if gc is not None else dv_local,
            dv_local, *strides4(q), *strides4(k), *strides4(do), T, H, NT, float(scale), USE_G=gc is not None,
            **meta)
    return dv_local


def bwd_dh_empty(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, do: torch.Tensor, gc: torch.Tensor | None,
                 dv_local: torch.Tensor, dht: torch.Tensor | None, scale: float, chunk: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chunk-end state gradients [B*H, NT, Dk, Dv] fp32, d v_new like ``dv_local`` in W's dtype,
    initial-state gradient [B, H, Dk, Dv] fp32), unfilled."""
    B, T, H, Dk = q.shape
    Dv = do.shape[-1]
    return (torch.empty(B * H, triton.cdiv(T, chunk), Dk, Dv, dtype=torch.float32, device=q.device),
            torch.empty(dv_local.shape, dtype=w.dtype, device=q.device),
            torch.empty(B, H, Dk, Dv, dtype=torch.float32, device=q.device))


def bwd_dh(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, do: torch.Tensor, gc: torch.Tensor | None,
           dv_local: torch.Tensor, dht: torch.Tensor | None, scale: float, chunk: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_delta_bwd_dh``: the reverse pass from ``dht`` (fp32 [B, H, Dk, Dv] contiguous, or None: zero)."""
    dhs, de, dh0 = bwd_dh_empty(q, k, w, do, gc, dv_local, dht, scale, chunk)
    B, T, H, Dk = q.shape
    Dv, NT = do.shape[-1], dhs.shape[1]
    _launch("bwd_dh", lambda META: (triton.cdiv(Dv, META["BV"]), B * H), q, k, w, do, gc if gc is not None else dhs,
            dv_local, dht if dht is not None else dhs, dhs, de, dh0, *strides4(q), *strides4(k), *strides4(do),
            T, H, NT, float(scale), USE_G=gc is not None, USE_DHT=dht is not None, **_meta(q, Dk, Dv, chunk))
    return dhs, de, dh0


def bwd_dqk_empty(q: torch.Tensor, k: torch.Tensor, do: torch.Tensor, gc: torch.Tensor | None, hs: torch.Tensor,
                  dhs: torch.Tensor, v_new: torch.Tensor, dv_new: torch.Tensor, scale: float, chunk: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq [B, T, H, Dk], the output and state part of dk and dW [B*H, NT*BT, Dk], per-tile gate
    terms [NK, B*H, NT*BT] (with gates; else empty)), fp32, unfilled."""
    B, T, H, Dk = q.shape
    rows = triton.cdiv(T, chunk) * chunk
    dev = q.device
    dk1 = torch.empty(B * H, rows, Dk, dtype=torch.float32, device=dev)
    NK = triton.cdiv(Dk, _meta(q, Dk, do.shape[-1], chunk)["BK"])
    dbp = (torch.empty(NK, B * H, rows, dtype=torch.float32, device=dev) if gc is not None
           else torch.empty(0, dtype=torch.float32, device=dev))
    return torch.empty(B, T, H, Dk, dtype=torch.float32, device=dev), dk1, torch.empty_like(dk1), dbp


def bwd_dqk(q: torch.Tensor, k: torch.Tensor, do: torch.Tensor, gc: torch.Tensor | None, hs: torch.Tensor,
            dhs: torch.Tensor, v_new: torch.Tensor, dv_new: torch.Tensor, scale: float, chunk: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_delta_bwd_dqk``; ``do`` in q's dtype."""
    dq, dk1, dw, dbp = bwd_dqk_empty(q, k, do, gc, hs, dhs, v_new, dv_new, scale, chunk)
    B, T, H, Dk = q.shape
    NT = hs.shape[1]
    meta = _meta(q, Dk, do.shape[-1], chunk)
    NK = triton.cdiv(Dk, meta["BK"])
    _launch("bwd_dqk", (NK, NT, B * H), q, k, do, gc if gc is not None else hs, hs, dhs, v_new, dv_new,
            dq, dk1, dw, dbp if gc is not None else dk1, *strides4(q), *strides4(k), *strides4(do), *strides4(dq),
            T, H, NT, float(scale), USE_G=gc is not None, **meta)
    return dq, dk1, dw, dbp


def bwd_wy_empty(k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, gc: torch.Tensor | None, a: torch.Tensor,
                 dw: torch.Tensor, dv_new: torch.Tensor, dk1: torch.Tensor, chunk: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dk [B, T, H, Dk], dv [B, T, H, Dv], dbeta and the WY gate terms [B*H, NT*BT] (with gates;
    else empty)), fp32, unfilled."""
    B, T, H, Dk = k.shape
    dev = k.device
    dbeta = torch.empty(beta.shape, dtype=torch.float32, device=dev)
    db = torch.empty_like(dbeta) if gc is not None else torch.empty(0, dtype=torch.float32, device=dev)
    return (torch.empty(B, T, H, Dk, dtype=torch.float32, device=dev),
            torch.empty(B, T, H, v.shape[-1], dtype=torch.float32, device=dev), dbeta, db)


def bwd_wy(k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, gc: torch.Tensor | None, a: torch.Tensor,
           dw: torch.Tensor, dv_new: torch.Tensor, dk1: torch.Tensor, chunk: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_delta_bwd_wy``: d v_new and dW through the inverse, to dk (adding ``dk1``), dv, dbeta and
    the WY part of the gate gradient."""
    dk, dv, dbeta, db = bwd_wy_empty(k, v, beta, gc, a, dw, dv_new, dk1, chunk)
    B, T, H, Dk = k.shape
    NT = triton.cdiv(T, chunk)
    _launch("bwd_wy", (NT, B * H), k, v, beta, gc if gc is not None else a, a, dw, dv_new, dk1, dk, dv, dbeta,
            db if gc is not None else dbeta, *strides4(k), *strides4(v), *strides4(dk), *strides4(dv), T, H, NT,
            USE_G=gc is not None, **_meta(k, Dk, v.shape[-1], chunk))
    return dk, dv, dbeta, db


@dataclass
class DeltaTritonStates:
    """Chunk-start states ``starts`` [B, H, NT, Dk, Dv] and the state after the run ``final``
    [B, H, Dk, Dv] (fp32), with the chunks' new values ``v_new`` = U - W S [B*H, NT*BT, Dv]
    (in the matmul operand dtype: the input dtype for 16-bit inputs, else fp32)."""

    starts: torch.Tensor
    final: torch.Tensor
    v_new: torch.Tensor


@dataclass
class DeltaTritonStateGrads:
    """Chunk-end state gradients ``ends`` [B, H, NT, Dk, Dv] and the initial-state gradient
    ``initial`` [B, H, Dk, Dv] (fp32); ``dv_new`` the gradient of the new values, ``dv_local`` its
    intra-chunk part and ``do`` the outputs' gradient they came from (for :meth:`with_final_grad`)."""

    ends: torch.Tensor
    initial: torch.Tensor
    dv_new: torch.Tensor
    dv_local: torch.Tensor
    do: torch.Tensor


class TritonDeltaChunkedRun:
    """One run of tokens of the gated delta rule on the Triton kernels, in the stages of the
    chunked-run protocol (as :class:`seqpar.kernels.delta_reference.DeltaChunkedRun`): WY
    preparation (``_delta_wy_fwd``, once per run) -> states (``_delta_fwd_h``) -> outputs
    (``_delta_fwd_o``); state gradients (``_delta_bwd_dv_local``, ``_delta_bwd_dh``) -> input
    gradients (``_delta_bwd_dqk``, ``_delta_bwd_wy``). float64 inputs run the torch class."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, beta: torch.Tensor,
                 g: torch.Tensor | None = None, scale: float | None = None, chunk_size: int = DEFAULT_CHUNK,
                 use_qk_l2norm: bool = False):
        if g is not None and g.dim() == 4:
            raise ValueError(f"per-key gates g {tuple(g.shape)} (KDA) have no Triton kernel; use backend='torch'")
        check_delta_inputs(q, k, v, beta, g)
        self.B, self.T, self.H, self.Dk = q.shape
        self.Dv = v.shape[-1]
        self.cd = compute_dtype(q.dtype)
        self._torch = None
        if q.dtype == torch.float64:
            self._torch = DeltaChunkedRun(q, k, v, beta=beta, g=g, scale=scale, chunk_size=chunk_size,
                                          use_qk_l2norm=use_qk_l2norm)
            return
        _check(q, k, v, beta, g)
        if self.T == 0:
            raise ValueError("a run needs at least one token")
        self.scale = default_scale(q, scale)
        self.want_dg = g is not None
        self.use_qk_l2norm = use_qk_l2norm
        if use_qk_l2norm:  # normalised in fp32, handed to the kernels in the input dtype (as fla does)
            qf, kf = q.float(), k.float()
            self._q_rstd = torch.rsqrt((qf * qf).sum(-1, keepdim=True) + L2NORM_EPS)
            self._k_rstd = torch.rsqrt((kf * kf).sum(-1, keepdim=True) + L2NORM_EPS)
            self._qn, self._kn = qf * self._q_rstd, kf * self._k_rstd
            q, k = self._qn.to(q.dtype), self._kn.to(k.dtype)
        self.q, self.k, self.v = q, k, v
        self.BT = _chunk(chunk_size)
        self.NT = triton.cdiv(self.T, self.BT)
        self.beta = _padded(beta, self.B, self.T, self.H, self.NT, self.BT)
        self.gc = (None if g is None else
                   _padded(g, self.B, self.T, self.H, self.NT, self.BT).view(-1, self.NT, self.BT).cumsum(-1)
                   .view(self.B * self.H, self.NT * self.BT))
        self._wy_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # ---- helpers -------------------------------------------------------------------------------

    def _wy(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A [B*H, NT*BT, BT], W [B*H, NT*BT, Dk], U [B*H, NT*BT, Dv]) of every chunk, fp32 (computed once)."""
        if self._wy_cache is None:
            self._wy_cache = custom_ops.delta_triton_wy(self.k, self.v, self.beta, self.gc, self.BT)
        return self._wy_cache

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.B * self.H, self.NT, self.Dk, self.Dv).contiguous()

    def _state(self, x: torch.Tensor | None, name: str) -> torch.Tensor | None:
        if x is None:
            return None
        if tuple(x.shape) != (self.B, self.H, self.Dk, self.Dv):
            raise ValueError(f"{name} must be [B, H, Dk, Dv] = {(self.B, self.H, self.Dk, self.Dv)}; "
                             f"got {tuple(x.shape)}")
        return x.to(device=self.q.device, dtype=torch.float32).contiguous()

    def _grad_input(self, do: torch.Tensor) -> torch.Tensor:
        if tuple(do.shape) != (self.B, self.T, self.H, self.Dv):
            raise ValueError(f"do must be [B, T, H, Dv] = {(self.B, self.T, self.H, self.Dv)}; got {tuple(do.shape)}")
        do = do.to(self.q.dtype)
        check_int32_offsets(do=do)
        return do

    # ---- forward -------------------------------------------------------------------------------

    def states(self, initial_state: torch.Tensor | None = None) -> DeltaTritonStates:
        """Chunk-start states, final state and the chunks' new values from ``initial_state`` (or 0)."""
        if self._torch is not None:
            return self._torch.states(initial_state)
        _, W, U = self._wy()
        hs, e, ht = custom_ops.delta_triton_fwd_h(self.k, W, U, self.gc, self._state(initial_state, "initial_state"),
                                                  self.BT)
        return DeltaTritonStates(hs.view(self.B, self.H, self.NT, self.Dk, self.Dv), ht, e)

    def with_initial_state(self, states: DeltaTritonStates, initial_state: torch.Tensor) -> DeltaTritonStates:
        """The states of the run started from ``initial_state`` (recomputed: the delta rule has no
        cheap shift of every chunk's new values)."""
        if self._torch is not None:
            return self._torch.with_initial_state(states, initial_state)
        return self.states(initial_state)

    def outputs(self, states: DeltaTritonStates) -> torch.Tensor:
        """o [B, T, H, Dv] fp32 from the run's states."""
        if self._torch is not None:
            return self._torch.outputs(states)
        return custom_ops.delta_triton_fwd_o(self.q, self.k, self.gc, self._flat(states.starts), states.v_new,
                                             float(self.scale), self.BT)

    def transition(self) -> MatrixTransition:
        """The run's state map S_in -> S_out - S_out(0): the product over chunks (last on the left)
        of exp(b_last) I - (K * exp(b_last - b))^T W, [B, H, Dk, Dk] fp32."""
        if self._torch is not None:
            return self._torch.transition()
        B, H, NT, BT, Dk = self.B, self.H, self.NT, self.BT, self.Dk
        _, W, _ = self._wy()
        kc = torch.zeros(B, H, NT * BT, Dk, dtype=torch.float32, device=W.device)
        kc[:, :, :self.T] = self.k.float().transpose(1, 2)
        kc = kc.view(B * H, NT, BT, Dk)
        eye = torch.eye(Dk, dtype=torch.float32, device=W.device)
        W = W.float().view(B * H, NT, BT, Dk)
        if self.gc is None:
            mats = eye - kc.transpose(-1, -2) @ W
        else:
            b = self.gc.view(B * H, NT, BT)
            to_end = (b[..., -1:] - b).exp().unsqueeze(-1)
            mats = (b[..., -1].exp()[..., None, None] * eye
                    - (kc * to_end).transpose(-1, -2) @ W)
        while mats.shape[1] > 1:  # pairwise products, later chunk on the left
            if mats.shape[1] % 2:
                mats = torch.cat([mats, eye.expand(B * H, 1, Dk, Dk)], dim=1)
            mats = mats[:, 1::2] @ mats[:, 0::2]
        return MatrixTransition(mats[:, 0].reshape(B, H, Dk, Dk))

    # ---- backward ------------------------------------------------------------------------------

    def state_grads(self, do: torch.Tensor, dht: torch.Tensor | None = None) -> DeltaTritonStateGrads:
        """Chunk-end state gradients and the initial-state gradient from ``do`` and the final-state
        gradient ``dht`` (None = 0); needs no state value."""
        if self._torch is not None:
            return self._torch.state_grads(do, dht)
        do = self._grad_input(do)
        del_ = custom_ops.delta_triton_bwd_dv_local(self.q, self.k, do, self.gc, float(self.scale), self.BT)
        return self._dh(do, del_, dht)

    def _dh(self, do: torch.Tensor, del_: torch.Tensor, dht: torch.Tensor | None) -> DeltaTritonStateGrads:
        _, W, _ = self._wy()
        dhs, de, dh0 = custom_ops.delta_triton_bwd_dh(self.q, self.k, W, do, self.gc, del_, self._state(dht, "dht"),
                                                      float(self.scale), self.BT)
        return DeltaTritonStateGrads(dhs.view(self.B, self.H, self.NT, self.Dk, self.Dv), dh0, de, del_, do)

    def with_final_grad(self, grads: DeltaTritonStateGrads, dht: torch.Tensor) -> DeltaTritonStateGrads:
        """The state gradients with final-state gradient ``dht``, given ``grads`` computed with none
        (the reverse pass is rerun; the intra-chunk part is reused)."""
        if self._torch is not None:
            return self._torch.with_final_grad(grads, dht)
        return self._dh(grads.do, grads.dv_local, dht)

    def input_grads(self, do: torch.Tensor, states: DeltaTritonStates, grads: DeltaTritonStateGrads,
                    dht: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """{"q", "k", "v", "beta"} (+ "g" when g was given) fp32 gradients from the run's states and
        state gradients (both of the actual initial state / final-state gradient; the chunk-end
        gate term <dht, S_final> comes from them, so ``dht`` itself is not needed)."""
        if self._torch is not None:
            return self._torch.input_grads(do, states, grads, dht)
        B, T, H, NT, BT = self.B, self.T, self.H, self.NT, self.BT
        do = self._grad_input(do)
        A, _, _ = self._wy()
        dq, dk1, dw, dbp = custom_ops.delta_triton_bwd_dqk(self.q, self.k, do, self.gc, self._flat(states.starts),
                                                           self._flat(grads.ends), states.v_new, grads.dv_new,
                                                           float(self.scale), BT)
        dk, dv, dbeta, db = custom_ops.delta_triton_bwd_wy(self.k, self.v, self.beta, self.gc, A, dw, grads.dv_new,
                                                           dk1, BT)
        if self.use_qk_l2norm:
            dq = _l2norm_backward(self._qn, self._q_rstd, dq)
            dk = _l2norm_backward(self._kn, self._k_rstd, dk)
        out = {"q": dq, "k": dk, "v": dv, "beta": dbeta.view(B, H, NT * BT)[:, :, :T].transpose(1, 2).contiguous()}
        if self.want_dg:
            # gradient of each chunk-local cumulative gate -> of each gate: reverse cumsum inside the chunk
            dcum = (dbp.sum(0) + db).view(B, H, NT, BT)
            dg = dcum.flip(-1).cumsum(-1).flip(-1).view(B, H, NT * BT)[:, :, :T]
            out["g"] = dg.transpose(1, 2).contiguous()
        return out
