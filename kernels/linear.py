"""Chunked linear attention: one dispatcher over the reference (torch) and Triton backends, and a
single-device autograd wrapper.

Every function works on one device and knows nothing about ranks. Conventions are those of
:mod:`seqpar.kernels.linear_reference`: q, k [B, T, H, Dk], v [B, T, H, Dv], log gates ``g``
[B, T, H] or per-head ``g_gamma`` [H] (no gradient: a fixed buffer), states [B, H, Dk, Dv];
outputs, states and gradients in the compute dtype (float32, or float64 for float64 inputs).
"""
from __future__ import annotations

import torch

from seqpar.kernels.linear_reference import ChunkedRun, default_scale
from seqpar.kernels.softmax import resolve_backend
from seqpar.kernels.softmax_reference import compute_dtype

DEFAULT_CHUNK_SIZE = 64


FAMILIES = ("scalar", "gla", "delta", "kda")


def linear_family(g: torch.Tensor | None, beta: torch.Tensor | None) -> str:
    """The recurrence the gates select: 'scalar' (no gate, ``g_gamma`` or ``g`` [B, T, H]), 'gla'
    (``g`` [B, T, H, Dk]: per-key gates), 'delta' (``beta``, with ``g`` [B, T, H] or none: the gated
    delta rule) or 'kda' (``beta`` with ``g`` [B, T, H, Dk]: the per-channel gated delta rule)."""
    per_key = g is not None and g.dim() == 4
    if beta is None:
        return "gla" if per_key else "scalar"
    return "kda" if per_key else "delta"


def check_family_backend(family: str, backend: str) -> None:
    """Refuse a family on a backend that has no kernel for it (KDA has no Triton kernel)."""
    if family == "kda" and backend == "triton":
        raise ValueError("the per-channel gated delta rule (beta with g [B, T, H, Dk]) has no Triton kernel; "
                         "use backend='torch' (or 'auto', which picks it)")


def chunked_run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, g: torch.Tensor | None = None,
                g_gamma: torch.Tensor | None = None, beta: torch.Tensor | None = None, scale: float | None = None,
                chunk_size: int = DEFAULT_CHUNK_SIZE, backend: str = "auto", use_qk_l2norm: bool = False):
    """The chunked computation of one run of tokens (no document boundary inside) split into its
    stages, for the family the gates select (:func:`linear_family`), on the chosen backend.

    Every run has ``states`` -> ``outputs``; ``state_grads`` -> ``input_grads`` (a dict of the
    gradients of q, k, v and the given gates); ``with_initial_state`` / ``with_final_grad``
    (results computed from a zero initial state / zero final-state gradient, shifted); and
    ``transition()``, the linear map A with S_out = A(S_in) + states().final
    (:mod:`seqpar.kernels.linear_transitions`). The sequence-parallel strategies call the stages
    between their communication steps (docs/linear.md)."""
    family = linear_family(g, beta)
    triton = resolve_backend(backend, q.device) == "triton" and q.dtype != torch.float64
    if family == "scalar":
        if triton:
            from seqpar.kernels.linear_triton import TritonChunkedRun
            return TritonChunkedRun(q, k, v, g=g, g_gamma=g_gamma, scale=scale, chunk_size=chunk_size)
        return ChunkedRun(q, k, v, g=g, g_gamma=g_gamma, scale=scale, chunk_size=chunk_size)
    if family == "gla":
        if triton:
            from seqpar.kernels.gla_triton import TritonGlaChunkedRun
            return TritonGlaChunkedRun(q, k, v, g=g, scale=scale, chunk_size=chunk_size)
        from seqpar.kernels.gla_reference import GlaChunkedRun
        return GlaChunkedRun(q, k, v, g=g, scale=scale, chunk_size=chunk_size)
    check_family_backend(family, backend)
    if triton and family == "delta":
        from seqpar.kernels.delta_triton import TritonDeltaChunkedRun
        return TritonDeltaChunkedRun(q, k, v, beta=beta, g=g, scale=scale, chunk_size=chunk_size,
                                     use_qk_l2norm=use_qk_l2norm)
    from seqpar.kernels import delta_reference
    run_class = getattr(delta_reference, "KdaChunkedRun", None) if family == "kda" else None
    return (run_class or delta_reference.DeltaChunkedRun)(q, k, v, beta=beta, g=g, scale=scale, chunk_size=chunk_size,
                                                          use_qk_l2norm=use_qk_l2norm)


