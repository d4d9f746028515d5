"""Softmax attention block on torch's fused SDPA ops that return the log-sum-exp ("sdpa" backend).

Same contract as :mod:`seqpar.kernels.softmax_reference` (the oracle): q [B, Tq, Hq, D],
k/v [B, Tk, Hkv, D], GQA by index, ``diagonal_offset`` None (no mask) or m (key j visible to query
i iff j <= i + m), outputs and grads in the compute dtype (fp32, fp64 for fp64), lse [B, Hq, Tq]
natural log, rows that see no key give o = 0 and lse = -inf.

Ops used:

* CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` and its ``_backward``. They take
  [B, H, T, D] views (we pass ``x.transpose(1, 2)``, no copy), fp64 natively, and GQA natively
  (query head h reads KV head h // G, checked against the reference). Non-fp64 inputs are cast to
  fp32 first, so results are those of the fp32 reference.
* CUDA (opt-in): ``aten._scaled_dot_product_flash_attention`` and its ``_backward`` for fp16/bf16 with D % 8 == 0, D <= 256. The CUDA op has no GQA, so K/V are
  expanded to Hq heads *locally inside this call only* (a compute copy, never communicated) and
  dk/dv are summed over each group. The block output and grads come out in the input dtype and
  are cast to fp32: one bf16 rounding per block that the Triton backend does not have.

Strides. The CPU ops read every tensor operand (q, k, v; in backward also grad_out and out)
through its batch, head and token strides only and assume a unit-stride head-dim axis
(``stride(-1) == 1``): a ``permute``-d or ``[..., ::2]`` view gave silently wrong results (O(1)
errors) before :func:`_operand` was added; the CUDA flash ops raise on such a tensor ("must
have contiguous last dimension"). Any other strides are read in place (checked on CPU against
contiguous copies: [B, H, T, D] and [T, B, H, D] storage, padded rows, stride-0 ``expand``-ed
batch / token / head axes, fp64 and fp32). :func:`_operand` copies an operand only when its last
axis is not unit-stride, in the same pass as the dtype cast.

Masks. The fused ops know "no mask" and top-left causal (key j visible to query i iff j <= i,
whatever Tq and Tk). :func:`_pieces` rewrites any ``diagonal_offset`` m into at most two such
pieces, each a (query range, key range, causal) triple with square causal pieces (the CUDA flash
op aligns causal masks bottom-right when Tq != Tk):

* m <= 0: queries [-m, Tq) against all keys, causal (rows i < -m see nothing: o = 0, lse = -inf);
* 0 < m < Tk - 1: all queries against keys [0, m], no mask, plus queries [1, Tq) against keys
  [m + 1, Tk), causal; the forward merges the two by log-sum-exp, the backward adds their grads;
* m >= Tk - 1 or None: no mask.

Backward. The fused backward ops take (grad_out, q, k, v, out, logsumexp) and compute
``D = rowsum(out * grad_out)`` themselves, then dS = exp(s - logsumexp) * (dP - D). We pass the
given row-global lse and an ``out`` *reconstructed from the given delta*
(:func:`_out_for_delta`): out = u * delta / (u . do) with u = do / max|do|, so
rowsum(out * do) = delta up to a few ulps. This keeps the dispatcher's (lse, delta) API, and delta
may carry an lse gradient (``delta - dlse``). Rows where do = 0 but delta != 0 (a loss on lse
only) have no such out: that block falls back to the reference (exact, slower). -inf lse rows are
treated as 0, like the reference.
"""
from __future__ import annotations

import torch

from seqpar.kernels.softmax import merge_partials_
from seqpar.kernels.softmax_reference import attention_block_backward_reference, compute_dtype

__all__ = [
    "sdpa_supports",
    "attention_block_forward_sdpa",
    "attention_block_backward_sdpa",
    "attention_block_accumulate_sdpa_",
]

_CPU_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_CUDA_DTYPES = (torch.float16, torch.bfloat16)

Piece = tuple[int, int, int, int, bool]  # q_start, q_stop, k_start, k_stop, causal


