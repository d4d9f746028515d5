"""The block kernels as torch custom ops (namespace ``seqpar``), the one place they are registered.

Every op has a real implementation (the plain launcher / kernel function of its backend, which
stays callable without this layer) and a fake one (``register_fake``) that allocates exactly
the outputs the real one returns -- shapes, dtypes, strides, device -- without computing or
launching anything, so that ``FakeTensorMode`` and ``torch.compile`` can trace through them and
the Triton launchers (which need data pointers, a GPU and host reads) never run on fake tensors.

Registered (docs/kernels.md, *Custom ops, FakeTensor and torch.compile*):

- softmax blocks, every backend (the ``backend`` argument is the one the dispatcher chose:
  "torch", "sdpa" or "triton"): ``seqpar::attention_block_forward`` -> (o, lse),
  ``seqpar::attention_block_backward`` -> (dq, dk, dv), and the Triton backend's fused
  accumulate ``seqpar::attention_block_accumulate_triton``, which writes its (o_acc, lse_acc)
  arguments in place (``mutates_args``). Fakes: Triton's allocations; the torch and sdpa
  backends are plain torch code, so their fake is the backend function itself run on the fake
  tensors (the same allocations and strides by construction). The sdpa backward takes ``out``
  (rowsum(out * do) = delta) from its caller: rebuilding it from delta reads tensor data
  (whether one exists), which :mod:`seqpar.kernels.softmax` does outside the op.
- chunked linear attention on Triton, one op per kernel launch (its outputs are the buffers the
  kernel writes): ``seqpar::linear_triton_*`` (scalar / per-head gates), ``seqpar::gla_triton_*``
  (per-key gates) and ``seqpar::delta_triton_*`` (the gated delta rule). The torch glue between
  them (gate cumsums, shifts, reductions) stays plain torch.

The drivers call the ops inside seqpar's own autograd Functions, whose backward calls the backward
ops; ``seqpar::attention_block_forward`` also has an autograd formula (through the backward op), so
that a block computed on its own stays differentiable as the plain torch backends were. The
other ops have none (they are stages of a computation whose gradients are other ops).

No Triton module is imported here: the implementations import their module on first call, so
importing this module does not decide Triton's interpreter mode (see docs/kernels.md, Tests).
Outputs that a kernel does not produce (a gate gradient without gates) are returned as empty
tensors: custom ops cannot return None.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "attention_block_forward",
    "attention_block_backward",
    "attention_block_accumulate_triton",
    "LINEAR_TRITON_OPS",
]

_NS = "seqpar"


def _softmax_triton():
    from seqpar.kernels import softmax_triton

    return softmax_triton


def _softmax_sdpa():
    from seqpar.kernels import softmax_sdpa

    return softmax_sdpa


def _softmax_reference():
    from seqpar.kernels import softmax_reference

    return softmax_reference


def _mask(diagonal_offset: Optional[int], window_offset: Optional[int], softcap: Optional[float]) -> dict:
    return dict(diagonal_offset=diagonal_offset, window_offset=window_offset, softcap=softcap)


# --------------------------------------------------------------------------------------------
# softmax attention blocks
# --------------------------------------------------------------------------------------------


def _forward_impl(q: Tensor, k: Tensor, v: Tensor, backend: str, scale: float, diagonal_offset: Optional[int],
                  window_offset: Optional[int], softcap: Optional[float]) -> tuple[Tensor, Tensor]:
    """(o, lse) of one block on ``backend`` ("torch", "sdpa" or "triton", already chosen and
    the mask arguments checked by :mod:`seqpar.kernels.softmax`)."""
    mask = _mask(diagonal_offset, window_offset, softcap)
    if backend == "triton":
        return _softmax_triton().attention_block_forward_triton(q, k, v, scale=scale, **mask)
    if backend == "sdpa":
        return _softmax_sdpa().attention_block_forward_sdpa(q, k, v, scale=scale, **mask)
    return _softmax_reference().attention_block_forward_reference(q, k, v, scale=scale, **mask)


attention_block_forward = torch.library.custom_op(f"{_NS}::attention_block_forward", _forward_impl, mutates_args=())


@attention_block_forward.register_fake
def _attention_block_forward_fake(q, k, v, backend, scale, diagonal_offset, window_offset, softcap):
    if backend == "triton":
        return _softmax_triton().attention_block_forward_triton_empty(
            q, k, v, scale=scale, **_mask(diagonal_offset, window_offset, softcap))
    # torch / sdpa: plain torch ops (the sdpa ones have fake kernels): run them on the fake tensors
    return _forward_impl(q, k, v, backend, scale, diagonal_offset, window_offset, softcap)


def _forward_setup_context(ctx, inputs, output) -> None:
    q, k, v, backend, scale, diagonal_offset, window_offset, softcap = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.args = (backend, scale, diagonal_offset, window_offset, softcap)


def _forward_grad(ctx, do: Optional[Tensor], dlse: Optional[Tensor]):
    """Autograd of the forward op (a block on its own: its lse is the row-global one) through the
    backward op: delta = rowsum(o * do) - dlse. The sdpa backward takes o as its ``out`` when there
    is no lse gradient; with one, the block's backward runs on the reference (exact)."""
    q, k, v, o, lse = ctx.saved_tensors
    backend, scale, diagonal_offset, window_offset, softcap = ctx.args
    do = torch.zeros_like(o) if do is None else do.to(o.dtype)
    out = None
    if backend == "sdpa" and dlse is None:
        delta, out = None, o
    else:
        delta = (o * do).sum(-1).transpose(1, 2)
        delta = (delta if dlse is None else delta - dlse.to(delta.dtype)).contiguous()
        backend = "torch" if backend == "sdpa" else backend
    dq, dk, dv = attention_block_backward(do, q, k, v, lse, delta, out, backend, scale, diagonal_offset,
                                          window_offset, softcap)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


