"""Where the K/V blocks of a sequence-parallel softmax attention come from.

A *K/V source* hands the driver (:mod:`seqpar.softmax.driver`) one :class:`KVBlock` at a time:
a slice of KV heads of the keys and values of one source rank, with the segments (global
positions) of those keys. The driver plans the block with ``layout.plan_blocks`` and computes it;
the source does the communication, issuing the transfer of the next block before yielding the
current one and waiting for it afterwards, so that communication overlaps compute.

- :class:`RingKV`: K/V travel a ring (Ring Attention and its zigzag / striped variants, and the
  ring axis of USP). P-1 exchanges forward; in backward dK/dV travel with K/V and arrive home
  (the last block's in two halves of its KV heads, the first sent while the second is computed).
  With one rank it is plain local attention (no communication).
- :class:`GatheredKV`: K/V are all-gathered (LASP-2H / Llama 3), split into KV-head groups so
  that the gather of group i+1 overlaps the compute of group i (and the gather of group i the
  compute of its own block, which is read from the local K/V); backward re-gathers (the gathered
  copy is not kept between forward and backward) and reduce-scatters dK/dV per head group, built
  by the driver right in the reduce-scatter buffer (``KVBlock.grads``). With a sliding window or
  packed documents (``ParallelPlan.kv_key_ranges``: the local key range of each rank's K/V that
  each rank's queries see) the gathers are zero-redundant: per head group one point-to-point
  ``exchange`` moves to each rank only the key range of each block it reads (a window costs
  O(window) bytes, not O(T_local)), blocks no local query sees are skipped, and in backward each
  dK/dV partial (over that range) goes straight back to its source (one exchange per group),
  which adds it into its slice of its block's dK/dV.

In backward a source is a generator: it yields a block, receives that block's ``(dk, dv)``
through ``send`` and finally returns the local ``(dk, dv)`` (``StopIteration.value``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Generator, Iterator, Sequence

import torch
import torch.distributed as dist

from seqpar.comm import all_gather, exchange, reduce_scatter, ring_exchange
from seqpar.kernels import compute_dtype
from seqpar.layout import Segment, slice_segments

KVGrads = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class KVBlock:
    """Keys / values [B, Tk, Hg, D] of KV heads ``kv_heads`` of one source, at ``segments``.

    ``grads`` (backward only, optional): (dk, dv) buffers [B, Tk, Hg, D] in the compute dtype
    where the driver builds this block's gradients (it writes every element and sends these
    very tensors back), so that the source needs no copy of its own."""

    k: torch.Tensor
    v: torch.Tensor
    segments: Sequence[Segment]
    kv_heads: slice
    grads: tuple[torch.Tensor, torch.Tensor] | None = None


class KVSource:
    """Base class: the local K/V of this rank, and the key segments of every source rank."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None, rank: int,
                 size: int, segments_of_source: Sequence[Sequence[Segment]]):
        if len(segments_of_source) != size:
            raise ValueError(f"need the key segments of {size} source ranks, got {len(segments_of_source)}")
        self.k, self.v = k, v
        self.group, self.rank, self.size = group, rank, size
        self.segments_of_source = segments_of_source

    def source_order(self) -> list[int]:
        """Source ranks in the order their blocks are visited: own block first, then r-1, r-2..."""
        return [(self.rank - step) % self.size for step in range(self.size)]

    def forward_blocks(self) -> Iterator[KVBlock]:
        raise NotImplementedError

    def backward_blocks(self) -> Generator[KVBlock, KVGrads, KVGrads]:
        raise NotImplementedError


