"""A cost model of every strategy: per-rank FLOPs (from the same causal block plan the strategies
execute), bytes on the wire, and an overlapped time estimate for a given machine.

There is one GPU in our lab, never several, so the multi-GPU behaviour of a strategy is shown by
this model (plus gloo runs staged through host memory and one real rank under the fake process
group). The work counts are exact: they come from :func:`seqpar.layout.plan_blocks`, the plan
the ring / all-gather drivers run. Times are estimates: compute at a sustained rate, messages at
a link bandwidth plus a fixed latency, and for overlapped strategies a step costs the larger of
its compute and its communication.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from seqpar.layout import check_global_length, chunks_per_rank, plan_blocks, segments

if TYPE_CHECKING:
    from seqpar.config import ModelConfig, SequenceParallelConfig


@dataclass(frozen=True)
class Machine:
    """Sustained rates of one rank and its links."""

    name: str = "H100 (cuDNN-level attention, NVLink 4 intra-node)"
    attention_tflops: float = 500.0  # sustained softmax-attention rate, fwd (H100 reference points: benchmarks/README.md)
    linear_tflops: float = 300.0  # sustained rate of chunked linear-attention matmuls
    link_gbytes_s: float = 200.0  # per-direction bandwidth a rank sees for collectives
    latency_us: float = 10.0  # fixed cost of one message / collective step


@dataclass(frozen=True)
class Shape:
    """One attention layer: batch, global length, query heads, KV heads, head dim, bytes/element."""

    batch: int = 1
    seq_len: int = 1 << 20
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    element_bytes: int = 2


@dataclass(frozen=True)
class Estimate:
    strategy: str
    layout: str
    world_size: int
    max_rank_tflop: float  # forward work of the busiest rank
    imbalance: float  # busiest rank / average rank
    bytes_sent_per_rank: float  # forward pass
    serial_steps: int  # communication steps that wait on each other
    fwd_ms: float


def visible_pairs(q_len: int, k_len: int, diagonal_offset: int | None) -> int:
    """Number of (query, key) pairs a block computes under its mask (exact)."""
    if diagonal_offset is None:
        return q_len * k_len
    per_query = (torch.arange(q_len, dtype=torch.long) + diagonal_offset + 1).clamp(0, k_len)
    return int(per_query.sum())


def _pairs_per_step(layout: str, world_size: int, local_len: int, causal: bool) -> list[list[int]]:
    """pairs[step][rank]: (query, key) pairs rank computes against the block of rank - step."""
    segs = [segments(layout, r, world_size, local_len) for r in range(world_size)]
    table = []
    for step in range(world_size):
        row = []
        for r in range(world_size):
            src = (r - step) % world_size
            row.append(sum(visible_pairs(t.q_len, t.k_len, t.diagonal_offset)
                           for t in plan_blocks(segs[r], segs[src], causal)))
        table.append(row)
    return table


def softmax_estimate(strategy: str, layout: str, world_size: int, shape: Shape, machine: Machine,
                     causal: bool = True, ulysses_size: int = 1) -> Estimate:
    """Forward estimate of one softmax-attention layer under ``strategy`` ('ring', 'allgather',
    'ulysses', 'usp' with ``ulysses_size``) and ``layout``."""
    local_len = check_global_length(layout, shape.seq_len, world_size)
    flop_per_pair = 4 * shape.batch * shape.heads * shape.head_dim
    kv_bytes_local = 2 * shape.batch * local_len * shape.kv_heads * shape.head_dim * shape.element_bytes
    rate = machine.attention_tflops * 1e12
    bw = machine.link_gbytes_s * 1e9
    lat = machine.latency_us * 1e-6

    if strategy in ("ring", "allgather"):
        pairs = _pairs_per_step(layout, world_size, local_len, causal)
        per_rank = [sum(pairs[s][r] for s in range(world_size)) for r in range(world_size)]
        busiest = max(per_rank) * flop_per_pair
        average = sum(per_rank) / world_size * flop_per_pair
        if strategy == "ring":
            comm_step = lat + kv_bytes_local / bw
            time = 0.0
            for s in range(world_size):
                compute = max(pairs[s]) * flop_per_pair / rate
                time += max(compute, comm_step) if s < world_size - 1 else compute
            sent, steps = kv_bytes_local * (world_size - 1), world_size - 1
        else:
            gather = lat + kv_bytes_local * (world_size - 1) / bw
            # the gather is split over KV heads: only the first head group is exposed
            groups = max(1, min(shape.kv_heads, 4))
            time = gather / groups + max(busiest / rate, gather * (groups - 1) / groups)
            sent, steps = kv_bytes_local * (world_size - 1), 1
        return Estimate(strategy, layout, world_size, busiest / 1e12, busiest / average, sent, steps, time * 1e3)

    if strategy in ("ulysses", "usp"):
        u = world_size if strategy == "ulysses" else ulysses_size
        if world_size % u != 0:
            raise ValueError(f"ulysses size {u} does not divide world size {world_size}")
        ring = world_size // u
        q_bytes = shape.batch * local_len * shape.heads * shape.head_dim * shape.element_bytes
        a2a = (q_bytes * 2 + kv_bytes_local) * (u - 1) / u  # q, o and k/v move; 1/u stays local
        full_pairs = visible_pairs(shape.seq_len, shape.seq_len, 0 if causal else None) // world_size
        compute = full_pairs * flop_per_pair / rate
        # after the all-to-all a ring block is u * local_len tokens of Hkv / u heads: the same bytes
        ring_comm = (ring - 1) * (lat + kv_bytes_local / bw) if ring > 1 else 0.0
        time = 2 * (lat + a2a / bw) + max(compute, ring_comm)
        sent = a2a + kv_bytes_local * (ring - 1)
        return Estimate(strategy, layout, world_size, full_pairs * flop_per_pair / 1e12, 1.0, sent,
                        2 + max(0, ring - 1), time * 1e3)
    raise ValueError(f"unknown softmax strategy {strategy!r}")


def linear_estimate(strategy: str, world_size: int, shape: Shape, machine: Machine,
                    chunks_per_rank: int = 1) -> Estimate:
    """Forward estimate of one linear-attention layer under 'lasp2' or 'lasp1' (ring, serial)."""
    local_len = shape.seq_len // world_size
    state_bytes = shape.batch * shape.heads * shape.head_dim * shape.head_dim * 4  # fp32 state
    # chunked linear attention (chunk 64): intra-chunk QK^T and PV, plus state update and readout
    chunk = 64
    flop = shape.batch * shape.heads * local_len * (4 * chunk * shape.head_dim + 4 * shape.head_dim ** 2)
    compute = flop / (machine.linear_tflops * 1e12)
    bw, lat = machine.link_gbytes_s * 1e9, machine.latency_us * 1e-6
    if strategy == "lasp2":
        sent = state_bytes * chunks_per_rank * (world_size - 1)  # all-gather: receive P-1 states, send ours
        comm = lat + state_bytes * chunks_per_rank * (world_size - 1) / bw
        time = max(compute, comm) + 2 * shape.batch * shape.heads * local_len * shape.head_dim ** 2 / (machine.linear_tflops * 1e12)
        steps = 1
    elif strategy == "lasp1":
        sent = state_bytes * chunks_per_rank
        hop = lat + state_bytes / bw
        time = compute + (world_size - 1) * hop
        steps = world_size - 1
    else:
        raise ValueError(f"unknown linear strategy {strategy!r}")
    return Estimate(strategy, "contiguous" if chunks_per_rank == 1 else "zigzag", world_size, flop / 1e12, 1.0,
                    sent, steps, time * 1e3)


@dataclass(frozen=True)
class StepBytes:
    """Bytes one rank sends in one training step of a model (cost-model estimates)."""

    attention_forward: float  # every attention layer's forward collectives
    attention_backward: float  # their backward collectives
    gradient_all_reduce: float  # summing the replicated gradients over sp, then dp (ring all-reduce)

    @property
    def total(self) -> float:
        return self.attention_forward + self.attention_backward + self.gradient_all_reduce


def _backward_bytes(strategy: str, forward_bytes: float, world_size: int, element_bytes: int) -> float:
    """Backward bytes of one layer from its forward bytes (see docs/softmax.md, docs/linear.md):
    ring / allgather move K/V again plus dK/dV in fp32 (ring: one extra hop home); Ulysses / USP
    move dO, dQ, dK, dV (as many bytes as forward); LASP-2 / LASP move dS states (as forward)."""
    if strategy in ("ring", "allgather") and world_size > 1:
        grad = forward_bytes * max(1.0, 4 / element_bytes)
        if strategy == "ring":
            grad *= world_size / (world_size - 1)
        return forward_bytes + grad
    return forward_bytes


def step_bytes_per_rank(model: ModelConfig, sp: SequenceParallelConfig, seq_len: int, batch_per_replica: int, element_bytes: int,
                        num_params: int, dp_size: int = 1) -> StepBytes:
    """Estimate what one rank sends per training step of a :class:`seqpar.config.ModelConfig` run
    under a :class:`seqpar.config.SequenceParallelConfig`: every softmax layer by
    :func:`softmax_estimate`, every linear layer by :func:`linear_estimate` (fp32 states), and the
    gradient all-reduce of ``num_params`` fp32 gradients (ring all-reduce: 2 (n-1)/n of the bytes
    over the sp group, then over the dp group)."""
    P = sp.sp_size
    machine = Machine()
    shape = Shape(batch=batch_per_replica, seq_len=seq_len, heads=model.n_heads, kv_heads=model.n_kv_heads,
                  head_dim=model.head_dim, element_bytes=element_bytes)
    fwd = bwd = 0.0
    if P > 1:
        for kind in model.layer_kinds:
            if kind == "softmax":
                strategy = sp.softmax_strategy
                est = softmax_estimate(strategy, sp.layout, P, shape, machine, causal=True,
                                       ulysses_size=sp.ulysses_size)
            else:
                strategy = sp.linear_strategy
                est = linear_estimate(strategy, P, shape, machine,
                                      chunks_per_rank=chunks_per_rank(sp.layout))
            fwd += est.bytes_sent_per_rank
            bwd += _backward_bytes(strategy, est.bytes_sent_per_rank, P, element_bytes)
    grads = 4.0 * num_params
    all_reduce = sum(2 * (n - 1) / n * grads for n in (P, dp_size) if n > 1)
    return StepBytes(fwd, bwd, all_reduce)