attention_block_forward.register_autograd(_forward_grad, setup_context=_forward_setup_context)


def _backward_impl(do: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Optional[Tensor],
                   out: Optional[Tensor], backend: str, scale: float, diagonal_offset: Optional[int],
                   window_offset: Optional[int], softcap: Optional[float]) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of one block on ``backend``. "sdpa" needs ``out`` (rowsum(out * do) = delta,
    :func:`seqpar.kernels.softmax.prepare_backward`; ``delta`` may then be None), the others ``delta``."""
    mask = _mask(diagonal_offset, window_offset, softcap)
    if backend == "sdpa":
        if out is None:  # rebuilding it reads tensor data (whether it exists): the caller's job
            raise ValueError("seqpar::attention_block_backward on 'sdpa' needs out")
        return _softmax_sdpa().attention_block_backward_sdpa(do, q, k, v, lse, delta, scale=scale, out=out, **mask)
    if delta is None:
        raise ValueError(f"seqpar::attention_block_backward on {backend!r} needs delta")
    if backend == "triton":
        return _softmax_triton().attention_block_backward_triton(do, q, k, v, lse, delta, scale=scale, **mask)
    return _softmax_reference().attention_block_backward_reference(do, q, k, v, lse, delta, scale=scale, **mask)


attention_block_backward = torch.library.custom_op(f"{_NS}::attention_block_backward", _backward_impl, mutates_args=())


@attention_block_backward.register_fake
def _attention_block_backward_fake(do, q, k, v, lse, delta, out, backend, scale, diagonal_offset, window_offset,
                                   softcap):
    if backend == "triton":
        if delta is None:
            raise ValueError("seqpar::attention_block_backward on 'triton' needs delta")
        return _softmax_triton().attention_block_backward_triton_empty(
            do, q, k, v, lse, delta, scale=scale, **_mask(diagonal_offset, window_offset, softcap))
    return _backward_impl(do, q, k, v, lse, delta, out, backend, scale, diagonal_offset, window_offset, softcap)


@torch.library.custom_op(f"{_NS}::attention_block_accumulate_triton", mutates_args=("o_acc", "lse_acc"))
def attention_block_accumulate_triton(q: Tensor, k: Tensor, v: Tensor, o_acc: Tensor, lse_acc: Tensor, scale: float,
                                      diagonal_offset: Optional[int], window_offset: Optional[int],
                                      softcap: Optional[float]) -> None:
    """One block merged into the running (o_acc, lse_acc) in place, in the Triton kernel's epilogue."""
    _softmax_triton().attention_block_accumulate_triton_(q, k, v, o_acc, lse_acc, scale=scale,
                                                         **_mask(diagonal_offset, window_offset, softcap))


@attention_block_accumulate_triton.register_fake
def _attention_block_accumulate_triton_fake(q, k, v, o_acc, lse_acc, scale, diagonal_offset, window_offset, softcap):
    _softmax_triton().check_accumulate_inputs(q, k, v, o_acc, lse_acc)


# --------------------------------------------------------------------------------------------
# chunked linear attention on Triton: one op per kernel launch
# --------------------------------------------------------------------------------------------

