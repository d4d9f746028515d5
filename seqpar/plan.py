"""Plan a long-context training run: ``python -m seqpar.plan`` (or ``seqpar-plan``).

For a model (a preset or a config), a global sequence length and a number of GPUs with their
memory, the planner tries candidate configurations of the trainer -- sequence-parallel size sp
(the rest of the GPUs are data-parallel replicas), softmax strategy (with its Ulysses size for
``usp``), linear strategy, layout, activation checkpointing -- and prints them ranked, with the
command line that runs the best one.

**Memory is measured, not modelled.** For each candidate it measures it runs ONE training step
of the real model (:class:`seqpar.model.HybridLM`) with the real strategies
(:func:`seqpar.parallelize.parallelize_model`), FSDP2 over the dp x sp mesh
(:func:`seqpar.parallelize.apply_fsdp`, bf16 parameters, fp32 reduction: the trainer's GPU
setting), activation checkpointing, gradient clipping and AdamW, on torch's fake process group
(``world_size`` = the GPU count; one rank runs) under ``FakeTensorMode``: nothing is allocated,
and torch's ``FSDPMemTracker`` (``torch.distributed._tools.fsdp2_mem_tracker``) counts every
tensor the step creates and frees. The step measured follows a first one: the optimizer's state
exists. The kernels are seqpar's Triton kernels through their ``seqpar::`` custom ops, whose fake
implementations allocate exactly what the real launchers allocate (``backend="triton"``, the
default). The fake tensors live on the CPU device: autograd on fake CUDA tensors needs a CUDA
build of torch; seqpar's code takes the same paths either way once the backend is explicit. The
peak is what a GPU's caching allocator would have allocated; it does not see the CUDA context,
NCCL's buffers or fragmentation -- hence ``headroom`` (10% of the memory by default).

**Time is estimated** (:func:`seqpar.cost_model.step_time_estimate`): matmuls at a GEMM rate,
the token mixing by the cost model at the Triton kernels' measured rates, FSDP traffic at the
link rate, for a named GPU (:data:`seqpar.cost_model.GPUS`).

**The search.** Every candidate gets a time estimate (cheap). Memory is measured per class (sp,
softmax strategy with its Ulysses size, checkpointing, batch); a class's layout and linear
strategy are those the estimate finds fastest (the trainer's order, lasp2 first, unless another
is faster by more than 0.1%). A class is not measured when a lower bound of its memory (the
sharded parameters and AdamW moments, plus what forward must keep for backward) exceeds the
budget, or when a class that needs no more memory did not fit (memory per rank is assumed to
fall as sp grows and with checkpointing, for one strategy). Classes are taken in order of
estimated tokens/s; before a class, its nearest such sibling (the same strategy at the next
larger sp) is measured if it has not been: when that one does not fit, neither does the class.
Measurements run in worker subprocesses, two at a time by default (the fake process group is
process-wide state). The search stops once ``keep`` (3) classes fit and no unmeasured class is
within ``tie`` (1%) of the best one's estimated tokens/s, or after ``max_measure`` (16)
measurements. The best is the fastest class that fits; estimates within ``tie`` of it are
ties, broken towards the lowest peak (the fastest of the tied classes within 5% of it).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from seqpar.config import (LINEAR_STRATEGIES, MODEL_PRESETS, SOFTMAX_STRATEGIES, ModelConfig,
                           SequenceParallelConfig, TrainConfig, check_compatible)
from seqpar.cost_model import GPUS, GpuSpec, ModelCounts, StepTimeEstimate, gpu_spec, model_counts, step_time_estimate

GIB = 2 ** 30
#: Kernel backends the planner can trace under fake tensors. "triton" (the GPU's kernels, through
#: their custom ops) is the default; "sdpa" runs torch's SDPA blocks and the torch linear kernels,
#: whose Python loop over 64-token chunks is slow to trace and which read gates on the host
#: (models with gated linear layers cannot be traced with it): for small checks only.
PLAN_BACKENDS = ("triton", "sdpa")
#: Layouts a candidate may use (``striped`` only for models without linear layers).
PLAN_LAYOUTS = ("contiguous", "zigzag", "striped")
_RESULT_TAG = "SEQPAR_PLAN_RESULT "


# ---------------------------------------------------------------------------------------------
# What is asked, and what is tried.


@dataclass(frozen=True)
class Candidate:
    """One configuration of the trainer: sp ranks per sequence, dp replicas of
    ``batch_per_replica`` sequences, the strategies, the layout and activation checkpointing."""

    sp: int
    dp: int
    softmax_strategy: str = "ring"
    linear_strategy: str = "lasp2"
    layout: str = "contiguous"
    activation_checkpointing: bool = True
    ulysses_size: int = 1
    batch_per_replica: int = 1

    def __post_init__(self) -> None:
        for name in ("sp", "dp", "ulysses_size", "batch_per_replica"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.activation_checkpointing, bool):
            raise TypeError(f"activation_checkpointing must be a bool, got {self.activation_checkpointing!r}")
        self.sp_config()  # strategies, layout and Ulysses size: SequenceParallelConfig's checks

    def sp_config(self, backend: str = "auto") -> SequenceParallelConfig:
        return SequenceParallelConfig(sp_size=self.sp, layout=self.layout, softmax_strategy=self.softmax_strategy,
                                      linear_strategy=self.linear_strategy, ulysses_size=self.ulysses_size,
                                      backend=backend)

    @property
    def world_size(self) -> int:
        return self.sp * self.dp

    @property
    def memory_class(self) -> tuple:
        """Candidates that differ only in layout and linear strategy share a class."""
        return (self.sp, self.softmax_strategy, self.ulysses_size, self.activation_checkpointing,
                self.batch_per_replica)

    @property
    def softmax_label(self) -> str:
        return f"usp{self.ulysses_size}" if self.softmax_strategy == "usp" else self.softmax_strategy

    @property
    def measured_rank(self) -> int:
        """The rank whose memory is measured: the last of the first replica. It is the busiest of
        a causal contiguous ring (it attends to every earlier rank's keys); with zigzag (or
        striped) every rank does the same work and the ranks differ only by the shapes of their
        blocks (at world 2 in tests/test_plan.py the last rank's peak is 1% above rank 0's);
        Ulysses splits the heads evenly."""
        return self.sp - 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class PlanRequest:
    """A planning question: ``model`` trained on sequences of ``seq_len`` tokens over ``gpus``
    GPUs of kind ``gpu`` (a key of :data:`seqpar.cost_model.GPUS`; ``memory_gib`` overrides its
    memory). A candidate fits when its measured peak is at most ``(1 - headroom) x memory``.
    The ``*_choices`` fields restrict the sweep (None: everything the model allows)."""

    model: ModelConfig
    seq_len: int
    gpus: int
    gpu: str = "h100-80gb"
    memory_gib: float | None = None
    preset: str | None = None  # named in the command line of the result
    batch_per_replica: int = 1
    backend: str = "triton"
    headroom: float = 0.10
    gpus_per_node: int | None = None  # None: the GPU's (8)
    sp_choices: tuple[int, ...] | None = None
    softmax_choices: tuple[str, ...] | None = None
    linear_choices: tuple[str, ...] | None = None
    layout_choices: tuple[str, ...] | None = None
    checkpointing_choices: tuple[bool, ...] = (True, False)
    usp_sizes: tuple[int, ...] | None = None  # None: the largest proper divisor of sp within a node

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelConfig(**self.model)
        for name in ("seq_len", "gpus", "batch_per_replica"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        gpu_spec(self.gpu)
        if self.memory_gib is not None and not self.memory_gib > 0:
            raise ValueError(f"memory_gib must be > 0, got {self.memory_gib}")
        if not 0.0 <= self.headroom < 1.0:
            raise ValueError(f"headroom must be in [0, 1), got {self.headroom}")
        if self.backend not in PLAN_BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; the planner traces {PLAN_BACKENDS}")
        if self.gpus_per_node is not None and self.gpus_per_node < 1:
            raise ValueError(f"gpus_per_node must be >= 1, got {self.gpus_per_node}")
        if self.preset is not None and self.preset not in MODEL_PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; expected one of {tuple(MODEL_PRESETS)}")
        for name, allowed in (("softmax_choices", SOFTMAX_STRATEGIES), ("linear_choices", LINEAR_STRATEGIES),
                              ("layout_choices", PLAN_LAYOUTS)):
            values = getattr(self, name)
            if values is not None:
                bad = [v for v in values if v not in allowed]
                if bad or not values:
                    raise ValueError(f"{name}: {bad or 'empty'} not in {allowed}")
        if self.sp_choices is not None:
            bad = [s for s in self.sp_choices if s < 1 or self.gpus % s != 0]
            if bad or not self.sp_choices:
                raise ValueError(f"sp_choices {bad or 'empty'}: each sp must divide the {self.gpus} GPUs")
        if not self.checkpointing_choices:
            raise ValueError("checkpointing_choices is empty")

    @property
    def spec(self) -> GpuSpec:
        spec = gpu_spec(self.gpu)
        changes: dict[str, Any] = {}
        if self.memory_gib is not None:
            changes["memory_gib"] = self.memory_gib
        if self.gpus_per_node is not None:
            changes["gpus_per_node"] = self.gpus_per_node
        return dataclasses.replace(spec, **changes) if changes else spec

    @property
    def budget_bytes(self) -> float:
        """The peak a candidate may reach: (1 - headroom) of the GPU's memory."""
        return self.spec.memory_gib * (1.0 - self.headroom) * GIB


