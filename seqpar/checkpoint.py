"""Verified checkpoints that resume with a different sequence- (or data-) parallel size.

Under sequence parallelism every rank holds the same parameters and the same optimiser state
(gradients are summed before the update, see :mod:`seqpar.parallelize`), and the model's
state dict holds nothing about the group (``context_parallel`` is a plain attribute, not a
buffer). So one rank (rank 0 of the world) saves model + optimiser + scheduler + step + data
position + config + metric history to a single file, and any layout of the world loads it.

Every checkpoint is two files, written in this order:

* ``step_XXXXXXXX.pt``: the state (``torch.save``), written to ``.pt.tmp``, fsynced, renamed,
  and the directory fsynced: a crash never leaves a half-written ``.pt`` under the real name;
* ``step_XXXXXXXX.json``: the completion marker, written the same way once the ``.pt`` is on
  disk: its size in bytes and its SHA-256 (computed while writing, one pass).

:func:`verify_checkpoint` checks both; :func:`load_checkpoint` verifies, then loads with
``torch.load(weights_only=True)`` (tensors and plain containers only: a checkpoint file cannot
run code). A ``.pt`` without its marker (a kill between the two renames, or a file written by
seqpar 0.1) is incomplete. :func:`newest_valid_checkpoint` walks back from the newest one and
reports every checkpoint it skips, by name and reason. Parameters and optimiser state are
checked to be finite before saving: a diverged model is never written.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from typing import Any, BinaryIO

import torch
import torch.nn as nn

CHECKPOINT_DIR = "checkpoints"
FORMAT = "seqpar-2"
_NAME = re.compile(r"^step_(\d+)\.pt$")
_CHUNK = 1 << 22


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or is incomplete or corrupt (the message names the file)."""


class NonFiniteStateError(CheckpointError):
    """The model or optimiser holds NaN / inf values, so saving them would destroy a good run."""


def checkpoint_path(run_dir: str, step: int) -> str:
    """``run_dir/checkpoints/step_{step:08d}.pt``."""
    return os.path.join(run_dir, CHECKPOINT_DIR, f"step_{step:08d}.pt")


def marker_path(path: str) -> str:
    """The completion marker of checkpoint ``path``: ``step_XXXXXXXX.json`` beside it."""
    return path[:-3] + ".json" if path.endswith(".pt") else path + ".json"


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the checkpoint files in ``run_dir`` (verified or not), oldest first."""
    folder = os.path.join(run_dir, CHECKPOINT_DIR)
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), os.path.join(folder, name)) for name in os.listdir(folder)
             if (m := _NAME.match(name))]
    return sorted(found)


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingWriter:
    """A binary file wrapper that hashes and counts what goes through ``write``."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh, self.sha, self.size = fh, hashlib.sha256(), 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sha.update(view)
        self.size += view.nbytes
        return self.fh.write(view)

    def flush(self) -> None:
        self.fh.flush()


