"""Chunked linear attention: one dispatcher over the reference (torch) and Triton backends, and a
single-device autograd wrapper.

Every function works on one device and knows nothing about ranks. Conventions are those of
:mod:`seqpar.kernels.linear_reference`: q, k [B, T, H, Dk], v [B, T, H, Dv], log gates ``g``
[B, T, H] or per-head ``g_gamma`` [H] (no gradient: a fixed buffer), states [B, H, Dk, Dv];
outputs, states and gradients in the compute dtype (float32, or float64 for float64 inputs).
"""
from __future__ import annotations

import torch

from seqpar.kernels.linear_reference import (
    ChunkedRun,
    chunk_linear_attention_backward_reference,
    chunk_linear_attention_forward_reference,
    default_scale,
)
from seqpar.kernels.softmax import resolve_backend

DEFAULT_CHUNK_SIZE = 64


def _triton():
    from seqpar.kernels import linear_triton

    return linear_triton


def chunked_run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, g: torch.Tensor | None = None,
                g_gamma: torch.Tensor | None = None, scale: float | None = None,
                chunk_size: int = DEFAULT_CHUNK_SIZE, backend: str = "auto"):
    """The chunked computation of one run of tokens split into its stages (``states`` ->
    ``outputs``; ``state_grads`` -> ``input_grads``; ``with_initial_state`` / ``with_final_grad``
    shift results computed from a zero initial state / final-state gradient), on the chosen
    backend: :class:`~seqpar.kernels.linear_reference.ChunkedRun` or
    ``linear_triton.TritonChunkedRun``. The sequence-parallel strategies call the stages between
    their communication steps; :func:`chunk_linear_attention_forward` is states + outputs."""
    if resolve_backend(backend, q.device) == "triton" and q.dtype != torch.float64:
        return _triton().TritonChunkedRun(q, k, v, g=g, g_gamma=g_gamma, scale=scale, chunk_size=chunk_size)
    return ChunkedRun(q, k, v, g=g, g_gamma=g_gamma, scale=scale, chunk_size=chunk_size)


def chunk_linear_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                                   g: torch.Tensor | None = None, g_gamma: torch.Tensor | None = None,
                                   scale: float | None = None, initial_state: torch.Tensor | None = None,
                                   output_final_state: bool = False, chunk_size: int = DEFAULT_CHUNK_SIZE,
                                   backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
    """(o, final_state or None) of chunked linear attention on one device."""
    kwargs = dict(g=g, g_gamma=g_gamma, scale=scale, initial_state=initial_state,
                  output_final_state=output_final_state, chunk_size=chunk_size)
    if resolve_backend(backend, q.device) == "triton":
        return _triton().chunk_linear_attention_forward_triton(q, k, v, **kwargs)
    return chunk_linear_attention_forward_reference(q, k, v, **kwargs)


def chunk_linear_attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                                    g: torch.Tensor | None = None, g_gamma: torch.Tensor | None = None,
                                    scale: float | None = None, initial_state: torch.Tensor | None = None,
                                    dht: torch.Tensor | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                                    backend: str = "auto"):
    """(dq, dk, dv, dg or None, dh0 or None); ``dht`` is the gradient of the final state."""
    kwargs = dict(g=g, g_gamma=g_gamma, scale=scale, initial_state=initial_state, dht=dht, chunk_size=chunk_size)
    if resolve_backend(backend, q.device) == "triton":
        return _triton().chunk_linear_attention_backward_triton(do, q, k, v, **kwargs)
    return chunk_linear_attention_backward_reference(do, q, k, v, **kwargs)


def check_linear_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                        g_gamma: torch.Tensor | None, initial_state: torch.Tensor | None) -> None:
    """Raise a ValueError naming the problem and the numbers for inconsistent inputs."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got shapes {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape [B, T, H, Dk]; got {tuple(q.shape)} and {tuple(k.shape)}")
    B, T, H, Dk = q.shape
    if v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be [B, T, H, Dv] = [{B}, {T}, {H}, Dv] like q; got {tuple(v.shape)}")
    Dv = v.shape[-1]
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.is_floating_point():
        raise ValueError(f"q, k, v must be floating point; got {q.dtype}")
    named = [("k", k), ("v", v), ("g", g), ("g_gamma", g_gamma), ("initial_state", initial_state)]
    for name, t in named:
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        if t is not None and not t.is_floating_point():
            raise ValueError(f"{name} must be floating point; got {t.dtype}")
    if g is not None and g_gamma is not None:
        raise ValueError("give either g (per-token log gates [B, T, H]) or g_gamma (per-head log decay [H]), not both")
    if g is not None and tuple(g.shape) != (B, T, H):
        raise ValueError(f"g must be [B, T, H] = [{B}, {T}, {H}] (local length T); got {tuple(g.shape)}")
    if g_gamma is not None and tuple(g_gamma.shape) != (H,):
        raise ValueError(f"g_gamma must be [H] = [{H}]; got {tuple(g_gamma.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (B, H, Dk, Dv):
        raise ValueError(f"initial_state must be [B, H, Dk, Dv] = [{B}, {H}, {Dk}, {Dv}]; "
                         f"got {tuple(initial_state.shape)}")


class _ChunkLinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, g_gamma, scale, output_final_state, chunk_size, backend):
        o, final = chunk_linear_attention_forward(q, k, v, g=g, g_gamma=g_gamma, scale=scale,
                                                  initial_state=initial_state, output_final_state=output_final_state,
                                                  chunk_size=chunk_size, backend=backend)
        ctx.save_for_backward(q, k, v, g, initial_state, g_gamma)
        ctx.scale, ctx.chunk_size, ctx.backend = scale, chunk_size, backend
        ctx.output_final_state = output_final_state
        if final is None:
            final = o.new_zeros(())
            ctx.mark_non_differentiable(final)
        return o.to(q.dtype), final

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, initial_state, g_gamma = ctx.saved_tensors
        dq, dk, dv, dg, dh0 = chunk_linear_attention_backward(
            do, q, k, v, g=g, g_gamma=g_gamma, scale=ctx.scale, initial_state=initial_state,
            dht=dht if ctx.output_final_state else None, chunk_size=ctx.chunk_size, backend=ctx.backend)
        dg = dg.to(g.dtype) if dg is not None and ctx.needs_input_grad[3] else None
        dh0 = dh0.to(initial_state.dtype) if dh0 is not None and ctx.needs_input_grad[4] else None
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg, dh0) + (None,) * 5


def chunk_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, g: torch.Tensor | None = None,
                           g_gamma: torch.Tensor | None = None, scale: float | None = None,
                           initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                           backend: str = "auto", chunk_size: int = DEFAULT_CHUNK_SIZE
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Linear attention with optional decay on one device, differentiable in q, k, v, g,
    initial_state and through the final state.

    S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = scale * S_t^T q_t. q, k [B, T, H, Dk], v [B, T, H, Dv];
    ``g`` [B, T, H] per-token log gates or ``g_gamma`` [H] per-head log decay (a fixed buffer:
    no gradient); ``scale`` defaults to Dk ** -0.5; ``initial_state`` [B, H, Dk, Dv].
    Returns o in q's dtype and the final state (fp32, fp64 for fp64 inputs) or None.
    """
    check_linear_inputs(q, k, v, g, g_gamma, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    resolve_backend(backend, q.device)
    o, final = _ChunkLinearAttention.apply(q, k, v, g, initial_state, g_gamma, default_scale(q, scale),
                                           output_final_state, chunk_size, backend)
    return o, (final if output_final_state else None)