def _usp_sizes(sp: int, n_heads: int, gpus_per_node: int, given: tuple[int, ...] | None) -> list[int]:
    if given is not None:
        return [u for u in given if 1 < u < sp and sp % u == 0 and n_heads % u == 0]
    inside = [u for u in range(2, sp) if sp % u == 0 and n_heads % u == 0 and u <= gpus_per_node]
    return inside[-1:]  # Ulysses inside a node, the ring across nodes


def enumerate_candidates(request: PlanRequest) -> list[Candidate]:
    """Every configuration the model, the sequence length and the GPU count allow (within the
    request's choices). sp = 1 is one candidate per checkpointing setting (no strategy)."""
    model, gpus = request.model, request.gpus
    sps = request.sp_choices or tuple(s for s in range(1, gpus + 1) if gpus % s == 0)
    has_softmax, has_linear = model.has_softmax, model.has_linear
    out: list[Candidate] = []
    for sp in sps:
        dp = gpus // sp
        for ac in request.checkpointing_choices:
            common = dict(sp=sp, dp=dp, activation_checkpointing=ac, batch_per_replica=request.batch_per_replica)
            if sp == 1:
                out.append(Candidate(**common))
                continue
            softmax: list[tuple[str, int]] = [("ring", 1)]
            if has_softmax:
                softmax = []
                for s in request.softmax_choices or SOFTMAX_STRATEGIES:
                    if s == "usp":
                        softmax += [("usp", u) for u in _usp_sizes(sp, model.n_heads, request.spec.gpus_per_node,
                                                                   request.usp_sizes)]
                    elif s != "ulysses" or model.n_heads % sp == 0:
                        softmax.append((s, 1))
            linear = list(request.linear_choices or LINEAR_STRATEGIES) if has_linear else ["lasp2"]
            layouts = [lay for lay in (request.layout_choices or ("contiguous", "zigzag"))
                       if not (lay == "striped" and has_linear)]
            for s, u in softmax:
                for lin in linear:
                    for lay in layouts:
                        cand = Candidate(softmax_strategy=s, linear_strategy=lin, layout=lay, ulysses_size=u,
                                         **common)
                        try:
                            check_compatible(model, cand.sp_config(), request.seq_len)
                        except ValueError:
                            continue
                        out.append(cand)
    return out