def sdpa_supports(q: torch.Tensor, k: torch.Tensor, diagonal_offset: int | None = None,
                  v: torch.Tensor | None = None) -> bool:
    """Whether the fused ops can compute this block (every ``diagonal_offset`` is expressible;
    the limits are device, dtype, shapes). False means: use the reference / Triton instead."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0]:
        return False
    if q.shape[1] == 0 or k.shape[1] == 0 or k.shape[2] == 0 or q.shape[2] % k.shape[2] != 0:
        return False  # the CPU op dies with SIGFPE on Tk = 0
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim or (v is not None and (v.shape[-1] != head_dim or v.shape[:3] != k.shape[:3])):
        return False
    if q.device != k.device or q.dtype != k.dtype:
        return False
    if q.device.type == "cpu":
        return q.dtype in _CPU_DTYPES
    if q.device.type == "cuda":
        return q.dtype in _CUDA_DTYPES and head_dim % 8 == 0 and head_dim <= 256
    return False


def _pieces(tq: int, tk: int, diagonal_offset: int | None) -> list[Piece]:
    """Cover the visible (query, key) pairs by disjoint no-mask / square top-left-causal pieces."""
    m = diagonal_offset
    if m is None or m >= tk - 1:
        return [(0, tq, 0, tk, False)]
    if m <= 0:
        raw = [(-m, tq, 0, tk)] if -m < tq else []
        pieces: list[Piece] = []
    else:
        raw = [(1, tq, m + 1, tk)] if tq > 1 else []
        pieces = [(0, tq, 0, m + 1, False)]
    for qs, qe, ks, ke in raw:  # top-left causal -> square causal (+ a no-mask tail of rows)
        n = min(qe - qs, ke - ks)
        pieces.append((qs, qs + n, ks, ks + n, True))
        if qe - qs > n:
            pieces.append((qs + n, qe, ks, ks + n, False))
    return pieces


def _expand_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """[B, T, Hkv, D] -> [B, T, Hkv * group, D], head h -> h // group (a local compute copy)."""
    return x if group == 1 else x.repeat_interleave(group, dim=2)


