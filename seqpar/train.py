"""Train the hybrid model with data x sequence parallelism: ``python -m seqpar.train``.

The world (torchrun's ranks) is split into ``world / sp`` data-parallel replicas of ``sp``
consecutive ranks (:func:`seqpar.comm.make_data_sequence_groups`). Every rank of a replica
reads the same global sequences, keeps its tokens (:func:`seqpar.parallelize.shard_batch`),
and the attention layers talk across the replica. Gradients are summed over sp and dp
(:func:`seqpar.parallelize.sync_gradients`), clipped by their global norm, and AdamW with a
cosine schedule updates the replicated parameters.

Run dir: ``config.json``, ``train.jsonl`` (one JSON record per logged step / evaluation),
``train.log`` (the same as text), ``loss.png`` and ``checkpoints/step_*.pt``.

``--fake-world-size N`` runs ONE real rank (``--fake-rank``) of an N-rank job on torch's fake
process group: every collective is a no-op, so the numbers are meaningless but the memory and
time of that rank are those of the real job (minus communication).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from seqpar.checkpoint import (checkpoint_path, latest_checkpoint, load_checkpoint, prune_checkpoints,
                               save_checkpoint)
from seqpar.comm.groups import SequenceParallelGroups
from seqpar.config import MODEL_PRESETS, TRAIN_PRESETS, ModelConfig, SequenceParallelConfig, TrainConfig
from seqpar.data import make_dataset
from seqpar.model import HybridLM
from seqpar.parallelize import (make_groups, parallelize_model, sequence_parallel_loss, shard_batch,
                                sync_gradients)

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


def lr_lambda(cfg: TrainConfig):
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` at ``steps``."""

    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (weight decay on matrices only) and its cosine LambdaLR schedule."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device != "auto":
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


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


def _local_groups(groups: SequenceParallelGroups | None) -> SequenceParallelGroups:
    return groups if groups is not None else SequenceParallelGroups(None, None, 1, 1, 0, 0)


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
                logits = model(sb.tokens, sb.positions)
            total += float(sequence_parallel_loss(logits, sb.labels, groups)[1])
    model.train(was_training)
    return total / cfg.eval_batches