# ---------------------------------------------------------------------------------------------
# Memory: one training step under FakeTensorMode on the fake process group.


@dataclass
class MemoryResult:
    """Peak bytes of one rank over one training step, and the tracker's breakdown at the peak
    (parameters, gradients, activations, temporaries, all-gather / reduce-scatter buffers,
    optimizer state, inputs). ``error`` when the step could not run."""

    peak_bytes: int = 0
    breakdown: dict[str, int] = field(default_factory=dict)
    rank: int = 0
    seconds: float = 0.0
    error: str | None = None


def memory_lower_bound(model: ModelConfig, counts: ModelCounts, cand: Candidate, seq_len: int) -> float:
    """Bytes that a rank certainly holds at the start of backward: its shard of the fp32
    parameters and of AdamW's two moments (12 bytes a parameter over every rank), and what
    forward kept for backward -- with activation checkpointing each layer's bf16 input; without,
    at least the two normed inputs and the three SwiGLU hidden tensors of every layer."""
    tokens = cand.batch_per_replica * seq_len // cand.sp
    per_token_layer = model.dim if cand.activation_checkpointing else 2 * model.dim + 3 * model.hidden_dim
    return 12.0 * counts.params / cand.world_size + 2.0 * model.n_layers * tokens * per_token_layer


def _optimizer(model: Any) -> Any:
    """AdamW with the trainer's parameter groups, as it runs on GPU (torch's default foreach
    implementation; the trainer takes the fused CPU kernel only for CPU parameters)."""
    import torch

    from seqpar.train import parameter_groups

    return torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95), foreach=True)


def _host_scalars() -> Any:
    """A dispatch mode that answers host reads of fake tensors (``.item()``) with 1: only the
    optimizer's step count is read, and AdamW's bias corrections need a step >= 1."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostScalars(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                t = args[0]
                return True if t.dtype == torch.bool else (1.0 if t.dtype.is_floating_point else 1)
            return func(*args, **(kwargs or {}))

    return HostScalars()


def _build(model_cfg: ModelConfig, cand: Candidate, backend: str, groups: Any, attn_group: Any,
           mixed_precision: bool) -> tuple[Any, Any]:
    """The trainer's model and optimizer for ``cand`` (as ``seqpar.train`` builds them on GPU:
    fp32 parameters, seqpar's kernels at every sp, checkpointing, FSDP2 over every rank)."""
    from seqpar.model import HybridLM
    from seqpar.parallelize import apply_fsdp, parallelize_model

    model = HybridLM(model_cfg)
    parallelize_model(model, cand.sp_config(backend), attn_group, validate="off")
    model.activation_checkpointing = cand.activation_checkpointing
    model.train()
    apply_fsdp(model, groups.shard_mesh, mixed_precision=mixed_precision)
    return model, _optimizer(model)


def _first_step_state(model: Any, optimizer: Any, fake: bool) -> None:
    """Create the optimizer's state (as after the first step) without running a step."""
    import contextlib

    import torch

    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with _host_scalars() if fake else contextlib.nullcontext():
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _batch(cand: Candidate, seq_len: int, groups: Any, fake: bool) -> Any:
    import torch

    from seqpar.parallelize import shard_batch

    shape = (cand.batch_per_replica, seq_len)
    tokens = torch.zeros(shape, dtype=torch.long) if fake else torch.randint(0, 256, shape)
    return shard_batch(tokens, tokens.clone(), cand.layout, groups.sp if cand.sp > 1 else None)


def _train_step(model: Any, optimizer: Any, batch: Any, label_count: int, fake: bool) -> None:
    """One step as the trainer runs it when the data knows its token count: forward, loss share,
    backward (FSDP2 reduce-scatters the gradients), clipping, AdamW, zeroing."""
    import contextlib

    import torch.nn as nn

    from seqpar.parallelize import token_loss_sum

    logits = model(batch.tokens, batch.positions)
    share = token_loss_sum(logits, batch.labels) / label_count
    share.backward()
    del logits, share
    nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    with _host_scalars() if fake else contextlib.nullcontext():
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _peak_tracker(model: Any, optimizer: Any) -> Any:
    """torch's FSDPMemTracker, keeping only the global peak: the stock tracker also updates the
    peak of every FSDP module on every operator (a quarter of the planner's time on the 8B model),
    which the planner does not read. The global peak is computed exactly as the stock tracker does."""
    from copy import deepcopy

    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY

    class PeakTracker(FSDPMemTracker):
        def _update_peak_stats(self, peak_state: Any) -> None:
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap[_TOTAL_KEY]:
                    self._peak_mem[dev] = snap[_TOTAL_KEY]
                    self._peak_mem_snap[dev] = deepcopy(snap)

    return PeakTracker(model, optimizer)


