"""The public entry point of sequence-parallel linear attention: validation, the autograd
Function, and the choice of strategy."""
from __future__ import annotations

import torch
import torch.distributed as dist

from seqpar.validation import check_flag, check_scale
from seqpar.comm import check_agreement, check_validate_mode, exclusive_use
from seqpar.comm.groups import group_rank_and_size
from seqpar.kernels.linear import DEFAULT_CHUNK_SIZE, check_linear_inputs
from seqpar.kernels.linear_reference import default_scale
from seqpar.kernels.softmax import resolve_backend
from seqpar.kernels.softmax_reference import compute_dtype
from seqpar.layout import check_layout, check_local_length
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
    """The pieces of this rank in local order, along the token axis (no copy for one piece)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class _LinearAttentionSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, h0, run: Run, strategy):
        pieces = make_pieces(run, q, k, v, g)
        # seqpar.linear_attention holds the group (exclusive_use) over the agreement check and this forward
        outs, final, saved = strategy.forward(run, pieces, h0)
        ctx.run, ctx.strategy, ctx.saved = run, strategy, saved
        ctx.save_for_backward(q, k, v, g)
        ctx.h0_dtype = None if h0 is None else h0.dtype
        o = _join(outs).to(q.dtype)
        if final is None:
            final = q.new_zeros((), dtype=run.cd)
            ctx.mark_non_differentiable(final)
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, g = ctx.saved_tensors
        run: Run = ctx.run
        pieces = make_pieces(run, q, k, v, g)
        dos = [do[:, p.start:p.stop].to(run.cd) for p in pieces]
        with exclusive_use(*run.comm_groups(), what="seqpar.linear_attention (backward)"):
            grads, dh0 = ctx.strategy.backward(run, pieces, dos, dfinal if run.output_final_state else None,
                                               ctx.saved, ctx.needs_input_grad[4])
        dq, dk, dv = (_join([gr[i] for gr in grads]) for i in range(3))
        dh0 = dh0.to(ctx.h0_dtype) if dh0 is not None else None
        dg = _join([gr[3] for gr in grads]).to(g.dtype) if g is not None and ctx.needs_input_grad[3] else None
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg, dh0, None, None


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, strategy: str = "lasp2",
                     layout: str | None = None, group: dist.ProcessGroup | None = None,
                     g: torch.Tensor | None = None, g_gamma: torch.Tensor | None = None,
                     scale: float | None = None, initial_state: torch.Tensor | None = None,
                     output_final_state: bool = False, backend: str = "auto",
                     chunk_size: int = DEFAULT_CHUNK_SIZE, comm_stats: CommStats | None = None,
                     validate: bool | str | None = "cached") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sequence-parallel linear attention on this rank's shard (docs/linear.md).

    S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = scale * S_t^T q_t over the *global* sequence.
    q, k [B, T_local, H, Dk], v [B, T_local, H, Dv] are this rank's tokens in ``layout``
    ('contiguous' (default) or 'zigzag'; 'striped' is not supported: its chunks are single
    tokens). ``g`` [B, T_local, H]: per-token log gates (local shard); ``g_gamma`` [H]: per-head
    log decay (fixed buffer, no gradient). ``initial_state`` [B, H, Dk, Dv] is the state before
    the first global token, passed alike on every rank (each rank's gradient is its own share;
    the shares sum to the full gradient).

    Shapes: the layout is [batch, tokens, heads, head_dim]. A [B, H, T, D] tensor (heads and tokens
    swapped) is in general NOT detected: both axes are just sizes. Checked here: q and k of one
    shape, v [B, T, H, Dv] like q, g [B, T, H], g_gamma [H] and initial_state [B, H, Dk, Dv] against
    q's sizes (so swapped q / k / v are caught when a gate or a state is given in the right layout
    and T != H; without them they are not), the layout's divisibility and, with ``validate``,
    equal shapes on all ranks. ``seqpar.model`` and the adapters in ``seqpar.integrations`` also
    check the head axis against their configured head counts. Any strided view of q, k, v, g is
    accepted (permuted, sliced, expanded, transposed), on every backend.

    ``strategy``: 'lasp2' (one all-gather of the states per pass, default), 'lasp1' (ring,
    pipelined) or 'lasp1_serial' (ring, as published). ``comm_stats``: an optional
    :class:`CommStats` that records every communication of this rank.

    Returns (o in q's dtype, final state or None). The final state (fp32; fp64 for fp64 inputs)
    is the state after the last global token, on every rank, and differentiable on every rank:
    the gradient it receives is the sum over ranks (as for a tensor broadcast from one rank).

    ``validate`` (the same on every rank) checks that the ranks agree on shapes, dtype, strategy,
    layout, which gates are given (and their shapes), scale and output_final_state -- and, when
    the check exchanges, g_gamma's values and an initial_state checksum -- so that every rank
    raises the same ValueError instead of a crash, hang or wrong answer in the collectives.
    ``"cached"`` (default, also None): one small exchange the first time a group sees a
    signature, nothing on later calls with it (tensor values are read on that first call only);
    ``"always"`` (True): the exchange on every call, and the log gates must be finite and <= 0;
    ``"off"`` (False): none. Local checks always run. See docs/linear.md, "Ranks that disagree".
    """
    mode = check_validate_mode(validate)
    layout = "contiguous" if layout is None else layout
    error: Exception | None = None
    try:
        run, strat = _prepare(q, k, v, strategy=strategy, layout=layout, group=group, g=g, g_gamma=g_gamma,
                              scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                              backend=backend, chunk_size=chunk_size, comm_stats=comm_stats)
        if mode == "always":
            _check_gates(g, g_gamma)
    except (ValueError, TypeError) as e:
        if mode == "off":
            raise
        error = e
    # one thread at a time on the group, from the agreement check to the end of the forward
    with exclusive_use(group, what="seqpar.linear_attention"):
        if mode != "off":
            check_agreement(_signature(q, k, v, strategy, layout, g, g_gamma, initial_state,
                                       scale if error else run.scale, output_final_state),
                            group, what=f"seqpar.linear_attention(validate={mode!r})", mode=mode,
                            values=lambda: _values(g_gamma, initial_state), local_error=error)
        o, final = _LinearAttentionSP.apply(q, k, v, g, initial_state, run, strat)
    return o, (final if output_final_state else None)


