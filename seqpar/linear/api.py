"""The public entry point of sequence-parallel linear attention: validation, the autograd
Function, and the choice of strategy."""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch
import torch.distributed as dist

from seqpar.validation import check_flag, check_scale
from seqpar.comm import check_agreement, check_validate_mode, exclusive_use
from seqpar.comm.groups import group_rank_and_size
from seqpar.kernels.linear import (
    DEFAULT_CHUNK_SIZE,
    check_beta_values,
    check_family_backend,
    check_initial_state,
    check_linear_inputs,
    linear_family,
)
from seqpar.kernels.linear_reference import default_scale
from seqpar.kernels.softmax import resolve_backend
from seqpar.kernels.softmax_reference import compute_dtype
from seqpar.layout import BalancedLayout, check_layout, check_local_length
from seqpar.masks import boundary_list
from seqpar.linear.common import CommStats, Run, make_pieces
from seqpar.linear.lasp1 import Lasp1
from seqpar.linear.lasp2 import Lasp2

STRATEGIES = ("lasp2", "lasp1", "lasp1_serial")


def _strategy(name: str):
    if name == "lasp2":
        return Lasp2()
    if name == "lasp1":
        return Lasp1(pipelined=True)
    if name == "lasp1_serial":
        return Lasp1(pipelined=False)
    raise ValueError(f"unknown linear-attention strategy {name!r}; expected one of {STRATEGIES}")


