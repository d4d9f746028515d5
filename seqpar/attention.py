"""Public API: exact softmax attention on sequence-parallel shards (see docs/softmax.md)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from seqpar.comm import UspGroups
from seqpar.softmax import STRATEGIES, SoftmaxContextParallel, build_plan

__all__ = ["attention", "STRATEGIES"]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, strategy: str,
              layout: str | None = None, group: dist.ProcessGroup | UspGroups | None = None,
              causal: bool = True, scale: float | None = None, return_lse: bool = False,
              backend: str = "auto") -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention of this rank's queries against the keys of the whole sequence.

    q [B, T_local, Hq, D], k / v [B, T_local, Hkv, D] (Hq % Hkv == 0) are this rank's tokens under
    ``layout`` ("contiguous" by default, "zigzag" or "striped"; shard with ``seqpar.shard``).
    ``strategy``: "ring", "allgather", "ulysses" (needs Hq % P == 0) or "usp" (``group`` must be a
    ``seqpar.comm.UspGroups``). ``group`` defaults to the default process group (or a single
    process without torch.distributed). Causal masks use global token positions.

    Returns o [B, T_local, Hq, D] in q.dtype, and with ``return_lse`` also the log-sum-exp
    [B, Hq, T_local] in fp32 (fp64 for fp64 inputs). Differentiable in q, k, v (and through lse).
    """
    plan = build_plan(q, k, v, strategy=strategy, layout="contiguous" if layout is None else layout,
                      group=group, causal=causal, scale=scale, backend=backend)
    o, lse = SoftmaxContextParallel.apply(q, k, v, plan)
    return (o, lse) if return_lse else o
