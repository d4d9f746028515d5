"""Checkpoints that resume with a different sequence- (or data-) parallel size.

Under sequence parallelism every rank holds the same parameters and the same optimiser state
(gradients are summed before the update, see :mod:`seqpar.parallelize`), and the model's
state dict holds nothing about the group (``context_parallel`` is a plain attribute, not a
buffer). So one rank (rank 0 of the world) saves model + optimiser + scheduler + step + data
position + config + metric history to a single file, and any layout of the world loads it.
"""
from __future__ import annotations

import os
import re
from typing import Any

import torch
import torch.nn as nn

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_path(run_dir: str, step: int) -> str:
    """``run_dir/checkpoints/step_{step:08d}.pt``."""
    return os.path.join(run_dir, CHECKPOINT_DIR, f"step_{step:08d}.pt")


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the checkpoints in ``run_dir``, oldest first."""
    folder = os.path.join(run_dir, CHECKPOINT_DIR)
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), os.path.join(folder, name)) for name in os.listdir(folder)
             if (m := _NAME.match(name))]
    return sorted(found)


def latest_checkpoint(run_dir: str) -> str | None:
    """Path of the newest checkpoint in ``run_dir``, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(path: str, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, step: int = 0, data_state: dict[str, Any] | None = None,
                    config: dict[str, Any] | None = None, history: list[dict[str, Any]] | None = None) -> str:
    """Write one checkpoint atomically (temporary file, then rename). Call on one rank only."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    state = {
        "format": "seqpar-1",
        "step": step,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "data": data_state or {},
        "config": config or {},
        "history": history or [],
    }
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None) -> dict[str, Any]:
    """Load a checkpoint into ``model`` (and optimiser / scheduler when given) on any rank.

    Returns the whole checkpoint dict (``step``, ``data``, ``config``, ``history``...).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("format") != "seqpar-1":
        raise ValueError(f"{path} is not a seqpar checkpoint (format {state.get('format')!r})")
    model.load_state_dict(state["model"])
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    return state


def prune_checkpoints(run_dir: str, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints of ``run_dir`` (keep 0: delete none)."""
    if keep <= 0:
        return
    for _, path in list_checkpoints(run_dir)[:-keep]:
        os.remove(path)
