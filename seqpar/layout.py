"""Token layouts: which global tokens each rank of a sequence-parallel group holds.

This module owns every index map of the library (docs/softmax.md, "Layouts"):

- ``contiguous``: rank r holds tokens [r*T/P, (r+1)*T/P).
- ``zigzag`` (head-tail): the sequence is cut into 2P chunks; rank r holds chunk r and
  chunk 2P-1-r, in that order.
- ``striped``: rank r holds the tokens t with t % P == r, in increasing order.

Besides ``shard`` / ``unshard`` and the global positions of the local tokens (which RoPE and
causal masks need), it describes the local tokens as *segments* (runs of tokens whose global
positions form an arithmetic progression) and plans, for any pair of query / key segments, which
part of the mask (``seqpar.masks.AttentionMask``: causal, sliding window, packed documents)
applies. Every strategy builds its per-step work from that plan, so the mask structure of all
layouts lives here and nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from seqpar.comm.groups import group_rank_and_size
from seqpar.masks import AttentionMask, as_mask

LAYOUTS = ("contiguous", "zigzag", "striped")


@dataclass(frozen=True, repr=False)
class BalancedLayout:
    """A document-aware layout: the packed row is cut into ``chunk_len``-token chunks, and rank r
    holds the chunks ``assignment[r]`` (the same number per rank, in increasing global order),
    chosen so that every rank has about the same masked attention work. Build it with
    :func:`balanced_layout` from the row's ``cu_seqlens``; it is valid for exactly one global
    length and world size, and every function here that takes a layout name takes it too."""

    world_size: int
    chunk_len: int
    assignment: tuple[tuple[int, ...], ...]

    def __post_init__(self):
        if len(self.assignment) != self.world_size:
            raise ValueError(f"BalancedLayout: {len(self.assignment)} chunk lists for world size {self.world_size}")
        counts = {len(a) for a in self.assignment}
        if len(counts) != 1:
            raise ValueError(f"BalancedLayout: every rank must hold the same number of chunks, got {sorted(counts)}")
        chunks = sorted(c for a in self.assignment for c in a)
        if chunks != list(range(len(chunks))):
            raise ValueError("BalancedLayout: the chunks of all ranks must be 0..N-1, each exactly once")
        if any(list(a) != sorted(a) for a in self.assignment):
            raise ValueError("BalancedLayout: each rank's chunks must be in increasing order")

    @property
    def chunks_per_rank(self) -> int:
        return len(self.assignment[0])

    @property
    def global_len(self) -> int:
        return self.chunk_len * self.chunks_per_rank * self.world_size

    def segments(self, rank: int) -> list[Segment]:
        """This rank's tokens as segments in local order; chunks that follow each other both locally
        and globally form one segment (fine chunks cost no more plan work than the runs they form)."""
        out: list[Segment] = []
        for i, chunk in enumerate(self.assignment[rank]):
            if out and out[-1].global_start + out[-1].length == chunk * self.chunk_len:
                last = out.pop()
                out.append(Segment(last.local_start, last.length + self.chunk_len, last.global_start, 1))
            else:
                out.append(Segment(i * self.chunk_len, self.chunk_len, chunk * self.chunk_len, 1))
        return out

    def __repr__(self) -> str:
        import hashlib

        digest = hashlib.sha1(repr(self.assignment).encode()).hexdigest()[:12]
        return (f"BalancedLayout(world_size={self.world_size}, chunk_len={self.chunk_len}, "
                f"chunks_per_rank={self.chunks_per_rank}, assignment=<{digest}>)")


def _row_work(first: int, stop: int, document_start: int, document_stop: int, causal: bool,
              window: int | None) -> int:
    """Visible (query, key) pairs of the queries at global positions [first, stop) of one document
    [document_start, document_stop): each sees min(position in document + 1, window) keys when
    causal, the whole document otherwise."""
    if not causal:
        return (stop - first) * (document_stop - document_start)
    lo, hi = first - document_start + 1, stop - document_start  # keys seen by the first / last row
    cap = hi if window is None else min(hi, window)
    total = 0
    if lo <= cap:
        total += (lo + cap) * (cap - lo + 1) // 2  # rows that see all of their document so far
    if window is not None and hi > window:
        total += window * (hi - max(lo - 1, window))  # rows that see a full window
    return total


def chunk_work(global_len: int, chunk_len: int, documents: Sequence[int] | None, *, causal: bool = True,
               window: int | None = None) -> list[int]:
    """Masked attention work (visible pairs) of the queries of every ``chunk_len``-token chunk."""
    bounds = list(documents) if documents is not None else [0, global_len]
    work = []
    doc = 0
    for start in range(0, global_len, chunk_len):
        stop = start + chunk_len
        total = 0
        while bounds[doc + 1] <= start:
            doc += 1
        d = doc
        while d + 1 < len(bounds) and bounds[d] < stop:
            a, b = max(start, bounds[d]), min(stop, bounds[d + 1])
            if b > a:
                total += _row_work(a, b, bounds[d], bounds[d + 1], causal, window)
            d += 1
        work.append(total)
    return work


def balanced_layout(cu_seqlens, world_size: int, *, chunks_per_rank: int | None = None, causal: bool = True,
                    window: int | None = None) -> BalancedLayout:
    """A :class:`BalancedLayout` for one packed row with document boundaries ``cu_seqlens``
    ([0, ..., T], a tensor or a sequence of ints): the row is cut into ``world_size x
    chunks_per_rank`` equal chunks and each rank gets ``chunks_per_rank`` of them so that the
    masked attention work (documents, ``causal``, ``window``) per rank is as even as possible
    (largest chunks first onto the least loaded rank with room, then pairwise swaps that lower the
    busiest rank). ``chunks_per_rank`` defaults to the largest of 16, 8, 4, 2, 1 that divides the
    local length. Work per rank: :func:`chunk_work` summed over a rank's chunks."""
    from seqpar.masks import check_documents, check_window

    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    bounds = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
    if not bounds:
        raise ValueError("cu_seqlens is empty; expected [0, ..., T]")
    global_len = int(bounds[-1])
    documents = check_documents(cu_seqlens, global_len, None)
    window = check_window(window)
    if global_len % world_size != 0:
        raise ValueError(f"sequence length {global_len} is not divisible by world_size = {world_size}")
    local_len = global_len // world_size
    if chunks_per_rank is None:
        chunks_per_rank = next(m for m in (16, 8, 4, 2, 1) if local_len % m == 0)
    if isinstance(chunks_per_rank, bool) or not isinstance(chunks_per_rank, int) or chunks_per_rank < 1 \
            or local_len % chunks_per_rank != 0:
        raise ValueError(f"chunks_per_rank must be an int >= 1 dividing the local length {local_len}, "
                         f"got {chunks_per_rank!r}")
    chunk_len = local_len // chunks_per_rank
    work = chunk_work(global_len, chunk_len, documents, causal=causal, window=window)
    owner_chunks: list[list[int]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for chunk in sorted(range(len(work)), key=lambda c: (-work[c], c)):
        rank = min((r for r in range(world_size) if len(owner_chunks[r]) < chunks_per_rank),
                   key=lambda r: (load[r], r))
        owner_chunks[rank].append(chunk)
        load[rank] += work[chunk]
    for _ in range(4 * world_size * chunks_per_rank):  # swaps that lower the busiest rank
        busiest = max(range(world_size), key=lambda r: load[r])
        best = None
        for other in range(world_size):
            if other == busiest:
                continue
            for a in owner_chunks[busiest]:
                for b in owner_chunks[other]:
                    delta = work[a] - work[b]
                    if delta > 0 and load[other] + delta < load[busiest]:
                        peak = max(load[busiest] - delta, load[other] + delta)
                        if best is None or peak < best[0]:
                            best = (peak, other, a, b)
        if best is None:
            break
        _, other, a, b = best
        owner_chunks[busiest][owner_chunks[busiest].index(a)] = b
        owner_chunks[other][owner_chunks[other].index(b)] = a
        delta = work[a] - work[b]
        load[busiest] -= delta
        load[other] += delta
    return BalancedLayout(world_size, chunk_len, tuple(tuple(sorted(c)) for c in owner_chunks))


def check_layout(layout: str | BalancedLayout) -> str | BalancedLayout:
    """Return ``layout`` if it is known, else raise a ValueError naming the choices."""
    if isinstance(layout, BalancedLayout):
        return layout
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS} or a BalancedLayout")
    return layout