class RingKV(KVSource):
    """K/V blocks passed around a ring: at step s this rank holds the block of rank (r - s) mod P.

    ``steps`` (default P): how many blocks every rank visits (the own block and the ``steps - 1``
    before it). A sliding window needs only the first few; the caller computes ``steps`` from the
    mask, the same on every rank. ``key_ranges`` (optional, the same on every rank): for each
    source rank the local key range [a, b) the ring carries (what the ranks it visits see); a
    rank keeps its whole block and sends only that slice, so a window costs O(window) bytes a hop.

    Backward: a rank keeps the dK/dV of its own block; each other block's dK/dV accumulate as it
    travels (starting at the first rank it visits) and, after the last step, go straight home
    (one exchange over ``steps - 1`` ranks, one hop when steps = P), where they are added to the
    owner's slice. That is ``steps - 1`` dK/dV transfers per rank.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None, rank: int,
                 size: int, segments_of_source: Sequence[Sequence[Segment]], steps: int | None = None,
                 key_ranges: Sequence[tuple[int, int]] | None = None):
        super().__init__(k, v, group, rank, size, segments_of_source)
        self.steps = size if steps is None else int(steps)
        if not 1 <= self.steps <= size:
            raise ValueError(f"a ring of {size} ranks visits 1 to {size} blocks, got steps={steps}")
        length = k.shape[1]
        self.key_ranges = [(0, length)] * size if key_ranges is None else [tuple(r) for r in key_ranges]
        if len(self.key_ranges) != size or not all(0 <= a < b <= length for a, b in self.key_ranges):
            raise ValueError(f"key_ranges must give {size} ranges 0 <= a < b <= {length}, got {key_ranges}")

    def _source(self, step: int) -> int:
        return (self.rank - step) % self.size

    def _travelling(self, x: torch.Tensor) -> torch.Tensor:
        """The slice of this rank's own K or V that the ring carries."""
        a, b = self.key_ranges[self.rank]
        return x if (a, b) == (0, x.shape[1]) else x[:, a:b]

    def _shapes(self, source: int, like: torch.Tensor) -> list[torch.Size]:
        """Shapes of the K, V (or dK, dV) slices of ``source`` that the ring carries."""
        a, b = self.key_ranges[source]
        shape = (like.shape[0], b - a) + tuple(like.shape[2:])
        return [torch.Size(shape)] * 2

    def _block(self, k: torch.Tensor, v: torch.Tensor, step: int, kv_heads: slice | None = None) -> KVBlock:
        """The block held at ``step`` (``k``, ``v``: its KV heads ``kv_heads``, default all)."""
        source = self._source(step)
        segs = self.segments_of_source[source]
        if step > 0:
            segs = slice_segments(segs, *self.key_ranges[source])
        return KVBlock(k, v, segs, slice(0, self.k.shape[2]) if kv_heads is None else kv_heads)

    def _pass_on(self, k: torch.Tensor, v: torch.Tensor, step: int):
        """Send the K/V held at ``step`` (the own block: its carried slice) to the next rank and
        receive the block of the step after, unless ``step`` is the last."""
        if step == self.steps - 1:
            return None
        send = [self._travelling(k), self._travelling(v)] if step == 0 else [k, v]
        return ring_exchange(send, self.group, recv_shapes=self._shapes(self._source(step + 1), k))

    def forward_blocks(self) -> Iterator[KVBlock]:
        k, v = self.k, self.v
        for step in range(self.steps):
            incoming = self._pass_on(k, v, step)
            yield self._block(k, v, step)
            if incoming is not None:
                k, v = incoming.wait()

    def backward_blocks(self) -> Generator[KVBlock, KVGrads, KVGrads]:
        """The blocks of the ring, as in forward. The last block is handed over in two halves of its
        KV heads (when it has two or more): the first half's dK/dV start home while the second half
        is computed, so that only half of the last transfer waits on the network."""
        k, v = self.k, self.v
        grads_in_flight = None  # dK/dV accumulators of the block held now, from the rank before
        going_home: list[tuple[slice, object]] = []  # (KV heads, exchange) of the last block's parts
        own = None
        heads = k.shape[2]
        for step in range(self.steps):
            last = step == self.steps - 1
            incoming = self._pass_on(k, v, step)
            if step == 0:
                own = yield self._block(k, v, step)
            elif not last:
                dk, dv = yield self._block(k, v, step)
                if grads_in_flight is not None:
                    dk_acc, dv_acc = grads_in_flight.wait()
                    dk, dv = dk_acc.add_(dk), dv_acc.add_(dv)
                # on to the next holder of this block
                grads_in_flight = ring_exchange([dk, dv], self.group, shift=1,
                                                recv_shapes=self._shapes(self._source(step + 1), dk))
            else:
                parts = [slice(0, heads // 2), slice(heads // 2, heads)] if heads > 1 else [slice(0, heads)]
                accumulated = None
                for part in parts:
                    dk, dv = yield self._block(k[:, :, part], v[:, :, part], step, part)
                    if grads_in_flight is not None:
                        accumulated = grads_in_flight.wait()
                        grads_in_flight = None
                    if accumulated is not None:
                        dk, dv = accumulated[0][:, :, part].add_(dk), accumulated[1][:, :, part].add_(dv)
                    # straight home to rank r - step (the block's owner), receiving the same part
                    # of this rank's own block's accumulators
                    going_home.append((part, ring_exchange([dk, dv], self.group, shift=-step,
                                                           recv_shapes=self._shapes(self.rank, dk))))
            if incoming is not None:
                k, v = incoming.wait()
        dk, dv = own
        a, b = self.key_ranges[self.rank]
        for part, handle in going_home:
            dk_home, dv_home = handle.wait()
            dk[:, a:b, part] += dk_home
            dv[:, a:b, part] += dv_home
        return dk, dv


class GatheredKV(KVSource):
    """K/V gathered in ``head_groups`` groups of KV heads (the transfer of group i+1 overlaps the
    compute of group i, the transfer of group i that of its own block).

    ``key_ranges`` (``ParallelPlan.kv_key_ranges``): ``key_ranges[r][s]`` = the local key range
    (a, b) of rank s's K/V that rank r's queries see (None: none; the diagonal is the whole
    block), the same matrix on every rank. None (or every entry the whole block): every rank
    needs every block; K/V are all-gathered and dK/dV reduce-scattered per group. Otherwise the
    gathers are zero-redundant: per group one point-to-point :func:`~seqpar.comm.exchange` sends
    ``k[:, a:b]``, ``v[:, a:b]`` to each rank r' with key_ranges[r'][r] = (a, b) and receives from
    each source s with key_ranges[r][s] = (a, b) its keys a..b-1 only (b - a tokens), handed to the
    driver with the segments of that slice (``layout.slice_segments``, local indices from 0), so
    a window costs O(window) bytes, not O(T_local). In backward the same re-fetch, then one
    exchange per group returns the dK/dV partial of each source (b - a tokens) to it and receives
    the partials of the local block's slices from the ranks that read them, each added into its
    slice of the own partial. Both sides of every message are derived from the same matrix, so
    each send meets its receive.

    ``bytes_sent`` / ``bytes_received``: {peer rank: bytes} this source moved (K/V and dK/dV; the
    all-gather / reduce-scatter path counts the block each pair of ranks exchanges through them).
    One rank communicates nothing."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None, rank: int,
                 size: int, segments_of_source: Sequence[Sequence[Segment]], head_groups: int,
                 key_ranges: Sequence[Sequence[tuple[int, int] | None]] | None = None):
        super().__init__(k, v, group, rank, size, segments_of_source)
        num_kv_heads = k.shape[2]
        head_groups = max(1, min(head_groups, num_kv_heads))
        bounds = [num_kv_heads * i // head_groups for i in range(head_groups + 1)]
        self.head_slices = [slice(bounds[i], bounds[i + 1]) for i in range(head_groups)]
        self.key_ranges = None
        if key_ranges is not None:
            self.key_ranges = self._check_ranges(key_ranges, size, k.shape[1])
            if all(x == (0, k.shape[1]) for row in self.key_ranges for x in row):
                self.key_ranges = None  # every rank needs every whole block: the collective
        # the segments of the keys received from each source (its whole block on the dense path)
        self.block_segments = list(segments_of_source)
        if self.key_ranges is None or size == 1:
            self.recv_from = self.source_order()[1:]
            self.send_to = [r for r in range(size) if r != rank]
        else:
            # the sources this rank reads (in visiting order) and the ranks that read this one
            self.recv_from = [s for s in self.source_order()[1:] if self.key_ranges[rank][s] is not None]
            self.send_to = [r for r in range(size) if r != rank and self.key_ranges[r][rank] is not None]
            for s in self.recv_from:
                self.block_segments[s] = slice_segments(segments_of_source[s], *self.key_ranges[rank][s])
        self.bytes_sent: dict[int, int] = {}
        self.bytes_received: dict[int, int] = {}

    @staticmethod
    def _check_ranges(key_ranges, size: int, length: int) -> tuple[tuple[tuple[int, int] | None, ...], ...]:
        try:
            ranges = tuple(tuple(None if x is None else (int(x[0]), int(x[1])) for x in row) for row in key_ranges)
        except (TypeError, IndexError, ValueError):
            ranges = None
        ok = ranges is not None and len(ranges) == size and all(len(row) == size for row in ranges)
        ok = ok and all(x is None or 0 <= x[0] < x[1] <= length for row in ranges for x in row)
        if not ok or not all(ranges[i][i] == (0, length) for i in range(size)):
            raise ValueError(f"key_ranges must be a {size} x {size} matrix of local key ranges (a, b) with "
                             f"0 <= a < b <= {length} or None, the diagonal (0, {length}) (the whole block); "
                             f"got {key_ranges}")
        return ranges

    @property
    def sparse(self) -> bool:
        """Whether key ranges travel point to point to the ranks that need them (else all-gather)."""
        return self.key_ranges is not None and self.size > 1

    def _sent_range(self, peer: int) -> tuple[int, int]:
        """The local key range of this rank's block that ``peer`` reads (sparse path)."""
        return self.key_ranges[peer][self.rank]

    def _received_range(self, source: int) -> tuple[int, int]:
        """The local key range of ``source``'s block that this rank reads (sparse path)."""
        return self.key_ranges[self.rank][source]

    def _count(self, sent: dict[int, Sequence[torch.Tensor]], received: dict[int, Sequence[torch.Tensor]]) -> None:
        for counts, messages in ((self.bytes_sent, sent), (self.bytes_received, received)):
            for peer, tensors in messages.items():
                counts[peer] = counts.get(peer, 0) + sum(t.numel() * t.element_size() for t in tensors)

    def _gather(self, group_index: int):
        if group_index >= len(self.head_slices) or self.size == 1:
            return None
        heads = self.head_slices[group_index]
        if self.sparse:
            if not self.send_to and not self.recv_from:
                return None
            k, v = self.k[:, :, heads], self.v[:, :, heads]
            # each receiver gets the keys it sees: one contiguous copy per distinct range
            # (exchange stages a tensor sent to several peers once)
            slices: dict[tuple[int, int], list[torch.Tensor]] = {}
            sends = {}
            for r in self.send_to:
                a, b = self._sent_range(r)
                if (a, b) not in slices:
                    slices[a, b] = [k[:, a:b].contiguous(), v[:, a:b].contiguous()]
                sends[r] = slices[a, b]
            recv_like = {}
            for s in self.recv_from:
                a, b = self._received_range(s)
                recv_like[s] = [k[:, a:b], v[:, a:b]]  # only shape, dtype and device are read
            self._count(sends, recv_like)
            return exchange(sends, recv_like, self.group)
        # one message per group: K and V stacked -> [P, 2, B, T, Hg, D] after the gather
        stacked = torch.stack([self.k[:, :, heads], self.v[:, :, heads]])
        self._count({r: [stacked] for r in self.send_to}, {s: [stacked] for s in self.recv_from})
        return all_gather(stacked, self.group)

    def _blocks(self) -> Iterator[tuple[slice, int, torch.Tensor, torch.Tensor]]:
        """(kv heads, source rank, k, v) in visiting order. Per head group the own block comes first,
        read from the local K/V while the group's transfer is still in flight (so even the first
        transfer overlaps compute), then the received blocks (or key ranges) of the other sources
        it needs."""
        pending = self._gather(0)
        for index, heads in enumerate(self.head_slices):
            next_pending = self._gather(index + 1)
            yield heads, self.rank, self.k[:, :, heads], self.v[:, :, heads]
            if pending is not None:
                kv = pending.wait()
                for source in self.recv_from:
                    if self.sparse:
                        yield heads, source, kv[source][0], kv[source][1]
                    else:
                        yield heads, source, kv[source, 0], kv[source, 1]
                del kv
            pending = next_pending

    def forward_blocks(self) -> Iterator[KVBlock]:
        for heads, source, k, v in self._blocks():
            yield KVBlock(k, v, self.block_segments[source], heads)

    def backward_blocks(self) -> Generator[KVBlock, KVGrads, KVGrads]:
        if self.sparse:
            return (yield from self._sparse_backward_blocks())
        scattering = []
        dtype = compute_dtype(self.k.dtype)
        grads = None

        def count(grads: torch.Tensor) -> None:
            self._count({s: [grads[0]] for s in self.recv_from}, {r: [grads[0]] for r in self.send_to})

        for heads, source, k, v in self._blocks():
            if source == self.rank:  # the first block of a head group
                if grads is not None:
                    scattering.append(reduce_scatter(grads, self.group))  # overlaps the next group
                    count(grads)
                # the driver builds each source's dK/dV right in its slot (every slot is written)
                grads = torch.empty((self.size, 2) + tuple(k.shape), dtype=dtype, device=k.device)
            slots = (grads[source, 0], grads[source, 1])
            dk, dv = yield KVBlock(k, v, self.block_segments[source], heads, slots)
            for slot, got in zip(slots, (dk, dv)):
                if got is not slot:
                    slot.copy_(got)
        scattering.append(reduce_scatter(grads, self.group))
        count(grads)
        parts = [handle.wait() for handle in scattering]  # each [2, B, T, Hg, D]
        if len(parts) == 1:
            return parts[0][0], parts[0][1]
        return torch.cat([p[0] for p in parts], dim=2), torch.cat([p[1] for p in parts], dim=2)

    def _sparse_backward_blocks(self) -> Generator[KVBlock, KVGrads, KVGrads]:
        """Backward of the zero-redundant path. Each source's (dk, dv) partial (over the key range
        this rank read) is the driver's own result, sent as it is (no slot buffer: point-to-point
        needs no stacked send buffer); the exchange that returns a head group's partials is issued
        when the group is done, so it overlaps the next group's compute (and its K/V re-fetch,
        issued earlier, runs alongside)."""
        returning = []  # per head group: (own (dk, dv), handle of the partials coming home)
        own: KVGrads | None = None
        partials = {}  # source rank -> [dk, dv] partials of the head group in progress

        def send_home(partials: dict[int, list[torch.Tensor]]) -> None:
            # the partials of the sources read in this group go back to them; the partials of this
            # rank's block come from the ranks that read it, each over the range that rank read
            coming = {}
            for r in self.send_to:
                a, b = self._sent_range(r)
                coming[r] = [own[0][:, a:b], own[1][:, a:b]]  # only shape, dtype and device are read
            self._count(partials, coming)
            returning.append((own, exchange(partials, coming, self.group)))

        for heads, source, k, v in self._blocks():
            if source == self.rank and own is not None:  # the first block of the next head group
                send_home(partials)
                partials = {}
            dk, dv = yield KVBlock(k, v, self.block_segments[source], heads)
            if source == self.rank:
                own = (dk, dv)
            else:
                partials[source] = [dk, dv]
        send_home(partials)
        results = []
        for (dk, dv), handle in returning:
            got = handle.wait()
            # the driver's own partial is this source's to keep: the others are added into it
            for peer in self.send_to:  # a fixed order: the same sum on every run
                a, b = self._sent_range(peer)
                part_k, part_v = got[peer]
                dk[:, a:b].add_(part_k)
                dv[:, a:b].add_(part_v)
            results.append((dk, dv))
        if len(results) == 1:
            return results[0]
        return torch.cat([r[0] for r in results], dim=2), torch.cat([r[1] for r in results], dim=2)
