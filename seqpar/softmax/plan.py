"""Input validation and the :class:`ParallelPlan` of each strategy.

Everything here is local (no collective), so bad input fails with a ValueError on every rank
before any communication starts, instead of hanging a collective.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.distributed as dist

from seqpar.comm.groups import UspGroups, group_rank_and_size, sp_group_of
from seqpar.kernels import resolve_backend
from seqpar.layout import Segment, check_layout, check_local_length, concat_segments, plan_blocks, segments, sort_row
from seqpar.masks import AttentionMask, check_documents, check_sinks, check_softcap, check_window
from seqpar.softmax.function import ParallelPlan
from seqpar.validation import check_flag, check_scale

STRATEGIES = ("ring", "allgather", "ulysses", "usp")

# The all-gather strategy gathers K/V in up to this many groups of KV heads, so that the gather
# of group i+1 overlaps the compute of group i.
ALLGATHER_KV_HEAD_GROUPS = 4
# Ulysses exchanges the heads in this many groups (when the KV heads of a rank divide), so that the
# transfer of one group overlaps the compute of another (ParallelPlan.head_groups)
ULYSSES_HEAD_GROUPS = 2


def ulysses_head_groups(num_kv_heads: int, ulysses_size: int, ring_size: int) -> int:
    """How many groups a Ulysses exchange of ``num_kv_heads`` KV heads over ``ulysses_size`` ranks
    runs in (``ParallelPlan.head_groups``): :data:`ULYSSES_HEAD_GROUPS` for pure Ulysses when
    every rank's KV heads split evenly into them (no KV-head repeat), else 1."""
    if ulysses_size > 1 and ring_size == 1 and num_kv_heads % ulysses_size == 0 and \
            (num_kv_heads // ulysses_size) % ULYSSES_HEAD_GROUPS == 0:
        return ULYSSES_HEAD_GROUPS
    return 1


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise a ValueError naming the numbers if q [B, T, Hq, D], k / v [B, T, Hkv, D] don't fit
    (a TypeError if one is not a tensor)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} must have 4 dims [B, T, H, D], got {x.dim()} dims with shape {tuple(x.shape)}")
        if x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"{name} has an empty head or head-dim axis: shape {tuple(x.shape)} "
                             f"[B, T, H, D] needs H >= 1 and D >= 1")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"batch size mismatch: q has {q.shape[0]}, k/v have {k.shape[0]}")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"local sequence length mismatch: q has {q.shape[1]} tokens, k/v have {k.shape[1]}")
    if q.shape[1] == 0:
        raise ValueError("local sequence length is 0; every rank needs at least one token")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"head dim mismatch: q has {q.shape[3]}, k/v have {k.shape[3]}")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads {q.shape[2]} are not a multiple of the KV heads {k.shape[2]} (Hq % Hkv != 0)")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"dtype mismatch: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"device mismatch: q on {q.device}, k on {k.device}, v on {v.device}")


def _group_size(group: dist.ProcessGroup | None) -> int:
    return group_rank_and_size(group)[1]


def _row(layout: str, ring_rank: int, ulysses_size: int, world_size: int,
         local_len: int) -> tuple[torch.Tensor | None, list[Segment]]:
    """Token order and segments of what the ranks of ring position ``ring_rank`` hold after the
    Ulysses exchange: the shards of sp ranks ring_rank * U + u, u = 0..U-1, concatenated in that
    order, then sorted by global position where that gives fewer segments (``layout.sort_row``).
    The order is None when the concatenation is kept (no reordering)."""
    per_rank = [segments(layout, ring_rank * ulysses_size + u, world_size, local_len) for u in range(ulysses_size)]
    order, sorted_segments = sort_row(per_rank)
    if sorted_segments is None:
        return None, concat_segments(per_rank)
    return order, sorted_segments


@lru_cache(maxsize=256)
def ring_steps(rows: tuple[tuple[Segment, ...], ...], mask: AttentionMask) -> int:
    """How many K/V blocks a ring over ``rows`` (the segments of each ring rank) must visit so that
    every rank sees every key its queries can see: 1 + the largest step s at which some rank's
    queries see a key of the rank s before it (fewer than the ring size with a sliding window)."""
    size = len(rows)
    for step in range(size - 1, 0, -1):
        if any(plan_blocks(rows[r], rows[(r - step) % size], mask) for r in range(size)):
            return step + 1
    return 1


