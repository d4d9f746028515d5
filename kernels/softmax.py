"""Blockwise softmax attention: one dispatcher over the reference (torch), Triton and fused-SDPA
backends (``sdpa``: torch's fused attention ops, :mod:`seqpar.kernels.softmax_sdpa`).

Every function works on one device and knows nothing about ranks. Conventions are those of
:mod:`seqpar.kernels.softmax_reference`: q [B, Tq, Hq, D], k/v [B, Tk, Hkv, D], o and grads in
the compute dtype (float32, or float64 for float64 inputs), lse [B, Hq, Tq].

Masks (block-local indices): key j is visible to query i iff (``diagonal_offset`` m is None or
j <= i + m) and (``window_offset`` w is None or j >= i + w): m alone is causal-like, w alone a
lower bound, both a band (a sliding window as the planner cuts it per block). Rows that see no key
give o = 0, lse = -inf and zero gradients. ``softcap`` c > 0 (Gemma 2): scores are
c * tanh(scale * q.k / c), capped before the mask; lse is of the capped scores, and the
row-global lse handed to a backward must be too.

Every function takes ``window_offset`` and ``softcap`` as keyword-only arguments (default None)
and validates them (:func:`check_mask_args`). The block itself runs as a torch custom op
(``seqpar::attention_block_forward`` / ``_backward`` / ``_accumulate_triton``,
:mod:`seqpar.kernels.custom_ops`), so that FakeTensor and torch.compile trace it; the choice of
backend (and, for sdpa's backward, the ``out`` it needs) is made here, outside the op. The
``sdpa`` backend masks windows on CPU only and never caps logits: such blocks run on the
reference (CPU) or Triton (CUDA), see :func:`block_backend`.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

from seqpar.kernels import custom_ops
from seqpar.kernels.softmax_reference import compute_dtype
from seqpar.masks import check_softcap

BACKENDS = ("auto", "torch", "triton", "sdpa")


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA, 'sdpa' on CPU, 'torch' elsewhere; validates explicit choices.

    'sdpa' is per block: a block that ``sdpa_supports`` refuses runs on the reference (CPU) or
    Triton (CUDA) instead (see :func:`block_backend`)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        return {"cuda": "triton", "cpu": "sdpa"}.get(device.type, "torch")
    return backend


def _check_offset(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__} {value!r}")
    return int(value)


def check_mask_args(diagonal_offset, window_offset, softcap) -> tuple[int | None, int | None, float | None]:
    """Validated (diagonal_offset, window_offset, softcap) as (int | None, int | None, float | None):
    offsets must be ints (bool refused: TypeError), softcap a finite number > 0 (TypeError for a
    non-number, ValueError naming the value otherwise)."""
    return (_check_offset("diagonal_offset", diagonal_offset), _check_offset("window_offset", window_offset),
            check_softcap(softcap))


def _sdpa():
    from seqpar.kernels import softmax_sdpa

    return softmax_sdpa


def block_backend(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  diagonal_offset: int | None, *, window_offset: int | None = None,
                  softcap: float | None = None) -> str:
    """The backend that computes this block: resolve_backend, with 'sdpa' falling back to
    'triton' (CUDA) or 'torch' where the fused ops cannot do it (a softcap; a window on CUDA)."""
    return _chosen_backend(backend, q, k, v, *check_mask_args(diagonal_offset, window_offset, softcap))


def _chosen_backend(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, diagonal_offset: int | None,
                    window_offset: int | None, softcap: float | None) -> str:
    """:func:`block_backend` for mask arguments already checked (``check_mask_args``)."""
    chosen = resolve_backend(backend, q.device)
    if chosen == "sdpa" and not _sdpa().sdpa_supports(q, k, diagonal_offset, v, window_offset=window_offset,
                                                      softcap=softcap):
        return "triton" if q.device.type == "cuda" else "torch"
    return chosen


def attention_block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                            diagonal_offset: int | None = None, backend: str = "auto",
                            window_offset: int | None = None, softcap: float | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) of one block of softmax attention."""
    diagonal_offset, window_offset, softcap = check_mask_args(diagonal_offset, window_offset, softcap)
    chosen = _chosen_backend(backend, q, k, v, diagonal_offset, window_offset, softcap)
    return _forward(chosen, q, k, v, scale, diagonal_offset, window_offset, softcap)


