"""Train the hybrid model with data x sequence parallelism: ``python -m seqpar.train``.

The world (torchrun's ranks) is a DeviceMesh with named axes ("dp", "sp"): ``world / sp``
data-parallel replicas of ``sp`` consecutive ranks (:func:`seqpar.comm.make_device_mesh`). Every
rank of a replica reads the same global sequences (from the standard library's bytes, the
synthetic task, or a token file, packed by document with ``--packing``), keeps its tokens
(:func:`seqpar.parallelize.shard_batch`), and the attention layers talk across the "sp" axis.
Parameters, gradients and AdamW's state are sharded with FSDP2 over all dp x sp ranks
(:func:`seqpar.parallelize.apply_fsdp`): gradients are reduce-scattered (summed) during backward,
clipped by their global norm, and the cosine schedule steps. Checkpoints are sharded DCP
directories (:mod:`seqpar.checkpoint`) that resume at any dp x sp size.

The loss is normalised by the global token count the data reports (``Batch.label_count``), and
the loss sum to log is all-reduced while backward runs: one collective of the trainer's own per
step. Each train record says where the step time went (:data:`BREAKDOWN_FIELDS`: the softmax
and the linear-attention layers' token mixing, the trainer's collectives, the rest), timed by a
:class:`seqpar.model.PhaseTimer` at a cost of four clock reads and two identity autograd nodes
per layer; ``--profile-every N`` runs every N-th step under torch.profiler.

Run dir: ``config.json``, ``train.jsonl`` (one JSON record per logged step / evaluation /
profiled step), ``train.log`` (the same as text), ``loss.png``, ``checkpoints/step_*.pt`` and,
with ``--profile-every``, ``profiles/`` (Chrome traces).

``--fake-world-size N`` runs ONE real rank (``--fake-rank``) of an N-rank job on torch's fake
process group: every collective is a no-op, so the numbers are meaningless but the memory and
time of that rank are those of the real job (minus communication).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import resource
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from seqpar.checkpoint import (CHECKPOINT_DIR, CheckpointError, checkpoint_path, latest_checkpoint,
                               load_checkpoint, local_shard, newest_valid_checkpoint, prune_checkpoints, read_checkpoint,
                               remove_stale_temporaries, save_checkpoint, verify_checkpoint)
from seqpar.comm.groups import SequenceParallelGroups
from seqpar.config import (FIELD_CHOICES, FIELD_HELP, MODEL_PRESETS, SEMANTIC_FIELDS, TRAIN_PRESETS, ModelConfig,
                           SequenceParallelConfig, TrainConfig, check_allow_changes, preset, resume_changes)
from seqpar.data import make_dataset
from seqpar.model import HybridLM, PhaseTimer, attach_timer
from seqpar.run_dir import (PROFILE_DIR, RunDirectoryError, RunDirLock, agree, existing_run, exit_with_launcher,
                             overwrite_conflict, prepare_run_dir, share_from_writer)
from seqpar.parallelize import (apply_fsdp, make_groups, parallelize_model, sequence_parallel_loss, shard_batch,
                                token_loss_sum)

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank)."""

    final_loss: float
    final_val_loss: float | None
    history: list[dict[str, Any]]
    run_dir: str
    log_path: str
    jsonl_path: str
    plot_path: str | None
    checkpoint: str | None
    peak_memory_mb: float
    mean_step_time_s: float
    num_params: int
    model: nn.Module | None = field(default=None, repr=False)
    state_memory_mb: float = 0.0  # kept between steps (see _state_memory_mb)