def _seen_keys(q_segments, k_segments, mask: AttentionMask) -> tuple[int, int] | None:
    """The smallest local key range [a, b) of a block that holds every key the queries see."""
    tasks = plan_blocks(q_segments, k_segments, mask)
    if not tasks:
        return None
    return min(t.k_start for t in tasks), max(t.k_start + t.k_len for t in tasks)


@lru_cache(maxsize=256)
def ring_key_ranges(rows: tuple[tuple[Segment, ...], ...], mask: AttentionMask,
                    steps: int) -> tuple[tuple[int, int], ...] | None:
    """For each ring rank s: the local key range [a, b) of its K/V that the ranks its block visits
    (s+1 .. s+steps-1) see, which is all the ring needs to carry; None when every range is the
    whole block (an unmasked attention). A causal mask trims too: under zigzag the late half of
    rank 0's block is seen by no other rank, under contiguous the last rank's block by none."""
    size = len(rows)
    if steps == 1 or not (mask.causal or mask.window is not None or mask.documents is not None):
        return None
    ranges = []
    for s in range(size):
        seen = [_seen_keys(rows[(s + t) % size], rows[s], mask) for t in range(1, steps)]
        seen = [x for x in seen if x is not None]
        # a block no other rank sees still travels (every hop sends a message): one key of it
        ranges.append((min(a for a, _ in seen), max(b for _, b in seen)) if seen else (0, 1))
    length = sum(seg.length for seg in rows[0])
    if all(r == (0, length) for r in ranges):
        return None
    return tuple(ranges)


@lru_cache(maxsize=256)
def visible_key_ranges(rows: tuple[tuple[Segment, ...], ...],
                       mask: AttentionMask) -> tuple[tuple[tuple[int, int] | None, ...], ...] | None:
    """``ranges[r][s]``: the local key range [a, b) of rank s's K/V that rank r's queries see (None:
    none; the own block is always the whole block), the same on every rank; None when every rank
    sees every whole block (an unmasked attention keeps the all-gather collective). A causal mask
    makes the gathers zero-redundant too: under contiguous, rank r reads only the ranks before it;
    under zigzag, the ranks after r read only the early half of r's block."""
    if not (mask.causal or mask.window is not None or mask.documents is not None):
        return None
    size = len(rows)
    length = sum(seg.length for seg in rows[0])
    ranges = tuple(tuple((0, length) if r == s else _seen_keys(rows[r], rows[s], mask) for s in range(size))
                   for r in range(size))
    return None if all(x == (0, length) for row in ranges for x in row) else ranges