def _tracked_peak(model: Any, optimizer: Any, batch: Any, label_count: int, fake: bool) -> tuple[int, dict[str, int]]:
    tracker = _peak_tracker(model, optimizer)
    tracker.track_inputs(tuple(batch))
    with tracker:
        _train_step(model, optimizer, batch, label_count, fake)
    snapshot = tracker.get_tracker_snapshot("peak")
    if not snapshot:
        return 0, {}
    device, counts = max(snapshot.items(), key=lambda kv: kv[1].get("Total", 0))
    breakdown = {str(getattr(k, "value", k)): int(v) for k, v in counts.items()}
    return breakdown.get("Total", 0), breakdown


def measure_memory(model_cfg: ModelConfig, cand: Candidate, seq_len: int, *, backend: str = "triton",
                   rank: int | None = None, mixed_precision: bool = True) -> MemoryResult:
    """Peak memory of ``rank`` (default :attr:`Candidate.measured_rank`) over one training step of
    ``cand`` (after a first step: the optimizer state exists), run under ``FakeTensorMode`` on
    torch's fake process group of ``cand.world_size`` ranks. Creates and destroys the process
    group: call it in a process without torch.distributed (the planner's worker subprocesses)."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from seqpar.parallelize import make_groups

    if dist.is_initialized():
        raise RuntimeError("measure_memory initialises torch's fake process group itself; this process already has "
                           "one (run it in a fresh process, as the planner's workers do)")
    rank = cand.measured_rank if rank is None else rank
    if not 0 <= rank < cand.world_size:
        raise ValueError(f"rank {rank} is outside 0..{cand.world_size - 1}")
    t0 = time.perf_counter()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=cand.world_size)
    try:
        groups, attn_group = make_groups(cand.sp_config(backend), device_type="cpu")
        with FakeTensorMode():
            model, optimizer = _build(model_cfg, cand, backend, groups, attn_group, mixed_precision)
            _first_step_state(model, optimizer, fake=True)
            batch = _batch(cand, seq_len, groups, fake=True)
            peak, breakdown = _tracked_peak(model, optimizer, batch, cand.batch_per_replica * cand.dp * seq_len,
                                            fake=True)
            del model, optimizer, batch
    finally:
        dist.destroy_process_group()
    return MemoryResult(peak, breakdown, rank, time.perf_counter() - t0)


def real_step_peaks(model_cfg: ModelConfig, cand: Candidate, seq_len: int, groups: Any, attn_group: Any, *,
                    backend: str = "sdpa", mixed_precision: bool = True) -> dict[str, int]:
    """The same step on REAL CPU tensors over an initialised process group (``groups`` from
    :func:`seqpar.comm.make_device_mesh`), for validating :func:`measure_memory`. Returns the
    peak of this rank two ways: ``profiler`` -- the bytes alive before the step (the storages of
    the sharded parameters, the optimizer state and the batch) plus the highest running sum of
    the CPU allocator's allocations and frees that ``torch.profiler`` records during the step;
    and ``tracker`` -- :class:`FSDPMemTracker` on the real tensors (one more step)."""
    from torch.profiler import ProfilerActivity, profile

    model, optimizer = _build(model_cfg, cand, backend, groups, attn_group, mixed_precision)
    _first_step_state(model, optimizer, fake=False)
    batch = _batch(cand, seq_len, groups, fake=False)
    count = cand.batch_per_replica * cand.dp * seq_len
    _train_step(model, optimizer, batch, count, fake=False)  # warm-up: lazy initialisations
    alive = list(model.parameters()) + list(batch)
    alive += [t for state in optimizer.state.values() for t in state.values() if hasattr(t, "untyped_storage")]
    storages: dict[int, int] = {}
    for t in alive:
        local = getattr(t, "_local_tensor", t)  # a DTensor's shard
        storages[local.untyped_storage().data_ptr()] = local.untyped_storage().nbytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _train_step(model, optimizer, batch, count, fake=False)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    running = highest = 0
    for e in events:
        running += e.nbytes()
        highest = max(highest, running)
    tracked, _ = _tracked_peak(model, optimizer, batch, count, fake=False)
    return {"profiler": sum(storages.values()) + highest, "tracker": tracked}


# ---------------------------------------------------------------------------------------------
# Worker subprocesses: the fake process group is process-wide, so measurements run elsewhere.


def worker_main(stdin: Any = None, stdout: Any = None) -> int:
    """A measuring worker: one JSON job a line on stdin ({"model", "candidate", "seq_len",
    "backend", "rank"}), one tagged JSON result a line on stdout. Errors become results."""
    import torch

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    torch.set_num_threads(1)
    for line in stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        try:
            result = measure_memory(ModelConfig(**job["model"]), Candidate(**job["candidate"]), job["seq_len"],
                                    backend=job.get("backend", "triton"), rank=job.get("rank"))
        except Exception as e:  # noqa: BLE001 -- reported as this candidate's result, the sweep goes on
            result = MemoryResult(error=f"{type(e).__name__}: {e}".splitlines()[0][:500])
        stdout.write(_RESULT_TAG + json.dumps({"id": job.get("id"), **dataclasses.asdict(result)}) + "\n")
        stdout.flush()
    return 0


class WorkerPool:
    """``jobs`` worker subprocesses (``python -c 'from seqpar.plan import worker_main; ...'``),
    each measuring one candidate at a time. Their stderr goes to a temporary file, quoted when
    a worker dies."""

    def __init__(self, jobs: int) -> None:
        self.results: queue.Queue = queue.Queue()
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Any] = []
        self.busy: dict[int, Any] = {}
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)  # the GPU's kernels: their fake implementations, not the interpreter's
        env.setdefault("OMP_NUM_THREADS", "1")
        for i in range(jobs):
            log = tempfile.TemporaryFile(mode="w+")
            proc = subprocess.Popen([sys.executable, "-c", "import sys; from seqpar.plan import worker_main; "
                                     "sys.exit(worker_main())"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=log, text=True, cwd=tempfile.gettempdir(), env=env, bufsize=1)
            self.procs.append(proc)
            self.logs.append(log)
            threading.Thread(target=self._read, args=(i, proc), daemon=True).start()

    def _read(self, i: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            if line.startswith(_RESULT_TAG):
                self.results.put((i, json.loads(line[len(_RESULT_TAG):])))
        self.results.put((i, None))  # the worker ended

    def idle(self) -> list[int]:
        return [i for i, p in enumerate(self.procs) if i not in self.busy and p.poll() is None]

    def submit(self, i: int, key: Any, job: dict[str, Any]) -> None:
        self.busy[i] = key
        self.procs[i].stdin.write(json.dumps(job) + "\n")
        self.procs[i].stdin.flush()

    def next_result(self) -> tuple[Any, MemoryResult]:
        """(key, result) of the next job to finish; a dead worker's job gets an error result."""
        while True:
            i, payload = self.results.get()
            if i not in self.busy:
                continue
            key = self.busy.pop(i)
            if payload is None:
                self.logs[i].seek(0)
                tail = self.logs[i].read()[-800:].strip().replace("\n", " | ")
                return key, MemoryResult(error=f"worker exited with status {self.procs[i].wait()}: {tail}")
            payload.pop("id", None)
            return key, MemoryResult(**payload)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self.logs:
            log.close()