def _shape(x: object) -> object:
    return None if x is None else tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def _signature(q, k, v, strategy, layout, g, g_gamma, initial_state, scale, output_final_state) -> dict:
    """What every rank of one call must agree on, without reading tensor data (see ``validate``).
    The backend, chunk_size and comm_stats are local choices and are not compared."""
    return dict(q=_shape(q), k=_shape(k), v=_shape(v), dtype=str(getattr(q, "dtype", None)),
                strategy=strategy if isinstance(strategy, str) else repr(strategy),
                layout=layout if isinstance(layout, str) else repr(layout),
                g=_shape(g), g_gamma=_shape(g_gamma), initial_state=_shape(initial_state), scale=scale,
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


def _check_gates(g: torch.Tensor | None, g_gamma: torch.Tensor | None) -> None:
    """Log gates must be finite and <= 0 (the kernels' stability guarantee); reads the data, so it
    synchronises a GPU: only under ``validate=True``."""
    for name, t in (("g", g), ("g_gamma", g_gamma)):
        if t is None or t.numel() == 0:
            continue
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} has {int((~torch.isfinite(t)).sum())} non-finite values (log gates must be finite)")
        top = float(t.max())
        if top > 0:
            raise ValueError(f"{name} has positive log gates (max {top:g}, {int((t > 0).sum())} values > 0): "
                             f"decays exp(g) > 1 grow the state and the kernels are only stable for g <= 0")


def _prepare(q, k, v, *, strategy, layout, group, g, g_gamma, scale, initial_state, output_final_state, backend,
             chunk_size, comm_stats) -> tuple[Run, object]:
    """Every local check, then the :class:`Run` and the strategy object of one call."""
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g), ("g_gamma", g_gamma), ("initial_state", initial_state)):
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
    check_linear_inputs(q, k, v, g, g_gamma, initial_state)
    strat = _strategy(strategy)
    check_layout(layout)
    if layout == "striped":
        raise ValueError("linear attention does not support the 'striped' layout (each rank would hold "
                         "T/P chunks of one token, one state hop per token); use 'contiguous' or 'zigzag'")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    resolve_backend(backend, q.device)
    rank, world_size = group_rank_and_size(group)
    B, T_local, H, Dk = q.shape
    if T_local < 1:
        raise ValueError(f"local length must be at least 1, got {T_local}")
    check_local_length(layout, T_local, world_size)
    run = Run(group=group, rank=rank, world_size=world_size, layout=layout, scale=default_scale(q, scale),
              chunk_size=chunk_size, backend=backend, g_gamma=None if g_gamma is None else g_gamma.detach(),
              data_dependent=g is not None, output_final_state=output_final_state, stats=comm_stats,
              cd=compute_dtype(q.dtype), B=B, H=H, Dk=Dk, Dv=v.shape[-1], local_len=T_local)
    return run, strat