def train(cfg: TrainConfig, groups: SequenceParallelGroups | None = None, attention_group: Any = None,
          return_model: bool = False) -> TrainResult:
    """Run ``cfg`` on this rank. ``groups`` (dp x sp) default to one process; ``attention_group``
    (what :func:`parallelize_model` gets) defaults to ``groups.sp``."""
    groups = _local_groups(groups)
    if groups.sp_size != cfg.sp.sp_size:
        raise ValueError(f"the sequence-parallel group has {groups.sp_size} ranks but the config says sp_size={cfg.sp.sp_size}")
    if cfg.batch_size % groups.dp_size != 0:
        raise ValueError(f"global batch_size {cfg.batch_size} is not divisible by the data-parallel size {groups.dp_size}")
    if attention_group is None:
        attention_group = groups.sp
    rank0 = groups.dp_rank == 0 and groups.sp_rank == 0
    device = _device(cfg)
    dtype = _DTYPES[cfg.dtype]
    use_amp = cfg.amp and device.type == "cuda" and dtype == torch.float32

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else nullcontext()

    torch.manual_seed(cfg.seed)  # the same initial parameters on every rank
    model = HybridLM(cfg.model).to(dtype=dtype)
    model = model.to(device)
    if cfg.sp.sp_size > 1 or device.type == "cuda":  # on GPU even sp=1 goes through seqpar's Triton kernels
        parallelize_model(model, cfg.sp, attention_group)
    model.activation_checkpointing = cfg.activation_checkpointing
    model.train()
    optimizer, scheduler = build_optimizer(model, cfg)
    dataset = make_dataset(cfg.data, max_bytes=cfg.max_corpus_bytes, val_fraction=cfg.val_fraction,
                           vocab_size=cfg.model.vocab_size)

    run_dir = cfg.run_dir
    os.makedirs(run_dir, exist_ok=True)
    jsonl_path = os.path.join(run_dir, "train.jsonl")
    log_path = os.path.join(run_dir, "train.log")
    history: list[dict[str, Any]] = []
    start_step = 0
    resume = latest_checkpoint(run_dir) if cfg.resume == "auto" else cfg.resume
    if resume:
        state = load_checkpoint(resume, model=model, optimizer=optimizer, scheduler=scheduler)
        start_step = int(state["step"])
        history = [h for h in state.get("history", []) if h.get("step", 0) <= start_step]
        if state.get("data", {}).get("batches_consumed", start_step) != start_step:
            raise ValueError(f"checkpoint {resume}: data position {state['data']} disagrees with step {start_step}")

    logger = _text_logger(log_path) if rank0 else None
    jsonl = open(jsonl_path, "a") if rank0 else None
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
        logger.info(f"start: {n_params:,} parameters, dp={groups.dp_size} sp={groups.sp_size} device={device} "
                    f"layer kinds={cfg.model.layer_kinds} resume={resume} start_step={start_step}")

    sp_group = groups.sp if groups.sp_size > 1 else None
    params = [p for p in model.parameters() if p.requires_grad]
    tokens_per_step = cfg.batch_size * cfg.seq_len
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not (rank0 and cfg.progress), dynamic_ncols=True,
               desc="train", unit="step")
    step_times: list[float] = []
    last_ckpt = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(start_step, cfg.steps):
        t0 = time.perf_counter()
        batch = dataset.batch(step, cfg.batch_size, cfg.seq_len, seed=cfg.seed, dp_rank=groups.dp_rank,
                              dp_size=groups.dp_size)
        sb = shard_batch(batch.tokens.to(device), batch.labels.to(device), cfg.sp.layout, sp_group)
        with autocast():
            logits = model(sb.tokens, sb.positions)
        share, loss = sequence_parallel_loss(logits, sb.labels, groups)
        share.backward()
        del logits, share
        sync_gradients(params, groups)
        if cfg.grad_clip > 0:
            grad_norm = float(nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        step_times.append(dt)
        done = step + 1
        if done % cfg.log_interval == 0 or done == cfg.steps:
            record({"kind": "train", "step": done, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                    "step_time_s": dt, "tokens_per_s": tokens_per_step / dt,
                    "peak_memory_mb": peak_memory_mb(device)})
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tokens_per_step / dt:,.0f}")
        if cfg.eval_interval and done % cfg.eval_interval == 0 and done != cfg.steps:
            record({"kind": "eval", "step": done, "val_loss": evaluate(model, dataset, cfg, groups, device, autocast)})
        if cfg.checkpoint_interval and done % cfg.checkpoint_interval == 0 and done != cfg.steps:
            last_ckpt = _save(cfg, rank0, model, optimizer, scheduler, done, history)
    bar.close()

    final_val = None
    if start_step < cfg.steps or not any(h.get("kind") == "eval" and h["step"] == cfg.steps for h in history):
        final_val = evaluate(model, dataset, cfg, groups, device, autocast)
        record({"kind": "eval", "step": cfg.steps, "val_loss": final_val})
    if start_step < cfg.steps:
        last_ckpt = _save(cfg, rank0, model, optimizer, scheduler, cfg.steps, history)
    train_losses = [h["loss"] for h in history if h.get("kind") == "train"]
    final_loss = train_losses[-1] if train_losses else float("nan")
    plot = None
    if rank0 and cfg.plot:
        plot = plot_history(history, os.path.join(run_dir, "loss.png"),
                            title=f"{cfg.model.pattern} x{cfg.model.n_layers}, dp={groups.dp_size} sp={groups.sp_size}")
    peak = peak_memory_mb(device)
    mean_dt = sum(step_times[1:]) / max(1, len(step_times) - 1) if len(step_times) > 1 else (step_times[0] if step_times else 0.0)
    if rank0:
        summary = (f"final train loss {final_loss:.4f}, held-out loss {final_val if final_val is None else round(final_val, 4)}; "
                   f"peak memory/rank {peak:.0f} MiB; step time {mean_dt:.3f} s; run dir {os.path.abspath(run_dir)} "
                   f"(log {log_path}, metrics {jsonl_path}, plot {plot}, checkpoint {last_ckpt})")
        logger.info(summary)
        for h in logger.handlers:
            h.close()
        jsonl.close()
    return TrainResult(final_loss, final_val, history, run_dir, log_path, jsonl_path, plot, last_ckpt, peak, mean_dt,
                       n_params, model if return_model else None)