def _write_atomically(path: str, write: Any) -> tuple[int, str]:
    """``write(file)`` to ``path.tmp``, fsync, rename to ``path``, fsync the directory.
    Returns (bytes, sha256 hex). A full disk becomes a CheckpointError that says so."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as fh:
            writer = _HashingWriter(fh)
            write(writer)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(f"cannot write checkpoint {path}: no space left on the device or over quota "
                                  f"({e.strerror}); free space or pass another --run-dir. The previous "
                                  f"checkpoints were left as they were.") from e
        raise CheckpointError(f"cannot write checkpoint {path}: {e}") from e
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return writer.size, writer.sha.hexdigest()


def non_finite_entries(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
    """Names of the parameters / buffers / optimiser-state tensors holding NaN or inf."""
    bad = [f"model.{name}" for name, t in model.state_dict().items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        for p, state in optimizer.state.items():
            for key, t in state.items():
                if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    bad.append(f"optimizer.{names.get(id(p), '?')}.{key}")
    return bad


def remove_stale_temporaries(run_dir: str) -> list[str]:
    """Delete ``*.tmp`` files left in ``run_dir/checkpoints`` by a save that was killed. Call only
    when no other process is saving (the trainer holds the run-directory lock)."""
    folder = os.path.join(run_dir, CHECKPOINT_DIR)
    removed = []
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".tmp"):
                os.remove(os.path.join(folder, name))
                removed.append(name)
    return removed


def save_checkpoint(path: str, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, step: int = 0, data_state: dict[str, Any] | None = None,
                    config: dict[str, Any] | None = None, history: list[dict[str, Any]] | None = None) -> str:
    """Write one verified checkpoint (state file, then completion marker; both atomic and
    fsynced). Call on one rank only. Raises :class:`NonFiniteStateError` instead of writing a
    model or optimiser state with NaN / inf in it, and :class:`CheckpointError` on a full disk."""
    bad = non_finite_entries(model, optimizer)
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise NonFiniteStateError(f"not saving checkpoint {path} at step {step}: non-finite values in "
                                  f"{', '.join(bad[:5])}{more}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    state = {
        "format": FORMAT,
        "step": step,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "data": data_state or {},
        "config": config or {},
        "history": history or [],
    }
    size, sha = _write_atomically(path, lambda fh: torch.save(state, fh))
    marker = {"format": FORMAT, "step": step, "file": os.path.basename(path), "bytes": size, "sha256": sha}
    _write_atomically(marker_path(path), lambda fh: fh.write(json.dumps(marker, indent=1).encode()))
    return path


def verify_checkpoint(path: str, checksum: bool = True) -> str | None:
    """Why checkpoint ``path`` cannot be used (missing, no completion marker, wrong size,
    checksum mismatch), or None when its bytes are exactly those that were saved.
    ``checksum=False`` checks the marker and the size only (no read of the file)."""
    if not os.path.isfile(path):
        return "the file does not exist"
    marker = marker_path(path)
    if not os.path.isfile(marker):
        return (f"it has no completion marker {os.path.basename(marker)} (the save was interrupted, or the "
                f"file was written by another program or an older seqpar)")
    try:
        with open(marker) as fh:
            meta = json.load(fh)
        expected_size, expected_sha = int(meta["bytes"]), str(meta["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its completion marker {os.path.basename(marker)} is unreadable ({type(e).__name__}: {e})"
    size = os.path.getsize(path)
    if size != expected_size:
        return f"it is {size:,} bytes but {expected_size:,} were written (truncated or overwritten)"
    if not checksum:
        return None
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            sha.update(chunk)
    if sha.hexdigest() != expected_sha:
        return "its SHA-256 differs from the one recorded when it was written (the bytes were altered)"
    return None


def newest_valid_checkpoint(run_dir: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(the newest checkpoint of ``run_dir`` that verifies, or None; [(path, why)] of the newer
    ones that were skipped)."""
    skipped = []
    for _, path in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def latest_checkpoint(run_dir: str) -> str | None:
    """Path of the newest verified checkpoint in ``run_dir``, or None."""
    return newest_valid_checkpoint(run_dir)[0]


def read_checkpoint(path: str, checksum: bool = True) -> dict[str, Any]:
    """Verify ``path`` (its marker and size; its SHA-256 too unless ``checksum=False``) and load
    it on the CPU with ``weights_only=True``. Raises :class:`CheckpointError` naming the file
    when it is incomplete or corrupt, FileNotFoundError when it is missing."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    problem = verify_checkpoint(path, checksum=checksum)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} cannot be used: {problem}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's unpickler raises many types; name the file either way
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a {FORMAT} seqpar checkpoint (format {found!r})")
    return state


def apply_checkpoint(state: dict[str, Any], *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                     scheduler: Any = None) -> None:
    """Load a checkpoint dict (from :func:`read_checkpoint`) into the model, optimiser, scheduler."""
    model.load_state_dict(state["model"])
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])


def load_checkpoint(path: str, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, checksum: bool = True) -> dict[str, Any]:
    """Verify and load ``path`` into ``model`` (and optimiser / scheduler when given) on any rank.

    Returns the whole checkpoint dict (``step``, ``data``, ``config``, ``history``...). Raises
    :class:`CheckpointError` naming the file when it is incomplete or corrupt.
    """
    state = read_checkpoint(path, checksum=checksum)
    apply_checkpoint(state, model=model, optimizer=optimizer, scheduler=scheduler)
    return state


def prune_checkpoints(run_dir: str, keep: int) -> list[str]:
    """Keep the ``keep`` newest checkpoints of ``run_dir`` that verify and delete the older ones
    (keep 0: delete none); here "verify" means a completion marker and the recorded size (the
    checksum was taken when the file was written). Incomplete files newer than the kept ones
    are left for inspection; the newest good checkpoint is never deleted. Returns the deleted paths."""
    if keep <= 0:
        return []
    kept, deleted = 0, []
    for _, path in reversed(list_checkpoints(run_dir)):
        if kept < keep:
            if verify_checkpoint(path, checksum=False) is None:
                kept += 1
            continue
        for victim in (path, marker_path(path)):
            if os.path.exists(victim):
                os.remove(victim)
        deleted.append(path)
    return deleted

