"""A pool of gloo worker processes shared by every multi-rank test.

Starting processes costs seconds, so the pool starts ``POOL_SIZE`` processes once per pytest
session (see conftest.py) and runs many cases on them. Each worker joins one default gloo group
and pre-builds a subgroup of the first w ranks for every w in 1..POOL_SIZE, plus the 2-D
Ulysses x ring groups of USP for 4 ranks. A case is a module-level function
``fn(ctx: WorkerContext, **kwargs)`` run on the first ``world_size`` ranks; the pool returns the
list of their results (CPU tensors, numbers...) in rank order, or raises with the worker's
traceback. Every call has a timeout, so a collective mismatch fails the test instead of hanging.
"""
from __future__ import annotations

import datetime
import importlib
import os
import queue
import socket
import subprocess
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

POOL_SIZE = 4


@dataclass
class WorkerContext:
    """What a case function gets on each rank: its rank and the group of ``world_size`` ranks."""

    rank: int
    world_size: int
    group: dist.ProcessGroup
    usp_groups: dict  # (ulysses_size, ring_size) -> seqpar.comm.UspGroups over the first u*r ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(rank: int, size: int, port: int, tasks: "mp.Queue", results: "mp.Queue") -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size, timeout=datetime.timedelta(seconds=90))
    from seqpar.comm import build_usp_groups

    groups = {w: dist.new_group(list(range(w))) for w in range(1, size + 1)}
    usp = {}
    for u, r in [(2, 2), (2, 1), (1, 2), (4, 1), (1, 4)]:
        if u * r <= size:
            usp[(u, r)] = build_usp_groups(list(range(u * r)), u, sp_group=groups[u * r])
    results.put((rank, "ready", None))
    while True:
        task = tasks.get()
        if task is None:
            break
        task_id, world_size, fn, kwargs = task
        if rank >= world_size:
            results.put((rank, task_id, ("skip", None)))
            continue
        ctx = WorkerContext(rank, world_size, groups[world_size], usp)
        try:
            torch.manual_seed(1234 + rank)
            out = fn(ctx, **kwargs)
            results.put((rank, task_id, ("ok", out)))
        except BaseException:  # report everything, including assertion errors, to the parent
            results.put((rank, task_id, ("error", traceback.format_exc())))
    dist.destroy_process_group()


class GlooPool:
    """``POOL_SIZE`` gloo processes; ``run(fn, world_size, **kwargs)`` runs a case on them."""

    def __init__(self, size: int = POOL_SIZE, timeout_s: float = 180.0):
        self.size = size
        self.timeout_s = timeout_s
        self._ctx = mp.get_context("spawn")
        self._start()

    def _start(self) -> None:
        port = _free_port()
        self._results = self._ctx.Queue()
        self._tasks = [self._ctx.Queue() for _ in range(self.size)]
        self._procs = [self._ctx.Process(target=_worker_main, args=(r, self.size, port, self._tasks[r], self._results),
                                         daemon=True) for r in range(self.size)]
        for p in self._procs:
            p.start()
        for _ in range(self.size):
            rank, status, _ = self._results.get(timeout=self.timeout_s)
            assert status == "ready", f"worker {rank} failed to start: {status}"
        self._next_id = 0

    def run(self, fn: Callable[..., Any], world_size: int, **kwargs) -> list[Any]:
        """Run ``fn(ctx, **kwargs)`` on ranks 0..world_size-1; return their results in rank order."""
        if not 1 <= world_size <= self.size:
            raise ValueError(f"world_size {world_size} outside 1..{self.size}")
        self._next_id += 1
        task_id = self._next_id
        for q in self._tasks:
            q.put((task_id, world_size, fn, kwargs))
        outcomes: dict[int, tuple[str, Any]] = {}
        try:
            while len(outcomes) < self.size:
                rank, got_id, outcome = self._results.get(timeout=self.timeout_s)
                if got_id == task_id:
                    outcomes[rank] = outcome
        except queue.Empty:
            self.restart()
            raise TimeoutError(f"case {fn.__name__} timed out after {self.timeout_s}s on world_size={world_size} "
                               f"(answered: {sorted(outcomes)})") from None
        errors = [f"rank {r}:\n{o[1]}" for r, o in sorted(outcomes.items()) if o[0] == "error"]
        if errors:
            # A failing rank may leave its peers inside a collective; their error or result is
            # in ``outcomes`` already because the group timeout is shorter than ours.
            raise AssertionError(f"case {fn.__name__} failed on world_size={world_size}:\n" + "\n".join(errors))
        return [outcomes[r][1] for r in range(world_size)]

    def restart(self) -> None:
        self.close()
        self._start()

    def close(self) -> None:
        for q in self._tasks:
            try:
                q.put(None)
            except Exception:
                pass
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()


TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def run_case_on_new_pool(module: str, case: str, world_size: int) -> list[Any]:
    """Run the pool case ``module.case`` on a pool of its own (entry point of the subprocess)."""
    fn = getattr(importlib.import_module(module), case)
    pool = GlooPool(size=world_size)
    try:
        results = pool.run(fn, world_size)
    finally:
        pool.close()
    print(results)
    return results


def run_case_interpreted(module: str, case: str, world_size: int = 2, timeout_s: float = 170.0) -> None:
    """Run a pool case in a fresh Python process with TRITON_INTERPRET=1, and assert it passed.

    Triton decides whether to interpret when a kernel module is imported, and pytest may have
    imported the kernels already, so the Triton-under-the-strategies cases get a process (and a
    gloo pool) of their own.
    """
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = f"import distributed_pool as d; d.run_case_on_new_pool({module!r}, {case!r}, {world_size})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=TESTS_DIR, env=env, capture_output=True, text=True,
                          timeout=timeout_s)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
