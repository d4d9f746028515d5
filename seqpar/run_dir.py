"""The run directory of a training job: who may write it, and agreement of every rank on it.

* :class:`RunDirLock`: the writing rank holds an exclusive ``flock`` on ``run_dir/.lock`` for the
  whole run, with its host, pid and start time written in the file. A second job on the same
  directory is refused with the holder's name. The kernel drops the lock when its process
  dies, so a lock file left by a killed job is stale and is taken over (and said so). ``flock``
  is honoured across nodes on local disks and on most network file systems (NFSv4, Lustre
  with ``flock`` mounts); where it is not, only jobs on one host exclude each other.
* :func:`agree`: one rank's verdict (an error message, or nothing) reaches every rank of the
  dp x sp groups, so all of them raise alike and none waits in a collective.
* :func:`exit_with_launcher`: a worker started by torchrun ends when its launcher dies, so
  killing the launcher never leaves orphans writing beside a resumed job.
"""
from __future__ import annotations

import ctypes
import datetime
import fcntl
import json
import os
import shutil
import signal
import socket
import sys
import threading
from typing import Any, Callable

import torch.distributed as dist

from seqpar.checkpoint import CHECKPOINT_DIR, list_checkpoints
from seqpar.comm.groups import SequenceParallelGroups

RUN_FILES = ("config.json", "train.jsonl", "train.log", "loss.png")
PROFILE_DIR = "profiles"  # --profile-every traces, removed with the run by --overwrite
LOCK_FILE = ".lock"


class RunDirectoryError(FileExistsError):
    """The run directory holds another run, or another job holds it (raised alike on every rank)."""


def existing_run(run_dir: str) -> str | None:
    """A short description of the run that ``run_dir`` already holds, or None when it holds none."""
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(run_dir, name))]
    checkpoints = list_checkpoints(run_dir)
    if checkpoints:
        found.append(f"{len(checkpoints)} checkpoint(s), the newest at step {checkpoints[-1][0]}")
    return ", ".join(found) if found else None


def overwrite_conflict(overwrite: bool, resume: str | None) -> str | None:
    """Why ``overwrite`` and ``resume`` cannot be used together, or None."""
    if overwrite and resume is not None:
        return f"--overwrite deletes the run in the run dir but --resume {resume} continues it: choose one"
    return None


def _merge_over_world(groups: SequenceParallelGroups, value: Any, merge: Callable[[list[Any]], Any]) -> Any:
    """All-gather ``value`` over sp and ``merge`` the list, then the same over dp: after sp every
    rank of a replica holds its replica's result, and dp then reaches the whole world. No
    exchange on torch's fake backend or in one process (``value`` is returned as it is)."""
    if dist.is_initialized() and dist.get_backend() != "fake":
        for group, size in ((groups.sp, groups.sp_size), (groups.dp, groups.dp_size)):
            if size > 1:
                everyone: list[Any] = [None] * size
                dist.all_gather_object(everyone, value, group=group)
                value = merge(everyone)
    return value


def agree(groups: SequenceParallelGroups, problem: str) -> str:
    """The first non-empty ``problem`` of any rank, on every rank of the dp x sp world."""
    return _merge_over_world(groups, problem, lambda verdicts: next((v for v in verdicts if v), ""))


