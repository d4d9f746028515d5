"""Where the K/V blocks of a sequence-parallel softmax attention come from.

A *K/V source* hands the driver (:mod:`seqpar.softmax.driver`) one :class:`KVBlock` at a time:
a slice of KV heads of the keys and values of one source rank, with the segments (global
positions) of those keys. The driver plans the block with ``layout.plan_blocks`` and computes it;
the source does the communication, issuing the transfer of the next block before yielding the
current one and waiting for it afterwards, so that communication overlaps compute.

- :class:`RingKV`: K/V travel a ring (Ring Attention and its zigzag / striped variants, and the
  ring axis of USP). P-1 exchanges forward; in backward dK/dV travel with K/V and arrive home.
  With one rank it is plain local attention (no communication).
- :class:`GatheredKV`: K/V are all-gathered (LASP-2H / Llama 3), split into KV-head groups so
  that the gather of group i+1 overlaps the compute of group i (and the gather of group i the
  compute of its own block, which is read from the local K/V); backward re-gathers (the gathered
  copy is not kept between forward and backward) and reduce-scatters dK/dV per head group, built
  by the driver right in the reduce-scatter buffer (``KVBlock.grads``). When the mask leaves some
  rank without a query that sees some other rank's keys (``ParallelPlan.kv_sources_needed``:
  causal contiguous shards, sliding windows, packed documents), the gathers are zero-redundant:
  per head group one point-to-point ``exchange`` moves each block only to the ranks that read it,
  blocks no local query sees are skipped, and in backward each dK/dV partial goes straight back
  to its source (one exchange per group), which sums the partials of its block.

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
from seqpar.layout import Segment

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
    mask, the same on every rank. In backward, each block's dK/dV travel with it and, after the
    last step, go straight home (one exchange over ``steps - 1`` ranks; one hop when steps = P).
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None, rank: int,
                 size: int, segments_of_source: Sequence[Sequence[Segment]], steps: int | None = None):
        super().__init__(k, v, group, rank, size, segments_of_source)
        self.steps = size if steps is None else int(steps)
        if not 1 <= self.steps <= size:
            raise ValueError(f"a ring of {size} ranks visits 1 to {size} blocks, got steps={steps}")

    def _block(self, k: torch.Tensor, v: torch.Tensor, step: int) -> KVBlock:
        source = (self.rank - step) % self.size
        return KVBlock(k, v, self.segments_of_source[source], slice(0, self.k.shape[2]))

    def forward_blocks(self) -> Iterator[KVBlock]:
        k, v = self.k, self.v
        for step in range(self.steps):
            incoming = ring_exchange([k, v], self.group) if step < self.steps - 1 else None
            yield self._block(k, v, step)
            if incoming is not None:
                k, v = incoming.wait()

    def backward_blocks(self) -> Generator[KVBlock, KVGrads, KVGrads]:
        k, v = self.k, self.v
        grads_in_flight = None  # dK/dV accumulators of the block that arrives with the next K/V
        dk = dv = None
        for step in range(self.steps):
            last = step == self.steps - 1
            incoming = ring_exchange([k, v], self.group) if not last else None
            dk, dv = yield self._block(k, v, step)
            if grads_in_flight is not None:
                dk_acc, dv_acc = grads_in_flight.wait()
                dk, dv = dk_acc.add_(dk), dv_acc.add_(dv)
            if self.steps > 1:
                # on, with the K/V; after the last step straight home to rank r - step (the owner of
                # the block held now), which is the next rank when every block was visited
                grads_in_flight = ring_exchange([dk, dv], self.group, shift=1 if not last else -step)
            if incoming is not None:
                k, v = incoming.wait()
        if grads_in_flight is not None:
            dk, dv = grads_in_flight.wait()
        return dk, dv


class GatheredKV(KVSource):
    """K/V gathered in ``head_groups`` groups of KV heads (the transfer of group i+1 overlaps the
    compute of group i, the transfer of group i that of its own block).

    ``needs`` (``ParallelPlan.kv_sources_needed``): ``needs[r][s]`` = some query of rank r sees a
    key of rank s, the same matrix on every rank. None: every rank needs every block; K/V are
    all-gathered and dK/dV reduce-scattered per group. Otherwise the gathers are zero-redundant:
    per group one point-to-point :func:`~seqpar.comm.exchange` sends the local K/V to exactly the
    ranks r' with needs[r'][r] and receives the K/V of exactly the sources s with needs[r][s]; in
    backward the same re-fetch, then one exchange per group returns the dK/dV partial of each
    source to it and receives the partials of the local block from the ranks that read it (summed
    with the own partial). Both sides of every message are derived from the same matrix, so each
    send meets its receive.

    ``bytes_sent`` / ``bytes_received``: {peer rank: bytes} this source moved (K/V and dK/dV; the
    all-gather / reduce-scatter path counts the block each pair of ranks exchanges through them).
    One rank communicates nothing."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None, rank: int,
                 size: int, segments_of_source: Sequence[Sequence[Segment]], head_groups: int,
                 needs: Sequence[Sequence[bool]] | None = None):
        super().__init__(k, v, group, rank, size, segments_of_source)
        num_kv_heads = k.shape[2]
        head_groups = max(1, min(head_groups, num_kv_heads))
        bounds = [num_kv_heads * i // head_groups for i in range(head_groups + 1)]
        self.head_slices = [slice(bounds[i], bounds[i + 1]) for i in range(head_groups)]
        self.needs = None
        if needs is not None:
            needs = tuple(tuple(bool(x) for x in row) for row in needs)
            square = len(needs) == size and all(len(row) == size for row in needs)
            if not square or not all(needs[i][i] for i in range(size)):
                raise ValueError(f"needs must be a {size} x {size} matrix with a True diagonal, got {needs}")
            self.needs = needs
        if self.needs is None or size == 1:
            self.recv_from = self.source_order()[1:]
            self.send_to = [r for r in range(size) if r != rank]
        else:
            # the sources this rank reads (in visiting order) and the ranks that read this one
            self.recv_from = [s for s in self.source_order()[1:] if self.needs[rank][s]]
            self.send_to = [r for r in range(size) if r != rank and self.needs[r][rank]]
        self.bytes_sent: dict[int, int] = {}
        self.bytes_received: dict[int, int] = {}

    @property
    def sparse(self) -> bool:
        """Whether blocks travel point to point to the ranks that need them (else all-gather)."""
        return self.needs is not None and self.size > 1

    def _count(self, sent: Sequence[torch.Tensor], peers_sent: Sequence[int], received: Sequence[torch.Tensor],
               peers_received: Sequence[int]) -> None:
        out = sum(t.numel() * t.element_size() for t in sent)
        into = sum(t.numel() * t.element_size() for t in received)
        for peer in peers_sent:
            self.bytes_sent[peer] = self.bytes_sent.get(peer, 0) + out
        for peer in peers_received:
            self.bytes_received[peer] = self.bytes_received.get(peer, 0) + into

    def _gather(self, group_index: int):
        if group_index >= len(self.head_slices) or self.size == 1:
            return None
        heads = self.head_slices[group_index]
        if self.sparse:
            if not self.send_to and not self.recv_from:
                return None
            # K and V of the group (made contiguous once) to every rank that reads them
            kv = [self.k[:, :, heads], self.v[:, :, heads]]
            if self.send_to:
                kv = [t.contiguous() for t in kv]
            self._count(kv, self.send_to, kv, self.recv_from)
            return exchange({r: kv for r in self.send_to}, {s: kv for s in self.recv_from}, self.group)
        # one message per group: K and V stacked -> [P, 2, B, T, Hg, D] after the gather
        stacked = torch.stack([self.k[:, :, heads], self.v[:, :, heads]])
        self._count([stacked], self.send_to, [stacked], self.recv_from)
        return all_gather(stacked, self.group)

    def _blocks(self) -> Iterator[tuple[slice, int, torch.Tensor, torch.Tensor]]:
        """(kv heads, source rank, k, v) in visiting order. Per head group the own block comes first,
        read from the local K/V while the group's transfer is still in flight (so even the first
        transfer overlaps compute), then the received blocks of the other sources it needs."""
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
            yield KVBlock(k, v, self.segments_of_source[source], heads)

    def backward_blocks(self) -> Generator[KVBlock, KVGrads, KVGrads]:
        if self.sparse:
            return (yield from self._sparse_backward_blocks())
        scattering = []
        dtype = compute_dtype(self.k.dtype)
        grads = None
        for heads, source, k, v in self._blocks():
            if source == self.rank:  # the first block of a head group
                if grads is not None:
                    scattering.append(reduce_scatter(grads, self.group))  # overlaps the next group
                    self._count([grads[0]], self.recv_from, [grads[0]], self.send_to)
                # the driver builds each source's dK/dV right in its slot (every slot is written)
                grads = torch.empty((self.size, 2) + tuple(k.shape), dtype=dtype, device=k.device)
            slots = (grads[source, 0], grads[source, 1])
            dk, dv = yield KVBlock(k, v, self.segments_of_source[source], heads, slots)
            for slot, got in zip(slots, (dk, dv)):
                if got is not slot:
                    slot.copy_(got)
        scattering.append(reduce_scatter(grads, self.group))
        self._count([grads[0]], self.recv_from, [grads[0]], self.send_to)
        parts = [handle.wait() for handle in scattering]  # each [2, B, T, Hg, D]
        if len(parts) == 1:
            return parts[0][0], parts[0][1]
        return torch.cat([p[0] for p in parts], dim=2), torch.cat([p[1] for p in parts], dim=2)

    def _sparse_backward_blocks(self) -> Generator[KVBlock, KVGrads, KVGrads]:
        """Backward of the zero-redundant path. Each source's (dk, dv) partial is the driver's own
        result, sent as it is (no slot buffer: point-to-point needs no stacked send buffer); the
        exchange that returns a head group's partials is issued when the group is done, so it
        overlaps the next group's compute (and its K/V re-fetch, issued earlier, runs alongside)."""
        returning = []  # per head group: (own (dk, dv), handle of the partials coming home)
        own: KVGrads | None = None
        partials: dict[int, list[torch.Tensor]] = {}

        def send_home() -> None:
            # the partials of the sources read in this group go back to them; the partials of this
            # rank's block come from the ranks that read it (shaped like the own partial)
            self._count(own, self.recv_from, own, self.send_to)
            handle = exchange(partials, {r: list(own) for r in self.send_to}, self.group)
            returning.append((own, handle))

        for heads, source, k, v in self._blocks():
            if source == self.rank and own is not None:  # the first block of the next head group
                send_home()
                partials = {}
            dk, dv = yield KVBlock(k, v, self.segments_of_source[source], heads)
            if source == self.rank:
                own = (dk, dv)
            else:
                partials[source] = [dk, dv]
        send_home()
        del partials
        results = []
        for (dk, dv), handle in returning:
            got = handle.wait()
            for peer in self.send_to:  # a fixed order: the same sum on every run
                # summed into the received buffers (ours), never into the driver's tensors
                part_k, part_v = got[peer]
                dk, dv = part_k.add_(dk), part_v.add_(dv)
            results.append((dk, dv))
        if len(results) == 1:
            return results[0]
        return torch.cat([r[0] for r in results], dim=2), torch.cat([r[1] for r in results], dim=2)