def measure_in_subprocesses(jobs: Sequence[tuple[ModelConfig, Candidate, int]], backend: str = "triton",
                            workers: int = 1, ranks: Sequence[int | None] | None = None) -> list[MemoryResult]:
    """:func:`measure_memory` of each (model, candidate, seq_len) in worker subprocesses, in order."""
    pool = WorkerPool(max(1, min(workers, len(jobs))))
    out: list[MemoryResult | None] = [None] * len(jobs)
    try:
        todo = list(enumerate(jobs))
        while todo or pool.busy:
            for i in pool.idle():
                if not todo:
                    break
                k, (model, cand, seq_len) = todo.pop(0)
                pool.submit(i, k, {"model": dataclasses.asdict(model), "candidate": cand.to_dict(),
                                   "seq_len": seq_len, "backend": backend, "rank": ranks[k] if ranks else None})
            if not pool.busy:
                raise RuntimeError("every measuring worker has exited")
            k, result = pool.next_result()
            out[k] = result
    finally:
        pool.close()
    return [r for r in out if r is not None]


# ---------------------------------------------------------------------------------------------
# The sweep.


@dataclass
class Row:
    """A candidate with its time estimate and what is known of its memory. ``status``: "fits",
    "too big" (measured), "bound" (its lower bound exceeds the budget), "implied" (a class needing
    less memory did not fit), "error", "in flight" or "not measured"."""

    candidate: Candidate
    time: StepTimeEstimate
    lower_bound: float
    memory: MemoryResult | None = None
    status: str = "not measured"
    note: str = ""

    @property
    def fits(self) -> bool:
        return self.status == "fits"


@dataclass
class PlanResult:
    request: PlanRequest
    rows: list[Row]  # one per memory class, ranked (see :func:`rank_rows`)
    best: Row | None
    candidates: int  # configurations considered (every layout and linear strategy)
    measured: int
    seconds: float
    params: int = 0

    def command(self) -> str | None:
        return None if self.best is None else command_line(self.request, self.best.candidate)


def _needs_at_least(row: Row, other: Row) -> bool:
    """Whether ``row`` needs at least the memory of ``other``, assuming memory per rank falls
    as sp grows and with checkpointing: same strategy (any, at sp = 1) and batch, sp no larger,
    checkpointing no more."""
    a, b = row.candidate, other.candidate
    strategy = a.sp == 1 or (a.softmax_strategy, a.ulysses_size) == (b.softmax_strategy, b.ulysses_size)
    return (strategy and a.batch_per_replica == b.batch_per_replica and a.sp <= b.sp
            and a.activation_checkpointing <= b.activation_checkpointing)


def rank_rows(rows: Iterable[Row]) -> list[Row]:
    """Fitting rows first, by estimated tokens/s; then measured ones that do not fit; then the
    rest (bounded, implied, errors, not measured), each by estimated tokens/s."""
    order = {"fits": 0, "too big": 1, "error": 2, "bound": 3, "implied": 3, "in flight": 4, "not measured": 4}
    return sorted(rows, key=lambda r: (order.get(r.status, 5), -r.time.tokens_per_s))


def choose_best(rows: Sequence[Row], tie: float = 0.01, memory_tie: float = 0.05) -> Row | None:
    """The fitting row with the highest estimated tokens/s, where estimates within ``tie`` of
    the highest are ties: among those, the rows whose peak is within ``memory_tie`` of the lowest
    peak, and of them the fastest (more headroom when speed does not tell candidates apart)."""
    fits = [r for r in rows if r.fits]
    if not fits:
        return None
    top = max(r.time.tokens_per_s for r in fits)
    tied = [r for r in fits if r.time.tokens_per_s >= (1 - tie) * top]
    low = min(r.memory.peak_bytes for r in tied)
    return max((r for r in tied if r.memory.peak_bytes <= (1 + memory_tie) * low), key=lambda r: r.time.tokens_per_s)