def _join(parts: list[torch.Tensor]) -> torch.Tensor:
    """The spans of this rank in local order, along the token axis (no copy for one span)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class _LinearAttentionSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, h0, run: Run, strategy):
        pieces = make_pieces(run, q, k, v, g, beta)
        # seqpar.linear_attention holds the group (exclusive_use) over the agreement check and this forward
        outs, final, saved = strategy.forward(run, pieces, h0)
        saved["h0"] = h0.detach() if h0 is not None else None
        ctx.run, ctx.strategy, ctx.saved = run, strategy, saved
        ctx.save_for_backward(q, k, v, g, beta)
        ctx.h0_dtype = None if h0 is None else h0.dtype
        o = _join(outs).to(q.dtype)
        if final is None:
            final = q.new_zeros((), dtype=run.cd)
            ctx.mark_non_differentiable(final)
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, g, beta = ctx.saved_tensors
        run: Run = ctx.run
        pieces = make_pieces(run, q, k, v, g, beta)
        dos = [[do[:, s.start:s.stop].to(run.cd) for s in p.spans] for p in pieces]
        with exclusive_use(*run.comm_groups(), what="seqpar.linear_attention (backward)"):
            dfinal_total = None
            if run.output_final_state:
                dfinal_total = run.sum_over_ranks(dfinal.to(run.cd), "backward")
            grads, dh0 = ctx.strategy.backward(run, pieces, dos, dfinal_total, ctx.saved, ctx.needs_input_grad[5])
        spans = [d for per_piece in grads for d in per_piece]
        joined = {name: _join([d[name] for d in spans]) for name in spans[0]}
        cast = lambda name, like, i: (joined[name].to(like.dtype)  # noqa: E731
                                      if like is not None and ctx.needs_input_grad[i] and name in joined else None)
        dh0 = dh0.to(ctx.h0_dtype) if dh0 is not None else None
        return (cast("q", q, 0), cast("k", k, 1), cast("v", v, 2), cast("g", g, 3), cast("beta", beta, 4), dh0,
                None, None)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, strategy: str = "lasp2",
                     layout: str | BalancedLayout | None = None, group: dist.ProcessGroup | None = None,
                     g: torch.Tensor | None = None, g_gamma: torch.Tensor | None = None,
                     beta: torch.Tensor | None = None, use_qk_l2norm: bool = False,
                     cu_seqlens: torch.Tensor | Sequence[int] | None = None,
                     scale: float | None = None, initial_state: torch.Tensor | None = None,
                     output_final_state: bool = False, backend: str = "auto",
                     chunk_size: int = DEFAULT_CHUNK_SIZE, comm_stats: CommStats | None = None,
                     validate: bool | str | None = "cached") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sequence-parallel linear attention on this rank's shard (docs/linear.md).

    The recurrence runs over the *global* sequence, per head, with o_t = scale * S_t^T q_t; the
    gates pick the family:

    - no gate, ``g_gamma`` [H] (fixed per-head log decay, no gradient) or ``g`` [B, T_local, H]:
      S_t = exp(g_t) S_{t-1} + k_t v_t^T (Lightning Attention, RetNet, Mamba2-style scalar gates);
    - ``g`` [B, T_local, H, Dk] (GLA): S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T;
    - ``beta`` [B, T_local, H] in (0, 1] (Gated DeltaNet), with ``g`` [B, T_local, H] or none:
      S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T; with ``g`` [B, T_local, H, Dk]
      (KDA): S_t = (I - beta_t k_t k_t^T) diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T. The delta rule
      expects unit-norm q and k: normalise them, or pass ``use_qk_l2norm=True``.

    q, k [B, T_local, H, Dk], v [B, T_local, H, Dv] are this rank's tokens in ``layout``
    ('contiguous' (default), 'zigzag' or a :class:`~seqpar.layout.BalancedLayout`; 'striped' is not
    supported: its chunks are single tokens). Log gates must be <= 0.

    ``cu_seqlens``: packed documents, as in :func:`seqpar.attention`: the GLOBAL boundaries
    ``[0, e_1, ..., T_global]``, the same on every rank (B = 1). The state starts from zero (or the
    document's initial state) at every document start, across rank boundaries and inside chunks.
    ``initial_state`` is then [N, H, Dk, Dv] and the final state [N, H, Dk, Dv], one per document
    (flash-linear-attention's varlen convention); without documents both are [B, H, Dk, Dv].

    ``initial_state`` is passed alike on every rank; each rank returns a share of its gradient
    (the rank holding a document's first token returns that document's full gradient, the others
    zero), and the shares sum to the full gradient.

    Shapes: the layout is [batch, tokens, heads, head_dim]. A [B, H, T, D] tensor (heads and tokens
    swapped) is in general NOT detected: both axes are just sizes. Checked here: q and k of one
    shape, v like q, the gates and initial_state against q's sizes, the layout's divisibility and,
    with ``validate``, equal shapes on all ranks. Any strided view of the inputs is accepted.

    ``strategy``: 'lasp2' (one all-gather of the states -- and of the transitions when they depend
    on the tokens -- per pass, default), 'lasp1' (ring, pipelined) or 'lasp1_serial' (ring, as
    published). ``comm_stats``: an optional :class:`CommStats` that records every communication.

    Returns (o in q's dtype, final state or None). The final state (fp32; fp64 for fp64 inputs)
    is on every rank and differentiable on every rank: the gradient it receives is the sum over
    ranks (as for a tensor broadcast from one rank).

    ``validate`` (the same on every rank) checks that the ranks agree on shapes, dtype, strategy,
    layout, the gates given (and their shapes), the documents, scale and output_final_state -- and,
    when the check exchanges, g_gamma's values and an initial_state checksum -- so that every rank
    raises the same ValueError instead of a crash, hang or wrong answer in the collectives.
    ``"cached"`` (default, also None): one small exchange the first time a group sees a
    signature; ``"always"`` (True): the exchange on every call, and the log gates must be finite
    and <= 0 and beta in (0, 1]; ``"off"`` (False): none. Local checks always run.
    """
    mode = check_validate_mode(validate)
    layout = "contiguous" if layout is None else layout
    error: Exception | None = None
    run = None
    try:
        run, strat = _prepare(q, k, v, strategy=strategy, layout=layout, group=group, g=g, g_gamma=g_gamma,
                              beta=beta, use_qk_l2norm=use_qk_l2norm, cu_seqlens=cu_seqlens, scale=scale,
                              initial_state=initial_state, output_final_state=output_final_state,
                              backend=backend, chunk_size=chunk_size, comm_stats=comm_stats)
        if mode == "always":
            _check_gates(g, g_gamma, beta)
    except (ValueError, TypeError) as e:
        if mode == "off":
            raise
        error = e
    # one thread at a time on the group, from the agreement check to the end of the forward
    with exclusive_use(group, what="seqpar.linear_attention"):
        if mode != "off":
            check_agreement(_signature(q, k, v, strategy, layout, g, g_gamma, beta, use_qk_l2norm,
                                       run.documents if run is not None else _shape(cu_seqlens), initial_state,
                                       scale if run is None else run.scale, output_final_state),
                            group, what=f"seqpar.linear_attention(validate={mode!r})", mode=mode,
                            values=lambda: _values(g_gamma, initial_state), local_error=error)
        o, final = _LinearAttentionSP.apply(q, k, v, g, beta, initial_state, run, strat)
    return o, (final if output_final_state else None)


def _shape(x: object) -> object:
    return None if x is None else tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def _signature(q, k, v, strategy, layout, g, g_gamma, beta, use_qk_l2norm, documents, initial_state, scale,
               output_final_state) -> dict:
    """What every rank of one call must agree on, without reading tensor data (see ``validate``).
    The backend, chunk_size and comm_stats are local choices and are not compared. The documents
    are compared by a digest (they were read on the host already)."""
    digest = documents
    if isinstance(documents, tuple):
        digest = hashlib.sha1(repr(documents).encode()).hexdigest()[:16]
    return dict(q=_shape(q), k=_shape(k), v=_shape(v), dtype=str(getattr(q, "dtype", None)),
                strategy=strategy if isinstance(strategy, str) else repr(strategy),
                layout=layout if isinstance(layout, str) else repr(layout),
                g=_shape(g), g_gamma=_shape(g_gamma), beta=_shape(beta), use_qk_l2norm=repr(use_qk_l2norm),
                documents=digest, initial_state=_shape(initial_state), scale=scale,
                output_final_state=(bool(output_final_state) if isinstance(output_final_state, (bool, int))
                                    else repr(output_final_state)))