# name -> (module of seqpar.kernels, launcher function, schema). The launcher ``f`` allocates its
# outputs and launches; ``f_empty`` (same arguments) allocates the same outputs: the fake. Tensors:
# q, k [B, T, H, Dk], v / do [B, T, H, Dv] (any strides), gc the chunk-local cumulative log gates,
# chunk states flat [B*H, NT, Dk, Dv]; ``chunk`` is the tile length BT. See each launcher's doc.
LINEAR_TRITON_OPS: dict[str, tuple[str, str, str]] = {
    # scalar / per-head gates (seqpar.kernels.linear_triton)
    "linear_triton_fwd_h": ("linear_triton", "fwd_h",
                            "(Tensor k, Tensor v, Tensor? gc, Tensor? h0, int chunk) -> (Tensor, Tensor)"),
    "linear_triton_fwd_o": ("linear_triton", "fwd_o",
                            "(Tensor q, Tensor k, Tensor v, Tensor? gc, Tensor hs, float scale, int chunk) "
                            "-> Tensor"),
    "linear_triton_bwd_dh": ("linear_triton", "bwd_dh",
                             "(Tensor q, Tensor do, Tensor? gc, Tensor? dht, float scale, int chunk) "
                             "-> (Tensor, Tensor)"),
    "linear_triton_bwd": ("linear_triton", "bwd",
                          "(Tensor q, Tensor k, Tensor v, Tensor do, Tensor? gc, Tensor hs, Tensor dhs, float scale, "
                          "int chunk, bool want_dg) -> (Tensor, Tensor, Tensor, Tensor)"),
    # per-key gates, GLA (seqpar.kernels.gla_triton)
    "gla_triton_state": ("gla_triton", "state_pass",
                         "(Tensor x, Tensor y, Tensor gc, Tensor? init, float scale, int chunk, bool reverse) "
                         "-> (Tensor, Tensor)"),
    "gla_triton_fwd_o": ("gla_triton", "fwd_o",
                         "(Tensor q, Tensor k, Tensor v, Tensor gc, Tensor hs, float scale, int chunk) -> Tensor"),
    "gla_triton_bwd": ("gla_triton", "bwd",
                       "(Tensor q, Tensor k, Tensor v, Tensor do, Tensor gc, Tensor hs, Tensor dhs, float scale, "
                       "int chunk) -> (Tensor, Tensor, Tensor, Tensor)"),
    # the gated delta rule (seqpar.kernels.delta_triton)
    "delta_triton_wy": ("delta_triton", "wy_fwd",
                        "(Tensor k, Tensor v, Tensor beta, Tensor? gc, int chunk) -> (Tensor, Tensor, Tensor)"),
    "delta_triton_fwd_h": ("delta_triton", "fwd_h",
                           "(Tensor k, Tensor w, Tensor u, Tensor? gc, Tensor? h0, int chunk) "
                           "-> (Tensor, Tensor, Tensor)"),
    "delta_triton_fwd_o": ("delta_triton", "fwd_o",
                           "(Tensor q, Tensor k, Tensor? gc, Tensor hs, Tensor v_new, float scale, int chunk) "
                           "-> Tensor"),
    "delta_triton_bwd_dv_local": ("delta_triton", "bwd_dv_local",
                                  "(Tensor q, Tensor k, Tensor do, Tensor? gc, float scale, int chunk) -> Tensor"),
    "delta_triton_bwd_dh": ("delta_triton", "bwd_dh",
                            "(Tensor q, Tensor k, Tensor w, Tensor do, Tensor? gc, Tensor dv_local, Tensor? dht, "
                            "float scale, int chunk) -> (Tensor, Tensor, Tensor)"),
    "delta_triton_bwd_dqk": ("delta_triton", "bwd_dqk",
                             "(Tensor q, Tensor k, Tensor do, Tensor? gc, Tensor hs, Tensor dhs, Tensor v_new, "
                             "Tensor dv_new, float scale, int chunk) -> (Tensor, Tensor, Tensor, Tensor)"),
    "delta_triton_bwd_wy": ("delta_triton", "bwd_wy",
                            "(Tensor k, Tensor v, Tensor beta, Tensor? gc, Tensor a, Tensor dw, Tensor dv_new, "
                            "Tensor dk1, int chunk) -> (Tensor, Tensor, Tensor, Tensor)"),
}


def _launcher_op(name: str, module: str, function: str, schema: str):
    """``seqpar::<name>``: ``seqpar.kernels.<module>.<function>``, faked by ``<function>_empty``."""

    def impl(*args):
        return getattr(importlib.import_module(f"seqpar.kernels.{module}"), function)(*args)

    def fake(*args):
        return getattr(importlib.import_module(f"seqpar.kernels.{module}"), f"{function}_empty")(*args)

    op = torch.library.custom_op(f"{_NS}::{name}", impl, mutates_args=(), schema=schema)
    op.register_fake(fake)
    return op


_LINEAR_OPS = {name: _launcher_op(name, *spec) for name, spec in LINEAR_TRITON_OPS.items()}
linear_triton_fwd_h = _LINEAR_OPS["linear_triton_fwd_h"]
linear_triton_fwd_o = _LINEAR_OPS["linear_triton_fwd_o"]
linear_triton_bwd_dh = _LINEAR_OPS["linear_triton_bwd_dh"]
linear_triton_bwd = _LINEAR_OPS["linear_triton_bwd"]
gla_triton_state = _LINEAR_OPS["gla_triton_state"]
gla_triton_fwd_o = _LINEAR_OPS["gla_triton_fwd_o"]
gla_triton_bwd = _LINEAR_OPS["gla_triton_bwd"]
delta_triton_wy = _LINEAR_OPS["delta_triton_wy"]
delta_triton_fwd_h = _LINEAR_OPS["delta_triton_fwd_h"]
delta_triton_fwd_o = _LINEAR_OPS["delta_triton_fwd_o"]
delta_triton_bwd_dv_local = _LINEAR_OPS["delta_triton_bwd_dv_local"]
delta_triton_bwd_dh = _LINEAR_OPS["delta_triton_bwd_dh"]
delta_triton_bwd_dqk = _LINEAR_OPS["delta_triton_bwd_dqk"]
delta_triton_bwd_wy = _LINEAR_OPS["delta_triton_bwd_wy"]