def plan(request: PlanRequest, *, keep: int = 3, max_measure: int = 16, jobs: int | None = None, tie: float = 0.01,
         log: Callable[[str], None] | None = None) -> PlanResult:
    """Run the sweep (module docstring): estimate every candidate, measure the memory classes in
    order of estimated tokens/s in ``jobs`` worker subprocesses (default: min(2, CPU count)), stop
    when ``keep`` fit and nothing unmeasured is within ``tie`` of the best, or after ``max_measure``
    measurements."""
    t0 = time.perf_counter()
    log = log or (lambda line: None)
    spec, model = request.spec, request.model
    counts = model_counts(model)
    candidates = enumerate_candidates(request)
    if not candidates:
        raise ValueError(f"no configuration of {request.gpus} GPUs can split {request.seq_len} tokens "
                         f"(sp choices {request.sp_choices}); try another sequence length")
    best_of_class: dict[tuple, Row] = {}
    for cand in candidates:
        sp_cfg = cand.sp_config()
        t = step_time_estimate(model, sp_cfg, request.seq_len, cand.batch_per_replica, request.gpus, spec,
                               activation_checkpointing=cand.activation_checkpointing, counts=counts)
        row = Row(cand, t, memory_lower_bound(model, counts, cand, request.seq_len))
        key = cand.memory_class
        # candidates come in the order of the trainer's choices (lasp2 before lasp1): a later one
        # represents the class only when it is faster by more than 0.1% (not a rounding matter)
        if key not in best_of_class or t.tokens_per_s > 1.001 * best_of_class[key].time.tokens_per_s:
            best_of_class[key] = row
    rows = sorted(best_of_class.values(), key=lambda r: -r.time.tokens_per_s)
    budget = request.budget_bytes
    for row in rows:
        if row.lower_bound > budget:
            row.status, row.note = "bound", f">= {row.lower_bound / GIB:.1f} GiB (lower bound)"
    log(f"plan: {len(candidates)} configurations in {len(rows)} memory classes; "
        f"{sum(r.status == 'bound' for r in rows)} cannot fit by their lower bound; measuring the rest in order of "
        f"estimated tokens/s (budget {budget / GIB:.1f} GiB a GPU)")

    measured = 0
    workers = max(1, jobs if jobs is not None else min(2, os.cpu_count() or 1))
    pool: WorkerPool | None = None

    def sibling(row: Row) -> Row | None:
        """The nearest class that needs no more memory than ``row``: the same strategy at the next
        larger sp (for a row without checkpointing: the same class with it). If that one does not
        fit, neither does ``row``, so measuring it first may spare ``row``'s measurement."""
        c = row.candidate
        if not c.activation_checkpointing:
            return next((o for o in rows if o.candidate == dataclasses.replace(
                c, activation_checkpointing=True, layout=o.candidate.layout,
                linear_strategy=o.candidate.linear_strategy)), None)
        larger = [o for o in rows if o is not row and o.candidate.sp > c.sp and _needs_at_least(row, o)
                  and o.candidate.activation_checkpointing and o.candidate.sp > 1]
        return min(larger, key=lambda o: o.candidate.sp, default=None)

    def next_row() -> Row | None:
        for row in rows:  # what the measurements so far settle
            blocker = next((o for o in rows if o.status == "too big" and _needs_at_least(row, o)), None)
            if row.status == "not measured" and blocker is not None:
                row.status = "implied"
                row.note = f"needs more than sp {blocker.candidate.sp} {blocker.candidate.softmax_label} " \
                           f"({blocker.memory.peak_bytes / GIB:.1f} GiB)"
        fitting = [r for r in rows if r.fits]
        best = max((r.time.tokens_per_s for r in fitting), default=None)
        for row in rows:
            if row.status != "not measured":
                continue
            if len(fitting) >= keep and best is not None and row.time.tokens_per_s < (1 - tie) * best:
                return None
            sib = sibling(row)
            if sib is not None and sib.status == "in flight":
                continue  # its result may settle this row
            if sib is not None and sib.status == "not measured":
                return sib
            return row
        return None

    try:
        while True:
            while measured < max_measure:
                row = next_row()
                if row is None:
                    break
                if pool is None:
                    pool = WorkerPool(workers)
                idle = pool.idle()
                if not idle:
                    break
                row.status = "in flight"
                pool.submit(idle[0], id(row), {"model": dataclasses.asdict(model),
                                               "candidate": row.candidate.to_dict(), "seq_len": request.seq_len,
                                               "backend": request.backend})
                measured += 1
            if pool is None or not pool.busy:
                break
            key, result = pool.next_result()
            row = next(r for r in rows if id(r) == key)
            row.memory, row.note = result, ""
            if result.error:
                row.status, row.note = "error", result.error
            else:
                row.status = "fits" if result.peak_bytes <= budget else "too big"
            c = row.candidate
            log(f"  measured sp {c.sp} x dp {c.dp} {c.softmax_label} {c.linear_strategy} {c.layout} "
                f"ac={'on' if c.activation_checkpointing else 'off'}: "
                + (f"error {result.error}" if result.error else
                   f"peak {result.peak_bytes / GIB:.2f} GiB ({row.status}) in {result.seconds:.0f} s"))
    finally:
        if pool is not None:
            pool.close()
    ranked = rank_rows(rows)
    return PlanResult(request, ranked, choose_best(ranked, tie), len(candidates), measured,
                      time.perf_counter() - t0, counts.params)