def chunk_linear_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                                   g: torch.Tensor | None = None, g_gamma: torch.Tensor | None = None,
                                   beta: torch.Tensor | None = None, scale: float | None = None,
                                   initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                                   chunk_size: int = DEFAULT_CHUNK_SIZE, backend: str = "auto",
                                   use_qk_l2norm: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(o, final_state or None) of chunked linear attention of any family on one device."""
    if q.shape[1] == 0:
        return _empty_forward(q, v, initial_state, output_final_state)
    run = chunked_run(q, k, v, g=g, g_gamma=g_gamma, beta=beta, scale=scale, chunk_size=chunk_size,
                      backend=backend, use_qk_l2norm=use_qk_l2norm)
    states = run.states(initial_state)
    return run.outputs(states), (states.final if output_final_state else None)


def chunk_linear_attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                                    g: torch.Tensor | None = None, g_gamma: torch.Tensor | None = None,
                                    beta: torch.Tensor | None = None, scale: float | None = None,
                                    initial_state: torch.Tensor | None = None, dht: torch.Tensor | None = None,
                                    chunk_size: int = DEFAULT_CHUNK_SIZE, backend: str = "auto",
                                    use_qk_l2norm: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """({"q": dq, "k": dk, "v": dv, "g": dg (with g), "beta": dbeta (with beta)}, dh0 or None);
    ``dht`` is the gradient of the final state, dh0 only when ``initial_state`` is given."""
    if q.shape[1] == 0:
        return _empty_backward(q, v, g, beta, initial_state, dht)
    run = chunked_run(q, k, v, g=g, g_gamma=g_gamma, beta=beta, scale=scale, chunk_size=chunk_size,
                      backend=backend, use_qk_l2norm=use_qk_l2norm)
    states = run.states(initial_state)
    grads = run.state_grads(do, dht)
    return run.input_grads(do, states, grads, dht), (grads.initial if initial_state is not None else None)


def _empty_forward(q, v, initial_state, output_final_state):
    B, _, H, Dk = q.shape
    cd = compute_dtype(q.dtype)
    o = torch.zeros(B, 0, H, v.shape[-1], dtype=cd, device=q.device)
    final = (initial_state.to(cd).clone() if initial_state is not None
             else torch.zeros(B, H, Dk, v.shape[-1], dtype=cd, device=q.device))
    return o, (final if output_final_state else None)


def _empty_backward(q, v, g, beta, initial_state, dht):
    cd = compute_dtype(q.dtype)
    grads = {"q": torch.zeros(q.shape, dtype=cd, device=q.device), "k": torch.zeros(q.shape, dtype=cd, device=q.device),
             "v": torch.zeros(v.shape, dtype=cd, device=q.device)}
    for name, t in (("g", g), ("beta", beta)):
        if t is not None:
            grads[name] = torch.zeros(t.shape, dtype=cd, device=q.device)
    dh0 = None
    if initial_state is not None:
        dh0 = dht.to(cd).clone() if dht is not None else torch.zeros(initial_state.shape, dtype=cd, device=q.device)
    return grads, dh0


def check_linear_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                        g_gamma: torch.Tensor | None, initial_state: torch.Tensor | None,
                        beta: torch.Tensor | None = None, use_qk_l2norm: bool = False) -> None:
    """Raise a ValueError naming the problem and the numbers for inconsistent inputs (an
    ``initial_state`` of one state per batch row: see :func:`check_initial_state`)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got shapes {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape [B, T, H, Dk]; got {tuple(q.shape)} and {tuple(k.shape)}")
    B, T, H, Dk = q.shape
    if v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be [B, T, H, Dv] = [{B}, {T}, {H}, Dv] like q; got {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.is_floating_point():
        raise ValueError(f"q, k, v must be floating point; got {q.dtype}")
    named = [("k", k), ("v", v), ("g", g), ("g_gamma", g_gamma), ("beta", beta)]
    for name, t in named:
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        if t is not None and not t.is_floating_point():
            raise ValueError(f"{name} must be floating point; got {t.dtype}")
    if g is not None and g_gamma is not None:
        raise ValueError("give either g (per-token log gates [B, T, H] or [B, T, H, Dk]) or g_gamma "
                         "(per-head log decay [H]), not both")
    if g is not None and tuple(g.shape) not in ((B, T, H), (B, T, H, Dk)):
        raise ValueError(f"g must be [B, T, H] = [{B}, {T}, {H}] (a log gate per head) or [B, T, H, Dk] = "
                         f"[{B}, {T}, {H}, {Dk}] (per key channel: GLA / KDA) with the local length T; "
                         f"got {tuple(g.shape)}")
    if g_gamma is not None and tuple(g_gamma.shape) != (H,):
        raise ValueError(f"g_gamma must be [H] = [{H}]; got {tuple(g_gamma.shape)}")
    if beta is not None and tuple(beta.shape) != (B, T, H):
        raise ValueError(f"beta must be [B, T, H] = [{B}, {T}, {H}] (the delta rule's step per head and token); "
                         f"got {tuple(beta.shape)}")
    if beta is not None and g_gamma is not None:
        raise ValueError("g_gamma (a fixed per-head decay) is not supported with the delta rule (beta): pass it "
                         "as per-token log gates g = g_gamma expanded to [B, T, H]")
    if use_qk_l2norm is not False and use_qk_l2norm is not True:
        raise TypeError(f"use_qk_l2norm must be a bool, got {type(use_qk_l2norm).__name__} {use_qk_l2norm!r}")
    if use_qk_l2norm and beta is None:
        raise ValueError("use_qk_l2norm=True applies to the delta rule (beta given); normalise q and k yourself "
                         "for the other families")
    check_initial_state(initial_state, q, v)


def check_initial_state(initial_state: torch.Tensor | None, q: torch.Tensor, v: torch.Tensor,
                        state_batch: int | None = None) -> None:
    """initial_state must be [B, H, Dk, Dv] (``state_batch`` None) or [state_batch, H, Dk, Dv] (one
    state per document), floating point, on q's device, against q [B, T, H, Dk] and v [..., Dv]
    (already checked)."""
    if initial_state is None:
        return
    if initial_state.device != q.device:
        raise ValueError(f"initial_state is on {initial_state.device} but q is on {q.device}")
    if not initial_state.is_floating_point():
        raise ValueError(f"initial_state must be floating point; got {initial_state.dtype}")
    B, _, H, Dk = q.shape
    Dv = v.shape[-1]
    n = B if state_batch is None else state_batch
    if tuple(initial_state.shape) != (n, H, Dk, Dv):
        lead = "B" if state_batch is None else "N (documents)"
        raise ValueError(f"initial_state must be [{lead}, H, Dk, Dv] = [{n}, {H}, {Dk}, {Dv}]; "
                         f"got {tuple(initial_state.shape)}")


def check_beta_values(beta: torch.Tensor) -> None:
    """beta must lie in (0, 1] (reads the data: a GPU synchronisation)."""
    if beta.numel() == 0:
        return
    bad = ~((beta > 0) & (beta <= 1))
    if bool(bad.any()):
        lo, hi = float(beta.min()), float(beta.max())
        raise ValueError(f"beta must lie in (0, 1]; {int(bad.sum())} of {beta.numel()} values do not "
                         f"(min {lo:g}, max {hi:g})")


class _ChunkLinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, kwargs: dict, output_final_state: bool):
        o, final = chunk_linear_attention_forward(q, k, v, g=g, beta=beta, initial_state=initial_state,
                                                  output_final_state=output_final_state, **kwargs)
        ctx.save_for_backward(q, k, v, g, beta, initial_state)
        ctx.kwargs, ctx.output_final_state = kwargs, output_final_state
        if final is None:
            final = o.new_zeros(())
            ctx.mark_non_differentiable(final)
        return o.to(q.dtype), final

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, initial_state = ctx.saved_tensors
        grads, dh0 = chunk_linear_attention_backward(do, q, k, v, g=g, beta=beta, initial_state=initial_state,
                                                     dht=dht if ctx.output_final_state else None, **ctx.kwargs)
        cast = lambda name, like, i: (grads[name].to(like.dtype) if like is not None and ctx.needs_input_grad[i]  # noqa: E731
                                      else None)
        dh0 = dh0.to(initial_state.dtype) if dh0 is not None and ctx.needs_input_grad[5] else None
        return (cast("q", q, 0), cast("k", k, 1), cast("v", v, 2), cast("g", g, 3), cast("beta", beta, 4), dh0,
                None, None)


def chunk_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, g: torch.Tensor | None = None,
                           g_gamma: torch.Tensor | None = None, beta: torch.Tensor | None = None,
                           scale: float | None = None, initial_state: torch.Tensor | None = None,
                           output_final_state: bool = False, backend: str = "auto",
                           chunk_size: int = DEFAULT_CHUNK_SIZE, use_qk_l2norm: bool = False
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Linear attention of any family on one device, differentiable in q, k, v, g, beta,
    initial_state and through the final state, over one run of tokens (for packed documents call
    it once per document, or use :func:`seqpar.linear_attention` with ``cu_seqlens`` and a
    one-rank group).

    Per head, with state S [Dk, Dv] and o_t = scale * S_t^T q_t (docs/linear.md):

    - no gate / ``g_gamma`` [H] (fixed, no gradient) / ``g`` [B, T, H]: S_t = exp(g_t) S + k_t v_t^T;
    - ``g`` [B, T, H, Dk] (GLA): S_t = diag(exp(g_t)) S + k_t v_t^T;
    - ``beta`` [B, T, H] in (0, 1] (gated delta rule, with optional ``g`` [B, T, H]):
      S_t = exp(g_t) (I - beta_t k_t k_t^T) S + beta_t k_t v_t^T; with ``g`` [B, T, H, Dk] (KDA):
      S_t = (I - beta_t k_t k_t^T) diag(exp(g_t)) S + beta_t k_t v_t^T. ``use_qk_l2norm``
      normalises q and k inside (the delta rule expects unit keys).

    q, k [B, T, H, Dk], v [B, T, H, Dv]; log gates <= 0; ``scale`` defaults to Dk ** -0.5;
    ``initial_state`` [B, H, Dk, Dv]. Returns o in q's dtype and the final state (fp32, fp64 for
    fp64 inputs) or None.
    """
    check_linear_inputs(q, k, v, g, g_gamma, initial_state, beta, use_qk_l2norm)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    on_triton = (resolve_backend(backend, q.device) == "triton" and q.dtype != torch.float64
                 and linear_family(g, beta) != "kda")
    kwargs = dict(g_gamma=g_gamma, scale=default_scale(q, scale), chunk_size=chunk_size, backend=backend,
                  use_qk_l2norm=use_qk_l2norm)
    # the Triton runs are seqpar:: ops and torch glue (torch.compile traces them whole); the torch
    # runs read their chunks' decays on the host, so under torch.compile they run eagerly
    apply = _ChunkLinearAttention.apply if on_triton else _apply_eagerly
    o, final = apply(q, k, v, g, beta, initial_state, kwargs, output_final_state)
    return o, (final if output_final_state else None)


@torch.compiler.disable(reason="the torch chunked runs read their chunks' decays on the host (exact or "
                               "factorised form): they run eagerly")
def _apply_eagerly(*args):
    """``_ChunkLinearAttention.apply(*args)`` outside torch.compile's graphs (one graph break)."""
    return _ChunkLinearAttention.apply(*args)