def build_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, strategy: str, layout: str, group,
               causal: bool, scale: float | None, backend: str, window: int | None = None,
               cu_seqlens: torch.Tensor | None = None, softcap: float | None = None,
               sinks: torch.Tensor | None = None) -> ParallelPlan:
    """Validate everything that can be checked locally and return the strategy's plan."""
    check_inputs(q, k, v)
    check_flag("causal", causal)
    check_scale(scale)
    window = check_window(window)
    softcap = check_softcap(softcap)
    check_sinks(sinks, q.shape[2], q.device)
    if window is not None and not causal:
        raise ValueError(f"window={window} needs causal=True: sliding windows are causal "
                         f"(query i sees keys i - window < j <= i); non-causal windows are not supported")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    check_layout(layout)
    backend = resolve_backend(backend, q.device)
    batch, local_len, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    scale = head_dim ** -0.5 if scale is None else float(scale)

    if strategy == "usp":
        if not isinstance(group, UspGroups):
            raise ValueError(f"strategy 'usp' needs group=seqpar.comm.UspGroups (see build_usp_groups), "
                             f"got {type(group).__name__}")
        world_size = _group_size(group.sp)
        ulysses_size, ring_size = group.ulysses_size, group.ring_size
        if ulysses_size * ring_size != world_size:
            raise ValueError(f"UspGroups: ulysses_size {ulysses_size} x ring_size {ring_size} = "
                             f"{ulysses_size * ring_size} != sequence-parallel size {world_size}")
        if _group_size(group.ulysses) != ulysses_size or _group_size(group.ring) != ring_size:
            raise ValueError(f"UspGroups: group sizes ulysses {_group_size(group.ulysses)} / ring "
                             f"{_group_size(group.ring)} differ from ulysses_size {ulysses_size} / ring_size {ring_size}")
        sp_rank = group_rank_and_size(group.sp)[0]
        ulysses_rank = group_rank_and_size(group.ulysses)[0]
        ring_rank = group_rank_and_size(group.ring)[0]
        if sp_rank != ring_rank * ulysses_size + ulysses_rank:
            raise ValueError(f"UspGroups: sp rank {sp_rank} != ring_rank {ring_rank} * ulysses_size {ulysses_size} "
                             f"+ ulysses_rank {ulysses_rank}")
        ulysses_group, ring_group = group.ulysses, group.ring
    else:
        sp_group = sp_group_of(group)  # a UspGroups works as its flat sp group
        sp_rank, world_size = group_rank_and_size(sp_group)
        if strategy == "ulysses":
            ulysses_size, ring_size, ring_rank = world_size, 1, 0
            ulysses_group, ring_group = sp_group, None
        else:
            ulysses_size, ring_size, ring_rank = 1, world_size, sp_rank
            ulysses_group, ring_group = None, sp_group
        ulysses_rank = sp_rank if strategy == "ulysses" else 0

    check_local_length(layout, local_len, world_size)
    global_len = local_len * world_size
    documents = check_documents(cu_seqlens, global_len, q.device)
    if documents is not None and batch != 1:
        raise ValueError(f"cu_seqlens describes the documents of ONE packed row; got batch size {batch}. "
                         f"Pack the batch into one row of {batch} x {global_len} tokens (B = 1)")
    mask = AttentionMask(causal=bool(causal), window=None if window is not None and window >= global_len else window,
                         documents=documents)
    kv_repeat = 1
    if ulysses_size > 1:
        if num_q_heads % ulysses_size != 0:
            raise ValueError(f"strategy {strategy!r}: {num_q_heads} query heads are not divisible by the "
                             f"Ulysses group size {ulysses_size}")
        if num_kv_heads % ulysses_size != 0:
            # fallback: repeat each KV head so that lcm(Hkv, U) heads split evenly (and still divide Hq)
            kv_repeat = math.lcm(num_kv_heads, ulysses_size) // num_kv_heads

    # every ring rank holds its row in that row's order (q and its own K/V alike), so the segments
    # of every source are those of its (possibly sorted) row
    rows = [_row(layout, i, ulysses_size, world_size, local_len) for i in range(ring_size)]
    order = rows[ring_rank][0]
    inverse = None
    if order is not None:
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel())
        order, inverse = order.to(q.device, non_blocking=True), inverse.to(q.device, non_blocking=True)
    row_segments = tuple(tuple(segs) for _, segs in rows)
    heads_per_rank = num_q_heads // ulysses_size
    gathered = strategy == "allgather"
    steps = None if gathered else ring_steps(row_segments, mask)
    return ParallelPlan(
        mask=mask, scale=scale, backend=backend, softcap=softcap,
        ring_steps=steps,
        kv_key_ranges=visible_key_ranges(row_segments, mask) if gathered else None,
        ring_key_ranges=None if gathered else ring_key_ranges(row_segments, mask, steps),
        q_heads=slice(ulysses_rank * heads_per_rank, (ulysses_rank + 1) * heads_per_rank),
        ulysses_group=ulysses_group, ulysses_size=ulysses_size, kv_repeat=kv_repeat,
        kv_transport="allgather" if strategy == "allgather" else "ring",
        kv_group=ring_group, kv_rank=ring_rank, kv_size=ring_size,
        q_segments=rows[ring_rank][1], segments_of_source=[segs for _, segs in rows],
        token_order=order, token_inverse=inverse,
        kv_head_groups=ALLGATHER_KV_HEAD_GROUPS, head_groups=ulysses_head_groups(num_kv_heads, ulysses_size, ring_size),
    )