def layout_name(layout: str | BalancedLayout) -> str:
    """'contiguous', 'zigzag', 'striped' or 'balanced'."""
    return "balanced" if isinstance(check_layout(layout), BalancedLayout) else layout


def chunks_per_rank(layout: str | BalancedLayout) -> int:
    """How many equal chunks of the sequence one rank holds (2 for zigzag, else 1)."""
    if isinstance(check_layout(layout), BalancedLayout):
        return layout.chunks_per_rank
    return 2 if layout == "zigzag" else 1


def _check_balanced(layout: BalancedLayout, world_size: int, global_len: int, what: str) -> None:
    if world_size != layout.world_size or global_len != layout.global_len:
        raise ValueError(f"{layout!r} was built for world size {layout.world_size} and {layout.global_len} tokens "
                         f"({layout.global_len // layout.world_size} per rank), got world size {world_size} and "
                         f"{what}")


def check_global_length(layout: str | BalancedLayout, global_len: int, world_size: int) -> int:
    """Return the local length for ``global_len`` tokens over ``world_size`` ranks, or raise."""
    check_layout(layout)
    if isinstance(layout, BalancedLayout):
        _check_balanced(layout, world_size, global_len, f"sequence length {global_len}")
        return global_len // world_size
    divisor = world_size * chunks_per_rank(layout)
    if global_len % divisor != 0:
        need = "2 * world_size" if layout == "zigzag" else "world_size"
        raise ValueError(
            f"sequence length {global_len} is not divisible by {need} = {divisor} "
            f"(layout={layout!r}, world_size={world_size})"
        )
    return global_len // world_size