def _forward(chosen: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
             diagonal_offset: int | None, window_offset: int | None, softcap: float | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention_block_forward` on the ``chosen`` backend, arguments already checked: the
    ``seqpar::attention_block_forward`` op (:mod:`seqpar.kernels.custom_ops`)."""
    return custom_ops.attention_block_forward(q, k, v, chosen, float(scale), diagonal_offset, window_offset, softcap)


def output_delta(out: torch.Tensor, do: torch.Tensor) -> torch.Tensor:
    """delta = rowsum(out * do) [B, H, T] (contiguous) in the compute dtype: what the softmax
    backward needs of the forward output o and its gradient."""
    cd = compute_dtype(do.dtype)
    return (out.to(cd) * do.to(cd)).sum(dim=-1).transpose(1, 2).contiguous()


def attention_block_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             lse: torch.Tensor, delta: torch.Tensor | None, *, scale: float,
                             diagonal_offset: int | None = None, backend: str = "auto",
                             out: torch.Tensor | None = None, window_offset: int | None = None,
                             softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of one block given the row-global ``lse`` (of the capped scores with
    ``softcap``) and ``delta = rowsum(o * do)``.

    ``out`` (optional, [B, Tq, Hq, D]): a tensor with rowsum(out * do) = delta, e.g. the forward's
    output o when there is no lse gradient, or the ``out`` of :func:`prepare_backward`; ``delta``
    may then be None. The ``sdpa`` backend hands it to the fused op instead of building one; a
    block that falls back (softcap, ...) computes delta from it."""
    diagonal_offset, window_offset, softcap = check_mask_args(diagonal_offset, window_offset, softcap)
    chosen = _chosen_backend(backend, q, k, v, diagonal_offset, window_offset, softcap)
    if chosen == "sdpa" and out is None:
        # the fused op needs an out with rowsum(out * do) = delta: built here (a host read: whether
        # one exists), so that the op itself reads no tensor data; without one, the reference
        prepared = _sdpa().backward_operands_sdpa(do, delta)
        if prepared is None:
            chosen = "torch"
        else:
            do, delta, out = prepared
    if chosen != "sdpa":
        if delta is None:
            if out is None:
                raise ValueError("attention_block_backward needs delta or out")
            delta = output_delta(out, do)
        out = None  # only the fused ops read it
    return custom_ops.attention_block_backward(do, q, k, v, lse, delta, out, chosen, float(scale), diagonal_offset,
                                               window_offset, softcap)


class BackwardOperands(NamedTuple):
    """What every block backward of one call shares (:func:`prepare_backward`)."""

    do: torch.Tensor
    delta: torch.Tensor | None  # None only with ``out`` (then delta = rowsum(out * do))
    out: torch.Tensor | None
    backend: str


def prepare_backward(do: torch.Tensor, delta: torch.Tensor | None, *, out: torch.Tensor | None = None,
                     backend: str = "auto") -> BackwardOperands:
    """Once per call, before the block backwards of one call (the driver's): the ``do``, ``delta``,
    ``out`` and ``backend`` to pass to every :func:`attention_block_backward` of the call, sliced
    like ``do`` [B, T, H, D] / ``delta`` [B, H, T].

    ``out`` given (the forward's o, valid when delta = rowsum(o * do), i.e. no lse gradient):
    ``delta`` may be None. For ``sdpa``, do and out are cast / laid out for the fused op once and
    a missing out is reconstructed from delta (one host synchronisation per call, none per
    block); where the fused ops cannot take the call (no such out: a row with do = 0 and
    delta != 0; or ops this torch lacks) the backend becomes the reference ("torch"; "triton" on
    CUDA) for the whole call. Other backends get delta (computed from out when None) and no out.
    Blocks of an ``sdpa`` call that fall back (softcap, ...) compute their delta from ``out``."""
    if delta is None and out is None:
        raise ValueError("prepare_backward needs delta or out")
    chosen = resolve_backend(backend, do.device)
    if chosen == "sdpa":
        prepared = _sdpa().backward_operands_sdpa(do, delta, out)
        if prepared is not None:
            return BackwardOperands(*prepared, backend="sdpa")
        chosen = "triton" if do.device.type == "cuda" else "torch"
    return BackwardOperands(do, output_delta(out, do) if delta is None else delta, None, chosen)


def merge_partials_(o_acc: torch.Tensor, lse_acc: torch.Tensor, o_blk: torch.Tensor, lse_blk: torch.Tensor) -> None:
    """Merge a block result into a running one, in place (both in fp32/fp64):

        lse = logaddexp(lse_acc, lse_blk);  o = exp(lse_acc - lse) o_acc + exp(lse_blk - lse) o_blk

    o [B, T, H, D], lse [B, H, T]. Rows with lse = -inf on both sides stay (0, -inf), no NaN.
    """
    lse_new = torch.logaddexp(lse_acc, lse_blk)
    safe = torch.where(torch.isinf(lse_new), torch.zeros_like(lse_new), lse_new)
    w_acc = torch.exp(lse_acc - safe).transpose(1, 2).unsqueeze(-1)
    w_blk = torch.exp(lse_blk - safe).transpose(1, 2).unsqueeze(-1)
    o_acc.mul_(w_acc).addcmul_(w_blk, o_blk.to(o_acc.dtype))
    lse_acc.copy_(lse_new)


def attention_block_accumulate_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o_acc: torch.Tensor,
                                lse_acc: torch.Tensor, *, scale: float, diagonal_offset: int | None = None,
                                backend: str = "auto", window_offset: int | None = None,
                                softcap: float | None = None) -> None:
    """Compute one block and merge it into the running (o_acc, lse_acc) in place.

    The Triton backend fuses the merge into the kernel's epilogue (no extra pass over o)."""
    diagonal_offset, window_offset, softcap = check_mask_args(diagonal_offset, window_offset, softcap)
    chosen = _chosen_backend(backend, q, k, v, diagonal_offset, window_offset, softcap)
    if chosen == "triton":
        custom_ops.attention_block_accumulate_triton(q, k, v, o_acc, lse_acc, float(scale), diagonal_offset,
                                                     window_offset, softcap)
        return
    o_blk, lse_blk = _forward(chosen, q, k, v, scale, diagonal_offset, window_offset, softcap)
    merge_partials_(o_acc, lse_acc, o_blk, lse_blk)