# ---------------------------------------------------------------------------------------------
# Output.


def _model_flags(request: PlanRequest) -> list[str]:
    """``seqpar.train`` flags that give ``request.model`` (those differing from the preset)."""
    base = ModelConfig(**MODEL_PRESETS[request.preset]) if request.preset else ModelConfig()
    flags = []
    for f in dataclasses.fields(ModelConfig):
        value, default = getattr(request.model, f.name), getattr(base, f.name)
        if value == default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif value is not None:
            flags += [flag, str(value)]
    return flags


def command_line(request: PlanRequest, cand: Candidate) -> str:
    """The ``torchrun ... -m seqpar.train`` line that runs ``cand`` (flags as the trainer's
    parser names them). More than one node: run the same line on every node."""
    per_node = min(request.gpus, request.spec.gpus_per_node)
    nodes = math.ceil(request.gpus / per_node)
    launch = (["torchrun", "--standalone", "--nproc-per-node", str(per_node)] if nodes == 1 else
              ["torchrun", "--nnodes", str(nodes), "--nproc-per-node", str(per_node), "--rdzv-backend", "c10d",
               "--rdzv-endpoint", "$MASTER_ADDR:29500"])
    args = ["-m", "seqpar.train"] + (["--preset", request.preset] if request.preset else []) + _model_flags(request)
    args += ["--sp", str(cand.sp), "--seq-len", str(request.seq_len),
             "--batch-size", str(cand.dp * cand.batch_per_replica)]
    if cand.sp > 1:
        args += ["--layout", cand.layout]
        if request.model.has_softmax:
            args += ["--softmax-strategy", cand.softmax_strategy]
            if cand.softmax_strategy == "usp":
                args += ["--ulysses-size", str(cand.ulysses_size)]
        if request.model.has_linear:
            args += ["--linear-strategy", cand.linear_strategy]
    args.append("--activation-checkpointing" if cand.activation_checkpointing else "--no-activation-checkpointing")
    if request.backend != "triton":
        args += ["--backend", request.backend]
    return " ".join(launch + args)


def format_table(result: PlanResult) -> str:
    """The ranked rows as a markdown table."""
    req = result.request
    head = ("| # | sp x dp | softmax | linear | layout | act. ckpt | peak GiB / GPU | fits | est. step s | "
            "tokens/s | MFU |")
    lines = [head, "|" + "---|" * 11]
    for i, row in enumerate(result.rows, 1):
        c, t = row.candidate, row.time
        if row.memory is not None and not row.memory.error:
            peak = f"{row.memory.peak_bytes / GIB:.1f}"
        elif row.status == "bound":
            peak = f">= {row.lower_bound / GIB:.1f} (bound)"
        else:
            peak = "-"
        fits = {"fits": "yes", "too big": "**no**", "bound": "no (bound)", "implied": "no (implied)",
                "error": "error", "in flight": "not measured", "not measured": "not measured"}[row.status]
        mark = " (best)" if row is result.best else ""
        sm = c.softmax_label if (c.sp > 1 and req.model.has_softmax) else "-"
        lin = c.linear_strategy if (c.sp > 1 and req.model.has_linear) else "-"
        lay = c.layout if c.sp > 1 else "-"
        lines.append(f"| {i}{mark} | {c.sp} x {c.dp} | {sm} | {lin} | {lay} | "
                     f"{'on' if c.activation_checkpointing else 'off'} | {peak} | {fits} | {t.step_s:.2f} | "
                     f"{t.tokens_per_s:,.0f} | {t.mfu:.0%} |")
    return "\n".join(lines)


def report(result: PlanResult) -> str:
    """What ``python -m seqpar.plan`` prints: the question, the table, notes, the command line."""
    req, spec = result.request, result.request.spec
    name = req.preset or "custom model"
    lines = [
        f"plan: {name} ({result.params / 1e9:.2f}B parameters, "
        f"pattern {req.model.pattern} x {req.model.n_layers} layers), {req.seq_len:,} tokens a sequence, {req.gpus} x "
        f"{spec.name} ({spec.memory_gib:g} GiB; a candidate fits under {req.budget_bytes / GIB:.1f} GiB = "
        f"{1 - req.headroom:.0%}), {req.batch_per_replica} sequence(s) per replica",
        "",
        format_table(result),
        "",
        f"peak GiB: one rank's peak over a training step (FSDPMemTracker under FakeTensorMode on the fake process "
        f"group; kernels: {req.backend}); step time, tokens/s and MFU (model FLOPs / dense bf16 peak, recomputation "
        f"not counted) are cost-model estimates for {spec.name}, not measurements. Each row stands for its class: the "
        f"layout and linear strategy shown are the fastest by the estimate. {result.candidates} configurations, "
        f"{len(result.rows)} classes, {result.measured} measured in {result.seconds:.0f} s.",
    ]
    errors = [r for r in result.rows if r.status == "error"]
    for r in errors[:3]:
        lines.append(f"error (sp {r.candidate.sp} {r.candidate.softmax_label}): {r.note}")
    if result.best is None:
        lines.append("no candidate fits: raise --gpus, lower --seq-len, or lower --headroom")
    else:
        b = result.best
        lines += ["", f"best: sp {b.candidate.sp} x dp {b.candidate.dp}, estimated {b.time.step_s:.2f} s a step "
                      f"({b.time.tokens_per_s:,.0f} tokens/s), peak {b.memory.peak_bytes / GIB:.1f} GiB a GPU:",
                  "  " + result.command()]
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        corpus = defaults["max_corpus_bytes"] * (1 - defaults["val_fraction"])
        if req.seq_len > corpus:
            lines.append(f"  (add --data PATH: the default stdlib corpus holds about {corpus:,.0f} training bytes, "
                         f"fewer than one {req.seq_len:,}-token row)")
    return "\n".join(lines)