def _values(g_gamma, initial_state) -> dict:
    """Values that must be equal on every rank: g_gamma's, and an initial_state checksum. Reads the
    data (a GPU synchronisation), so only when the agreement check exchanges (see ``validate``)."""
    def checksum(t):
        if not isinstance(t, torch.Tensor) or t.numel() == 0 or not t.is_floating_point():
            return _shape(t)
        t64 = t.detach().to(torch.float64)
        return (tuple(t.shape), float(t64.sum()), float((t64 * t64).sum()))
    return dict(g_gamma=(tuple(g_gamma.detach().double().tolist())
                         if isinstance(g_gamma, torch.Tensor) and g_gamma.dim() == 1 else _shape(g_gamma)),
                initial_state=checksum(initial_state))


def _check_gates(g: torch.Tensor | None, g_gamma: torch.Tensor | None, beta: torch.Tensor | None) -> None:
    """Log gates must be finite and <= 0 (the kernels' stability guarantee) and beta in (0, 1];
    reads the data, so it synchronises a GPU: only under ``validate=True``."""
    for name, t in (("g", g), ("g_gamma", g_gamma)):
        if t is None or t.numel() == 0:
            continue
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} has {int((~torch.isfinite(t)).sum())} non-finite values (log gates must be finite)")
        top = float(t.max())
        if top > 0:
            raise ValueError(f"{name} has positive log gates (max {top:g}, {int((t > 0).sum())} values > 0): "
                             f"decays exp(g) > 1 grow the state and the kernels are only stable for g <= 0")
    if beta is not None:
        check_beta_values(beta)


def _prepare(q, k, v, *, strategy, layout, group, g, g_gamma, beta, use_qk_l2norm, cu_seqlens, scale,
             initial_state, output_final_state, backend, chunk_size, comm_stats) -> tuple[Run, object]:
    """Every local check, then the :class:`Run` and the strategy object of one call."""
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g), ("g_gamma", g_gamma), ("beta", beta),
                    ("initial_state", initial_state)):
        if t is not None and not isinstance(t, torch.Tensor) or t is None and name in ("q", "k", "v"):
            optional = "" if name in ("q", "k", "v") else " or None"
            raise TypeError(f"{name} must be a torch.Tensor{optional}, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() == 4 and min(t.shape[2], t.shape[3]) == 0:
            raise ValueError(f"{name} has an empty head or feature axis: shape {tuple(t.shape)} [B, T, H, D] "
                             f"needs H >= 1 and D >= 1")
    if isinstance(chunk_size, bool) or not hasattr(chunk_size, "__index__"):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__} {chunk_size!r}")
    chunk_size = chunk_size.__index__()
    check_flag("output_final_state", output_final_state)
    check_scale(scale)
    strat = _strategy(strategy)
    check_layout(layout)
    if layout == "striped":
        raise ValueError("linear attention does not support the 'striped' layout (each rank would hold "
                         "T/P chunks of one token, one state hop per token); use 'contiguous' or 'zigzag'")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    resolve_backend(backend, q.device)
    rank, world_size = group_rank_and_size(group)
    check_linear_inputs(q, k, v, g, g_gamma, None, beta, use_qk_l2norm)
    B, T_local, H, Dk = q.shape
    if T_local < 1:
        raise ValueError(f"local length must be at least 1, got {T_local}")
    check_local_length(layout, T_local, world_size)
    documents = None
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens (packed documents) needs batch size 1, got B={B} (q {tuple(q.shape)})")
        documents = tuple(boundary_list(cu_seqlens, global_len=T_local * world_size, device=q.device))
    check_initial_state(initial_state, q, v, None if documents is None else len(documents) - 1)
    family = linear_family(g, beta)
    check_family_backend(family, backend)
    run = Run(group=group, rank=rank, world_size=world_size, layout=layout, scale=default_scale(q, scale),
              chunk_size=chunk_size, backend=backend, family=family,
              g_gamma=None if g_gamma is None else g_gamma.detach(), use_qk_l2norm=use_qk_l2norm,
              data_dependent=g is not None or beta is not None, output_final_state=output_final_state,
              stats=comm_stats, cd=compute_dtype(q.dtype), B=B, H=H, Dk=Dk, Dv=v.shape[-1], local_len=T_local,
              documents=documents, device=q.device)
    return run, strat