def _reduce_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """Sum the grads of the expanded heads back onto their KV head."""
    if group == 1:
        return x
    b, t, h, d = x.shape
    return x.reshape(b, t, h // group, group, d).sum(dim=3)


def _operand(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype`` with a unit-stride last axis, the one layout requirement of the fused ops
    (see the module doc). Copies only when the cast or the layout needs it (one copy for both);
    other strides, stride 0 included, are kept."""
    if x.stride(-1) == 1 or x.shape[-1] <= 1:
        return x.to(dtype)
    if x.dtype == dtype:  # (x.to(x.dtype, memory_format=...) would return x itself, strides and all)
        return x.contiguous()
    return x.to(dtype, memory_format=torch.contiguous_format)


def _fused_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One piece: (o [B, Tq, Hq, D], lse [B, Hq, Tq]) in the compute dtype."""
    cd = compute_dtype(q.dtype)
    if q.device.type == "cuda":
        group = q.shape[2] // k.shape[2]
        q, k, v = (_operand(x, x.dtype) for x in (q, k, v))
        out = torch.ops.aten._scaled_dot_product_flash_attention(
            q.transpose(1, 2), _expand_kv(k, group).transpose(1, 2), _expand_kv(v, group).transpose(1, 2),
            0.0, causal, False, scale=scale)
        return out[0].transpose(1, 2).to(cd), out[1].to(cd)
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        _operand(q, cd).transpose(1, 2), _operand(k, cd).transpose(1, 2), _operand(v, cd).transpose(1, 2),
        0.0, causal, scale=scale)
    return o.transpose(1, 2), lse


def _fused_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, scale: float, causal: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One piece: (dq, dk, dv) in the compute dtype; ``out`` satisfies rowsum(out * do) = delta."""
    cd = compute_dtype(q.dtype)
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    if q.device.type == "cuda":
        group = q.shape[2] // k.shape[2]
        do, q, k, v, out = (_operand(x, q.dtype) for x in (do, q, k, v, out))
        ke, ve = _expand_kv(k, group), _expand_kv(v, group)
        seed = torch.zeros(2, dtype=torch.uint64, device=q.device)
        # cum_seq_q / cum_seq_k are None for dense inputs, as the forward op returns them: an empty
        # tensor there selects the varlen path ("batch size must be positive", seen on an H200)
        grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            t(do), t(q), t(ke), t(ve), t(out), lse.to(torch.float32).contiguous(), None, None,
            q.shape[1], k.shape[1], 0.0, causal, seed, torch.zeros((), dtype=torch.uint64, device=q.device),
            scale=scale)
        dq, dk, dv = (t(g).to(cd) for g in grads)
        return dq, _reduce_kv(dk, group), _reduce_kv(dv, group)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        *(t(_operand(x, cd)) for x in (do, q, k, v, out)), lse.to(cd), 0.0, causal, scale=scale)
    return t(dq), t(dk), t(dv)


def _out_for_delta(do: torch.Tensor, delta: torch.Tensor) -> torch.Tensor | None:
    """An ``out`` [B, Tq, Hq, D] (compute dtype) with rowsum(out * do) = delta [B, Hq, Tq] to a few
    ulps, or None when some row has do = 0 and delta != 0 (or the result is not finite)."""
    cd = compute_dtype(do.dtype)
    dof = do.to(cd)
    top = dof.abs().amax(dim=-1, keepdim=True)
    u = dof / torch.where(top > 0, top, torch.ones_like(top))  # |u| <= 1, no underflow in u . do
    norm = (u * dof).sum(dim=-1, keepdim=True)  # = |do|^2 / max|do| >= max|do|
    d = delta.to(cd).transpose(1, 2).unsqueeze(-1)
    if bool(((norm == 0) & (d != 0)).any()):
        return None
    out = u * (d / torch.where(norm > 0, norm, torch.ones_like(norm)))
    return out if bool(torch.isfinite(out).all()) else None


def attention_block_forward_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                                 diagonal_offset: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) of one block on the fused op (call only where :func:`sdpa_supports`)."""
    B, Tq, Hq, _ = q.shape
    pieces = _pieces(Tq, k.shape[1], diagonal_offset)
    if len(pieces) == 1 and pieces[0][:2] == (0, Tq):
        _, _, ks, ke, causal = pieces[0]
        return _fused_forward(q, k[:, ks:ke], v[:, ks:ke], scale, causal)
    cd = compute_dtype(q.dtype)
    o = torch.zeros(B, Tq, Hq, v.shape[-1], dtype=cd, device=q.device)
    lse = torch.full((B, Hq, Tq), float("-inf"), dtype=cd, device=q.device)
    for qs, qe, ks, ke, causal in pieces:
        o_p, lse_p = _fused_forward(q[:, qs:qe], k[:, ks:ke], v[:, ks:ke], scale, causal)
        merge_partials_(o[:, qs:qe], lse[:, :, qs:qe], o_p, lse_p)
    return o, lse


def attention_block_backward_sdpa(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  lse: torch.Tensor, delta: torch.Tensor, *, scale: float,
                                  diagonal_offset: int | None = None
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of one block given the row-global ``lse`` and ``delta`` (see module doc)."""
    out = _out_for_delta(do, delta)
    if out is None:
        return attention_block_backward_reference(do, q, k, v, lse, delta, scale=scale,
                                                  diagonal_offset=diagonal_offset)
    cd = compute_dtype(q.dtype)
    lse_f = lse.to(cd)
    lse_f = torch.where(torch.isinf(lse_f), torch.zeros_like(lse_f), lse_f)
    Tq, Tk = q.shape[1], k.shape[1]
    pieces = _pieces(Tq, Tk, diagonal_offset)
    if len(pieces) == 1 and pieces[0][:4] == (0, Tq, 0, Tk):
        return _fused_backward(do, q, k, v, out, lse_f, scale, pieces[0][4])
    dq = torch.zeros(q.shape, dtype=cd, device=q.device)
    dk = torch.zeros(k.shape, dtype=cd, device=q.device)
    dv = torch.zeros(v.shape, dtype=cd, device=q.device)
    for qs, qe, ks, ke, causal in pieces:
        dq_p, dk_p, dv_p = _fused_backward(do[:, qs:qe], q[:, qs:qe], k[:, ks:ke], v[:, ks:ke], out[:, qs:qe],
                                           lse_f[:, :, qs:qe], scale, causal)
        dq[:, qs:qe] += dq_p
        dk[:, ks:ke] += dk_p
        dv[:, ks:ke] += dv_p
    return dq, dk, dv


def attention_block_accumulate_sdpa_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o_acc: torch.Tensor,
                                     lse_acc: torch.Tensor, *, scale: float, diagonal_offset: int | None = None
                                     ) -> None:
    """Forward, then merge into the running (o_acc, lse_acc) in place (no fused epilogue)."""
    o_blk, lse_blk = attention_block_forward_sdpa(q, k, v, scale=scale, diagonal_offset=diagonal_offset)
    merge_partials_(o_acc, lse_acc, o_blk, lse_blk)