class RunDirLock:
    """An exclusive lock on ``run_dir`` (``run_dir/.lock``), held from :meth:`acquire` to
    :meth:`release`. ``stale`` describes the dead holder a lock was taken over from, if any."""

    def __init__(self, run_dir: str) -> None:
        self.path = os.path.join(run_dir, LOCK_FILE)
        self.fd: int | None = None
        self.stale: str | None = None

    @staticmethod
    def _describe(info: dict[str, Any]) -> str:
        return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {info.get('started', '?')}"
                + (f" (command: {info['command']})" if info.get("command") else ""))

    def _read(self) -> dict[str, Any]:
        try:
            with open(self.path) as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunDirectoryError` naming the job that holds it."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirectoryError(
                f"run directory {os.path.dirname(self.path)!r} is in use by another job "
                f"({self._describe(self._read())}); wait for it to finish or stop it, or pass another "
                f"--run-dir") from None
        previous = self._read()
        if previous:
            self.stale = self._describe(previous)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().isoformat(timespec="seconds"),
                "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        """Drop the lock (its file stays; an unlocked file means: nobody holds it)."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def prepare_run_dir(run_dir: str, resume: str | None, groups: SequenceParallelGroups, writer: bool,
                    overwrite: bool = False) -> RunDirLock | None:
    """Lock ``run_dir`` (writer rank only) and refuse to start a new run in a directory that
    holds one (unless ``overwrite``, which deletes it; ``resume`` continues it). The writer's
    verdict reaches every rank of ``groups`` (:func:`agree`), so all of them raise the same
    :class:`RunDirectoryError`. Returns the writer's held lock (None on other ranks)."""
    problem, lock = "", None
    if writer:
        lock = RunDirLock(run_dir)
        try:
            lock.acquire()
        except RunDirectoryError as e:
            problem, lock = str(e), None
    if writer and not problem and resume is None:
        found = existing_run(run_dir)
        if found and not overwrite:
            problem = (f"run directory {run_dir!r} already holds a run ({found}); pass --resume auto to "
                       f"continue it, --overwrite to delete it and start again, or another --run-dir")
        elif found:
            for name in RUN_FILES:
                path = os.path.join(run_dir, name)
                if os.path.exists(path):
                    os.remove(path)
            shutil.rmtree(os.path.join(run_dir, CHECKPOINT_DIR), ignore_errors=True)
            shutil.rmtree(os.path.join(run_dir, PROFILE_DIR), ignore_errors=True)
    problem = agree(groups, problem)
    if problem:
        if lock is not None:
            lock.release()
        raise RunDirectoryError(problem)
    return lock


def _kill_me_with_my_parent() -> bool:
    """Ask Linux to SIGKILL this process when its parent dies (``prctl(PR_SET_PDEATHSIG)``):
    works whatever the process is doing, even blocked in C++ holding the GIL."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(1, signal.SIGKILL, 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False


def exit_with_launcher(poll_s: float = 1.0) -> threading.Thread | None:
    """When started by a launcher (torchrun sets TORCHELASTIC_RUN_ID; other launchers may set
    SEQPAR_EXIT_WITH_PARENT=1, where 0 or empty means off), end this process when the launcher
    dies: on Linux the kernel kills it at once (parent-death signal); elsewhere, and as a
    fallback, a daemon thread notices the re-parenting within ``poll_s`` and exits with status 70.
    Returns the thread, or None when not under a launcher."""
    asked = os.environ.get("SEQPAR_EXIT_WITH_PARENT", "0") not in ("", "0")
    if "TORCHELASTIC_RUN_ID" not in os.environ and not asked:
        return None
    parent = os.getppid()
    if parent == 1:
        return None
    _kill_me_with_my_parent()

    def gone() -> None:
        print(f"seqpar: the launcher (pid {parent}) of this worker (pid {os.getpid()}) is gone; exiting "
              f"so that no orphan keeps writing the run directory", file=sys.stderr, flush=True)
        os._exit(70)  # the kernel drops the run-directory lock with the process

    if os.getppid() != parent:  # it died before the parent-death signal was armed
        gone()

    def watch() -> None:
        stop = threading.Event()
        while not stop.wait(poll_s):
            if os.getppid() != parent:
                gone()

    thread = threading.Thread(target=watch, name="seqpar-exit-with-launcher", daemon=True)
    thread.start()
    return thread


def share_from_writer(groups: SequenceParallelGroups, value: Any, writer: bool) -> Any:
    """The ``writer`` rank's ``value`` on every rank of the dp x sp world (other ranks pass
    anything)."""
    _, value = _merge_over_world(groups, (writer, value),
                                 lambda pairs: next(((True, v) for has, v in pairs if has), (False, None)))
    return value
