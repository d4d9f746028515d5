"""The one driver of every softmax strategy: local queries against the K/V blocks of a source.

For each :class:`~seqpar.softmax.sources.KVBlock` the driver asks ``layout.plan_blocks`` which
parts of the local queries see which parts of the block (and with which diagonal mask), then

- forward: merges each part into a running (o, lse) kept in fp32 (fp64 for fp64 inputs) with
  ``attention_block_accumulate_``;
- backward: accumulates dQ locally and hands the block's dK/dV back to the source, which
  carries them home (ring) or reduce-scatters them (all-gather).

The driver knows nothing about communication; the sources know nothing about masks.
"""
from __future__ import annotations

from typing import Sequence

import torch

from seqpar.kernels import attention_block_accumulate_, attention_block_backward, compute_dtype
from seqpar.layout import Segment, plan_blocks
from seqpar.softmax.sources import KVBlock, KVSource


def _query_heads(block: KVBlock, queries_per_kv_head: int) -> slice:
    """Query heads that read the KV heads of ``block`` (query head h reads KV head h // G)."""
    heads = block.kv_heads
    return slice(heads.start * queries_per_kv_head, heads.stop * queries_per_kv_head)


def attention_forward(q: torch.Tensor, source: KVSource, q_segments: Sequence[Segment], *, causal: bool,
                      scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) in the compute dtype of local queries q [B, T, Hq, D] against every block of
    ``source``; rows that see no key keep o = 0, lse = -inf."""
    batch, length, num_heads, _ = q.shape
    dtype = compute_dtype(q.dtype)
    o = torch.zeros(batch, length, num_heads, source.v.shape[-1], dtype=dtype, device=q.device)
    lse = torch.full((batch, num_heads, length), float("-inf"), dtype=dtype, device=q.device)
    group_size = num_heads // source.k.shape[2]
    for block in source.forward_blocks():
        qh = _query_heads(block, group_size)
        for task in plan_blocks(q_segments, block.segments, causal):
            rows = slice(task.q_start, task.q_start + task.q_len)
            keys = slice(task.k_start, task.k_start + task.k_len)
            attention_block_accumulate_(q[:, rows, qh], block.k[:, keys], block.v[:, keys],
                                        o[:, rows, qh], lse[:, qh, rows], scale=scale,
                                        diagonal_offset=task.diagonal_offset, backend=backend)
    return o, lse


def attention_backward(do: torch.Tensor, q: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor,
                       source: KVSource, q_segments: Sequence[Segment], *, causal: bool, scale: float,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) in the compute dtype. ``lse`` is the final (global) log-sum-exp of every row and
    ``delta`` = rowsum(o * do) [B, Hq, T] (minus the gradient of lse, when lse is used)."""
    dtype = compute_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=dtype, device=q.device)
    group_size = q.shape[2] // source.k.shape[2]
    blocks = source.backward_blocks()
    block = next(blocks)
    while True:
        qh = _query_heads(block, group_size)
        dk = torch.zeros(block.k.shape, dtype=dtype, device=q.device)
        dv = torch.zeros(block.v.shape, dtype=dtype, device=q.device)
        for task in plan_blocks(q_segments, block.segments, causal):
            rows = slice(task.q_start, task.q_start + task.q_len)
            keys = slice(task.k_start, task.k_start + task.k_len)
            dq_part, dk_part, dv_part = attention_block_backward(
                do[:, rows, qh], q[:, rows, qh], block.k[:, keys], block.v[:, keys], lse[:, qh, rows],
                delta[:, qh, rows], scale=scale, diagonal_offset=task.diagonal_offset, backend=backend)
            dq[:, rows, qh] += dq_part
            dk[:, keys] += dk_part
            dv[:, keys] += dv_part
        try:
            block = blocks.send((dk, dv))
        except StopIteration as done:
            dk_local, dv_local = done.value
            return dq, dk_local, dv_local
