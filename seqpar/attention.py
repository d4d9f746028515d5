"""Public API: exact softmax attention on sequence-parallel shards (see docs/softmax.md)."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from seqpar.comm import UspGroups, check_same_on_all_ranks
from seqpar.softmax import STRATEGIES, SoftmaxContextParallel, build_plan

__all__ = ["attention", "STRATEGIES"]


def _shape(x: object) -> object:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def check_scale(scale: object) -> None:
    """Raise unless ``scale`` is None or a finite number > 0 (0, negative or NaN give NaN / garbage)."""
    if scale is None:
        return
    if isinstance(scale, (bool, str, bytes)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__} {scale!r}")
    try:
        value = float(scale)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__} {scale!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"scale must be a finite number > 0 (or None for D ** -0.5), got {value}")


def check_flag(name: str, value: object) -> None:
    """Raise a TypeError for a flag that is a string, bytes or float (``causal="False"`` is true)."""
    if isinstance(value, (str, bytes, float)) or value is None:
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def _check_arguments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: object, scale: object) -> None:
    """Checks besides those of ``build_plan``: options' types and empty head / feature dims."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 4 and (x.shape[2] == 0 or x.shape[3] == 0):
            raise ValueError(f"{name} has an empty head or head-dim axis: shape {tuple(x.shape)} "
                             f"[B, T, H, D] needs H >= 1 and D >= 1")
    check_flag("causal", causal)
    check_scale(scale)


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
        _check_arguments(q, k, v, causal, scale)
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
