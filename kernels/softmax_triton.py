"""Triton blockwise softmax attention (forward, backward, fused accumulate).

Conventions are those of :mod:`seqpar.kernels.softmax_reference` (the oracle): q [B, Tq, Hq, D],
k [B, Tk, Hkv, D], v [B, Tk, Hkv, Dv] with any strides, GQA by index (query head h reads KV
head h // (Hq // Hkv); K/V are never repeated). The mask is a band in block-local indices: key j
is visible to query i iff (``diagonal_offset`` is None or j <= i + diagonal_offset) and
(``window_offset`` is None or j >= i + window_offset); both None: no mask, diagonal_offset alone:
causal at some offset, both: a sliding window (or any band). ``softcap`` c (Gemma 2) caps the
logits before the mask: s = c * tanh(scale * q.k / c); lse is of the capped scores and the
backward applies the exact chain rule (dS_raw = dS_capped * (1 - tanh^2)). Outputs and gradients
are fp32; lse is fp32 [B, Hq, Tq], natural log; rows that see no key give o = 0, lse = -inf (and
zero gradients); a band no query sees launches nothing.

Design (after Triton's fused-attention tutorial / FlashAttention-2):

* forward: one program per (query block, batch * query head). The key loop lives in
  :func:`_attn_fwd_inner`, which carries the online-softmax state (m, l, acc) in log2 units
  (``scale * log2(e)`` folded into one multiply, ``exp2``; the soft cap is applied to these
  log2-unit scores with constants rescaled to match, see :func:`_softcap`). :func:`_band_tiles`
  gives each query block the key blocks of the band, in three stages: the lower (window) edge,
  masked; the blocks every row sees whole, with no mask arithmetic and no bounds checks; the
  upper (diagonal) edge and the key tail, masked. Key blocks that no row of the query block can
  see are never visited. The epilogue either writes (o, lse) or, in the fused accumulate path,
  merges the block into a running fp32 (o_acc, lse_acc) in place (log-sum-exp merge, -inf safe).
* backward: delta = rowsum(o * do) is given, so there is no preprocess kernel. One kernel
  computes dK/dV per key block, looping over the query blocks of the band seen from the key side
  (query i sees key j iff j - diag <= i <= j - win) for every query head of the KV group (GQA
  reduction without atomics); one kernel computes dQ per query block, looping over the key blocks
  of the band. Both use the same masked / unmasked / masked stage split.
* window and softcap are compile-time switches (HAS_WINDOW, HAS_SOFTCAP, like HAS_MASK for the
  diagonal bound): the plain and causal paths pay nothing for them.
* autotuning over a small config list keyed on head dims, dtype, the mask / softcap switches and
  (power-of-two buckets of) the lengths, pruned by head dim and the device's shared memory. Under
  the interpreter a single small config is used.

float64 inputs are not supported by Triton: they fall back to the plain PyTorch reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqpar.kernels.softmax_reference import (
    attention_block_backward_reference,
    attention_block_forward_reference,
)
from seqpar.kernels.triton_common import check_int32_offsets, check_launch_device, interpreting, strides4
from seqpar.masks import check_softcap

__all__ = [
    "attention_block_forward_triton",
    "attention_block_backward_triton",
    "attention_block_accumulate_triton_",
    "attention_block_forward_triton_empty",
    "attention_block_backward_triton_empty",
]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# --------------------------------------------------------------------------------------------
# autotune configs
# --------------------------------------------------------------------------------------------

def _max_shared_mem() -> int:
    try:
        dev = torch.cuda.current_device()
        return int(triton.runtime.driver.active.utils.get_device_properties(dev)["max_shared_mem"])
    except Exception:  # pragma: no cover - no CUDA driver
        return 100 * 1024


def _arg(named_args: dict, kwargs: dict, name: str):
    return kwargs[name] if name in kwargs else named_args[name]


def _accumulator_elems(kind: str, bm: int, bn: int, block_d: int, block_dv: int) -> int:
    """fp32 accumulator elements a program keeps in registers."""
    if kind == "fwd":
        return bm * block_dv
    if kind == "dkdv":
        return bn * (block_d + block_dv)
    return bm * block_d  # dq


def _pruner(kind: str):
    """Config pruning for one kernel: register budget (measured with ptxas for sm_90: configs
    above 2048 accumulator elements per warp spill) and shared memory of the device."""

    def prune(configs, named_args, **kwargs):
        block_d = _arg(named_args, kwargs, "BLOCK_D")
        block_dv = _arg(named_args, kwargs, "BLOCK_DV")
        elt = 4 if _arg(named_args, kwargs, "PRECISION") == "ieee" else 2
        smem = _max_shared_mem()
        kept = []
        for c in configs:
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            acc = _accumulator_elems(kind, bm, bn, block_d, block_dv)
            if acc * (elt // 2) > 2048 * c.num_warps:
                continue
            need = elt * (bm * max(block_d, block_dv) + bn * (block_d + block_dv) * max(1, c.num_stages - 1))
            if need <= smem:
                kept.append(c)
        if elt == 4:
            # fp32 IEEE dots are FMA loops: per ptxas (sm_90, D=128) 32x32 tiles on 8 warps spill
            # 0-0.8 KB, anything larger 3-38 KB
            kept = [c for c in kept if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 32 * 32 and c.num_warps == 8]
        if kept:
            return kept
        return [min(configs, key=lambda c: (_accumulator_elems(kind, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"],
                                                               block_d, block_dv) / c.num_warps, c.num_stages))]

    return prune


def _cfgs(rows) -> list:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in rows]


# (BLOCK_M, BLOCK_N, num_warps, num_stages), after the tutorial's choices; spill-free ones for
# D=128 bf16 on sm_90 checked offline with ptxas.
def _fwd_configs():
    return _cfgs(((128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3), (128, 32, 8, 3),
                  (64, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 2), (64, 64, 8, 2), (64, 32, 8, 2), (32, 32, 8, 2)))


def _bwd_dkdv_configs():
    return _cfgs(((32, 64, 8, 3), (64, 64, 8, 3), (64, 64, 8, 2), (32, 128, 8, 3), (64, 128, 8, 3),
                  (32, 64, 4, 3), (64, 32, 8, 2), (32, 32, 8, 2), (16, 32, 4, 2)))


def _bwd_dq_configs():
    return _cfgs(((128, 64, 8, 2), (128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3),
                  (64, 32, 8, 2), (64, 64, 8, 2), (32, 64, 8, 2), (32, 32, 8, 2)))


_KEY = ["HEAD_DIM", "HEAD_DV", "TQ_KEY", "TK_KEY", "HAS_MASK", "HAS_WINDOW", "HAS_SOFTCAP"]


# --------------------------------------------------------------------------------------------
# shared pieces: the band's tile ranges, the soft cap
# --------------------------------------------------------------------------------------------

@triton.jit
def _band_tiles(r0, N, lo_off, hi_off, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK: tl.constexpr, TAIL_FULL: tl.constexpr):
    """Column tiles of the row tile [r0, r0 + BLOCK_R) of a band: column c in [0, N) is visible
    to row r iff (not HAS_LO or c >= r + lo_off) and (not HAS_HI or c <= r + hi_off).

    Returns (lo, f_lo, f_hi, hi), lo <= f_lo <= f_hi <= hi: columns outside [lo, hi) are
    invisible to every row; the BLOCK-wide tiles of [f_lo, f_hi) are visible to every row (no
    mask work); the tiles of [lo, f_lo) (lower edge) and [f_hi, hi) (upper edge, and the column
    tail) need the mask. lo, f_lo, f_hi are multiples of BLOCK (or equal to hi). The full tiles
    lie inside [0, N) unless TAIL_FULL (the caller bounds-checks columns in every stage, so a
    partial last tile that every row sees counts as full). The range is tight for a non-empty
    band (lo_off <= hi_off): the first and last tile hold a visible column, lo == hi when the
    rows see nothing. Rows of the last tile past the row count count as rows (never stored; as in
    the tutorial: clamping them cost the causal path registers in ptxas). Integer divisions only
    see non-negative operands (C and Python division differ on negatives, and the interpreter uses
    Python's)."""
    r1 = r0 + BLOCK_R
    if HAS_HI:
        c_hi = tl.minimum(tl.maximum(r1 + hi_off, 0), N)           # past the last row's last column
        full_hi = tl.minimum(tl.maximum(r0 + hi_off + 1, 0), N)    # past the first row's last column
        if TAIL_FULL:
            f_hi = tl.where(full_hi >= N, c_hi, (full_hi // BLOCK) * BLOCK)
        else:
            f_hi = (full_hi // BLOCK) * BLOCK
    else:
        c_hi = N
        if TAIL_FULL:
            f_hi = N
        else:
            f_hi = (N // BLOCK) * BLOCK
    if HAS_LO:
        c_lo = tl.maximum(r0 + lo_off, 0)              # first column of the first row
        full_lo = tl.maximum(r1 - 1 + lo_off, 0)       # first column of the last row
        lo = (c_lo // BLOCK) * BLOCK
        hi = tl.where(c_lo < c_hi, c_hi, lo)
        f_lo = tl.minimum(tl.maximum(((full_lo + BLOCK - 1) // BLOCK) * BLOCK, lo), hi)
        f_hi = tl.minimum(tl.maximum(f_hi, f_lo), hi)
    else:  # 0 <= f_hi <= c_hi already; the constant loop start keeps the causal / unmasked code as it was
        lo = 0
        hi = c_hi
        f_lo = 0
    return lo, f_lo, f_hi, hi


@triton.jit
def _softcap(x, cap_k, cap_out):
    """Soft cap in log2 units: x = s * log2(e) for a natural-scale score s; returns
    (c * tanh(s / c) * log2(e), d/ds of c * tanh(s / c) = 1 - tanh^2) with cap_k = 2 / c and
    cap_out = c * log2(e). tanh through exp2 of a non-positive argument only (no overflow, no
    tl.tanh / libdevice: the same code runs in the interpreter and on every backend):
    e = exp(-2 |s| / c) = exp2(-|x| * cap_k) in (0, 1], |tanh| = (1 - e) / (1 + e) and
    1 - tanh^2 = 4 e / (1 + e)^2 (no cancellation where tanh saturates)."""
    e = tl.math.exp2(-tl.abs(x) * cap_k)
    r = 1.0 / (1.0 + e)
    t = (1.0 - e) * r
    t = tl.where(x < 0.0, -t, t)
    return t * cap_out, 4.0 * e * r * r


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------

@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                    offs_m, offs_d, offs_dv, lo, hi, Tk, qk_scale, diag, win, cap_k, cap_out,
                    MASKED: tl.constexpr, HAS_MASK: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr,
                    HEAD_DV: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
                    PRECISION: tl.constexpr):
    """Online softmax over key blocks [lo, hi); returns the running (acc, l, m) (log2 units)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    d_mask = offs_d < HEAD_DIM
    dv_mask = offs_dv < HEAD_DV
    # the masked band edges are one or two blocks: software-pipelining them only costs registers
    for start_n in tl.range(lo, hi, BLOCK_N, num_stages=1 if MASKED else None):
        offs_n = start_n + offs_n0
        if MASKED:
            n_ok = offs_n < Tk
            k = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd,
                        mask=d_mask[:, None] & n_ok[None, :], other=0.0)
        else:
            k = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd,
                        mask=d_mask[:, None], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        qk = tl.dot(q, k, input_precision=PRECISION) * qk_scale
        if HAS_SOFTCAP:  # cap first, then mask
            qk, _ = _softcap(qk, cap_k, cap_out)
        if MASKED:
            vis = n_ok[None, :]
            if HAS_MASK:
                vis = vis & (offs_n[None, :] <= offs_m[:, None] + diag)
            if HAS_WINDOW:
                vis = vis & (offs_n[None, :] >= offs_m[:, None] + win)
            qk = tl.where(vis, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if MASKED:  # a row may have seen no key yet: keep exp2 away from -inf - -inf
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_safe = m_new
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_dv[None, :] * stride_vd,
                        mask=n_ok[:, None] & dv_mask[None, :], other=0.0)
        else:
            v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_dv[None, :] * stride_vd,
                        mask=dv_mask[None, :], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE,
              stride_qb, stride_qt, stride_qh, stride_qd,
              stride_kb, stride_kt, stride_kh, stride_kd,
              stride_vb, stride_vt, stride_vh, stride_vd,
              stride_ob, stride_ot, stride_oh, stride_od,
              stride_lb, stride_lh, stride_lt,
              Tq, Tk, Hq, G, qk_scale, diag, win, cap_k, cap_out, TQ_KEY, TK_KEY,
              HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_DV: tl.constexpr, HAS_MASK: tl.constexpr, HAS_WINDOW: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, ACCUMULATE: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    if HAS_MASK:  # heaviest (last) query blocks of a causal mask first: better tail balance
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // Hq).to(tl.int64)
    off_h = (pid_bh % Hq).to(tl.int64)
    off_hk = off_h // G
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < Tq

    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # key j visible to query i iff i + win <= j <= i + diag: only key blocks of the band are visited
    lo, f_lo, f_hi, hi = _band_tiles(start_m, Tk, win, diag, HAS_WINDOW, HAS_MASK, BLOCK_M, BLOCK_N, False)
    if HAS_WINDOW:  # stage 1: the lower (window) edge, masked
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd,
                                        stride_vt, stride_vd, offs_m, offs_d, offs_dv, lo, f_lo, Tk,
                                        qk_scale, diag, win, cap_k, cap_out, True, HAS_MASK, HAS_WINDOW,
                                        HAS_SOFTCAP, HEAD_DIM, HEAD_DV, BLOCK_N, UPCAST, PRECISION)
    # stage 2: key blocks every row sees (no mask, no bounds check on keys)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd,
                                    stride_vt, stride_vd, offs_m, offs_d, offs_dv, f_lo, f_hi, Tk,
                                    qk_scale, diag, win, cap_k, cap_out, False, HAS_MASK, HAS_WINDOW,
                                    HAS_SOFTCAP, HEAD_DIM, HEAD_DV, BLOCK_N, UPCAST, PRECISION)
    # stage 3: the upper (diagonal) edge and the key tail, masked
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd,
                                    stride_vt, stride_vd, offs_m, offs_d, offs_dv, f_hi, hi, Tk,
                                    qk_scale, diag, win, cap_k, cap_out, True, HAS_MASK, HAS_WINDOW,
                                    HAS_SOFTCAP, HEAD_DIM, HEAD_DV, BLOCK_N, UPCAST, PRECISION)

    # epilogue
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), m_i * 0.6931471805599453 + tl.log(l_safe))
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ot + offs_dv[None, :] * stride_od
    l_ptrs = LSE + off_b * stride_lb + off_h * stride_lh + offs_m * stride_lt
    o_mask = m_ok[:, None] & (offs_dv[None, :] < HEAD_DV)
    if ACCUMULATE:
        lse_old = tl.load(l_ptrs, mask=m_ok, other=float("-inf"))
        o_old = tl.load(o_ptrs, mask=o_mask, other=0.0)
        mx = tl.maximum(lse_old, lse)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        e_old = tl.exp(lse_old - mx)
        e_new = tl.exp(lse - mx)
        s = e_old + e_new
        s_safe = tl.where(s == 0.0, 1.0, s)
        o = o_old * (e_old / s_safe)[:, None] + o * (e_new / s_safe)[:, None]
        lse = tl.where(s == 0.0, float("-inf"), mx + tl.log(s_safe))
    tl.store(o_ptrs, o, mask=o_mask)
    tl.store(l_ptrs, lse, mask=m_ok)


_attn_fwd_tuned = triton.autotune(configs=_fwd_configs(), key=_KEY,
                                  prune_configs_by={"early_config_prune": _pruner("fwd")})(_attn_fwd)
# The accumulate path updates O/LSE in place: the autotuner must restore them between trials.
_attn_fwd_acc_tuned = triton.autotune(configs=_fwd_configs(), key=_KEY, restore_value=["O", "LSE"],
                                      prune_configs_by={"early_config_prune": _pruner("fwd")})(_attn_fwd)


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------

@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                         stride_qt, stride_qd, stride_dot, stride_dod, stride_lt, stride_dt,
                         offs_n, offs_d, offs_dv, lo, hi, Tq, qk_scale, diag, win, cap_k, cap_out,
                         MASKED: tl.constexpr, HAS_MASK: tl.constexpr, HAS_WINDOW: tl.constexpr,
                         HAS_SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr,
                         BLOCK_M: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dK/dV of one key block over query blocks [lo, hi) of one query head."""
    offs_m0 = tl.arange(0, BLOCK_M)
    d_mask = offs_d < HEAD_DIM
    dv_mask = offs_dv < HEAD_DV
    # the masked band edges are one or two blocks: software-pipelining them only costs registers
    for start_m in tl.range(lo, hi, BLOCK_M, num_stages=1 if MASKED else None):
        offs_m = start_m + offs_m0
        m_ok = offs_m < Tq
        qT = tl.load(q_base + offs_m[None, :] * stride_qt + offs_d[:, None] * stride_qd,
                     mask=d_mask[:, None] & m_ok[None, :], other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_dv[None, :] * stride_dod,
                     mask=m_ok[:, None] & dv_mask[None, :], other=0.0)
        if UPCAST:
            qT = qT.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(lse_base + offs_m * stride_lt, mask=m_ok, other=0.0)
        lse = tl.where(lse == float("-inf"), 0.0, lse) * 1.4426950408889634
        delta = tl.load(delta_base + offs_m * stride_dt, mask=m_ok, other=0.0)
        qkT = tl.dot(k, qT, input_precision=PRECISION) * qk_scale
        if HAS_SOFTCAP:
            qkT, dcapT = _softcap(qkT, cap_k, cap_out)
        pT = tl.math.exp2(qkT - lse[None, :])
        if MASKED:
            # only compiled under HAS_MASK or HAS_WINDOW (the query tail needs no mask here)
            if HAS_MASK:
                vis = offs_n[:, None] <= offs_m[None, :] + diag
                if HAS_WINDOW:
                    vis = vis & (offs_n[:, None] >= offs_m[None, :] + win)
            else:
                vis = offs_n[:, None] >= offs_m[None, :] + win
            pT = tl.where(vis, pT, 0.0)
        # out-of-range query rows have do = 0 and delta = 0: they contribute nothing
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        if HAS_SOFTCAP:
            dsT = dsT * dcapT
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV,
                   stride_qb, stride_qt, stride_qh, stride_qd,
                   stride_kb, stride_kt, stride_kh, stride_kd,
                   stride_vb, stride_vt, stride_vh, stride_vd,
                   stride_dob, stride_dot, stride_doh, stride_dod,
                   stride_lb, stride_lh, stride_lt,
                   stride_db, stride_dh, stride_dt,
                   stride_dkb, stride_dkt, stride_dkh, stride_dkd,
                   stride_dvb, stride_dvt, stride_dvh, stride_dvd,
                   Tq, Tk, Hkv, G, scale, qk_scale, diag, win, cap_k, cap_out, TQ_KEY, TK_KEY,
                   HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DV: tl.constexpr, HAS_MASK: tl.constexpr, HAS_WINDOW: tl.constexpr,
                   HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // Hkv).to(tl.int64)
    off_hk = (pid_bh % Hkv).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < Tk
    k = tl.load(K + off_b * stride_kb + off_hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                mask=n_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    v = tl.load(V + off_b * stride_vb + off_hk * stride_vh + offs_n[:, None] * stride_vt + offs_dv[None, :] * stride_vd,
                mask=n_ok[:, None] & (offs_dv[None, :] < HEAD_DV), other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    # query i sees key j iff j - diag <= i <= j - win: the band seen from the key side. Query
    # blocks [lo, f_lo) (diagonal edge) and [f_hi, hi) (window edge) need the mask, [f_lo, f_hi)
    # see the whole key block; the query loop bounds-checks rows, so the query tail is no edge.
    lo, f_lo, f_hi, hi = _band_tiles(start_n, Tq, -diag, -win, HAS_MASK, HAS_WINDOW, BLOCK_N, BLOCK_M, True)

    for g in range(0, G):
        off_h = off_hk * G + g
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_dob + off_h * stride_doh
        lse_base = LSE + off_b * stride_lb + off_h * stride_lh
        delta_base = DELTA + off_b * stride_db + off_h * stride_dh
        if HAS_MASK:
            dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                          stride_qt, stride_qd, stride_dot, stride_dod, stride_lt, stride_dt,
                                          offs_n, offs_d, offs_dv, lo, f_lo, Tq, qk_scale, diag, win, cap_k, cap_out,
                                          True, HAS_MASK, HAS_WINDOW, HAS_SOFTCAP, HEAD_DIM, HEAD_DV, BLOCK_M,
                                          UPCAST, PRECISION)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                      stride_qt, stride_qd, stride_dot, stride_dod, stride_lt, stride_dt,
                                      offs_n, offs_d, offs_dv, f_lo, f_hi, Tq, qk_scale, diag, win, cap_k, cap_out,
                                      False, HAS_MASK, HAS_WINDOW, HAS_SOFTCAP, HEAD_DIM, HEAD_DV, BLOCK_M,
                                      UPCAST, PRECISION)
        if HAS_WINDOW:
            dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                          stride_qt, stride_qd, stride_dot, stride_dod, stride_lt, stride_dt,
                                          offs_n, offs_d, offs_dv, f_hi, hi, Tq, qk_scale, diag, win, cap_k, cap_out,
                                          True, HAS_MASK, HAS_WINDOW, HAS_SOFTCAP, HEAD_DIM, HEAD_DV, BLOCK_M,
                                          UPCAST, PRECISION)
    dk = dk * scale
    tl.store(DK + off_b * stride_dkb + off_hk * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :] * stride_dkd,
             dk, mask=n_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(DV + off_b * stride_dvb + off_hk * stride_dvh + offs_n[:, None] * stride_dvt + offs_dv[None, :] * stride_dvd,
             dv, mask=n_ok[:, None] & (offs_dv[None, :] < HEAD_DV))


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                       offs_m, offs_d, offs_dv, lo, hi, Tk, qk_scale, diag, win, cap_k, cap_out,
                       MASKED: tl.constexpr, HAS_MASK: tl.constexpr, HAS_WINDOW: tl.constexpr,
                       HAS_SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr,
                       HEAD_DV: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
                       PRECISION: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [lo, hi)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    d_mask = offs_d < HEAD_DIM
    dv_mask = offs_dv < HEAD_DV
    # the masked band edges are one or two blocks: software-pipelining them only costs registers
    for start_n in tl.range(lo, hi, BLOCK_N, num_stages=1 if MASKED else None):
        offs_n = start_n + offs_n0
        if MASKED:
            n_ok = offs_n < Tk
            kT = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd,
                         mask=d_mask[:, None] & n_ok[None, :], other=0.0)
            vT = tl.load(v_base + offs_n[None, :] * stride_vt + offs_dv[:, None] * stride_vd,
                         mask=dv_mask[:, None] & n_ok[None, :], other=0.0)
        else:
            kT = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd,
                         mask=d_mask[:, None], other=0.0)
            vT = tl.load(v_base + offs_n[None, :] * stride_vt + offs_dv[:, None] * stride_vd,
                         mask=dv_mask[:, None], other=0.0)
        if UPCAST:
            kT = kT.to(tl.float32)
            vT = vT.to(tl.float32)
        qk = tl.dot(q, kT, input_precision=PRECISION) * qk_scale
        if HAS_SOFTCAP:
            qk, dcap = _softcap(qk, cap_k, cap_out)
        p = tl.math.exp2(qk - lse[:, None])
        if MASKED:
            vis = n_ok[None, :]
            if HAS_MASK:
                vis = vis & (offs_n[None, :] <= offs_m[:, None] + diag)
            if HAS_WINDOW:
                vis = vis & (offs_n[None, :] >= offs_m[:, None] + win)
            p = tl.where(vis, p, 0.0)
        dp = tl.dot(do, vT, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * dcap
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ,
                 stride_qb, stride_qt, stride_qh, stride_qd,
                 stride_kb, stride_kt, stride_kh, stride_kd,
                 stride_vb, stride_vt, stride_vh, stride_vd,
                 stride_dob, stride_dot, stride_doh, stride_dod,
                 stride_lb, stride_lh, stride_lt,
                 stride_db, stride_dh, stride_dt,
                 stride_dqb, stride_dqt, stride_dqh, stride_dqd,
                 Tq, Tk, Hq, G, scale, qk_scale, diag, win, cap_k, cap_out, TQ_KEY, TK_KEY,
                 HEAD_DIM: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_DV: tl.constexpr, HAS_MASK: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // Hq).to(tl.int64)
    off_h = (pid_bh % Hq).to(tl.int64)
    off_hk = off_h // G
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < Tq
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dot + offs_dv[None, :] * stride_dod,
                 mask=m_ok[:, None] & (offs_dv[None, :] < HEAD_DV), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + off_b * stride_lb + off_h * stride_lh + offs_m * stride_lt, mask=m_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse) * 1.4426950408889634
    delta = tl.load(DELTA + off_b * stride_db + off_h * stride_dh + offs_m * stride_dt, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    lo, f_lo, f_hi, hi = _band_tiles(start_m, Tk, win, diag, HAS_WINDOW, HAS_MASK, BLOCK_M, BLOCK_N, False)
    if HAS_WINDOW:
        dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                                offs_m, offs_d, offs_dv, lo, f_lo, Tk, qk_scale, diag, win, cap_k, cap_out,
                                True, HAS_MASK, HAS_WINDOW, HAS_SOFTCAP, HEAD_DIM, HEAD_DV, BLOCK_N, UPCAST,
                                PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                            offs_m, offs_d, offs_dv, f_lo, f_hi, Tk, qk_scale, diag, win, cap_k, cap_out,
                            False, HAS_MASK, HAS_WINDOW, HAS_SOFTCAP, HEAD_DIM, HEAD_DV, BLOCK_N, UPCAST, PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                            offs_m, offs_d, offs_dv, f_hi, hi, Tk, qk_scale, diag, win, cap_k, cap_out,
                            True, HAS_MASK, HAS_WINDOW, HAS_SOFTCAP, HEAD_DIM, HEAD_DV, BLOCK_N, UPCAST, PRECISION)
    dq = dq * scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd,
             dq, mask=m_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


_attn_bwd_dkdv_tuned = triton.autotune(configs=_bwd_dkdv_configs(), key=_KEY,
                                       prune_configs_by={"early_config_prune": _pruner("dkdv")})(_attn_bwd_dkdv)
_attn_bwd_dq_tuned = triton.autotune(configs=_bwd_dq_configs(), key=_KEY,
                                     prune_configs_by={"early_config_prune": _pruner("dq")})(_attn_bwd_dq)


# --------------------------------------------------------------------------------------------
# host wrappers
# --------------------------------------------------------------------------------------------


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int, int, int]:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got dims {q.dim()}, {k.dim()}, {v.dim()}")
    B, Tq, Hq, D = q.shape
    Bk, Tk, Hkv, Dk = k.shape
    if tuple(v.shape[:3]) != (Bk, Tk, Hkv):
        raise ValueError(f"v shape {tuple(v.shape)} does not match k shape {tuple(k.shape)}")
    if Bk != B or Dk != D:
        raise ValueError(f"q shape {tuple(q.shape)} and k shape {tuple(k.shape)} disagree on B or D")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    Dv = v.shape[3]
    check_int32_offsets(q=q, k=k, v=v)
    if not (1 <= D <= 256 and 1 <= Dv <= 256):
        raise ValueError(f"head dims must be in [1, 256]; got D={D}, Dv={Dv}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"unsupported dtype {q.dtype} for the Triton kernel")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    return B, Tq, Hq, D, Tk, Hkv, Dv


_OFFSET_SLACK = 1024  # > every BLOCK_M / BLOCK_N


def _band(Tq: int, Tk: int, diagonal_offset: int | None, window_offset: int | None,
          softcap: float | None) -> tuple[int, int, float, float, bool]:
    """Kernel scalars (diag, win, cap_k, cap_out) and whether the band is empty (no query of the
    block sees any key). Offsets are clamped to [-(Tq + S), Tk + S] with S (1024) more than any
    tile: that changes no visibility, not even for the rows past the end of a last tile (an upper
    bound that high or lower bound that low holds for every pair, the others for none), and keeps
    the kernels' int32 index arithmetic far from overflow."""
    lo_clamp, hi_clamp = -(Tq + _OFFSET_SLACK), Tk + _OFFSET_SLACK
    diag = 0 if diagonal_offset is None else max(lo_clamp, min(int(diagonal_offset), hi_clamp))
    win = 0 if window_offset is None else max(lo_clamp, min(int(window_offset), hi_clamp))
    # query i sees some key iff max(0, i + win) <= min(Tk - 1, i + diag)
    first = max(0, -diag) if diagonal_offset is not None else 0          # first query with j <= i + diag for j = 0
    last = min(Tq - 1, Tk - 1 - win) if window_offset is not None else Tq - 1  # last with j >= i + win for j = Tk-1
    empty = Tk == 0 or first > last or (diagonal_offset is not None and window_offset is not None and win > diag)
    if softcap is None:
        cap_k, cap_out = 0.0, 0.0
    else:
        cap_k, cap_out = 2.0 / float(softcap), float(softcap) * LOG2E
    return diag, win, cap_k, cap_out, empty


def _meta(q: torch.Tensor, D: int, Dv: int, Tq: int, Tk: int, diagonal_offset: int | None,
          window_offset: int | None, softcap: float | None) -> dict:
    return dict(
        TQ_KEY=triton.next_power_of_2(max(Tq, 1)),
        TK_KEY=triton.next_power_of_2(max(Tk, 1)),
        HEAD_DIM=D,
        HEAD_DV=Dv,
        BLOCK_D=max(16, triton.next_power_of_2(D)),
        BLOCK_DV=max(16, triton.next_power_of_2(Dv)),
        HAS_MASK=diagonal_offset is not None,
        HAS_WINDOW=window_offset is not None,
        HAS_SOFTCAP=softcap is not None,
        UPCAST=interpreting() and q.dtype == torch.bfloat16,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


# Under the interpreter the autotuner would try to time configs (no driver there): launch the
# plain kernel with one small config instead (tests may shrink it to make the band skip tiles).
_INTERPRET_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 16}


def _launch(tuned, raw, grid, *args, **meta) -> None:
    check_launch_device(args[0])
    if interpreting():
        raw[grid(_INTERPRET_BLOCKS)](*args, **meta, **_INTERPRET_BLOCKS)
    else:
        with torch.cuda.device(args[0].device):  # launch on the tensors' GPU, not the current one
            tuned[grid](*args, **meta)


def _s3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _fwd_launch(q, k, v, o, lse, scale, diagonal_offset, window_offset, softcap, accumulate: bool) -> bool:
    """Launch the forward kernel; returns False (launching nothing) when the band is empty."""
    B, Tq, Hq, D, Tk, Hkv, Dv = _check(q, k, v)
    diag, win, cap_k, cap_out, empty = _band(Tq, Tk, diagonal_offset, window_offset, softcap)
    if B * Hq == 0 or Tq == 0 or empty:
        return False
    meta = _meta(q, D, Dv, Tq, Tk, diagonal_offset, window_offset, softcap)
    grid = lambda META: (triton.cdiv(Tq, META["BLOCK_M"]), B * Hq)  # noqa: E731
    kernel = _attn_fwd_acc_tuned if accumulate else _attn_fwd_tuned
    _launch(kernel, _attn_fwd, grid, q, k, v, o, lse, *strides4(q), *strides4(k), *strides4(v), *strides4(o), *_s3(lse),
            Tq, Tk, Hq, Hq // Hkv, float(scale) * LOG2E, diag, win, cap_k, cap_out, ACCUMULATE=accumulate, **meta)
    return True


def attention_block_forward_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                                   diagonal_offset: int | None = None, window_offset: int | None = None,
                                   softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) of one block of softmax attention: o fp32 [B, Tq, Hq, Dv], lse fp32 [B, Hq, Tq].
    Key j is visible to query i iff j <= i + diagonal_offset and j >= i + window_offset (None:
    no such bound); scores are scale * q.k, soft-capped (softcap * tanh(s / softcap)) if
    ``softcap`` is given, then masked."""
    check_softcap(softcap)
    if q.dtype == torch.float64:
        return attention_block_forward_reference(q, k, v, scale=scale, diagonal_offset=diagonal_offset,
                                                 window_offset=window_offset, softcap=softcap)
    o, lse = _forward_outputs(q, k, v)
    if not _fwd_launch(q, k, v, o, lse, scale, diagonal_offset, window_offset, softcap, accumulate=False):
        o.zero_()
        lse.fill_(float("-inf"))
    return o, lse


def _forward_outputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's (o, lse) buffers, unfilled (inputs checked)."""
    B, Tq, Hq, D, Tk, Hkv, Dv = _check(q, k, v)
    return (torch.empty(B, Tq, Hq, Dv, dtype=torch.float32, device=q.device),
            torch.empty(B, Hq, Tq, dtype=torch.float32, device=q.device))


def attention_block_forward_triton_empty(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                                         diagonal_offset: int | None = None, window_offset: int | None = None,
                                         softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`attention_block_forward_triton` returns, allocated but not computed (same
    shapes, dtypes, strides and device; the same input errors): the fake implementation of the
    ``seqpar::attention_block_forward`` op on this backend. float64 inputs run the reference, which
    traces under FakeTensor as it is."""
    check_softcap(softcap)
    if q.dtype == torch.float64:
        return attention_block_forward_reference(q, k, v, scale=scale, diagonal_offset=diagonal_offset,
                                                 window_offset=window_offset, softcap=softcap)
    return _forward_outputs(q, k, v)


def attention_block_accumulate_triton_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o_acc: torch.Tensor,
                                       lse_acc: torch.Tensor, *, scale: float,
                                       diagonal_offset: int | None = None, window_offset: int | None = None,
                                       softcap: float | None = None) -> None:
    """Compute one block and merge it into the running fp32 (o_acc [B, Tq, Hq, Dv], lse_acc
    [B, Hq, Tq]) in place, in the kernel's epilogue; views with any strides are fine. Mask and
    softcap as in :func:`attention_block_forward_triton`; an empty band leaves the state as is."""
    check_softcap(softcap)
    B, Tq, Hq, D, Tk, Hkv, Dv = _check(q, k, v) if q.dtype != torch.float64 else (None,) * 7
    if q.dtype == torch.float64 or o_acc.dtype != torch.float32 or lse_acc.dtype != torch.float32:
        from seqpar.kernels.softmax import merge_partials_

        o_blk, lse_blk = attention_block_forward_reference(q, k, v, scale=scale, diagonal_offset=diagonal_offset,
                                                           window_offset=window_offset, softcap=softcap)
        merge_partials_(o_acc, lse_acc, o_blk, lse_blk)
        return
    if tuple(o_acc.shape) != (B, Tq, Hq, Dv) or tuple(lse_acc.shape) != (B, Hq, Tq):
        raise ValueError(f"o_acc {tuple(o_acc.shape)} / lse_acc {tuple(lse_acc.shape)} do not match "
                         f"[B, Tq, Hq, Dv] = {[B, Tq, Hq, Dv]} / [B, Hq, Tq] = {[B, Hq, Tq]}")
    check_int32_offsets(o_acc=o_acc)
    _fwd_launch(q, k, v, o_acc, lse_acc, scale, diagonal_offset, window_offset, softcap, accumulate=True)


def attention_block_backward_triton(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                    lse: torch.Tensor, delta: torch.Tensor, *, scale: float,
                                    diagonal_offset: int | None = None, window_offset: int | None = None,
                                    softcap: float | None = None
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in fp32 given the row-global ``lse`` (of the soft-capped scores, over every
    block the rows saw) and ``delta = rowsum(o * do)`` (fp32 [B, Hq, Tq]); dk/dv are summed over
    the query heads of each KV group. Mask and softcap as in the forward."""
    check_softcap(softcap)
    if q.dtype == torch.float64:
        return attention_block_backward_reference(do, q, k, v, lse, delta, scale=scale,
                                                  diagonal_offset=diagonal_offset, window_offset=window_offset,
                                                  softcap=softcap)
    dq, dk, dv = _backward_outputs(do, q, k, v, lse, delta)
    B, Tq, Hq, D, Tk, Hkv, Dv = _check(q, k, v)
    if do.dtype != q.dtype:
        do = do.to(q.dtype)
    check_int32_offsets(do=do)
    lse = lse.float()
    delta = delta.float()
    diag, win, cap_k, cap_out, empty = _band(Tq, Tk, diagonal_offset, window_offset, softcap)
    if Tq == 0 or Tk == 0 or B * Hq == 0 or empty:
        return dq, dk, dv
    meta = _meta(q, D, Dv, Tq, Tk, diagonal_offset, window_offset, softcap)
    G = Hq // Hkv
    common = (*strides4(q), *strides4(k), *strides4(v), *strides4(do), *_s3(lse), *_s3(delta))
    band = (diag, win, cap_k, cap_out)
    grid_kv = lambda META: (triton.cdiv(Tk, META["BLOCK_N"]), B * Hkv)  # noqa: E731
    _launch(_attn_bwd_dkdv_tuned, _attn_bwd_dkdv, grid_kv, q, k, v, do, lse, delta, dk, dv, *common,
            *strides4(dk), *strides4(dv), Tq, Tk, Hkv, G, float(scale), float(scale) * LOG2E, *band, **meta)
    grid_q = lambda META: (triton.cdiv(Tq, META["BLOCK_M"]), B * Hq)  # noqa: E731
    _launch(_attn_bwd_dq_tuned, _attn_bwd_dq, grid_q, q, k, v, do, lse, delta, dq, *common, *strides4(dq),
            Tq, Tk, Hq, G, float(scale), float(scale) * LOG2E, *band, **meta)
    return dq, dk, dv


def _backward_outputs(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor,
                      delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward's zero-filled (dq, dk, dv) buffers (inputs checked)."""
    B, Tq, Hq, D, Tk, Hkv, Dv = _check(q, k, v)
    if tuple(do.shape) != (B, Tq, Hq, Dv):
        raise ValueError(f"do shape {tuple(do.shape)} != o shape {(B, Tq, Hq, Dv)}")
    if tuple(lse.shape) != (B, Hq, Tq) or tuple(delta.shape) != (B, Hq, Tq):
        raise ValueError(f"lse {tuple(lse.shape)} / delta {tuple(delta.shape)} must be [B, Hq, Tq] = {(B, Hq, Tq)}")
    return (torch.zeros(B, Tq, Hq, D, dtype=torch.float32, device=q.device),
            torch.zeros(B, Tk, Hkv, D, dtype=torch.float32, device=q.device),
            torch.zeros(B, Tk, Hkv, Dv, dtype=torch.float32, device=q.device))


def attention_block_backward_triton_empty(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                          lse: torch.Tensor, delta: torch.Tensor, *, scale: float,
                                          diagonal_offset: int | None = None, window_offset: int | None = None,
                                          softcap: float | None = None
                                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What :func:`attention_block_backward_triton` returns, allocated but not computed (the fake
    implementation of ``seqpar::attention_block_backward`` on this backend)."""
    check_softcap(softcap)
    if q.dtype == torch.float64:
        return attention_block_backward_reference(do, q, k, v, lse, delta, scale=scale,
                                                  diagonal_offset=diagonal_offset, window_offset=window_offset,
                                                  softcap=softcap)
    return _backward_outputs(do, q, k, v, lse, delta)


def check_accumulate_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o_acc: torch.Tensor,
                            lse_acc: torch.Tensor) -> None:
    """The input errors of :func:`attention_block_accumulate_triton_` (what its fake implementation
    checks: it writes nothing)."""
    if q.dtype == torch.float64:
        return
    B, Tq, Hq, D, Tk, Hkv, Dv = _check(q, k, v)
    if o_acc.dtype == torch.float32 and lse_acc.dtype == torch.float32 and (
            tuple(o_acc.shape) != (B, Tq, Hq, Dv) or tuple(lse_acc.shape) != (B, Hq, Tq)):
        raise ValueError(f"o_acc {tuple(o_acc.shape)} / lse_acc {tuple(lse_acc.shape)} do not match "
                         f"[B, Tq, Hq, Dv] = {[B, Tq, Hq, Dv]} / [B, Hq, Tq] = {[B, Hq, Tq]}")
