"""The one driver of every softmax strategy: local queries against the K/V blocks of a source.

For each :class:`~seqpar.softmax.sources.KVBlock` the driver asks ``layout.plan_blocks`` which
parts of the local queries see which parts of the block under the call's
:class:`~seqpar.masks.AttentionMask` (and with which band: diagonal and window offsets), merged
into as few kernel calls as possible by ``layout.merge_block_tasks`` (cached per segment pair), then

- forward: merges each part into a running (o, lse) kept in fp32 (fp64 for fp64 inputs) with
  ``attention_block_accumulate_``;
- backward: accumulates dQ locally and hands the block's dK/dV back to the source, which
  carries them home (ring) or reduce-scatters them (all-gather).

Accumulators are not zero-filled up front: the first part that reaches a region of o / lse / dQ /
dK / dV is copied there (or, when it covers the whole accumulator, taken as it is: world size 1
and Ulysses are one kernel call with no extra pass), later parts are merged / added, and what no
part reached is set to its empty value (o = 0, lse = -inf, grads 0) at the end. The backward's
per-call operands (do and ``out`` in the fused op's layout, see ``prepare_backward``) are made
once per call, never per block.

The driver knows nothing about communication; the sources know nothing about masks.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable, Sequence

import torch

from seqpar.kernels import attention_block_accumulate_, attention_block_backward, compute_dtype, merge_partials_
from seqpar.kernels.softmax import attention_block_forward, prepare_backward
from seqpar.layout import BlockTask, Segment, merge_block_tasks, plan_blocks
from seqpar.masks import AttentionMask
from seqpar.softmax.sources import KVBlock, KVSource


def _query_heads(block: KVBlock, queries_per_kv_head: int) -> slice:
    """Query heads that read the KV heads of ``block`` (query head h reads KV head h // G)."""
    heads = block.kv_heads
    return slice(heads.start * queries_per_kv_head, heads.stop * queries_per_kv_head)


@lru_cache(maxsize=1024)
def _tasks(q_segments: tuple[Segment, ...], k_segments: tuple[Segment, ...],
           mask: AttentionMask) -> tuple[BlockTask, ...]:
    return tuple(merge_block_tasks(plan_blocks(q_segments, k_segments, mask)))


def block_tasks(q_segments: Sequence[Segment], k_segments: Sequence[Segment],
                mask: AttentionMask) -> tuple[BlockTask, ...]:
    """The kernel calls of local queries against one key block (merged ``plan_blocks``)."""
    return _tasks(tuple(q_segments), tuple(k_segments), mask)


class _Written:
    """Which (row range x head range) rectangles of a [B, T, H, ...] accumulator hold data, for head
    ranges that are equal or disjoint (the KV-head groups of a source always are)."""

    def __init__(self, rows: int, heads: int):
        self.rows, self.heads = rows, heads
        self.done: dict[tuple[int, int], list[tuple[int, int]]] = {}  # head range -> sorted row ranges
        self.complete = False  # everything written (after fill_missing)

    def state(self, rows: slice, heads: slice) -> str:
        """'none', 'all' or 'some' of the rectangle is written."""
        if self.complete:
            return "all"
        key = (heads.start, heads.stop)
        for other, ranges in self.done.items():
            if other == key:
                covered = sum(max(0, min(b, rows.stop) - max(a, rows.start)) for a, b in ranges)
                return "none" if covered == 0 else "all" if covered == rows.stop - rows.start else "some"
            if other[0] < key[1] and key[0] < other[1]:
                return "some"  # overlapping different head ranges: treat generally
        return "none"

    def add(self, rows: slice, heads: slice) -> None:
        if self.complete:
            return
        ranges = sorted(self.done.get((heads.start, heads.stop), []) + [(rows.start, rows.stop)])
        merged = [ranges[0]]
        for a, b in ranges[1:]:
            if a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self.done[(heads.start, heads.stop)] = merged

    def missing(self) -> list[tuple[slice, slice]]:
        """The unwritten (rows, heads) rectangles."""
        if self.complete:
            return []
        gaps: list[tuple[slice, slice]] = []
        edge = 0
        for (h0, h1), ranges in sorted(self.done.items()):
            if h0 > edge:
                gaps.append((slice(0, self.rows), slice(edge, h0)))
            start = 0
            for a, b in ranges:
                if a > start:
                    gaps.append((slice(start, a), slice(h0, h1)))
                start = max(start, b)
            if start < self.rows:
                gaps.append((slice(start, self.rows), slice(h0, h1)))
            edge = max(edge, h1)
        if edge < self.heads:
            gaps.append((slice(0, self.rows), slice(edge, self.heads)))
        return gaps

    def fill_missing(self, fill: Callable[[slice, slice], None]) -> None:
        for rows, heads in self.missing():
            fill(rows, heads)
        self.done, self.complete = {}, True


class _GradSum:
    """A sum of parts on (rows, heads) rectangles of a [B, T, H, D] gradient: the first part of a
    region is copied there (a part covering everything is kept as it is), later ones are added;
    unwritten regions are 0 in :meth:`result`. ``buffer``: where to build it (else allocated)."""

    def __init__(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device,
                 buffer: torch.Tensor | None = None):
        self.shape, self.dtype, self.device = tuple(shape), dtype, device
        self.value = buffer
        self.written = _Written(self.shape[1], self.shape[2])

    def _whole(self, rows: slice, heads: slice) -> bool:
        return (rows.start, rows.stop, heads.start, heads.stop) == (0, self.shape[1], 0, self.shape[2])

    def add(self, part: torch.Tensor, rows: slice, heads: slice) -> None:
        state = self.written.state(rows, heads)
        if self.value is None:
            if state == "none" and self._whole(rows, heads) and part.dtype == self.dtype:
                self.value = part.contiguous()
                self.written.add(rows, heads)
                return
            self.value = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        if state == "some":
            self.written.fill_missing(lambda r, h: self.value[:, r, h].zero_())
        if state == "none":
            self.value[:, rows, heads].copy_(part)
        else:
            self.value[:, rows, heads].add_(part)
        self.written.add(rows, heads)

    def result(self) -> torch.Tensor:
        if self.value is None:
            return torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        self.written.fill_missing(lambda r, h: self.value[:, r, h].zero_())
        return self.value


def attention_forward(q: torch.Tensor, source: KVSource, q_segments: Sequence[Segment], *, mask: AttentionMask,
                      scale: float, backend: str, softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) in the compute dtype of local queries q [B, T, Hq, D] against every block of
    ``source``; rows that see no key keep o = 0, lse = -inf. o and lse are contiguous."""
    batch, length, num_heads, _ = q.shape
    dtype = compute_dtype(q.dtype)
    o_shape, lse_shape = (batch, length, num_heads, source.v.shape[-1]), (batch, num_heads, length)
    o = lse = None
    written = _Written(length, num_heads)

    def fill_empty(rows: slice, heads: slice) -> None:
        o[:, rows, heads].zero_()
        lse[:, heads, rows].fill_(float("-inf"))

    group_size = num_heads // source.k.shape[2]
    for block in source.forward_blocks():
        qh = _query_heads(block, group_size)
        for task in block_tasks(q_segments, block.segments, mask):
            rows = slice(task.q_start, task.q_start + task.q_len)
            keys = slice(task.k_start, task.k_start + task.k_len)
            args = (q[:, rows, qh], block.k[:, keys], block.v[:, keys])
            kw = dict(scale=scale, diagonal_offset=task.diagonal_offset, window_offset=task.window_offset,
                      softcap=softcap, backend=backend)
            state = written.state(rows, qh)
            if state == "all":
                attention_block_accumulate_(*args, o[:, rows, qh], lse[:, qh, rows], **kw)
                continue
            o_blk, lse_blk = attention_block_forward(*args, **kw)
            if o is None and state == "none" and (task.q_start, task.q_len, qh.start, qh.stop) == (
                    0, length, 0, num_heads) and o_blk.dtype == dtype:
                o, lse = o_blk.contiguous(), lse_blk.contiguous()  # the block is the whole output
            else:
                if o is None:
                    o = torch.empty(o_shape, dtype=dtype, device=q.device)
                    lse = torch.empty(lse_shape, dtype=dtype, device=q.device)
                if state == "none":
                    o[:, rows, qh].copy_(o_blk)
                    lse[:, qh, rows].copy_(lse_blk)
                else:
                    written.fill_missing(fill_empty)
                    merge_partials_(o[:, rows, qh], lse[:, qh, rows], o_blk, lse_blk)
            written.add(rows, qh)
    if o is None:
        return (torch.zeros(o_shape, dtype=dtype, device=q.device),
                torch.full(lse_shape, float("-inf"), dtype=dtype, device=q.device))
    written.fill_missing(fill_empty)
    return o, lse


def attention_backward(do: torch.Tensor, q: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor | None,
                       source: KVSource, q_segments: Sequence[Segment], *, mask: AttentionMask, scale: float,
                       backend: str, out: torch.Tensor | None = None, softcap: float | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the compute dtype. ``lse`` is the final (global) log-sum-exp of every row and
    ``delta`` = rowsum(o * do) [B, Hq, T] (minus the gradient of lse, when lse is used).

    ``out``: the forward's output o [B, T, Hq, D], given only when delta = rowsum(o * do) (no lse
    gradient); ``delta`` may then be None (the fused backward computes it from o itself)."""
    dtype = compute_dtype(q.dtype)
    do, delta, out, backend = prepare_backward(do, delta, out=out, backend=backend)  # once per call
    dq = _GradSum(q.shape, dtype, q.device)
    group_size = q.shape[2] // source.k.shape[2]
    blocks = source.backward_blocks()
    block = next(blocks)
    while True:
        qh = _query_heads(block, group_size)
        dk_buf, dv_buf = block.grads if block.grads is not None else (None, None)
        dk = _GradSum(block.k.shape, dtype, q.device, dk_buf)
        dv = _GradSum(block.v.shape, dtype, q.device, dv_buf)
        every_head = slice(0, block.k.shape[2])
        for task in block_tasks(q_segments, block.segments, mask):
            rows = slice(task.q_start, task.q_start + task.q_len)
            keys = slice(task.k_start, task.k_start + task.k_len)
            dq_part, dk_part, dv_part = attention_block_backward(
                do[:, rows, qh], q[:, rows, qh], block.k[:, keys], block.v[:, keys], lse[:, qh, rows],
                None if delta is None else delta[:, qh, rows], scale=scale, diagonal_offset=task.diagonal_offset,
                window_offset=task.window_offset, softcap=softcap, backend=backend,
                out=None if out is None else out[:, rows, qh])
            dq.add(dq_part, rows, qh)
            dk.add(dk_part, keys, every_head)
            dv.add(dv_part, keys, every_head)
        try:
            block = blocks.send((dk.result(), dv.result()))
        except StopIteration as done:
            dk_local, dv_local = done.value
            return dq.result(), dk_local, dv_local