def result_json(result: PlanResult) -> dict[str, Any]:
    """The plan as plain data (``--json``)."""
    def row(r: Row) -> dict[str, Any]:
        return {"candidate": r.candidate.to_dict(), "status": r.status, "note": r.note,
                "peak_bytes": r.memory.peak_bytes if r.memory and not r.memory.error else None,
                "breakdown": r.memory.breakdown if r.memory else None,
                "measure_s": r.memory.seconds if r.memory else None, "lower_bound_bytes": r.lower_bound,
                "time": dataclasses.asdict(r.time), "tokens_per_s": r.time.tokens_per_s, "mfu": r.time.mfu,
                "best": r is result.best}

    req = dataclasses.asdict(result.request)
    return {"request": req, "gpu": dataclasses.asdict(result.request.spec), "rows": [row(r) for r in result.rows],
            "command": result.command(), "candidates": result.candidates, "measured": result.measured,
            "seconds": result.seconds}


# ---------------------------------------------------------------------------------------------
# Command line.


def _csv(kind: Callable[[str], Any]) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        return tuple(kind(x) for x in text.split(",") if x)
    return parse


def _model_value(text: str) -> Any:
    if text.lower() in ("none", "null"):
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m seqpar.plan",
        description="Rank training configurations of a model on N GPUs: each candidate's peak memory per GPU is "
                    "measured by running one training step under FakeTensorMode on torch's fake process group (no "
                    "GPU needed), its step time estimated by seqpar's cost model; prints the table and the "
                    "command line of the best one.")
    p.add_argument("--preset", choices=sorted(MODEL_PRESETS), default=None, help="model preset (or --config)")
    p.add_argument("--config", default=None, metavar="JSON",
                   help="a TrainConfig JSON (a run's config.json: its model) or a ModelConfig JSON")
    p.add_argument("--model", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a ModelConfig field, e.g. --model n_layers=24 (repeatable)")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per sequence (global)")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100-80gb", help="GPU kind (rates and memory)")
    p.add_argument("--memory-gib", type=float, default=None, help="memory per GPU (default: the GPU kind's)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node (default 8)")
    p.add_argument("--headroom", type=float, default=0.10,
                   help="fraction of the memory kept free for the CUDA context, NCCL and fragmentation (0.10)")
    p.add_argument("--batch-per-replica", type=int, default=1, help="sequences per data-parallel replica (1)")
    p.add_argument("--backend", choices=PLAN_BACKENDS, default="triton", help="kernels to trace (triton)")
    p.add_argument("--sp", type=_csv(int), default=None, metavar="N,N", help="only these sp sizes")
    p.add_argument("--softmax-strategies", type=_csv(str), default=None, metavar="S,S")
    p.add_argument("--linear-strategies", type=_csv(str), default=None, metavar="S,S")
    p.add_argument("--layouts", type=_csv(str), default=None, metavar="L,L")
    p.add_argument("--usp-sizes", type=_csv(int), default=None, metavar="U,U",
                   help="Ulysses sizes of usp (default: the largest proper divisor of sp within a node)")
    p.add_argument("--activation-checkpointing", choices=("both", "on", "off"), default="both")
    p.add_argument("--keep", type=int, default=3, help="stop after this many fitting candidates (3)")
    p.add_argument("--max-measure", type=int, default=16, help="measure at most this many candidates (16)")
    p.add_argument("--jobs", type=int, default=None, help="measuring subprocesses (default: min(2, CPUs))")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the plan as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def request_from_args(args: argparse.Namespace) -> PlanRequest:
    if (args.preset is None) == (args.config is None):
        raise ValueError("give exactly one of --preset and --config")
    if args.preset:
        model = dict(MODEL_PRESETS[args.preset])
    else:
        with open(args.config) as fh:
            data = json.load(fh)
        model = dict(data.get("model", data))
    for item in args.model:
        if "=" not in item:
            raise ValueError(f"--model takes FIELD=VALUE, got {item!r}")
        name, value = item.split("=", 1)
        if name not in {f.name for f in dataclasses.fields(ModelConfig)}:
            raise ValueError(f"--model {name}: not a ModelConfig field")
        model[name] = _model_value(value)
    ac = {"both": (True, False), "on": (True,), "off": (False,)}[args.activation_checkpointing]
    return PlanRequest(model=ModelConfig(**model), seq_len=args.seq_len, gpus=args.gpus, gpu=args.gpu,
                       memory_gib=args.memory_gib, preset=args.preset, batch_per_replica=args.batch_per_replica,
                       backend=args.backend, headroom=args.headroom, gpus_per_node=args.gpus_per_node,
                       sp_choices=args.sp, softmax_choices=args.softmax_strategies,
                       linear_choices=args.linear_strategies, layout_choices=args.layouts,
                       checkpointing_choices=ac, usp_sizes=args.usp_sizes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("keep", "max_measure"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    try:
        request = request_from_args(args)
    except (ValueError, TypeError, OSError) as e:
        parser.error(str(e))
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        result = plan(request, keep=args.keep, max_measure=args.max_measure, jobs=args.jobs, log=log)
    except ValueError as e:
        parser.error(str(e))
    print(report(result), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result_json(result), fh, indent=1, default=str)
    return 0 if result.best is not None else 1


if __name__ == "__main__":
    sys.exit(main())
