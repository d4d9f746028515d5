"""Sharded, verified checkpoints (torch.distributed.checkpoint) that resume at any dp x sp size.

Under FSDP2 every rank holds a shard of the parameters and of the optimiser state. A
checkpoint is a directory that every rank writes its shards into with
``torch.distributed.checkpoint`` (DCP), plus the trainer's own state as JSON; loading it into a
model sharded over another number of ranks reshards it (DCP's metadata says where every slice
lies). Without torch.distributed the same code saves and loads one process's full tensors.

Every checkpoint is a directory and a completion marker, written in this order:

* ``step_XXXXXXXX/``: written as ``step_XXXXXXXX.tmp/`` -- the DCP shards of every rank
  (``__R_0.distcp``, ``.metadata``; each rank fsyncs its files) and ``trainer_state.json``
  (step, data position, scheduler, config, metric history) -- then renamed by rank 0, and the
  parent fsynced: a crash never leaves a half-written checkpoint under the real name;
* ``step_XXXXXXXX.json``: the completion marker, written atomically once the directory is in
  place: every file's size in bytes and SHA-256.

:func:`verify_checkpoint` checks both; :func:`load_checkpoint` verifies, then loads. DCP's
``.metadata`` is a pickle: it is read with an unpickler that only builds DCP's own metadata
classes, so a checkpoint directory cannot run code (the shards themselves are read by DCP with
``torch.load(weights_only=True)``; the trainer state is JSON). A directory without its marker
(a kill between the rename and the marker) is incomplete. :func:`newest_valid_checkpoint` walks
back from the newest one and reports every checkpoint it skips, by name and reason. The
parameters and optimiser state are checked to be finite (each rank its shards, then every rank
agrees) before anything is written: a diverged model is never saved.

The directory must be on a file system every rank sees (DCP's requirement for resharding).
``python -m seqpar.checkpoint export CHECKPOINT OUT.pt`` writes one ``torch.save`` file of the
full model and optimiser state, for small models and other tools.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import sys
import warnings
from typing import Any, BinaryIO, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

CHECKPOINT_DIR = "checkpoints"
FORMAT = "seqpar-3"
TRAINER_STATE = "trainer_state.json"
_NAME = re.compile(r"^step_(\d+)$")
_CHUNK = 1 << 22


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or is incomplete or corrupt (the message names the file)."""


class NonFiniteStateError(CheckpointError):
    """The model or optimiser holds NaN / inf values, so saving them would destroy a good run."""


def checkpoint_path(run_dir: str, step: int) -> str:
    """``run_dir/checkpoints/step_{step:08d}`` (a directory)."""
    return os.path.join(run_dir, CHECKPOINT_DIR, f"step_{step:08d}")


def marker_path(path: str) -> str:
    """The completion marker of checkpoint ``path``: ``step_XXXXXXXX.json`` beside it."""
    return path.rstrip(os.sep) + ".json"


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the checkpoint directories in ``run_dir`` (verified or not), oldest first."""
    folder = os.path.join(run_dir, CHECKPOINT_DIR)
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), os.path.join(folder, name)) for name in os.listdir(folder)
             if (m := _NAME.match(name)) and os.path.isdir(os.path.join(folder, name))]
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


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor, or ``t`` itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def non_finite_entries(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
    """Names of the parameters / buffers / optimiser-state tensors whose shard on this rank holds
    NaN or inf."""
    bad = [f"model.{name}" for name, t in model.state_dict().items()
           if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(local_shard(t)).all())]
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        for p, state in optimizer.state.items():
            for key, t in state.items():
                if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(local_shard(t)).all()):
                    bad.append(f"optimizer.{names.get(id(p), '?')}.{key}")
    return bad


def remove_stale_temporaries(run_dir: str) -> list[str]:
    """Delete the ``*.tmp`` files and directories left in ``run_dir/checkpoints`` by a save that
    was killed. Call only when no other process is saving (the trainer holds the run-directory lock)."""
    folder = os.path.join(run_dir, CHECKPOINT_DIR)
    removed = []
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".tmp"):
                victim = os.path.join(folder, name)
                shutil.rmtree(victim) if os.path.isdir(victim) else os.remove(victim)
                removed.append(name)
    return removed


def _is_distributed(group: Any) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _first_problem(problem: str, group: Any) -> str:
    """The first non-empty ``problem`` of any rank of ``group``, on every rank of it."""
    if not _is_distributed(group):
        return problem
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, problem, group=group)
    return next((p for p in everyone if p), "")


def _group_rank(group: Any) -> int:
    return dist.get_rank(group) if _is_distributed(group) else 0


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it assumes one process when torch.distributed is not initialised: that is
    the intent here, so that warning (and only it) is dropped."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        yield


def _hash_file(path: str) -> tuple[int, str]:
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return size, sha.hexdigest()


def _fsync_file(path: str) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _tensor_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """The model's (and optimiser's) state dict in DCP's sharded form (fully qualified names)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    return state


