"""Opt-in cross-rank agreement check: every rank of a group compares a few descriptive fields of
its call (shapes, dtype, options) with every other rank's, and all ranks raise the same
ValueError when they differ, instead of crashing or hanging inside a later collective or
silently computing a wrong answer. Used by ``validate=True`` of the public attention calls."""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch.distributed as dist

from seqpar.comm.groups import group_rank_and_size


def _same(a: Any, b: Any) -> bool:
    """Equality, with a relative tolerance for floats (checksums), element-wise in tuples / lists."""
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def check_same_on_all_ranks(fields: Mapping[str, Any], group: Any, *, what: str,
                            local_error: BaseException | None = None) -> None:
    """Compare ``fields`` (picklable values: numbers, strings, tuples...) across ``group``.

    Collective (one ``all_gather_object``): every rank of ``group`` must call it. ``local_error``
    is this rank's own validation error, if any: it is re-raised here after the exchange, and the
    other ranks raise a ValueError naming this rank and its message, so that a rank with bad
    input cannot leave the others waiting in a collective. Raises a ValueError naming each field
    that differs and every rank's value. ``group`` may be a UspGroups (its ``sp`` group is used).
    """
    group = getattr(group, "sp", group)
    rank, world_size = group_rank_and_size(group)
    if world_size == 1:
        if local_error is not None:
            raise local_error
        return
    mine = (None if local_error is None else f"{type(local_error).__name__}: {local_error}", dict(fields))
    everyone: list[Any] = [None] * world_size
    dist.all_gather_object(everyone, mine, group=group)
    if local_error is not None:
        raise local_error
    failed = [(r, err) for r, (err, _) in enumerate(everyone) if err is not None]
    if failed:
        details = "; ".join(f"rank {r}: {err}" for r, err in failed)
        raise ValueError(f"{what}: other ranks of the group rejected their inputs ({details})")
    diffs = []
    for name, value in fields.items():
        values = [f.get(name) for _, f in everyone]
        if not all(_same(value, other) for other in values):
            diffs.append(f"{name}: " + ", ".join(f"rank {r} {v!r}" for r, v in enumerate(values)))
    if diffs:
        raise ValueError(f"{what}: the ranks of the group (this is rank {rank} of {world_size}) disagree on "
                         + "; ".join(diffs))