def check_local_length(layout: str | BalancedLayout, local_len: int, world_size: int) -> None:
    """Raise if a local shard of ``local_len`` tokens cannot come from ``layout``."""
    check_layout(layout)
    if isinstance(layout, BalancedLayout):
        _check_balanced(layout, world_size, local_len * world_size, f"local length {local_len}")
    if layout == "zigzag" and world_size > 1 and local_len % 2 != 0:
        raise ValueError(
            f"zigzag layout needs an even local length (two chunks per rank), got local length "
            f"{local_len} with world_size={world_size}"
        )


def global_positions(layout: str, rank: int, world_size: int, local_len: int,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Global token positions (int64, shape [local_len]) of the tokens ``rank`` holds."""
    check_local_length(layout, local_len, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a group of size {world_size}")
    positions = [seg.positions() for seg in segments(layout, rank, world_size, local_len)]
    return torch.cat(positions).to(device) if device is not None else torch.cat(positions)


def permutation(layout: str, world_size: int, global_len: int) -> torch.Tensor:
    """Global positions in rank-major order: ``x[:, perm]`` concatenates every rank's shard."""
    local_len = check_global_length(layout, global_len, world_size)
    return torch.cat([global_positions(layout, r, world_size, local_len) for r in range(world_size)])


# ---------------------------------------------------------------------------------------------
# Segments and the causal plan.


@dataclass(frozen=True)
class Segment:
    """``length`` local tokens from ``local_start`` on, at global positions start + stride * i."""

    local_start: int
    length: int
    global_start: int
    stride: int = 1

    def positions(self) -> torch.Tensor:
        return self.global_start + self.stride * torch.arange(self.length, dtype=torch.long)

    def shifted(self, local_shift: int) -> "Segment":
        return Segment(self.local_start + local_shift, self.length, self.global_start, self.stride)


def segments(layout: str, rank: int, world_size: int, local_len: int) -> list[Segment]:
    """The local tokens of ``rank`` as segments, in local order."""
    check_local_length(layout, local_len, world_size)
    if world_size == 1:
        return [Segment(0, local_len, 0, 1)]
    if isinstance(layout, BalancedLayout):
        return layout.segments(rank)
    if layout == "contiguous":
        return [Segment(0, local_len, rank * local_len, 1)]
    if layout == "zigzag":
        half = local_len // 2
        return [Segment(0, half, rank * half, 1),
                Segment(half, half, (2 * world_size - 1 - rank) * half, 1)]
    return [Segment(0, local_len, rank, world_size)]


def slice_segments(segs: Sequence[Segment], start: int, stop: int) -> list[Segment]:
    """The segments of local tokens [start, stop) of ``segs``, re-based to local index 0 (what a
    rank holds when it receives only that slice of another rank's tokens)."""
    out = []
    for seg in segs:
        a, b = max(seg.local_start, start), min(seg.local_start + seg.length, stop)
        if b > a:
            out.append(Segment(a - start, b - a, seg.global_start + seg.stride * (a - seg.local_start), seg.stride))
    return out


def concat_segments(per_rank: Sequence[Sequence[Segment]]) -> list[Segment]:
    """Segments of the concatenation of several ranks' tokens (in the given order), merged
    where one segment continues the previous one both locally and globally."""
    merged: list[Segment] = []
    offset = 0
    for segs in per_rank:
        local_len = 0
        for seg in segs:
            seg = seg.shifted(offset)
            local_len = max(local_len, seg.local_start + seg.length - offset)
            prev = merged[-1] if merged else None
            if (prev is not None and prev.stride == seg.stride
                    and prev.local_start + prev.length == seg.local_start
                    and prev.global_start + prev.stride * prev.length == seg.global_start):
                merged[-1] = Segment(prev.local_start, prev.length + seg.length, prev.global_start, prev.stride)
            else:
                merged.append(seg)
        offset += local_len
    return merged


def sort_row(per_rank: Sequence[Sequence[Segment]]) -> tuple[torch.Tensor, list[Segment] | None]:
    """Reorder a row of concatenated shards (what a rank holds after the Ulysses exchange) into
    increasing global position, when that gives fewer segments than :func:`concat_segments`.

    Returns ``(order, sorted_segments)``: ``x.index_select(dim, order)`` puts the concatenated
    tokens in increasing global position, and ``sorted_segments`` describes that order as maximal
    runs of consecutive positions. The runs have stride 1 (not arbitrary arithmetic runs) so that
    every sorted row shares one stride and the causal plan between rows stays possible. If sorting
    does not reduce the number of segments, ``order`` is the identity and ``sorted_segments`` None:
    keep the concatenation as it is.
    """
    concat = concat_segments(per_rank)
    length = sum(seg.length for seg in concat)
    identity = torch.arange(length, dtype=torch.long)
    strides = {seg.stride for seg in concat if seg.length > 1}
    if len(concat) <= 1:
        return identity, None
    if strides <= {1}:
        # runs of consecutive positions: sort and merge the segments themselves (no per-token work)
        by_start = sorted(concat, key=lambda seg: seg.global_start)
        runs: list[list[Segment]] = []
        for seg in by_start:
            end = runs[-1][-1].global_start + runs[-1][-1].length if runs else None
            if end is not None and seg.global_start < end:
                raise ValueError(f"a row holds global position {seg.global_start} twice; its shards overlap")
            if end == seg.global_start:
                runs[-1].append(seg)
            else:
                runs.append([seg])
        if len(runs) >= len(concat):
            return identity, None
        order = torch.cat([torch.arange(seg.local_start, seg.local_start + seg.length) for seg in by_start])
        sorted_segments, start = [], 0
        for run in runs:
            run_len = sum(seg.length for seg in run)
            sorted_segments.append(Segment(start, run_len, run[0].global_start, 1))
            start += run_len
        return order, sorted_segments
    if len(strides) == 1 and min(strides) > len(concat) and length >= len(concat) ** 2:
        # k segments of one stride s > k cover at most k residues mod s, so a run of consecutive
        # positions is at most k long and sorting gives at least length / k >= k runs
        return identity, None
    positions = torch.empty(length, dtype=torch.long)
    for seg in concat:
        positions[seg.local_start:seg.local_start + seg.length] = seg.positions()
    values, order = torch.sort(positions, stable=True)
    gaps = values[1:] - values[:-1]
    if bool((gaps == 0).any()):
        raise ValueError(f"a row of {length} tokens holds a global position twice; its shards overlap")
    breaks = (torch.nonzero(gaps != 1).flatten() + 1).tolist()
    if len(breaks) + 1 >= len(concat):
        return identity, None
    starts, ends = [0] + breaks, breaks + [length]
    firsts = values[starts].tolist()
    return order, [Segment(a, b - a, g, 1) for a, b, g in zip(starts, ends, firsts)]


@dataclass(frozen=True)
class BlockTask:
    """Queries [q_start, q_start+q_len) against keys [k_start, k_start+k_len) (local indices).

    Key j is visible to query i (indices within the block) iff ``diagonal_offset`` is None or
    j <= i + diagonal_offset, and ``window_offset`` is None or j >= i + window_offset (the lower
    edge of a sliding window). Both None: an unmasked block.
    """

    q_start: int
    q_len: int
    k_start: int
    k_len: int
    diagonal_offset: int | None
    window_offset: int | None = None


# Banded blocks (a sliding window) are cut into query tiles of at least this many rows, each
# against only the keys its rows can see, so that work follows the band.
BAND_TILE = 128


def _band_tasks(q_start: int, q_len: int, k_start: int, k_len: int, hi: int | None,
                lo: int | None, tile: bool = True) -> list[BlockTask]:
    """The tasks of one block whose mask is the band lo <= j - i <= hi (None: unbounded), trimmed
    to the rows and keys that see something, cut into query tiles when the band is narrow."""
    for _ in range(2):  # trimming one side can tighten the other; two passes reach the fixpoint
        if hi is not None and hi < 0:  # rows i < -hi see nothing
            q_start, q_len, lo, hi = q_start - hi, q_len + hi, None if lo is None else lo - hi, 0
        if lo is not None and lo > 0:  # keys j < lo are never seen
            k_start, k_len, hi, lo = k_start + lo, k_len - lo, None if hi is None else hi - lo, 0
        if q_len <= 0 or k_len <= 0:
            return []
        if hi is not None:
            k_len = min(k_len, q_len + hi)  # keys beyond the last row's upper edge
        if lo is not None:
            q_len = min(q_len, k_len - lo)  # rows whose lower edge is past the last key
        if q_len <= 0 or k_len <= 0:
            return []
    if hi is not None and hi >= k_len - 1:
        hi = None
    if lo is not None and lo <= 1 - q_len:
        lo = None
    if lo is None:
        return [BlockTask(q_start, q_len, k_start, k_len, hi)]
    width = (hi - lo + 1) if hi is not None else k_len
    rows_per_tile = max(BAND_TILE, width // 2)
    if not tile or q_len <= rows_per_tile:
        return [BlockTask(q_start, q_len, k_start, k_len, hi, lo)]
    tasks: list[BlockTask] = []
    for a in range(0, q_len, rows_per_tile):
        rows = min(rows_per_tile, q_len - a)
        first = max(0, a + lo)
        last = k_len - 1 if hi is None else min(k_len - 1, a + rows - 1 + hi)
        tasks.extend(_band_tasks(q_start + a, rows, k_start + first, last - first + 1,
                                 None if hi is None else hi + a - first, lo + a - first, tile=False))
    return tasks


def _document_runs(seg: Segment, documents: Sequence[int] | None) -> list[tuple[int, int, int]]:
    """(document index, first, stop) local index runs of ``seg`` per document it touches."""
    if documents is None:
        return [(0, 0, seg.length)]
    import bisect

    last = seg.global_start + seg.stride * (seg.length - 1)
    first_doc = bisect.bisect_right(documents, seg.global_start) - 1
    last_doc = bisect.bisect_right(documents, last) - 1
    runs = []
    for doc in range(first_doc, last_doc + 1):
        a, b = documents[doc], documents[doc + 1]
        start = max(0, -(-(a - seg.global_start) // seg.stride))
        stop = min(seg.length, -(-(b - seg.global_start) // seg.stride))
        if stop > start:
            runs.append((doc, start, stop))
    return runs


def _segment_pair_tasks(qs: Segment, ks: Segment, mask: AttentionMask) -> list[BlockTask]:
    """The tasks of query segment ``qs`` against key segment ``ks`` under ``mask``."""
    if mask.causal and qs.stride != ks.stride:
        raise ValueError(f"cannot plan a causal block between strides {qs.stride} and {ks.stride}")
    stride = qs.stride
    if mask.causal:
        # key j' sees query i' (segment indices) iff gk + s j' <= gq + s i': j' <= i' + floor((gq - gk) / s)
        base_hi = (qs.global_start - ks.global_start) // stride
        # window: gk + s j' > gq + s i' - W: j' >= i' + floor((gq - gk - W) / s) + 1
        base_lo = None if mask.window is None else (qs.global_start - ks.global_start - mask.window) // stride + 1
    else:
        base_hi = base_lo = None
    q_runs = _document_runs(qs, mask.documents)
    k_runs = {doc: (a, b) for doc, a, b in _document_runs(ks, mask.documents)}
    tasks: list[BlockTask] = []
    for doc, qa, qb in q_runs:
        if doc not in k_runs:
            continue
        ka, kb = k_runs[doc]
        hi = None if base_hi is None else base_hi + qa - ka
        lo = None if base_lo is None else base_lo + qa - ka
        tasks.extend(_band_tasks(qs.local_start + qa, qb - qa, ks.local_start + ka, kb - ka, hi, lo))
    return tasks


def plan_blocks(q_segments: Sequence[Segment], k_segments: Sequence[Segment],
                mask: AttentionMask | bool) -> list[BlockTask]:
    """The blocks of work of local queries against one key block, with their masks.

    ``mask``: an :class:`~seqpar.masks.AttentionMask` (or a bool: causal, nothing else).
    Documents split a segment pair into one block per shared document; causal masks and windows
    become each block's band (``diagonal_offset`` / ``window_offset``), trimmed to the rows and keys
    that see something. Fully masked pairs are left out; unmasked pairs that share the key segment
    and touch in the query index are merged into one block so that kernels see as few calls as
    possible.
    """
    mask = as_mask(mask)
    tasks: list[BlockTask] = []
    for ks in k_segments:
        for qs in q_segments:
            for task in _segment_pair_tasks(qs, ks, mask):
                prev = tasks[-1] if tasks else None
                if (prev is not None and prev.diagonal_offset is None and task.diagonal_offset is None
                        and prev.window_offset is None and task.window_offset is None
                        and prev.k_start == task.k_start and prev.k_len == task.k_len
                        and prev.q_start + prev.q_len == task.q_start):
                    tasks[-1] = BlockTask(prev.q_start, prev.q_len + task.q_len, prev.k_start, prev.k_len, None)
                else:
                    tasks.append(task)
    return tasks


def _joined(first: BlockTask, second: BlockTask) -> BlockTask | None:
    """``first`` and ``second`` as one task, when ``second`` continues ``first`` below it (same
    keys, the next rows) or right of it (same rows, the next keys) and one diagonal offset
    reproduces both masks; else None (always None for banded tasks)."""
    if first.window_offset is not None or second.window_offset is not None:
        return None
    m1, m2 = first.diagonal_offset, second.diagonal_offset
    if (first.k_start, first.k_len) == (second.k_start, second.k_len) and \
            first.q_start + first.q_len == second.q_start:
        # rows of second are rows q_len.. of the union: key j visible iff j <= i + M
        if m1 is None:
            offset = None if m2 is None else False  # the rows above see every key, so must these
        elif m2 is None:
            offset = m1 if first.q_len + m1 >= first.k_len - 1 else False
        else:
            offset = m1 if m2 == m1 + first.q_len else False
        length = first.q_len + second.q_len
        task = BlockTask(first.q_start, length, first.k_start, first.k_len, None)
    elif (first.q_start, first.q_len) == (second.q_start, second.q_len) and \
            first.k_start + first.k_len == second.k_start:
        # keys of second are keys k_len.. of the union: key j' visible iff j' + k_len <= i + M
        if m1 is None:
            offset = None if m2 is None else (m2 + first.k_len if m2 >= -1 else False)
        else:
            offset = m1 if m2 is not None and m2 == m1 - first.k_len else False
        task = BlockTask(first.q_start, first.q_len, first.k_start, first.k_len + second.k_len, None)
    else:
        return None
    if offset is False:
        return None
    if offset is not None and offset >= task.k_len - 1:
        offset = None
    return BlockTask(task.q_start, task.q_len, task.k_start, task.k_len, offset)


def _diagonal(task: BlockTask) -> int | None:
    """The task's mask as one constant in block-local indices: key j visible to query i iff
    j - i <= constant (None: unmasked). Banded tasks have no such constant."""
    m = task.diagonal_offset
    return None if m is None else m + task.k_start - task.q_start


def _visible_pairs(q0: int, q1: int, k0: int, k1: int, c: int | None) -> int:
    """How many (i, j) in [q0, q1) x [k0, k1) have j - i <= c (all of them when c is None)."""
    rows, width = max(0, q1 - q0), max(0, k1 - k0)
    if c is None or rows == 0 or width == 0:
        return rows * width
    # row i sees clamp(i + c + 1 - k0, 0, width) keys: 0 up to row lo, then one more per row, then all
    lo = min(max(k0 - c - 1, q0), q1)        # rows [q0, lo) see nothing
    hi = min(max(k1 - c - 1, lo), q1)        # rows [lo, hi) see i + c + 1 - k0 keys, rows [hi, q1) all
    first, last = lo + c + 1 - k0, hi - 1 + c + 1 - k0
    return (hi - lo) * (first + last) // 2 + (q1 - hi) * width


def _task_pairs(task: BlockTask) -> int:
    return _visible_pairs(task.q_start, task.q_start + task.q_len, task.k_start, task.k_start + task.k_len,
                          _diagonal(task))


def _reach(task: BlockTask) -> int:
    """An upper bound of j - i over the task's visible pairs (block-local indices)."""
    widest = task.k_start + task.k_len - 1 - task.q_start
    d = _diagonal(task)
    return widest if d is None else min(d, widest)


def _box_joined(first: BlockTask, second: BlockTask) -> BlockTask | None:
    """``first`` and ``second`` as one task over their bounding box, when one diagonal reproduces
    exactly the pairs of both (e.g. zigzag's own block: the early half's causal task plus the late
    half's causal diagonal, which together are the local causal block); else None. The merged
    diagonal offset is <= 0 or None (what a fused kernel takes in one call)."""
    if first.window_offset is not None or second.window_offset is not None:
        return None
    a, b = first, second
    if not (a.q_start + a.q_len <= b.q_start or b.q_start + b.q_len <= a.q_start
            or a.k_start + a.k_len <= b.k_start or b.k_start + b.k_len <= a.k_start):
        return None  # overlapping boxes
    q0, q1 = min(a.q_start, b.q_start), max(a.q_start + a.q_len, b.q_start + b.q_len)
    k0, k1 = min(a.k_start, b.k_start), max(a.k_start + a.k_len, b.k_start + b.k_len)
    pairs = _task_pairs(a) + _task_pairs(b)
    for c in dict.fromkeys((_diagonal(a), _diagonal(b))):  # the candidates, in a fixed order
        # every pair of both tasks must be visible under c, and together they must be all of them
        if c is not None and max(_reach(a), _reach(b)) > c:
            continue
        if _visible_pairs(q0, q1, k0, k1, c) != pairs:
            continue
        m = None if c is None else c - k0 + q0
        if m is not None and m >= k1 - k0 - 1:
            m = None
        if m is None or m <= 0:
            return BlockTask(q0, q1 - q0, k0, k1 - k0, m)
    return None


# Box merging compares every pair of tasks: done for blocks of at most this many tasks.
_BOX_MERGE_TASKS = 32


def merge_block_tasks(tasks: Sequence[BlockTask]) -> list[BlockTask]:
    """Fewer, larger tasks with exactly the (query, key) pairs and masks of ``tasks``
    (:func:`plan_blocks`' output for one key block).

    Two tasks merge when one continues the other in the local query index with the same keys, or
    in the local key index with the same queries, and one mask covers both, with diagonal offset
    None (no mask) or <= 0: the masks that fused attention kernels take in one call (top-left
    causal: each row sees one key more than the row above it, the first row sees keys [0, m]).
    E.g. zigzag's own block, whose early half is causal and whose late half sees every key of the
    early half, becomes one causal task (queries of both halves against the early keys) plus the
    late half's causal diagonal; two unmasked tasks of the same queries against consecutive key
    segments become one. Merges into a mask with offset > 0 are left out (a fused kernel would
    split them again). The order of the result is not that of ``tasks``.
    """
    merged = list(tasks)
    changed = True
    while changed and len(merged) > 1:
        changed = False
        for key in (lambda t: (t.k_start, t.k_len, t.q_start), lambda t: (t.q_start, t.q_len, t.k_start)):
            merged.sort(key=key)
            out: list[BlockTask] = []
            for task in merged:
                joined = _joined(out[-1], task) if out else None
                if joined is not None and (joined.diagonal_offset is None or joined.diagonal_offset <= 0):
                    out[-1] = joined
                    changed = True
                else:
                    out.append(task)
            merged = out
        if not changed and 1 < len(merged) <= _BOX_MERGE_TASKS:
            changed = _merge_one_box(merged)
    return merged


def _merge_one_box(tasks: list[BlockTask]) -> bool:
    """Replace the first pair of ``tasks`` that :func:`_box_joined` merges by their union (in place)."""
    for x in range(len(tasks)):
        for y in range(x + 1, len(tasks)):
            joined = _box_joined(tasks[x], tasks[y])
            if joined is not None:
                tasks[x] = joined
                del tasks[y]
                return True
    return False


# ---------------------------------------------------------------------------------------------
# Shard / unshard over a process group.


def shard_tensor(x: torch.Tensor, layout: str, rank: int, world_size: int, dim: int = 1) -> torch.Tensor:
    """The tokens of ``rank`` (along ``dim``) from a full tensor, without communication."""
    global_len = x.shape[dim]
    local_len = check_global_length(layout, global_len, world_size)
    index = global_positions(layout, rank, world_size, local_len, device=x.device)
    return x.index_select(dim, index)


def unshard_tensor(shards: Sequence[torch.Tensor], layout: str, dim: int = 1) -> torch.Tensor:
    """Put every rank's shard (in rank order) back into global token order."""
    world_size = len(shards)
    stacked = torch.cat(list(shards), dim=dim)
    perm = permutation(layout, world_size, stacked.shape[dim]).to(stacked.device)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return stacked.index_select(dim, inverse)


def _check_token_dim(name: str, x: torch.Tensor, dim: int) -> None:
    """Raise a TypeError / ValueError unless ``x`` is a tensor with a token axis ``dim``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"token dim {dim!r} is out of range for {name} of shape {tuple(x.shape)} ({x.dim()} dims)")


def shard(x: torch.Tensor, *, layout: str = "contiguous", group: dist.ProcessGroup | None = None,
          dim: int = 1) -> torch.Tensor:
    """Return this rank's tokens of the full tensor ``x`` (every rank passes the same ``x``)."""
    _check_token_dim("x", x, dim)
    rank, world_size = group_rank_and_size(group)
    return shard_tensor(x, layout, rank, world_size, dim=dim)


class _AllGatherTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_local: torch.Tensor, layout: str, group, dim: int) -> torch.Tensor:
        from seqpar.comm import all_gather

        ctx.layout, ctx.group, ctx.dim = layout, group, dim
        gathered = all_gather(x_local, group).wait()  # [P, *x_local.shape]
        return unshard_tensor(list(gathered.unbind(0)), layout, dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rank, world_size = group_rank_and_size(ctx.group)
        return shard_tensor(grad, ctx.layout, rank, world_size, dim=ctx.dim), None, None, None


def unshard(x_local: torch.Tensor, *, layout: str = "contiguous", group: dist.ProcessGroup | None = None,
            dim: int = 1) -> torch.Tensor:
    """Gather every rank's shard and restore global token order (differentiable; the gradient
    of the full tensor is assumed identical on every rank, as after any replicated loss)."""
    check_layout(layout)
    _check_token_dim("x_local", x_local, dim)
    _, world_size = group_rank_and_size(group)
    if world_size == 1:
        return x_local
    check_local_length(layout, x_local.shape[dim], world_size)
    return _AllGatherTokens.apply(x_local, layout, group, dim)


def local_positions(local_len: int, *, layout: str = "contiguous", group: dist.ProcessGroup | None = None,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Global positions of this rank's ``local_len`` tokens (for RoPE and position ids)."""
    if isinstance(local_len, (bool, float)) or not hasattr(local_len, "__index__"):
        raise TypeError(f"local_len must be an int, got {type(local_len).__name__} {local_len!r}")
    if local_len.__index__() < 1:
        raise ValueError(f"local_len must be >= 1, got {local_len.__index__()}")
    local_len = local_len.__index__()
    rank, world_size = group_rank_and_size(group)
    return global_positions(layout, rank, world_size, local_len, device=device)