def _save(cfg: TrainConfig, rank0: bool, model: nn.Module, optimizer: Any, scheduler: Any, step: int,
          history: list[dict[str, Any]]) -> str | None:
    path = checkpoint_path(cfg.run_dir, step)
    if cfg.keep_checkpoints == 0:
        return None
    if rank0:
        save_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, step=step,
                        data_state={"batches_consumed": step, "seed": cfg.seed, "data": cfg.data},
                        config=cfg.to_dict(), history=history)
        prune_checkpoints(cfg.run_dir, cfg.keep_checkpoints)
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


def build_parser() -> argparse.ArgumentParser:
    """Every field of ModelConfig, SequenceParallelConfig and TrainConfig as ``--field-name``
    (unset flags keep the preset's value)."""
    p = argparse.ArgumentParser(prog="python -m seqpar.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(TRAIN_PRESETS), help="model + training preset")
    p.add_argument("--config", default=None, help="a JSON TrainConfig (as written to run_dir/config.json); flags override it")
    p.add_argument("--fake-world-size", type=int, default=0,
                   help="run ONE rank of a job of this many ranks on torch's fake process group (no-op collectives)")
    p.add_argument("--fake-rank", type=int, default=0, help="the rank to run with --fake-world-size")
    for title, cls, skip in (("model", ModelConfig, ()), ("sequence parallelism", SequenceParallelConfig, ()),
                             ("training", TrainConfig, ("model", "sp"))):
        g = p.add_argument_group(title)
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            flags = ["--" + f.name.replace("_", "-")]
            if f.name == "sp_size":
                flags.append("--sp")
            t = _arg_type(str(f.type))
            if t is bool:
                g.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
            else:
                g.add_argument(*flags, dest=f.name, type=t, default=None, help=f"(default: preset / {f.default!r})"
                               if f.default is not dataclasses.MISSING else None)
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
    for f in dataclasses.fields(SequenceParallelConfig):
        if f.name in given:
            sp[f.name] = given[f.name]
    for f in dataclasses.fields(TrainConfig):
        if f.name in given and f.name not in ("model", "sp"):
            base[f.name] = given[f.name]
    return TrainConfig(model=ModelConfig(**model), sp=SequenceParallelConfig(**sp), **base)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m seqpar.train`` / ``seqpar-train`` (torchrun sets the ranks)."""
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    fake = args.fake_world_size > 0
    if fake:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        if not 0 <= args.fake_rank < args.fake_world_size:
            raise ValueError(f"--fake-rank {args.fake_rank} outside 0..{args.fake_world_size - 1}")
        dist.init_process_group("fake", store=FakeStore(), rank=args.fake_rank, world_size=args.fake_world_size)
        # no-op collectives leave receive buffers uninitialised: keep denormal garbage from
        # slowing the CPU arithmetic down (the numbers are meaningless anyway)
        torch.set_flush_denormal(True)
    elif "RANK" in os.environ or cfg.sp.sp_size > 1:
        from seqpar.comm.groups import init_distributed

        init_distributed()
    if dist.is_initialized():
        groups, attn_group = make_groups(cfg.sp)
    else:
        groups, attn_group = None, None
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 or fake:
        world = dist.get_world_size() if dist.is_initialized() else 1
        print(f"seqpar.train: world {world}{' (fake)' if fake else ''} = dp {world // cfg.sp.sp_size} x sp {cfg.sp.sp_size}; "
              f"preset {args.preset}; pattern {cfg.model.pattern} x {cfg.model.n_layers} layers", flush=True)
    try:
        result = train(cfg, groups, attn_group)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0 or fake:
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