def lr_lambda(cfg: TrainConfig):
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` at ``steps``."""

    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW's parameter groups: weight decay on the matrices (dim >= 2) only."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (weight decay on matrices only) and its cosine LambdaLR schedule. On CPU the fused
    AdamW kernel (one call per step instead of a loop over the parameters: 3 ms -> 0.9 ms a step
    for the tiny model); on GPU torch's default (foreach)."""
    groups = parameter_groups(model, cfg.weight_decay)
    kwargs: dict[str, Any] = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    opt = None
    if all(p.device.type == "cpu" for group in groups for p in group["params"]):
        try:
            opt = torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError, TypeError):  # a torch without the CPU kernel, or a dtype it lacks
            opt = None
    if opt is None:
        opt = torch.optim.AdamW(groups, **kwargs)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device != "auto":
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def uses_amp(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether the forward runs under bf16 autocast: fp32 parameters on CUDA with ``cfg.amp``."""
    return cfg.amp and device.type == "cuda" and cfg.dtype == "float32"


def local_tokens_per_step(cfg: TrainConfig, world: int) -> int:
    """Tokens one rank processes per step: its replica's share of the global batch, each
    sequence split over the ``sp_size`` ranks."""
    dp = max(1, world // cfg.sp.sp_size)
    return max(1, cfg.batch_size // dp) * cfg.seq_len // cfg.sp.sp_size


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this rank: CUDA allocator peak on GPU, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _text_logger(path: str) -> logging.Logger:
    """A logger of its own (not registered globally) writing to ``path``."""
    logger = logging.Logger(f"seqpar.train:{path}")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(handler)
    return logger


def plot_history(history: list[dict[str, Any]], path: str, title: str = "") -> str:
    """Train (and held-out) loss against step, written as PNG with matplotlib's Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    train = [(h["step"], h["loss"]) for h in history if h.get("kind") == "train"]
    val = [(h["step"], h["val_loss"]) for h in history if h.get("kind") == "eval"]
    if train:
        ax.plot(*zip(*train), label="train", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="held-out", lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _job_groups(groups: SequenceParallelGroups | None, device: torch.device, timeout_s: float) -> SequenceParallelGroups:
    """``groups`` with their DeviceMesh: one process without torch.distributed gets none; groups
    made by hand (a ProcessGroup per axis, no mesh) get one built over the same ranks."""
    if groups is None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError(f"torch.distributed has {dist.get_world_size()} ranks but no groups were given: "
                             "pass seqpar.parallelize.make_groups(...)[0]")
        groups = SequenceParallelGroups(None, None, 1, 1, 0, 0)
    if groups.mesh is not None or not dist.is_initialized():
        return groups
    from seqpar.comm.groups import make_device_mesh

    if groups.dp_size == 1:
        job = groups.sp
    elif groups.dp_size * groups.sp_size == dist.get_world_size():
        job = None
    else:
        raise ValueError(f"groups of dp {groups.dp_size} x sp {groups.sp_size} ranks inside a world of "
                         f"{dist.get_world_size()}: build them with seqpar.comm.make_device_mesh(group=...)")
    return make_device_mesh(groups.sp_size, device.type, timeout_s, group=job)


def job_group(groups: SequenceParallelGroups) -> Any:
    """The process group of every rank of the job (dp x sp), or None on one process."""
    return groups.shard_mesh.get_group() if groups.shard_mesh is not None else None


def evaluate(model: nn.Module, dataset: Any, cfg: TrainConfig, groups: SequenceParallelGroups,
             device: torch.device, autocast: Any) -> float:
    """Mean held-out loss over ``cfg.eval_batches`` fixed batches (the same on every rank)."""
    was_training = model.training
    model.eval()
    sp_group = groups.sp if groups.sp_size > 1 else None
    total = 0.0
    with torch.no_grad():
        for i in range(cfg.eval_batches):
            b = dataset.batch(i, cfg.batch_size, cfg.seq_len, seed=cfg.seed, dp_rank=groups.dp_rank,
                              dp_size=groups.dp_size, split="val")
            sb = shard_batch(b.tokens.to(device), b.labels.to(device), cfg.sp.layout, sp_group)
            with autocast():
                logits = model(sb.tokens, sb.positions, getattr(b, "cu_seqlens", None))
            total += float(sequence_parallel_loss(logits, sb.labels, groups)[1])
    model.train(was_training)
    return total / cfg.eval_batches


class Progress:
    """A tqdm bar on a terminal; elsewhere (torchrun --tee, a log file, CI) a plain line every
    ``~steps / 20`` steps, so the output never breaks into carriage-return fragments."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.enabled, self.total, self.done = enabled, total, initial
        self.every = max(1, (total - initial) // 20)
        self.bar = None
        if enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, desc="train", unit="step")

    def update(self, **fields: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(**fields)
        elif self.enabled and (self.done % self.every == 0 or self.done == self.total):
            print(f"step {self.done}/{self.total} " + " ".join(f"{k}={v}" for k, v in fields.items()), flush=True)

    def write(self, line: str) -> None:
        """A line of its own (above the bar on a terminal); nothing when progress is off."""
        if self.bar is not None:
            self.bar.write(line)
        elif self.enabled:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------
# Where the step time goes (docs/training.md, "Where the step time goes").

#: Fields of a train record that split its ``step_time_s`` (seconds per step, rank 0's):
#: the token mixing of the softmax layers and of the linear-attention layers (forward and
#: backward, with the communication inside them), the trainer's own collectives (loss and
#: gradient all-reduce, waiting included), and the rest of the step time.
BREAKDOWN_FIELDS = ("softmax_attention_s", "linear_attention_s", "comm_s", "rest_s")
_PHASE_OF_FIELD = {"softmax_attention_s": "softmax", "linear_attention_s": "linear", "comm_s": "comm"}


class _Interval:
    """Step time summed over some steps; or train records averaged, weighted by their steps."""

    def __init__(self) -> None:
        self.steps, self.time_s, self.cpu_s, self.first_step = 0, 0.0, 0.0, None
        self.sums: dict[str, float] = {}

    def add(self, dt: float, cpu_dt: float) -> None:
        self.steps += 1
        self.time_s += dt
        self.cpu_s += cpu_dt

    def mean_step_s(self) -> float:
        return self.time_s / max(1, self.steps)

    def add_record(self, rec: dict[str, Any], steps: int) -> None:
        if self.first_step is None:
            self.first_step = rec["step"] - steps + 1
        self.steps += steps
        for key in ("step_time_s", "cpu_time_s") + BREAKDOWN_FIELDS:
            self.sums[key] = self.sums.get(key, 0.0) + rec[key] * steps

    def mean_record(self) -> dict[str, float]:
        return {k: v / max(1, self.steps) for k, v in self.sums.items()}


def step_breakdown(phases: dict[str, float], time_s: float, steps: int) -> dict[str, float]:
    """Per-step means of :data:`BREAKDOWN_FIELDS` from a :class:`seqpar.model.PhaseTimer`'s
    totals over ``steps`` steps that took ``time_s`` in all; ``rest_s`` is what the measured
    phases leave of the step time (never below 0)."""
    steps = max(1, steps)
    out = {f: phases.get(phase, 0.0) / steps for f, phase in _PHASE_OF_FIELD.items()}
    out["rest_s"] = max(0.0, time_s / steps - sum(out.values()))
    return out


def breakdown_line(mean: dict[str, float], first: int | None, last: int) -> str:
    """One console line: the mean step time of steps ``first``..``last`` and its parts."""
    total = mean["step_time_s"]
    names = {"softmax_attention_s": "softmax attention", "linear_attention_s": "linear attention",
             "comm_s": "comm", "rest_s": "rest"}
    parts = ", ".join(f"{names[f]} {mean[f] * 1e3:.1f} ms ({100 * mean[f] / total if total > 0 else 0:.0f}%)"
                      for f in BREAKDOWN_FIELDS)
    steps = f"step {last}" if first in (None, last) else f"steps {first}-{last}"
    cpu = f"; process CPU time {mean['cpu_time_s'] * 1e3:.1f} ms" if "cpu_time_s" in mean else ""
    return f"time/step {total * 1e3:.1f} ms ({steps}): {parts}{cpu}"


def _profiler(device: torch.device) -> Any:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=activities)


def _is_collective(event: Any, device: torch.device) -> bool:
    name = event.name
    if device.type == "cuda":  # the NCCL kernels' device time (host events only enqueue them)
        return "nccl" in name.lower() and str(getattr(event, "device_type", "")).endswith("CUDA")
    return name.startswith(("gloo:", "nccl:"))


def _union_s(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``intervals`` (microseconds in, seconds out)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total / 1e6


def profile_record(prof: Any, device: torch.device, step: int, dt: float, run_dir: str) -> dict[str, Any]:
    """The ``kind: profile`` record of a step run under torch.profiler (``--profile-every``):
    every collective the step ran, the trainer's and those inside the attention strategies,
    by name (count, seconds), and the time during which at least one was in flight
    (``collective_s``). Each rank writes its Chrome trace to ``run_dir/profiles/``."""
    ops: dict[str, list[float]] = {}
    spans: list[tuple[float, float]] = []
    for e in prof.events():
        if not _is_collective(e, device):
            continue
        start, end = e.time_range.start, e.time_range.end
        spans.append((start, end))
        entry = ops.setdefault(e.name, [0, 0.0])
        entry[0] += 1
        entry[1] += (end - start) / 1e6
    rank = dist.get_rank() if dist.is_initialized() else 0
    trace = os.path.join(PROFILE_DIR, f"step_{step:08d}.rank{rank}.json")
    try:
        os.makedirs(os.path.join(run_dir, PROFILE_DIR), exist_ok=True)
        prof.export_chrome_trace(os.path.join(run_dir, trace))
    except OSError:
        trace = None
    return {"kind": "profile", "step": step, "step_time_s": dt, "collective_s": _union_s(spans),
            "collectives": {name: {"count": int(c), "s": t} for name, (c, t) in sorted(ops.items())},
            "trace": trace}


def profile_line(rec: dict[str, Any]) -> str:
    ops = ", ".join(f"{name} x{v['count']} {v['s'] * 1e3:.1f} ms" for name, v in rec["collectives"].items())
    return (f"profile of step {rec['step']} ({rec['step_time_s'] * 1e3:.1f} ms under the profiler): collectives in "
            f"flight {rec['collective_s'] * 1e3:.1f} ms" + (f" ({ops})" if ops else "")
            + (f"; trace {rec['trace']}" if rec["trace"] else ""))


class DivergenceError(RuntimeError):
    """The loss or the gradient norm was not finite (raised alike on every rank, before the update)."""


class ResumeConfigError(ValueError):
    """A resume would change the model or its data (the message lists each field)."""


#: Exit status of ``python -m seqpar.train`` per error (2: usage, as argparse; 4: checkpoints).
EXIT_CODES: dict[type, int] = {RunDirectoryError: 2, ResumeConfigError: 2, DivergenceError: 3, CheckpointError: 4}


def _json_number(value: float) -> float | str:
    """``value``, or 'nan' / 'inf' / '-inf' as text (train.jsonl stays strict JSON)."""
    return value if math.isfinite(value) else str(value)


def find_resume_checkpoint(run_dir: str, resume: str, existed: bool = True) -> tuple[str | None, list[str]]:
    """The checkpoint ``resume`` ("auto" or a path) names, verified, and what was found, as
    lines to print. "auto" takes the newest checkpoint of ``run_dir`` that verifies, naming
    each newer one it skips; None (start at step 0) when the directory holds no checkpoint.
    Raises :class:`CheckpointError` for a bad explicit path, or when every checkpoint is bad.
    ``existed``: whether ``run_dir`` existed before this job (its lock file) created it."""
    if resume != "auto":
        problem = verify_checkpoint(resume)
        if problem is not None:
            raise CheckpointError(f"--resume {resume}: this checkpoint cannot be used: {problem}")
        return resume, [f"resume: continuing from {resume} (verified)"]
    if not existed or not os.path.isdir(run_dir):
        return None, [f"resume auto: run directory {run_dir} does not exist; starting a new run there at step 0"]
    path, skipped = newest_valid_checkpoint(run_dir)
    notes = [f"resume auto: skipping {p}: {why}" for p, why in skipped]
    if path is None and skipped:
        raise CheckpointError(
            f"resume auto: none of the {len(skipped)} checkpoint(s) in {os.path.join(run_dir, CHECKPOINT_DIR)} can "
            "be used (" + "; ".join(f"{os.path.basename(p)}: {why}" for p, why in skipped) + "); not starting "
            "over on top of them: pass --overwrite to start afresh, or --resume with a good checkpoint's path")
    if path is None:
        found = existing_run(run_dir)
        notes.append(f"resume auto: {run_dir} holds no checkpoint ({'it holds ' + found if found else 'it is empty'}); "
                     "starting at step 0")
    else:
        notes.append(f"resume auto: continuing from {path} (verified)")
    return path, notes


def apply_optimizer_settings(optimizer: torch.optim.Optimizer, scheduler: Any, cfg: TrainConfig) -> None:
    """Make a loaded optimiser follow ``cfg`` (peak lr, betas, weight decay) from the schedule's
    current step on; the schedule's shape (warm-up, steps, min lr) comes from ``cfg`` already."""
    factor = lr_lambda(cfg)(scheduler.last_epoch)
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    for i, group in enumerate(optimizer.param_groups):
        group.update(initial_lr=cfg.lr, lr=cfg.lr * factor, betas=(cfg.beta1, cfg.beta2))
        for key in ("fused", "foreach"):  # the implementation build_optimizer chose, not the saved one
            if key in optimizer.defaults:
                group[key] = optimizer.defaults[key]
        if i == 0:  # build_optimizer: the matrices, with weight decay
            group["weight_decay"] = cfg.weight_decay
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def train(cfg: TrainConfig, groups: SequenceParallelGroups | None = None, attention_group: Any = None,
          return_model: bool = False, dry_run: bool = False, overwrite: bool = False,
          allow_changes: Sequence[str] = ()) -> TrainResult:
    """Run ``cfg`` on this rank. ``groups`` (dp x sp) default to one process; ``attention_group``
    (what :func:`parallelize_model` gets) defaults to ``groups.sp``. A ``cfg.run_dir`` that holds
    another run is refused unless ``overwrite`` (delete it) or ``cfg.resume`` (continue it); one
    that another job is using is refused (:class:`seqpar.run_dir.RunDirLock`).

    A resume compares the checkpoint's config with ``cfg``: a change of the model or of its data
    raises :class:`ResumeConfigError` unless the field is in ``allow_changes`` (see
    :func:`seqpar.config.resume_changes`); the other changes apply and are logged. A non-finite
    loss or gradient norm raises :class:`DivergenceError` before the update (``cfg.on_nonfinite``
    may skip the step instead); a checkpoint that cannot be written or read raises
    :class:`CheckpointError`. Every rank raises alike.

    ``dry_run`` (one real rank on the fake process group): no evaluation, checkpoint, plot or
    loss (the collectives are no-ops, so they would be meaningless); steps record time and memory,
    and the result carries the memory the rank keeps between steps (``state_memory_mb``)."""
    groups = _job_groups(groups, _device(cfg), cfg.timeout_s)
    if groups.sp_size != cfg.sp.sp_size:
        raise ValueError(f"the sequence-parallel group has {groups.sp_size} ranks but the config says sp_size={cfg.sp.sp_size}")
    if cfg.batch_size % groups.dp_size != 0:
        raise ValueError(f"global batch_size {cfg.batch_size} is not divisible by the data-parallel size {groups.dp_size}")
    conflict = overwrite_conflict(overwrite, cfg.resume)
    if conflict:
        raise ValueError(conflict)
    allow_changes = tuple(allow_changes)
    check_allow_changes(allow_changes)  # a bad name is an error before anything starts
    if attention_group is None:
        attention_group = groups.sp
    rank0 = groups.dp_rank == 0 and groups.sp_rank == 0
    existed = os.path.isdir(cfg.run_dir)
    lock = prepare_run_dir(cfg.run_dir, cfg.resume, groups, writer=rank0, overwrite=overwrite)
    try:
        return _train_in_run_dir(cfg, groups, attention_group, rank0, return_model, dry_run, allow_changes, lock,
                                 existed)
    finally:
        if lock is not None:
            lock.release()


def _train_in_run_dir(cfg: TrainConfig, groups: SequenceParallelGroups, attention_group: Any, rank0: bool,
                      return_model: bool, dry_run: bool, allow_changes: tuple[str, ...],
                      lock: RunDirLock | None, existed: bool) -> TrainResult:
    device = _device(cfg)
    dtype = _DTYPES[cfg.dtype]
    use_amp = uses_amp(cfg, device)
    sharded = groups.shard_mesh is not None  # FSDP2 over every rank of the job
    autocast_on = use_amp and not sharded  # with FSDP2 its mixed-precision policy casts instead

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if autocast_on else nullcontext()

    # built on the meta device, sharded, then materialised: no rank ever holds the whole model,
    # and every parameter is drawn from a generator of its own (seed, name), so the values are
    # those of one process whatever the dp x sp size (HybridLM.reset_parameters)
    with torch.device("meta"):
        model = HybridLM(cfg.model).to(dtype=dtype)
    if cfg.sp.sp_size > 1 or device.type == "cuda":  # on GPU even sp=1 goes through seqpar's Triton kernels
        parallelize_model(model, cfg.sp, attention_group)
    model.activation_checkpointing = cfg.activation_checkpointing
    if cfg.compile:
        compile_layers(model)
    if sharded:
        apply_fsdp(model, groups.shard_mesh, mixed_precision=use_amp)
    model.to_empty(device=device)
    model.reset_parameters(seed=cfg.seed)
    model.train()
    optimizer, scheduler = build_optimizer(model, cfg)
    dataset = make_dataset(cfg.data, max_bytes=cfg.max_corpus_bytes, val_fraction=cfg.val_fraction,
                           vocab_size=cfg.model.vocab_size, packing=cfg.packing, data_dtype=cfg.data_dtype,
                           eos_id=cfg.eos_id)

    run_dir = cfg.run_dir
    os.makedirs(run_dir, exist_ok=True)
    jsonl_path = os.path.join(run_dir, "train.jsonl")
    log_path = os.path.join(run_dir, "train.log")
    history: list[dict[str, Any]] = []
    start_step = 0

    # resume: the writer chooses and verifies the checkpoint, every rank loads it
    notes: list[str] = []
    found: tuple[str, str | None, list[str]] = ("", None, [])
    alone = dist.is_initialized() and dist.get_backend() == "fake"  # a dry run's one real rank reads for itself
    chooser = rank0 or alone
    if chooser:
        if lock is not None:  # only the lock holder may touch the files
            if lock.stale:
                notes.append(f"took over the run-directory lock of a job that is gone ({lock.stale})")
            notes += [f"removed {name}, left by an interrupted save" for name in remove_stale_temporaries(run_dir)]
        if cfg.resume is not None:
            try:
                path, resume_notes = find_resume_checkpoint(run_dir, cfg.resume, existed)
                found = ("", path, notes + resume_notes)
            except (CheckpointError, OSError) as e:
                found = (str(e), None, notes)
        else:
            found = ("", None, notes)
    problem, resume, notes = share_from_writer(groups, found, chooser)
    if problem:
        raise CheckpointError(problem)
    state, problem = None, ""
    if resume:
        try:
            state = read_checkpoint(resume, checksum=False)  # the chooser verified the checksums just now
        except (CheckpointError, OSError) as e:
            problem = f"rank {dist.get_rank() if dist.is_initialized() else 0}: {e}"
    problem = agree(groups, problem)
    if problem:
        raise CheckpointError(problem)
    if state is not None:
        refused, applied = resume_changes(state.get("config") or {}, cfg, allow_changes)
        if "data" not in allow_changes:
            refused += data_source_changes((state.get("data") or {}).get("source"), _data_source(dataset))
        if refused:
            raise ResumeConfigError(
                f"resuming {resume} would change the model or its data: " + "; ".join(refused) + ". Use the "
                "checkpoint's values (they are in its run dir's config.json), or name each field you change on "
                "purpose with --allow-change FIELD (not possible for fields that give the parameters their shapes)")
        load_checkpoint(resume, model=model, optimizer=optimizer, scheduler=scheduler, state=state,
                        group=None if alone else job_group(groups))
        apply_optimizer_settings(optimizer, scheduler, cfg)
        notes += [f"resume: {line} (applied)" for line in applied]
        start_step = int(state["step"])
        history = [h for h in state.get("history", []) if h.get("step", 0) <= start_step]
        if state.get("data", {}).get("batches_consumed", start_step) != start_step:
            raise ValueError(f"checkpoint {resume}: data position {state['data']} disagrees with step {start_step}")
        del state
    if chooser:
        for line in notes:
            print(line, flush=True)

    logger = _text_logger(log_path) if rank0 else None
    jsonl = open(jsonl_path, "w") if rank0 else None  # rewritten from the checkpoint's history on resume
    try:
        return _train_loop(cfg, groups, model, optimizer, scheduler, dataset, device, autocast, rank0, dry_run,
                           return_model, history, start_step, resume, notes, logger, jsonl)
    finally:
        if rank0:
            for h in logger.handlers:
                h.close()
            jsonl.close()


def _train_loop(cfg: TrainConfig, groups: SequenceParallelGroups, model: nn.Module, optimizer: Any, scheduler: Any,
                dataset: Any, device: torch.device, autocast: Any, rank0: bool, dry_run: bool, return_model: bool,
                history: list[dict[str, Any]], start_step: int, resume: str | None, notes: list[str],
                logger: logging.Logger | None, jsonl: Any) -> TrainResult:
    run_dir = cfg.run_dir
    jsonl_path = os.path.join(run_dir, "train.jsonl")
    log_path = os.path.join(run_dir, "train.log")
    if rank0:
        for rec in history:
            jsonl.write(json.dumps(rec) + "\n")
    n_params = model.num_params()

    def record(rec: dict[str, Any]) -> None:
        history.append(rec)
        if rank0:
            jsonl.write(json.dumps(rec) + "\n")
            jsonl.flush()
            logger.info(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))

    if rank0:
        with open(os.path.join(run_dir, "config.json"), "w") as fh:
            json.dump(cfg.to_dict(), fh, indent=2)
        for line in notes:
            logger.info(line)
        logger.info(f"start: {n_params:,} parameters, dp={groups.dp_size} sp={groups.sp_size} device={device} "
                    f"layer kinds={cfg.model.layer_kinds} window={cfg.model.window} softcap={cfg.model.softcap} "
                    f"resume={resume} start_step={start_step}")

    sp_group = groups.sp if groups.sp_size > 1 else None
    job = job_group(groups) if not dry_run else None
    params = [p for p in model.parameters() if p.requires_grad]
    tokens_per_step = cfg.batch_size * cfg.seq_len
    bar = Progress(cfg.steps, start_step, enabled=rank0 and cfg.progress)
    step_times: list[float] = []
    last_ckpt = None
    state_mb = 0.0
    skipped_in_row = 0
    # where the step time goes (see docs/training.md): the layers' token mixing and the
    # trainer's collectives are timed as they run, read once per record
    timer = PhaseTimer(device)
    attach_timer(model, timer)
    since_record = _Interval()  # steps since the last train record
    since_line = _Interval()  # records since the last console breakdown line
    line_every = cfg.log_interval * max(1, -(-bar.every // cfg.log_interval))  # ~20 lines a run at most
    if cfg.profile_every and rank0 and start_step == 0:
        shutil.rmtree(os.path.join(run_dir, PROFILE_DIR), ignore_errors=True)  # a fresh run's traces only
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before_first_step_mb = peak_memory_mb(device)
    for step in range(start_step, cfg.steps):
        done = step + 1
        log_now = done % cfg.log_interval == 0 or done == cfg.steps
        profiled = cfg.profile_every > 0 and done % cfg.profile_every == 0
        with _profiler(device) if profiled else nullcontext() as prof:
            t0, c0 = time.perf_counter(), time.process_time()
            batch = dataset.batch(step, cfg.batch_size, cfg.seq_len, seed=cfg.seed, dp_rank=groups.dp_rank,
                                  dp_size=groups.dp_size)
            sb = shard_batch(batch.tokens.to(device), batch.labels.to(device), cfg.sp.layout, sp_group)
            with autocast():
                logits = model(sb.tokens, sb.positions, getattr(batch, "cu_seqlens", None))
            count = getattr(batch, "label_count", None)
            if count is not None:
                # the data knows the global token count: no collective before backward; the loss
                # sum to log is all-reduced while backward runs (FSDP2 reduce-scatters the
                # gradients during backward: no gradient all-reduce of the trainer's own)
                local_sum = token_loss_sum(logits, sb.labels)
                share = local_sum / max(count, 1)
                loss_sum = local_sum.detach().to(torch.float64).reshape(1)
                pending = dist.all_reduce(loss_sum, group=job, async_op=True) if job is not None else None
                share.backward()
                del logits, share
                if pending is not None:
                    with timer.phase("comm") if timer.enabled else nullcontext():
                        pending.wait()
                loss = loss_sum[0] / max(count, 1)
            else:
                share, loss = sequence_parallel_loss(logits, sb.labels, groups, timer=timer)
                share.backward()
                del logits, share
            norm = gradient_norm(params, cfg.grad_clip)
            lr = scheduler.get_last_lr()[0]
            # one host read of both numbers (a device sync on GPU: the guard below needs them)
            loss_value, grad_norm = torch.stack([loss.detach().reshape(()).double(), norm.double()]).tolist()
            # the loss is all-reduced and the gradients summed over every rank before their norm is
            # taken, so every rank sees the same two numbers and takes the same decision
            if dry_run or (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                optimizer.step()
                skipped_in_row = 0
            else:
                skipped_in_row += 1
                stop = cfg.on_nonfinite == "stop" or skipped_in_row >= cfg.max_skipped_steps
                record({"kind": "nonfinite", "step": done, "loss": _json_number(loss_value),
                        "grad_norm": _json_number(grad_norm), "lr": lr, "action": "stop" if stop else "skip"})
                if stop:
                    bar.close()
                    kept = latest_checkpoint(run_dir) if rank0 else None
                    why = (f"{skipped_in_row} steps in a row (--max-skipped-steps {cfg.max_skipped_steps})"
                           if cfg.on_nonfinite == "skip" else "--on-nonfinite stop")
                    raise DivergenceError(
                        f"step {done}: the loss is {loss_value} and the gradient norm {grad_norm}: not finite, so "
                        f"the update was not applied and training stopped ({why}). No checkpoint was written after "
                        "it" + (f"; the newest good one is {kept}" if kept else "") + ". Lower --lr or lengthen "
                        "--warmup-steps and resume, or pass --on-nonfinite skip to skip such steps")
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda" and (log_now or profiled):
                torch.cuda.synchronize(device)  # once per record: the step times and the timer's events are read
            dt = time.perf_counter() - t0
            cpu_dt = time.process_time() - c0
        step_times.append(dt)
        since_record.add(dt, cpu_dt)
        if step == start_step:
            state_mb = _state_memory_mb(device, before_first_step_mb, optimizer)
        if log_now:
            step_s = since_record.mean_step_s()
            rec = {"kind": "train", "step": done, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                   "step_time_s": step_s, "tokens_per_s": tokens_per_step / step_s,
                   "peak_memory_mb": peak_memory_mb(device), "cpu_time_s": since_record.cpu_s / since_record.steps}
            rec.update(step_breakdown(timer.collect(), since_record.time_s, since_record.steps))
            if dry_run:
                for key in ("loss", "grad_norm"):
                    rec.pop(key)
            record(rec)
            since_line.add_record(rec, since_record.steps)
            since_record = _Interval()
            if rank0 and (done % line_every == 0 or done == cfg.steps):
                bar.write(breakdown_line(since_line.mean_record(), since_line.first_step, done))
                since_line = _Interval()
        if profiled:
            prec = profile_record(prof, device, done, dt, run_dir)
            record(prec)
            if rank0:
                bar.write(profile_line(prec))
        if dry_run:
            bar.update(step_s=f"{dt:.2f}", peak_mib=f"{peak_memory_mb(device):,.0f}")
            continue
        if skipped_in_row:
            bar.update(loss=f"{loss_value}", skipped=str(skipped_in_row))
            continue
        bar.update(loss=f"{loss_value:.4f}", tok_s=f"{tokens_per_step / dt:,.0f}")
        if cfg.eval_interval and done % cfg.eval_interval == 0 and done != cfg.steps:
            timer.enabled = False
            record({"kind": "eval", "step": done, "val_loss": evaluate(model, dataset, cfg, groups, device, autocast)})
            timer.enabled = True
        if cfg.checkpoint_interval and done % cfg.checkpoint_interval == 0 and done != cfg.steps:
            last_ckpt = _save(cfg, groups, rank0, model, optimizer, scheduler, done, history, dataset)
    timer.enabled = False
    attach_timer(model, None)
    bar.close()

    final_val = None
    if not dry_run and (start_step < cfg.steps or
                        not any(h.get("kind") == "eval" and h["step"] == cfg.steps for h in history)):
        final_val = evaluate(model, dataset, cfg, groups, device, autocast)
        record({"kind": "eval", "step": cfg.steps, "val_loss": final_val})
    if start_step < cfg.steps and not dry_run:
        last_ckpt = _save(cfg, groups, rank0, model, optimizer, scheduler, cfg.steps, history, dataset)
    train_losses = [h["loss"] for h in history if h.get("kind") == "train" and "loss" in h]
    final_loss = train_losses[-1] if train_losses else float("nan")
    plot = None
    if rank0 and cfg.plot and not dry_run:
        plot = plot_history(history, os.path.join(run_dir, "loss.png"),
                            title=f"{cfg.model.pattern} x{cfg.model.n_layers}, dp={groups.dp_size} sp={groups.sp_size}")
    peak = peak_memory_mb(device)
    mean_dt = sum(step_times[1:]) / max(1, len(step_times) - 1) if len(step_times) > 1 else (step_times[0] if step_times else 0.0)
    if rank0:
        if dry_run:
            summary = (f"dry run: peak memory/rank {peak:.0f} MiB; state kept between steps {state_mb:.0f} MiB; "
                       f"step time {mean_dt:.3f} s")
        else:
            summary = (f"final train loss {final_loss:.4f}, held-out loss {final_val if final_val is None else round(final_val, 4)}; "
                       f"peak memory/rank {peak:.0f} MiB; step time {mean_dt:.3f} s; run dir {os.path.abspath(run_dir)} "
                       f"(log {log_path}, metrics {jsonl_path}, plot {plot}, checkpoint {last_ckpt})")
        logger.info(summary)
    return TrainResult(final_loss, final_val, history, run_dir, log_path, jsonl_path, plot, last_ckpt, peak, mean_dt,
                       n_params, model if return_model else None, state_mb)


def compile_backend() -> str:
    """torch.compile's backend here: "inductor" when a C++ compiler is on PATH (inductor's CPU
    code needs one; on GPU it emits Triton), else "aot_eager" (traced, no code generation)."""
    if torch.cuda.is_available() or any(shutil.which(c) for c in (os.environ.get("CXX", ""), "c++", "g++", "clang++") if c):
        return "inductor"
    return "aot_eager"


def compile_layers(model: nn.Module) -> None:
    """torch.compile each decoder layer in place (torchtitan's granularity: one graph per layer,
    reused by every layer of the same kind), before FSDP2 wraps them."""
    backend = compile_backend()
    for layer in model.layers:
        layer.compile(backend=backend)


def _data_source(dataset: Any) -> dict[str, Any] | None:
    """What identifies a token-file dataset's content (``TokenDataset.state()``), None for the
    built-in sources (their content follows from the config)."""
    state = getattr(dataset, "state", None)
    return state() if callable(state) else None


def data_source_changes(saved: dict[str, Any] | None, current: dict[str, Any] | None) -> list[str]:
    """How the token files differ from those a checkpoint was trained on (files, token counts,
    dtype, end-of-document id, vocabulary), as lines for :class:`ResumeConfigError`. The path
    itself may change (a moved directory); the content may not, since the row order follows
    from it. Empty when either side is not a token file."""
    if not saved or not current:
        return []
    keys = ("train_files", "val_files", "dtype", "eos_id", "vocab_size")
    return [f"data {key}: {saved.get(key)} -> {current.get(key)}" for key in keys
            if saved.get(key) != current.get(key)]


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective for partial / sharded ones), or ``t``."""
    full_tensor = getattr(t, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else t


def _sharded_group(grads: Sequence[torch.Tensor]) -> Any:
    """The process group when every gradient is a DTensor sharded (``Shard`` only) over one 1-D
    mesh, in one dtype on one device, as FSDP2 leaves them: each element then lives on exactly
    one rank. Else None."""
    from torch.distributed.tensor import DTensor, Shard

    mesh = None
    for g in grads:
        if not isinstance(g, DTensor) or g.device_mesh.ndim != 1 or \
                not all(isinstance(p, Shard) for p in g.placements) or \
                (g.dtype, g.device) != (grads[0].dtype, grads[0].device):
            return None
        if mesh is None:
            mesh = g.device_mesh
        elif g.device_mesh != mesh:
            return None
    return None if mesh is None else mesh.get_group()


def gradient_norm(params: Sequence[torch.Tensor], clip: float) -> torch.Tensor:
    """The global norm of the gradients (FSDP2's sharded ones included), after clipping them to
    ``clip`` when ``clip > 0`` (``clip_grad_norm_``'s rule: scale by clip / (norm + 1e-6) when
    that is < 1); the same number on every rank.

    FSDP2's sharded gradients take one fused norm of the local shards and one all-reduce of the
    sum of squares (what DTensor does, without its per-tensor dispatch); other gradients go
    through ``torch.nn.utils``."""
    grads = [p.grad for p in params if p.grad is not None]
    group = _sharded_group(grads)
    if group is None:
        if clip > 0:
            return _full(nn.utils.clip_grad_norm_(params, clip))
        return _full(nn.utils.get_total_norm(grads))
    local = [g.to_local() for g in grads]
    norms = torch._foreach_norm(local, 2.0)
    squares = torch.stack([n.to(torch.float64) for n in norms]).square().sum()
    dist.all_reduce(squares, group=group)
    norm = squares.sqrt().to(grads[0].dtype)
    if clip > 0:
        scale = (clip / (norm + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(local, scale.to(local[0].dtype))
    return norm


def _state_memory_mb(device: torch.device, before_first_step_mb: float, optimizer: torch.optim.Optimizer) -> float:
    """Memory this rank keeps between steps (parameters, optimizer state, the process itself):
    allocated CUDA memory after the first step, or on CPU the RSS before it plus the optimizer
    state the first step created (the RSS itself never shrinks)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2 ** 20
    state = sum(local_shard(t).numel() * t.element_size() for st in optimizer.state.values() for t in st.values()
                if isinstance(t, torch.Tensor))
    return before_first_step_mb + state / 2 ** 20


def _save(cfg: TrainConfig, groups: SequenceParallelGroups, rank0: bool, model: nn.Module, optimizer: Any,
          scheduler: Any, step: int, history: list[dict[str, Any]], dataset: Any = None) -> str | None:
    """Save (every rank its shards, rank 0 the trainer state and marker), then prune (rank 0);
    a failure (full disk, non-finite state) is raised on every rank."""
    path = checkpoint_path(cfg.run_dir, step)
    if cfg.keep_checkpoints == 0:
        return None
    save_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, step=step,
                    data_state={"batches_consumed": step, "seed": cfg.seed, "data": cfg.data, "packing": cfg.packing,
                                "source": _data_source(dataset)},
                    config=cfg.to_dict(), history=history, group=job_group(groups))
    problem = ""
    if rank0:
        try:
            prune_checkpoints(cfg.run_dir, cfg.keep_checkpoints)
        except OSError as e:
            problem = f"cannot prune old checkpoints in {cfg.run_dir}: {e}"
    problem = agree(groups, problem)
    if problem:
        raise CheckpointError(problem)
    return path


# ---------------------------------------------------------------------------------------------
# Command line.


def _arg_type(type_str: str):
    if "bool" in type_str:
        return bool
    if "int" in type_str:
        return int
    if "float" in type_str:
        return float
    return str


def program_name(argv0: str | None = None) -> str:
    """How the user started the trainer, for usage lines: ``seqpar-train``,
    ``python -m seqpar.train`` or the script's name."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    norm = argv0.replace(os.sep, "/")
    if norm.endswith("seqpar/train.py") or norm in ("-m", "-c", ""):
        return "python -m seqpar.train"
    if os.path.basename(argv0) == "seqpar-train":
        return "seqpar-train"
    return argv0  # a script, as typed (examples/train_hybrid.py)


def _preset_summary(name: str) -> str:
    m, t = MODEL_PRESETS[name], TRAIN_PRESETS[name]
    return f"{name} (dim {m['dim']}, {m['n_layers']} layers {m['pattern']}, {t['batch_size']} x {t['seq_len']} tokens)"


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else str(value)


def build_parser(defaults: TrainConfig | None = None, prog: str | None = None) -> argparse.ArgumentParser:
    """Every field of ModelConfig, SequenceParallelConfig and TrainConfig as ``--field-name``, one
    line of help each, with the allowed values and the value it takes when not given (that of
    ``defaults``: the preset, a ``--config`` file and the flags already given). Unset flags parse
    as None, so :func:`config_from_args` can tell them from the preset's values."""
    defaults = defaults if defaults is not None else preset("tiny")
    p = argparse.ArgumentParser(
        prog=prog or program_name(), usage="%(prog)s [--preset NAME] [--sp N] [--FIELD VALUE ...]",
        description="Train the hybrid softmax / linear-attention model with data x sequence parallelism.",
        epilog="Under torchrun every process runs this program; --sp must divide the number of processes "
               "(the rest are data-parallel replicas). Defaults shown are those of the chosen preset and "
               "of the flags already given.")
    p.add_argument("--preset", default="tiny", choices=sorted(TRAIN_PRESETS), metavar="{" + ",".join(TRAIN_PRESETS) + "}",
                   help="model + training preset: " + "; ".join(_preset_summary(n) for n in TRAIN_PRESETS)
                   + " (default: tiny)")
    p.add_argument("--config", default=None, metavar="JSON",
                   help="start from a TrainConfig JSON (as written to run_dir/config.json) instead of a preset; flags override it")
    p.add_argument("--fake-world-size", type=int, default=0, metavar="N",
                   help="dry run: ONE real rank of an N-rank job on torch's fake process group (no-op collectives); "
                        "reports memory, step time, bytes sent and the longest sequence that fits")
    p.add_argument("--fake-rank", type=int, default=0, metavar="R", help="the rank a dry run runs (default: 0)")
    p.add_argument("--fake-memory-gib", type=float, default=None, metavar="GIB",
                   help="dry run: memory per rank of the real job, for the longest-sequence estimate "
                        "(default: this GPU's memory, or this host's)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run dir that already holds a run, deleting its logs and checkpoints")
    p.add_argument("--allow-change", action="append", default=[], metavar="FIELD",
                   help="on resume, accept a new value of this model / data field (repeat or comma-separate; one of "
                        + ", ".join(SEMANTIC_FIELDS) + "); other changes of them are refused")
    sections = (("model", ModelConfig, defaults.model, ()),
                ("sequence parallelism", SequenceParallelConfig, defaults.sp, ()),
                ("training", TrainConfig, defaults, ("model", "sp")))
    for title, cls, values, skip in sections:
        g = p.add_argument_group(title)
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            flags = ["--" + f.name.replace("_", "-")]
            if f.name == "sp_size":
                flags.append("--sp")
            help_text = f"{FIELD_HELP[f.name]} (default: {_shown(getattr(values, f.name))})"
            t = _arg_type(str(f.type))
            if t is bool:
                g.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            else:
                metavar = {int: "N", float: "X"}.get(t, "PATH" if f.name in ("run_dir", "resume", "data") else "NAME")
                g.add_argument(*flags, dest=f.name, type=t, default=None, choices=FIELD_CHOICES.get(f.name),
                               metavar=None if f.name in FIELD_CHOICES else metavar, help=help_text)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Preset (or --config JSON), then every flag that was given."""
    if args.config:
        with open(args.config) as fh:
            base = json.load(fh)
        model, sp = dict(base.pop("model")), dict(base.pop("sp"))
    else:
        base = dict(TRAIN_PRESETS[args.preset])
        model, sp = dict(MODEL_PRESETS[args.preset]), {}
    given = {k: v for k, v in vars(args).items() if v is not None}
    for f in dataclasses.fields(ModelConfig):
        if f.name in given:
            model[f.name] = given[f.name]
    data = given.get("data", base.get("data", "stdlib"))
    if "vocab_size" not in given and not args.config and data not in ("stdlib", "synthetic") and os.path.exists(data):
        # a token file's vocabulary (its sidecar says it) sizes the model unless --vocab-size is given
        from seqpar.data import TokenDataset

        try:
            model["vocab_size"] = TokenDataset(data, dtype=given.get("data_dtype"), eos_id=given.get("eos_id"),
                                               vocab_size=None).vocab_size
        except (ValueError, OSError):
            pass  # the trainer's own make_dataset call reports what is wrong
    for f in dataclasses.fields(SequenceParallelConfig):
        if f.name in given:
            sp[f.name] = given[f.name]
    for f in dataclasses.fields(TrainConfig):
        if f.name in given and f.name not in ("model", "sp"):
            base[f.name] = given[f.name]
    return TrainConfig(model=ModelConfig(**model), sp=SequenceParallelConfig(**sp), **base)


def _requested_sp(args: argparse.Namespace) -> int:
    if args.sp_size is not None:
        return args.sp_size
    if args.config:
        with open(args.config) as fh:
            return int(json.load(fh).get("sp", {}).get("sp_size", 1))
    return 1


def world_error(sp: int, world: int, prog: str, fake: bool) -> str | None:
    """What is wrong (and what to do) when ``sp`` ranks per sequence cannot be cut from ``world``
    processes; None when they can."""
    if sp < 1:
        return f"--sp must be >= 1, got {sp}"
    if sp > world and world == 1 and not fake:
        target = "-m seqpar.train" if prog in ("python -m seqpar.train", "seqpar-train") else prog
        return (f"--sp {sp} splits each sequence over {sp} processes, but this is a single process. Start {sp} "
                f"with torchrun: torchrun --nproc-per-node {sp} {target} --sp {sp} ... (on CPU they use gloo), "
                f"or check the split on one process with --fake-world-size {sp}")
    if sp > world:
        return (f"--sp {sp} is larger than the number of processes ({world}{' fake' if fake else ''}): "
                f"use --sp <= {world} or start {sp} processes (torchrun --nproc-per-node {sp})")
    if world % sp != 0:
        divisors = [d for d in range(1, world + 1) if world % d == 0]
        return (f"--sp {sp} does not divide the number of processes ({world}): the processes form world / sp "
                f"data-parallel replicas of sp ranks each; use --sp in {divisors}")
    return None


def cpu_threads_per_rank(cfg: TrainConfig, world: int, local_ranks: int, cpus: int | None = None) -> int:
    """Intra-op threads for one CPU rank when the user has not set OMP_NUM_THREADS: the cores
    shared evenly among this host's ranks, but one thread for small steps (fewer than 2^18
    token x width elements per rank), whose work is too small to split and which several
    threads per process on a busy machine slow down several-fold."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if local_tokens_per_step(cfg, world) * cfg.model.dim < 2 ** 18:
        return 1
    return max(1, cpus // max(1, local_ranks))


def dry_run_report(cfg: TrainConfig, result: TrainResult, world: int, rank: int, memory_gib: float | None,
                   device: torch.device) -> str:
    """What a dry run is for: this rank's peak memory and step time, the bytes it would send per
    step (cost model) and the longest sequence that would fit (linear extrapolation)."""
    from seqpar.cost_model import step_bytes_per_rank

    sp, dp = cfg.sp.sp_size, world // cfg.sp.sp_size
    batch_per_replica = max(1, cfg.batch_size // dp)
    local_tokens = local_tokens_per_step(cfg, world)
    element_bytes = 2 if uses_amp(cfg, device) else _DTYPES[cfg.dtype].itemsize
    bytes_ = step_bytes_per_rank(cfg.model, cfg.sp, cfg.seq_len, batch_per_replica, element_bytes,
                                 result.num_params, dp_size=dp, param_bytes=element_bytes)
    if memory_gib is None:
        if device.type == "cuda":
            memory_gib = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
            where = f"this GPU's {memory_gib:.1f} GiB"
        else:
            memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
            where = f"this host's {memory_gib:.1f} GiB"
    else:
        where = f"{memory_gib:.1f} GiB (--fake-memory-gib)"
    per_token_mb = max(result.peak_memory_mb - result.state_memory_mb, 1e-9) / local_tokens
    fits_local = (memory_gib * 1024 - result.state_memory_mb) / per_token_mb / batch_per_replica
    divisor = cfg.sp.length_divisor
    fits = int(fits_local * sp) // divisor * divisor
    mib = 2 ** 20
    peak_what = "CUDA allocator peak" if device.type == "cuda" else "process max RSS"
    lines = [
        f"dry run: rank {rank} of {world} (dp {dp} x sp {sp}, layout {cfg.sp.layout}) on torch's fake process group. "
        "Collectives are no-ops, so losses and gradient norms are meaningless and not shown; memory and "
        "compute are this rank's real ones.",
        f"  sequence: {cfg.seq_len:,} tokens x {batch_per_replica} per replica; this rank holds {local_tokens:,} tokens",
        f"  peak memory of this rank: {result.peak_memory_mb / 1024:.2f} GiB ({peak_what}); "
        f"kept between steps: {result.state_memory_mb / 1024:.2f} GiB",
        f"  step time: {result.mean_step_time_s:.3f} s (mean after the first step; communication not included)",
        f"  bytes this rank sends per step (cost model, {element_bytes}-byte activations): attention forward "
        f"{bytes_.attention_forward / mib:,.1f} MiB, backward {bytes_.attention_backward / mib:,.1f} MiB, FSDP2 "
        f"parameter gathers and gradient reduce-scatter {bytes_.fsdp / mib:,.1f} MiB",
        f"  longest sequence that fits in {where} per rank: about {fits:,} tokens "
        f"(activation memory grows linearly with the local length: {per_token_mb * 1024:.2f} KiB per local token here)",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Entry point of ``python -m seqpar.train`` / ``seqpar-train`` (torchrun sets the ranks).
    ``prog`` names the program in usage and error messages (default: how it was started)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or program_name()
    parser = build_parser(prog=prog)
    if "-h" in argv or "--help" in argv:
        # show the defaults of the chosen preset / config and of the flags given before --help
        given = [a for a in argv if a not in ("-h", "--help")]
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                shown = config_from_args(parser.parse_args(given))
        except (SystemExit, ValueError, TypeError, OSError):
            shown = None
        build_parser(shown, prog=prog).parse_args(["--help"])
    args = parser.parse_args(argv)
    if args.fake_world_size < 0:
        parser.error(f"--fake-world-size must be >= 0 (0: no dry run), got {args.fake_world_size}")
    if args.fake_memory_gib is not None and not args.fake_memory_gib > 0:
        parser.error(f"--fake-memory-gib must be > 0, got {args.fake_memory_gib}")
    fake = args.fake_world_size > 0
    world = args.fake_world_size if fake else int(os.environ.get("WORLD_SIZE", "1"))
    try:
        problem = world_error(_requested_sp(args), world, prog, fake)
    except (OSError, ValueError) as e:
        problem = f"--config {args.config}: {e}"
    if problem is None:
        problem = overwrite_conflict(args.overwrite, args.resume)
    if problem is None and fake and not 0 <= args.fake_rank < args.fake_world_size:
        problem = f"--fake-rank {args.fake_rank} is outside 0..{args.fake_world_size - 1}"
    if problem is not None:
        parser.error(problem)
    try:
        cfg = config_from_args(args)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    allow_changes = tuple(name for item in args.allow_change for name in item.split(",") if name)
    try:
        check_allow_changes(allow_changes)
    except ValueError as e:
        parser.error(str(e))
    exit_with_launcher()  # under torchrun: never outlive the launcher
    if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(cpu_threads_per_rank(cfg, world, local_ranks))
    if fake:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=args.fake_rank, world_size=args.fake_world_size)
        # no-op collectives leave receive buffers uninitialised: keep denormal garbage from
        # slowing the CPU arithmetic down (the numbers are meaningless anyway)
        torch.set_flush_denormal(True)
    elif "RANK" in os.environ or cfg.sp.sp_size > 1:
        from seqpar.comm.groups import init_distributed

        init_distributed(timeout_s=cfg.timeout_s)
    if dist.is_initialized():
        groups, attn_group = make_groups(cfg.sp, cfg.timeout_s, _device(cfg).type)
    else:
        groups, attn_group = None, None
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 or fake:
        threads = torch.get_num_threads()
        print(f"{prog}: world {world}{' (fake)' if fake else ''} = dp {world // cfg.sp.sp_size} x sp {cfg.sp.sp_size}; "
              f"preset {args.preset if not args.config else args.config}; pattern {cfg.model.pattern} x "
              f"{cfg.model.n_layers} layers; {threads} CPU thread{'s' if threads > 1 else ''} per rank", flush=True)
    try:
        try:
            result = train(cfg, groups, attn_group, dry_run=fake, overwrite=args.overwrite, allow_changes=allow_changes)
        except (RunDirectoryError, ResumeConfigError, DivergenceError, CheckpointError) as e:
            if rank == 0 or fake:
                print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
            return EXIT_CODES[type(e)] if type(e) in EXIT_CODES else 4
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if fake:
        print(dry_run_report(cfg, result, world, args.fake_rank, args.fake_memory_gib, _device(cfg)), flush=True)
    elif rank == 0:
        print(f"final train loss {result.final_loss:.4f}; held-out loss "
              f"{'n/a' if result.final_val_loss is None else f'{result.final_val_loss:.4f}'}; "
              f"{result.num_params:,} parameters; peak memory/rank {result.peak_memory_mb:.0f} MiB; "
              f"mean step time {result.mean_step_time_s:.3f} s", flush=True)
        print(f"logs: {os.path.abspath(result.log_path)} and {os.path.abspath(result.jsonl_path)}", flush=True)
        print(f"plot: {os.path.abspath(result.plot_path) if result.plot_path else 'none'}; "
              f"checkpoint: {result.checkpoint}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