def save_checkpoint(path: str, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, step: int = 0, data_state: dict[str, Any] | None = None,
                    config: dict[str, Any] | None = None, history: list[dict[str, Any]] | None = None,
                    group: Any = None) -> str:
    """Write one verified checkpoint directory (see the module docstring). Collective over
    ``group`` (the job's ranks; None: the world, or one process without torch.distributed):
    every rank writes its shards. Raises :class:`NonFiniteStateError` (on every rank) instead of
    writing a model or optimiser state with NaN / inf in it, and :class:`CheckpointError` on a
    full disk; the previous checkpoints are left as they were."""
    import torch.distributed.checkpoint as dcp

    bad = non_finite_entries(model, optimizer)
    problem = ""
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        problem = (f"not saving checkpoint {path} at step {step}: non-finite values in "
                   f"{', '.join(bad[:5])}{more} (rank {dist.get_rank() if dist.is_initialized() else 0})")
    problem = _first_problem(problem, group)
    if problem:
        raise NonFiniteStateError(problem)
    writer = _group_rank(group) == 0
    tmp = path.rstrip(os.sep) + ".tmp"
    problem = ""
    if writer:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        except OSError as e:
            problem = _os_problem(path, e)
    problem = _first_problem(problem, group)
    if problem:
        raise CheckpointError(problem)
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _quiet_single_process():
            dcp.save(_tensor_state(model, optimizer), checkpoint_id=tmp,
                     process_group=group if dist.is_initialized() else None)
        problem = ""
    except (Exception, CheckpointException) as e:  # DCP wraps each rank's failure (a BaseException)
        problem = _os_problem(path, e)
    problem = _first_problem(problem, group)
    if problem:
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(problem)
    if writer:
        trainer_state = {"format": FORMAT, "step": step, "scheduler": scheduler.state_dict() if scheduler else None,
                         "data": data_state or {}, "config": config or {}, "history": history or []}
        try:
            _write_atomically(os.path.join(tmp, TRAINER_STATE),
                              lambda fh: fh.write(json.dumps(trainer_state).encode()))
            files = {}
            for name in sorted(os.listdir(tmp)):
                _fsync_file(os.path.join(tmp, name))
                files[name] = _hash_file(os.path.join(tmp, name))
            _fsync_dir(tmp)
            shutil.rmtree(path, ignore_errors=True)  # an unmarked leftover of the same step
            os.replace(tmp, path)
            _fsync_dir(os.path.dirname(os.path.abspath(path)))
            marker = {"format": FORMAT, "step": step, "directory": os.path.basename(path),
                      "files": {name: {"bytes": size, "sha256": sha} for name, (size, sha) in files.items()}}
            _write_atomically(marker_path(path), lambda fh: fh.write(json.dumps(marker, indent=1).encode()))
        except (OSError, CheckpointError) as e:
            shutil.rmtree(tmp, ignore_errors=True)
            problem = str(e) if isinstance(e, CheckpointError) else _os_problem(path, e)
    problem = _first_problem(problem, group)
    if problem:
        raise CheckpointError(problem)
    return path


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind ``e`` (its causes, or the per-rank failures DCP collects), if any."""
    stack, seen = [e], set()
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError):
            return x
        stack += [c for c in (x.__cause__, x.__context__) if c is not None]
        failures = getattr(x, "failures", None)
        if isinstance(failures, dict):  # rank -> exception, or (exception, traceback) pairs
            for f in failures.values():
                stack += [x for x in (f if isinstance(f, tuple) else (f,)) if isinstance(x, BaseException)]
    return None


def _os_problem(path: str, e: BaseException) -> str:
    cause = _os_error(e)
    if cause is not None and cause.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"cannot write checkpoint {path}: no space left on the device or over quota ({cause.strerror}); "
                f"free space or pass another --run-dir. The previous checkpoints were left as they were.")
    root = cause if cause is not None else e
    return f"cannot write checkpoint {path}: {type(root).__name__}: {root}"


def _read_marker(path: str) -> tuple[dict[str, Any] | None, str | None]:
    marker = marker_path(path)
    if not os.path.isfile(marker):
        return None, (f"it has no completion marker {os.path.basename(marker)} (the save was interrupted, or the "
                      f"directory was written by another program or an older seqpar)")
    try:
        with open(marker) as fh:
            meta = json.load(fh)
        files = {str(k): (int(v["bytes"]), str(v["sha256"])) for k, v in meta["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"its completion marker {os.path.basename(marker)} is unreadable ({type(e).__name__}: {e})"
    if meta.get("format") != FORMAT:
        return None, f"its completion marker says format {meta.get('format')!r}, this seqpar reads {FORMAT!r}"
    return {"files": files}, None


def verify_checkpoint(path: str, checksum: bool = True) -> str | None:
    """Why checkpoint ``path`` cannot be used (missing, no completion marker, a file missing or
    of the wrong size, a checksum mismatch), or None when its files are exactly those that
    were saved. ``checksum=False`` checks the marker and the sizes only (no read of the files)."""
    if not os.path.isdir(path):
        return "the directory does not exist" if not os.path.exists(path) else "it is not a directory"
    meta, problem = _read_marker(path)
    if problem is not None:
        return problem
    for name, (expected_size, expected_sha) in meta["files"].items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"its file {name} is missing"
        size = os.path.getsize(file)
        if size != expected_size:
            return f"its file {name} is {size:,} bytes but {expected_size:,} were written (truncated or overwritten)"
        if checksum and _hash_file(file)[1] != expected_sha:
            return f"the SHA-256 of its file {name} differs from the one recorded when it was written (the bytes were altered)"
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
    """Verify ``path`` (its marker and sizes; the SHA-256 of every file too unless
    ``checksum=False``) and return its trainer state: ``step``, ``data``, ``scheduler``,
    ``config``, ``history`` (the tensors are read by :func:`load_checkpoint`). Raises
    :class:`CheckpointError` naming the checkpoint when it is incomplete or corrupt,
    FileNotFoundError when it is missing."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    problem = verify_checkpoint(path, checksum=checksum)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} cannot be used: {problem}")
    try:
        with open(os.path.join(path, TRAINER_STATE)) as fh:
            state = json.load(fh)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: its {TRAINER_STATE} cannot be read: {e}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a {FORMAT} seqpar checkpoint (format {found!r})")
    return state


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only what DCP's ``.metadata`` holds: its own dataclasses, torch sizes and dtypes,
    and plain containers. Anything else (a callable a crafted file would run) is refused."""

    _MODULES = ("torch.distributed.checkpoint.", "torch.distributed._shard.")
    _BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "slice", "int", "float", "str", "bytes", "bool",
                 "NoneType"}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith(self._MODULES):
            found = super().find_class(module, name)
            if isinstance(found, type):  # DCP's dataclasses and enums; never one of its functions
                return found
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        if module == "collections" and name == "OrderedDict" or module == "builtins" and name in self._BUILTINS or \
                module == "pathlib" and name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath"):
            return super().find_class(module, name)
        if module == "torch.serialization" and name == "_get_layout":  # torch.strided and kin, by name
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata asks to build {module}.{name}, which DCP metadata never "
                                     f"holds; refusing to load it (it could run code)")


def _reader(path: str) -> Any:
    """A DCP FileSystemReader of ``path`` whose metadata goes through :class:`_MetadataUnpickler`."""
    from torch.distributed.checkpoint import FileSystemReader

    class _SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            with open(os.path.join(path, ".metadata"), "rb") as fh:
                try:
                    metadata = _MetadataUnpickler(io.BytesIO(fh.read())).load()
                except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
                    raise CheckpointError(f"checkpoint {path}: its .metadata cannot be used: {e}") from e
            if getattr(metadata, "storage_meta", None) is None:
                from torch.distributed.checkpoint.metadata import StorageMeta

                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            if metadata.planner_data is None:
                metadata.planner_data = {}
            return metadata

    return _SafeReader(path)


def load_checkpoint(path: str, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, checksum: bool = True, group: Any = None,
                    state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Verify ``path`` and load it into ``model`` (and optimiser / scheduler when given), each rank
    its own shards, whatever dp x sp size saved it. Collective over ``group`` (as
    :func:`save_checkpoint`). ``state``: the trainer state :func:`read_checkpoint` already
    returned (then the files are not verified again). Returns the trainer state. Raises
    :class:`CheckpointError` naming the checkpoint when it is incomplete or corrupt."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    from torch.distributed.checkpoint.api import CheckpointException

    if state is None:
        state = read_checkpoint(path, checksum=checksum)
    _reader(path).read_metadata()  # a .metadata that would build anything but DCP's classes stops here
    tensors = _tensor_state(model, optimizer)
    try:
        with _quiet_single_process():
            dcp.load(tensors, storage_reader=_reader(path), process_group=group if dist.is_initialized() else None)
    except (Exception, CheckpointException) as e:  # DCP's own exception is a BaseException
        raise CheckpointError(f"checkpoint {path} cannot be loaded into this model: {type(e).__name__}: {e}") from e
    set_model_state_dict(model, tensors["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, tensors["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    return state


def prune_checkpoints(run_dir: str, keep: int) -> list[str]:
    """Keep the ``keep`` newest checkpoints of ``run_dir`` that verify and delete the older ones
    (keep 0: delete none); here "verify" means a completion marker and the recorded sizes (the
    checksums were taken when the files were written). Incomplete checkpoints newer than the kept
    ones are left for inspection; the newest good checkpoint is never deleted. Returns the
    deleted paths."""
    if keep <= 0:
        return []
    kept, deleted = 0, []
    for _, path in reversed(list_checkpoints(run_dir)):
        if kept < keep:
            if verify_checkpoint(path, checksum=False) is None:
                kept += 1
            continue
        if os.path.exists(marker_path(path)):
            os.remove(marker_path(path))  # first the marker: a kill in between leaves an incomplete one
        shutil.rmtree(path, ignore_errors=True)
        deleted.append(path)
    return deleted


def export_checkpoint(path: str, out: str, checksum: bool = True) -> str:
    """Write checkpoint ``path`` (any dp x sp size) as one ``torch.save`` file ``out`` holding the
    full tensors (``model``, ``optimizer``) and the trainer state (``trainer_state``); one
    process, no torch.distributed. For small models and tools that read plain state dicts."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner

    state = read_checkpoint(path, checksum=checksum)
    _reader(path).read_metadata()
    full: dict[str, Any] = {}
    _load_state_dict(full, storage_reader=_reader(path), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    full["trainer_state"] = state
    torch.save(full, out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m seqpar.checkpoint verify CHECKPOINT`` / ``export CHECKPOINT OUT.pt``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m seqpar.checkpoint",
                                description="Verify a seqpar checkpoint, or export it to one torch.save file.")
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check every file's size and SHA-256 against the completion marker")
    v.add_argument("checkpoint")
    e = sub.add_parser("export", help="write the full model and optimiser state to one torch.save file")
    e.add_argument("checkpoint")
    e.add_argument("out")
    args = p.parse_args(argv)
    if args.command == "verify":
        problem = verify_checkpoint(args.checkpoint)
        print(f"{args.checkpoint}: " + ("ok" if problem is None else problem))
        return 0 if problem is None else 1
    try:
        out = export_checkpoint(args.checkpoint, args.out)
    except (CheckpointError, FileNotFoundError) as err:
        print(f"python -m seqpar.checkpoint: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({os.path.getsize(out):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
