"""Public API: exact softmax attention on sequence-parallel shards (see docs/softmax.md)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from seqpar.comm import UspGroups, check_same_on_all_ranks
from seqpar.softmax import STRATEGIES, SoftmaxContextParallel, build_plan

__all__ = ["attention", "STRATEGIES"]


def _shape(x: object) -> object:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, strategy: str,
              layout: str | None = None, group: dist.ProcessGroup | UspGroups | None = None,
              causal: bool = True, scale: float | None = None, return_lse: bool = False,
              backend: str = "auto", validate: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention of this rank's queries against the keys of the whole sequence.

    q [B, T_local, Hq, D], k / v [B, T_local, Hkv, D] (Hq % Hkv == 0) are this rank's tokens under
    ``layout`` ("contiguous" by default, "zigzag" or "striped"; shard with ``seqpar.shard``).
    ``strategy``: "ring", "allgather", "ulysses" (needs Hq % P == 0) or "usp" (``group`` must be a
    ``seqpar.comm.UspGroups``). ``group`` defaults to the default process group (or a single
    process without torch.distributed). Causal masks use global token positions.

    ``validate=True`` (pass it on every rank alike) adds one small ``all_gather_object`` that
    checks the ranks agree on shapes, dtype, strategy, layout, causal and scale, and raises the
    same ValueError on every rank when they do not (or when any rank's inputs are bad), instead
    of a crash, hang or wrong answer in the collectives. Local checks always run.

    Returns o [B, T_local, Hq, D] in q.dtype, and with ``return_lse`` also the log-sum-exp
    [B, Hq, T_local] in fp32 (fp64 for fp64 inputs). Differentiable in q, k, v (and through lse).
    """
    layout = "contiguous" if layout is None else layout
    error: Exception | None = None
    try:
        plan = build_plan(q, k, v, strategy=strategy, layout=layout, group=group, causal=causal, scale=scale,
                          backend=backend)
    except (ValueError, TypeError) as e:
        if not validate:
            raise
        error = e
    if validate:
        fields = dict(q=_shape(q), k=_shape(k), v=_shape(v), dtype=str(getattr(q, "dtype", None)),
                      strategy=strategy, layout=layout, causal=repr(causal) if error is not None else bool(causal),
                      scale=None if error is not None else plan.scale)
        if isinstance(group, UspGroups):
            fields.update(ulysses_size=group.ulysses_size, ring_size=group.ring_size)
        check_same_on_all_ranks(fields, group, what="seqpar.attention(validate=True)", local_error=error)
    o, lse = SoftmaxContextParallel.apply(q, k, v, plan)
    return (o, lse) if return_lse else o
