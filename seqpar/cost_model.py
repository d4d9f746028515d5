"""A cost model of every strategy: per-rank FLOPs (from the same block plan the strategies execute,
under any :class:`~seqpar.masks.AttentionMask`: causal, sliding window, packed documents), bytes
on the wire, and an overlapped time estimate for a given machine.

There is one GPU in our lab, never several, so the multi-GPU behaviour of a strategy is shown by
this model (plus gloo runs staged through host memory and one real rank under the fake process
group). The work counts are exact: they come from :func:`seqpar.layout.plan_blocks`, the plan
the ring / all-gather drivers run, and every block's (query, key) pairs are counted in closed form
(:func:`visible_pairs`), so a 1M-token estimate with hundreds of documents takes well under a
second. A ring visits only the K/V blocks some query can see (``seqpar.softmax.plan.ring_steps``:
fewer than P with a sliding window), and sends only those; with a window or documents the all-gather
strategy moves only the key range of each rank's K/V that some query of the receiver sees
(``seqpar.softmax.plan.visible_key_ranges``; bytes are those of the busiest sender). Times are
estimates: compute at a sustained rate, messages at a link bandwidth plus a fixed latency, and for
overlapped strategies a step costs the larger of its compute and its communication.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from seqpar.layout import Segment, check_global_length, chunks_per_rank, merge_block_tasks, plan_blocks, segments
from seqpar.masks import AttentionMask, as_mask

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
    mean_rank_tflop: float | None = None  # forward work of the average rank
    ring_steps: int | None = None  # K/V blocks a ring visits (its own included); None: no ring (all-gather)


def _pairs_at_or_below(q_len: int, k_len: int, offset: int) -> int:
    """#{(i, j) in [0, q_len) x [0, k_len): j <= i + offset}: row i sees clamp(i + offset + 1, 0, k_len)
    keys, an arithmetic run clamped at both ends; summed in closed form."""
    first, last = offset + 1, offset + q_len  # keys seen by the first / last row, before clamping
    full_rows = max(0, last - max(first, k_len) + 1)  # rows that see all k_len keys
    a, b = max(first, 1), min(last, k_len - 1)  # the partly clamped rows see a, a + 1, ..., b keys
    partial = (a + b) * (b - a + 1) // 2 if b >= a else 0
    return full_rows * k_len + partial


def visible_pairs(q_len: int, k_len: int, diagonal_offset: int | None, window_offset: int | None = None) -> int:
    """Number of (query, key) pairs a block computes under its band (exact, O(1)): key j is visible
    to query i iff j <= i + ``diagonal_offset`` (None: no upper bound) and j >= i + ``window_offset``
    (None: no lower bound), as in :class:`seqpar.layout.BlockTask`."""
    if q_len <= 0 or k_len <= 0:
        return 0
    upper = q_len * k_len if diagonal_offset is None else _pairs_at_or_below(q_len, k_len, diagonal_offset)
    below = 0 if window_offset is None else _pairs_at_or_below(q_len, k_len, window_offset - 1)
    return max(0, upper - below)


def _task_pairs(task) -> int:
    return visible_pairs(task.q_len, task.k_len, task.diagonal_offset, task.window_offset)


Rows = tuple[tuple[Segment, ...], ...]


@lru_cache(maxsize=64)
def _layout_rows(layout: str, world_size: int, local_len: int) -> Rows:
    """The segments of every rank (a ring / all-gather over ``world_size`` ranks)."""
    return tuple(tuple(segments(layout, r, world_size, local_len)) for r in range(world_size))


@lru_cache(maxsize=64)
def _ulysses_rows(layout: str, world_size: int, local_len: int, ulysses_size: int) -> Rows:
    """The segments of every ring row after the Ulysses exchange (``ulysses_size`` ranks a row),
    in the order the strategy holds them (``seqpar.softmax.plan._row``)."""
    from seqpar.softmax.plan import _row  # lazy: the strategy's module, not needed for the layout rows

    return tuple(tuple(_row(layout, i, ulysses_size, world_size, local_len)[1])
                 for i in range(world_size // ulysses_size))


def _ring_steps(rows: Rows, mask: AttentionMask) -> int:
    from seqpar.softmax.plan import ring_steps  # lazy: keeps this module free of import cycles

    return ring_steps(rows, mask)


def _ring_hop_fractions(rows: Rows, mask: AttentionMask, steps: int) -> list[list[float]]:
    """fractions[hop][r]: the share of a K/V block rank r sends at ``hop`` (0 .. steps - 2): the
    key range of source r - hop that the ring carries (``seqpar.softmax.plan.ring_key_ranges``)."""
    from seqpar.softmax.plan import ring_key_ranges

    size = len(rows)
    length = sum(seg.length for seg in rows[0])
    ranges = ring_key_ranges(rows, mask, steps) or ((0, length),) * size
    return [[(ranges[(r - hop) % size][1] - ranges[(r - hop) % size][0]) / length for r in range(size)]
            for hop in range(steps - 1)]


@lru_cache(maxsize=64)
def _rows_pairs(rows: Rows, mask: AttentionMask) -> tuple[tuple[int, ...], ...]:
    """pairs[step][r]: (query, key) pairs row r computes against the K/V of row r - step."""
    size = len(rows)
    return tuple(tuple(sum(_task_pairs(t) for t in plan_blocks(rows[r], rows[(r - step) % size], mask))
                       for r in range(size))
                 for step in range(size))


@lru_cache(maxsize=64)
def _rows_tasks(rows: Rows, mask: AttentionMask) -> tuple[tuple[int, ...], ...]:
    """tasks[step][r]: kernel calls (merged block tasks, as the driver runs them) of row r against
    the K/V of row r - step."""
    size = len(rows)
    return tuple(tuple(len(merge_block_tasks(plan_blocks(rows[r], rows[(r - step) % size], mask)))
                       for r in range(size))
                 for step in range(size))


def _check_mask(mask: AttentionMask | bool, seq_len: int) -> AttentionMask:
    mask = as_mask(mask)
    if mask.documents is not None and (mask.documents[0] != 0 or mask.documents[-1] != seq_len):
        raise ValueError(f"the mask's documents must run from 0 to the sequence length {seq_len}, got "
                         f"({mask.documents[0]}, ..., {mask.documents[-1]})")
    return mask


def _pairs_per_step(layout: str, world_size: int, local_len: int,
                    mask: AttentionMask | bool) -> tuple[tuple[int, ...], ...]:
    """pairs[step][rank]: (query, key) pairs rank computes against the block of rank - step under
    ``mask`` (an AttentionMask over global positions, or a bool: causal). Exact and cached."""
    mask = _check_mask(mask, world_size * local_len)
    return _rows_pairs(_layout_rows(layout, world_size, local_len), mask)


def _rows_of(strategy: str, layout: str, world_size: int, local_len: int, ulysses_size: int) -> tuple[Rows, int]:
    """(rows, ranks per row) of a strategy: one rank a row for ring / all-gather, the Ulysses group
    for 'ulysses' (one row: the whole sequence) and 'usp'."""
    if strategy in ("ring", "allgather"):
        return _layout_rows(layout, world_size, local_len), 1
    if strategy in ("ulysses", "usp"):
        u = world_size if strategy == "ulysses" else ulysses_size
        if u < 1 or world_size % u != 0:
            raise ValueError(f"ulysses size {u} does not divide world size {world_size}")
        return _ulysses_rows(layout, world_size, local_len, u), u
    raise ValueError(f"unknown softmax strategy {strategy!r}")


def _resolve_mask(causal: bool | None, mask: AttentionMask | bool | None) -> AttentionMask:
    if mask is None:
        return AttentionMask(causal=True if causal is None else bool(causal))
    mask = as_mask(mask)
    if causal is not None and bool(causal) != mask.causal:
        raise ValueError(f"causal={causal} contradicts mask={mask} (pass one of them)")
    return mask


def block_tasks_per_rank(strategy: str, layout: str, world_size: int, seq_len: int,
                         mask: AttentionMask | bool = True, ulysses_size: int = 1) -> list[int]:
    """Kernel calls (merged block tasks: ``merge_block_tasks(plan_blocks(...))``, as the driver runs
    them, per K/V block visited, not multiplied by KV-head groups) of every rank in one forward."""
    local_len = check_global_length(layout, seq_len, world_size)
    mask = _check_mask(mask, seq_len)
    rows, u = _rows_of(strategy, layout, world_size, local_len, ulysses_size)
    tasks = _rows_tasks(rows, mask)
    steps = len(rows) if strategy == "allgather" else _ring_steps(rows, mask)
    per_row = [sum(tasks[s][r] for s in range(steps)) for r in range(len(rows))]
    return [per_row[rank // u] for rank in range(world_size)]


def softmax_estimate(strategy: str, layout: str, world_size: int, shape: Shape, machine: Machine,
                     causal: bool | None = None, ulysses_size: int = 1,
                     mask: AttentionMask | bool | None = None) -> Estimate:
    """Forward estimate of one softmax-attention layer under ``strategy`` ('ring', 'allgather',
    'ulysses', 'usp' with ``ulysses_size``) and ``layout``.

    ``mask``: an :class:`~seqpar.masks.AttentionMask` over the ``shape.seq_len`` global positions
    (its documents must end at seq_len), or a bool (causal); without it ``causal`` (default True)
    gives a plain causal / full mask. Work is exact per rank (the strategies' block plan); a ring
    visits and sends only the K/V blocks some query sees (``ring_steps``)."""
    mask = _check_mask(_resolve_mask(causal, mask), shape.seq_len)
    local_len = check_global_length(layout, shape.seq_len, world_size)
    flop_per_pair = 4 * shape.batch * shape.heads * shape.head_dim
    kv_bytes_local = 2 * shape.batch * local_len * shape.kv_heads * shape.head_dim * shape.element_bytes
    rate = machine.attention_tflops * 1e12
    bw = machine.link_gbytes_s * 1e9
    lat = machine.latency_us * 1e-6
    rows, u = _rows_of(strategy, layout, world_size, local_len, ulysses_size)
    pairs = _rows_pairs(rows, mask)
    size = len(rows)
    per_row = [sum(pairs[s][r] for s in range(size)) for r in range(size)]
    # a row of u ranks splits its heads u ways: each rank does 1/u of the row's pairs (over all heads)
    busiest = max(per_row) * flop_per_pair / u
    average = sum(per_row) * flop_per_pair / world_size
    imbalance = busiest / average if average > 0 else 1.0

    if strategy in ("ring", "allgather"):
        if strategy == "ring":
            steps = _ring_steps(rows, mask)
            hops = _ring_hop_fractions(rows, mask, steps)  # only the keys some later rank sees travel
            time = 0.0
            for s in range(steps):
                compute = max(pairs[s]) * flop_per_pair / rate
                time += max(compute, lat + max(hops[s]) * kv_bytes_local / bw) if s < steps - 1 else compute
            sent = max(sum(hop[r] for hop in hops) for r in range(size)) * kv_bytes_local
            serial, ring = steps - 1, steps
        else:
            from seqpar.softmax.plan import visible_key_ranges  # lazy, as _ring_steps

            ranges = visible_key_ranges(rows, mask)
            if ranges is None:  # the all-gather collective: every rank sends to and receives from all
                sent = received = kv_bytes_local * (world_size - 1)
            else:  # zero-redundant: only the key range some query of the receiver sees moves
                kv_bytes_token = kv_bytes_local // local_len
                tokens = [[0 if r == s or ranges[r][s] is None else ranges[r][s][1] - ranges[r][s][0]
                           for s in range(size)] for r in range(size)]  # tokens[r][s]: r receives from s
                sent = kv_bytes_token * max(sum(tokens[r][s] for r in range(size)) for s in range(size))
                received = kv_bytes_token * max(sum(row) for row in tokens)
            gather = lat + received / bw
            # the gather is split over KV heads: only the first head group is exposed
            groups = max(1, min(shape.kv_heads, 4))
            time = gather / groups + max(busiest / rate, gather * (groups - 1) / groups)
            serial, ring = 1, None
        return Estimate(strategy, layout, world_size, busiest / 1e12, imbalance, sent, serial, time * 1e3,
                        average / 1e12, ring)

    # ulysses / usp
    steps = _ring_steps(rows, mask) if size > 1 else 1
    q_bytes = shape.batch * local_len * shape.heads * shape.head_dim * shape.element_bytes
    a2a = (q_bytes * 2 + kv_bytes_local) * (u - 1) / u  # q, o and k/v move; 1/u stays local
    compute = busiest / rate
    # after the all-to-all a ring block is u * local_len tokens of Hkv / u heads: the same bytes
    hops = _ring_hop_fractions(rows, mask, steps) if steps > 1 else []
    ring_comm = sum(lat + max(hop) * kv_bytes_local / bw for hop in hops)
    from seqpar.softmax.plan import ulysses_head_groups  # lazy, as _ring_steps

    # in head groups only the first group's inputs and the last group's results wait on the
    # network; the other groups' transfers overlap the compute
    exposed = a2a / ulysses_head_groups(shape.kv_heads, u, size)
    time = 2 * (lat + exposed / bw) + max(compute, 2 * (a2a - exposed) / bw, ring_comm)
    sent = a2a + (max(sum(hop[r] for hop in hops) for r in range(size)) * kv_bytes_local if hops else 0.0)
    return Estimate(strategy, layout, world_size, busiest / 1e12, imbalance, sent, 2 + (steps - 1), time * 1e3,
                    average / 1e12, steps)


TRANSITION_ELEMENTS = {"none": lambda dk: 0, "scalar": lambda dk: 1, "gla": lambda dk: dk, "delta": lambda dk: dk * dk}


def linear_estimate(strategy: str, world_size: int, shape: Shape, machine: Machine,
                    chunks_per_rank: int = 1, transition: str = "none", value_dim: int | None = None) -> Estimate:
    """Forward estimate of one linear-attention layer under 'lasp2' or 'lasp1' (ring, serial).

    ``transition``: what LASP-2 gathers with each state (docs/linear.md, "Bytes per pass"):
    'none' (no gate or a fixed decay: known), 'scalar' (a data-dependent gate per head), 'gla'
    (per key channel) or 'delta' (the delta rule and KDA: a Dk x Dk matrix per head).
    ``value_dim``: Dv (default: the head dim)."""
    local_len = shape.seq_len // world_size
    dv = shape.head_dim if value_dim is None else value_dim
    state_bytes = shape.batch * shape.heads * shape.head_dim * dv * 4  # fp32 state
    gathered_bytes = state_bytes + shape.batch * shape.heads * TRANSITION_ELEMENTS[transition](shape.head_dim) * 4
    # chunked linear attention (chunk 64): intra-chunk QK^T and PV, plus state update and readout
    chunk = 64
    flop = shape.batch * shape.heads * local_len * (4 * chunk * shape.head_dim + 4 * shape.head_dim ** 2)
    compute = flop / (machine.linear_tflops * 1e12)
    bw, lat = machine.link_gbytes_s * 1e9, machine.latency_us * 1e-6
    if strategy == "lasp2":
        sent = gathered_bytes * chunks_per_rank * (world_size - 1)  # all-gather: receive P-1 pieces, send ours
        comm = lat + gathered_bytes * chunks_per_rank * (world_size - 1) / bw
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
    fsdp: float  # FSDP2 over dp x sp: parameter all-gathers (forward, backward) and gradient reduce-scatter

    @property
    def total(self) -> float:
        return self.attention_forward + self.attention_backward + self.fsdp


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


LINEAR_TRANSITIONS = {"gate": "scalar", "gla": "gla"}  # ModelConfig.linear_decay -> what LASP-2 gathers


def step_bytes_per_rank(model: ModelConfig, sp: SequenceParallelConfig, seq_len: int, batch_per_replica: int, element_bytes: int,
                        num_params: int, dp_size: int = 1, param_bytes: int = 4) -> StepBytes:
    """Estimate what one rank sends per training step of a :class:`seqpar.config.ModelConfig` run
    under a :class:`seqpar.config.SequenceParallelConfig`: every softmax layer by
    :func:`softmax_estimate`, every linear layer by :func:`linear_estimate` (fp32 states), and
    FSDP2's traffic over the N = sp x dp ranks (:func:`seqpar.parallelize.apply_fsdp`): the
    ``num_params`` parameters all-gathered twice (forward, and again in backward after the
    reshard) in ``param_bytes`` (2 under bf16 mixed precision) and their gradients
    reduce-scattered in fp32, each collective sending (N-1)/N of its bytes."""
    P = sp.sp_size
    machine = Machine()
    shape = Shape(batch=batch_per_replica, seq_len=seq_len, heads=model.n_heads, kv_heads=model.n_kv_heads,
                  head_dim=model.head_dim, element_bytes=element_bytes)
    fwd = bwd = 0.0
    if P > 1:
        for kind in model.layer_kinds:
            if kind == "softmax":
                strategy = sp.softmax_strategy
                window = getattr(model, "window", None)
                est = softmax_estimate(strategy, sp.layout, P, shape, machine, ulysses_size=sp.ulysses_size,
                                       mask=AttentionMask(causal=True, window=window if window and window < seq_len
                                                          else None))
            else:
                strategy = sp.linear_strategy
                layer_shape, transition, dv = shape, LINEAR_TRANSITIONS.get(model.linear_decay, "none"), None
                if kind == "delta":
                    heads, dk, dv = model.delta_dims
                    layer_shape = Shape(batch=batch_per_replica, seq_len=seq_len, heads=heads, kv_heads=heads,
                                        head_dim=dk, element_bytes=element_bytes)
                    transition = "delta"
                est = linear_estimate(strategy, P, layer_shape, machine, chunks_per_rank=chunks_per_rank(sp.layout),
                                      transition=transition, value_dim=dv)
            fwd += est.bytes_sent_per_rank
            bwd += _backward_bytes(strategy, est.bytes_sent_per_rank, P, element_bytes)
    n = P * dp_size
    fsdp = (n - 1) / n * num_params * (2 * param_bytes + 4)
    return StepBytes(fwd, bwd, fsdp)


# ---------------------------------------------------------------------------------------------
# One training step of a whole model on named GPUs (the planner, ``python -m seqpar.plan``).


@dataclass(frozen=True)
class GpuSpec:
    """A GPU by name: its memory and the sustained rates one training step is estimated with.

    Every rate is an estimate; ``source`` says where each comes from. ``attention_tflops`` and
    ``linear_tflops`` are forward rates of seqpar's Triton kernels counted as
    :func:`softmax_estimate` / :func:`linear_estimate` count FLOPs; the ``*_backward_ratio``
    fields are backward time / forward time of the same kernels."""

    name: str
    memory_gib: float  # what the CUDA driver reports as the device's total memory
    peak_tflops: float  # dense bf16 peak from the data sheet: the MFU denominator
    matmul_tflops: float  # sustained dense bf16 GEMM (projections, SwiGLU, output head)
    attention_tflops: float
    attention_backward_ratio: float
    linear_tflops: float
    linear_backward_ratio: float
    intra_node_gbytes_s: float  # per-direction collective bandwidth of a rank inside one node
    inter_node_gbytes_s: float  # per GPU between nodes
    latency_us: float = 10.0
    gpus_per_node: int = 8
    source: str = ""

    def machine(self, ranks: int, linear_cost: float = 1.0) -> Machine:
        """The :class:`Machine` of collectives over ``ranks`` consecutive ranks (inside one node
        when ``ranks <= gpus_per_node``, else at the inter-node rate); ``linear_cost`` divides the
        linear-attention rate (a family that costs more per FLOP of the scalar one)."""
        link = self.intra_node_gbytes_s if ranks <= self.gpus_per_node else self.inter_node_gbytes_s
        return Machine(name=self.name, attention_tflops=self.attention_tflops,
                       linear_tflops=self.linear_tflops / linear_cost, link_gbytes_s=link, latency_us=self.latency_us)


_H200_KERNELS = ("softmax forward 490 TFLOP/s and backward 4.8x the forward time: seqpar's Triton kernels on one "
                 "H200, B=1 H=16 D=128 bf16 causal, 481-502 TFLOP/s forward and 13.3 / 205 ms forward+backward "
                 "against 2.29 / 35.1 ms forward at T = 16K / 64K (benchmarks/README.md, first GPU session, "
                 "2026-11-30); linear forward 82 TFLOP/s (0.314 ms at T = 16K, H=16 D=128, as linear_estimate "
                 "counts FLOPs) and backward 2.6x (1.12 ms forward+backward), same session")
_ASSUMED = ("not measured here: GEMM {gemm} TFLOP/s (about {share:.0%} of the {peak:g} TFLOP/s dense bf16 peak), "
            "{intra:g} GB/s per rank inside a node ({nvlink}), {inter:g} GB/s per GPU between nodes ({nic})")

#: Named GPUs for the planner (``--gpu``). Only the H200's attention kernel rates were measured on
#: this project's hardware; the rest is stated in each ``source``.
_HOPPER_RATES = dict(peak_tflops=989.0, matmul_tflops=600.0, attention_tflops=490.0, attention_backward_ratio=4.8,
                     linear_tflops=82.0, linear_backward_ratio=2.6, intra_node_gbytes_s=200.0,
                     inter_node_gbytes_s=50.0)
_HOPPER_ASSUMED = _ASSUMED.format(gemm=600, share=600 / 989, peak=989, intra=200, inter=50,
                                  nvlink="NVLink 4: the cost model's default Machine", nic="one 400 Gb/s NIC per GPU")

GPUS: dict[str, GpuSpec] = {
    "h100-80gb": GpuSpec(
        name="H100 80GB SXM", memory_gib=79.6, **_HOPPER_RATES,
        source="kernels: the H200's measured rates (same SMs and clocks as the H100 SXM; the H100 has 0.7x its "
               "memory bandwidth, which may slow the linear kernels: not measured): " + _H200_KERNELS + "; "
               + _HOPPER_ASSUMED),
    "h200": GpuSpec(name="H200", memory_gib=140.4, **_HOPPER_RATES,
                    source="kernels: " + _H200_KERNELS + "; " + _HOPPER_ASSUMED),
    "a100-80gb": GpuSpec(
        name="A100 80GB SXM", memory_gib=80.0, peak_tflops=312.0, matmul_tflops=200.0, attention_tflops=155.0,
        attention_backward_ratio=4.8, linear_tflops=26.0, linear_backward_ratio=2.6, intra_node_gbytes_s=130.0,
        inter_node_gbytes_s=25.0,
        source="kernels: the H200's measured rates scaled by the dense bf16 peaks, 312 / 989 (not measured on an "
               "A100): " + _H200_KERNELS + "; "
               + _ASSUMED.format(gemm=200, share=200 / 312, peak=312, intra=130, inter=25,
                                 nvlink="NVLink 3, scaled from the H100 figure by 300 / 450 GB/s",
                                 nic="one 200 Gb/s NIC per GPU")),
}

#: Time per FLOP of a linear-attention family relative to the scalar decay (the torch kernels on
#: CPU, benchmarks/README.md "Linear-attention families", fwd+bwd at T = 8192; no GPU figure yet).
LINEAR_FAMILY_COST = {"none": 1.0, "scalar": 1.0, "gla": 1.03, "delta": 2.73}


def gpu_spec(name: str) -> GpuSpec:
    """The :data:`GPUS` entry called ``name`` (ValueError naming the choices otherwise)."""
    if name not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; expected one of {', '.join(GPUS)}")
    return GPUS[name]


@dataclass(frozen=True)
class ModelCounts:
    """Parameter counts of a :class:`seqpar.config.ModelConfig` that the step time needs."""

    params: int  # every parameter (what FSDP gathers and reduces)
    layer_matmul_params: int  # weights of the decoder layers' nn.Linear modules
    head_matmul_params: int  # the output head (vocab x dim, tied or not)


def model_counts(model: ModelConfig) -> ModelCounts:
    """Count the parameters of ``HybridLM(model)`` built on the meta device (nothing allocated)."""
    import torch
    import torch.nn as nn

    from seqpar.model import HybridLM

    with torch.device("meta"):
        lm = HybridLM(model)
    layers = sum(m.weight.numel() for m in lm.layers.modules() if isinstance(m, nn.Linear))
    return ModelCounts(sum(p.numel() for p in lm.parameters()), layers, model.vocab_size * model.dim)


@dataclass(frozen=True)
class StepTimeEstimate:
    """Seconds of one training step on each rank (an estimate), and what it gives.

    ``matmul_s``: projections, SwiGLU and head at the GEMM rate; ``softmax_s`` / ``linear_s``:
    the token mixing of every layer of that kind, forward (twice with activation checkpointing)
    and backward, with its sequence-parallel communication (overlapped as the cost model says);
    ``fsdp_s``: FSDP2's all-gathers and reduce-scatters, of which ``fsdp_exposed_s`` exceeds the
    compute they overlap. Not modelled: norms, RoPE, element-wise ops, the loss, the optimizer
    step, launch overheads."""

    matmul_s: float
    softmax_s: float
    linear_s: float
    fsdp_s: float
    fsdp_exposed_s: float
    step_s: float
    tokens_per_step: int  # global: dp x batch per replica x seq_len
    model_tflop: float  # global per step: forward + backward, without recomputation
    world_size: int
    peak_tflops: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s

    @property
    def mfu(self) -> float:
        """Model FLOPs per second over the dense bf16 peak of all GPUs (recomputation not counted)."""
        return self.model_tflop / (self.step_s * self.world_size * self.peak_tflops)


#: Backward FLOPs / forward FLOPs of causal softmax attention (the FlashAttention convention).
ATTENTION_BACKWARD_FLOPS = 2.5


def step_time_estimate(model: ModelConfig, sp: SequenceParallelConfig, seq_len: int, batch_per_replica: int,
                       world_size: int, gpu: GpuSpec, *, activation_checkpointing: bool,
                       counts: ModelCounts | None = None) -> StepTimeEstimate:
    """Estimate one training step of ``model`` on ``world_size`` GPUs ``gpu``: ``sp.sp_size``
    ranks per sequence, ``world_size / sp_size`` data-parallel replicas of ``batch_per_replica``
    sequences of ``seq_len`` tokens, FSDP2 over every rank (bf16 parameters, fp32 gradient
    reduction: :func:`seqpar.parallelize.apply_fsdp`). Softmax layers by :func:`softmax_estimate`,
    linear and delta-rule layers by :func:`linear_estimate` (forward), their backward at the
    GPU's measured backward / forward time ratio; the busiest rank's time counts."""
    P = sp.sp_size
    if world_size % P != 0:
        raise ValueError(f"sp_size {P} does not divide the {world_size} GPUs")
    check_global_length(sp.layout if P > 1 else "contiguous", seq_len, P)
    counts = counts if counts is not None else model_counts(model)
    ac = 1 if activation_checkpointing else 0
    tokens_rank = batch_per_replica * seq_len // P
    layout = sp.layout if P > 1 else "contiguous"
    lat = gpu.latency_us * 1e-6

    layer_fwd = 2.0 * counts.layer_matmul_params * tokens_rank
    head_fwd = 2.0 * counts.head_matmul_params * tokens_rank
    matmul_s = ((3 + ac) * layer_fwd + 3 * head_fwd) / (gpu.matmul_tflops * 1e12)
    model_flop = 3 * (layer_fwd + head_fwd)  # per rank

    softmax_s = linear_s = 0.0
    kinds = model.layer_kinds
    if "softmax" in kinds:
        machine = gpu.machine(P)
        strategy = sp.softmax_strategy if P > 1 else "ring"
        window = model.window if model.window is not None and model.window < seq_len else None
        shape = Shape(batch=batch_per_replica, seq_len=seq_len, heads=model.n_heads, kv_heads=model.n_kv_heads,
                      head_dim=model.head_dim, element_bytes=2)
        est = softmax_estimate(strategy, layout, P, shape, machine, ulysses_size=sp.ulysses_size if strategy == "usp"
                               else 1, mask=AttentionMask(causal=True, window=window))
        compute = est.max_rank_tflop * 1e12 / (machine.attention_tflops * 1e12)
        bwd_compute = compute * gpu.attention_backward_ratio
        bwd_comm = 0.0
        if P > 1:
            bwd_comm = _backward_bytes(strategy, est.bytes_sent_per_rank, P, 2) / (machine.link_gbytes_s * 1e9) \
                + est.serial_steps * lat
        bwd = max(bwd_compute, bwd_comm) if strategy in ("ring", "allgather") else bwd_compute + bwd_comm
        n = kinds.count("softmax")
        softmax_s = n * ((1 + ac) * est.fwd_ms / 1e3 + bwd)
        model_flop += n * (1 + ATTENTION_BACKWARD_FLOPS) * (est.mean_rank_tflop or est.max_rank_tflop) * 1e12
    for kind in ("linear", "delta"):
        n = kinds.count(kind)
        if n == 0:
            continue
        if kind == "delta":
            heads, dk, dv = model.delta_dims
            transition = "delta"
        else:
            heads, dk, dv = model.n_heads, model.head_dim, None
            transition = LINEAR_TRANSITIONS.get(model.linear_decay, "none")
        machine = gpu.machine(P, LINEAR_FAMILY_COST["delta" if kind == "delta" else transition])
        shape = Shape(batch=batch_per_replica, seq_len=seq_len, heads=heads, kv_heads=heads, head_dim=dk,
                      element_bytes=2)
        est = linear_estimate(sp.linear_strategy, P, shape, machine, chunks_per_rank=chunks_per_rank(layout) if P > 1
                              else 1, transition=transition, value_dim=dv)
        compute = est.max_rank_tflop * 1e12 / (machine.linear_tflops * 1e12)
        bwd = compute * gpu.linear_backward_ratio
        if P > 1:
            bwd += est.bytes_sent_per_rank / (machine.link_gbytes_s * 1e9) + est.serial_steps * lat
        linear_s += n * ((1 + ac) * est.fwd_ms / 1e3 + bwd)
        model_flop += n * 3 * est.max_rank_tflop * 1e12

    fsdp_s = 0.0
    if world_size > 1:  # bf16 all-gathers in forward and backward, fp32 reduce-scatter (as step_bytes_per_rank)
        link = gpu.intra_node_gbytes_s if world_size <= gpu.gpus_per_node else gpu.inter_node_gbytes_s
        fsdp_bytes = (world_size - 1) / world_size * counts.params * (2 * 2 + 4)
        fsdp_s = fsdp_bytes / (link * 1e9) + 3 * (model.n_layers + 1) * lat
    compute_s = matmul_s + softmax_s + linear_s
    exposed = max(0.0, fsdp_s - compute_s)  # FSDP2 prefetches the next layer's parameters during compute
    dp = world_size // P
    return StepTimeEstimate(matmul_s, softmax_s, linear_s, fsdp_s, exposed, compute_s + exposed,
                            dp * batch_per_replica * seq_len, world_size * model_flop / 1e12, world_size,
                            gpu.peak_tflops)
