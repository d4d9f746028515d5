"""Overhead of seqpar's public calls and strategies over the bare kernels, every ratio measured side
by side in one run (CPU; on a GPU also the single-device rows, see below).

    python benchmarks/overhead.py                      # full sizes, ~5-10 min on a 2-core CPU
    python benchmarks/overhead.py --quick              # tiny sizes, every row, < 1 min (the test)
    python benchmarks/overhead.py --rows linear lasp2 --repeats 7 --out /tmp/overhead

Rows (B = 1, H = 8, D = 64, fp32, per-token log gates g = logsigmoid(randn) for linear attention,
causal softmax attention; 1 torch thread per process everywhere):

- ``linear``: ``seqpar.linear_attention`` at world size 1 (group=None, no process group) /
  ``seqpar.kernels.linear.chunk_linear_attention`` on the same tokens, forward+backward, T = 8192.
- ``linear-fwd``: the same, forward only (no autograd), and ``seqpar.linear_attention`` forward / a
  20-line chunked loop in plain torch (:func:`chunked_loop`: chunk 64, chunk-local cumulative gates).
- ``lasp2``: LASP-2 on 2 gloo ranks (T = 16384 global), contiguous and zigzag, forward+backward:
  the slowest rank / the bare kernel on T/2 (the slower of the two ranks' medians).
- ``lasp1``: LASP ring ("lasp1", pipelined) contiguous and zigzag on 2 ranks / ``seqpar.linear_attention``
  at world size 1 on T/2 (a one-rank group in each worker).
- ``softmax``: ``seqpar.attention`` at world size 1 (default CPU backend, "sdpa") /
  ``torch.nn.functional.scaled_dot_product_attention``, causal, forward+backward, T = 2048 and 8192.
- ``softmax-sp``: efficiency of ring zigzag, allgather zigzag and ulysses (contiguous) on 2 ranks,
  T = 8192 global: (SDPA forward+backward on the full T, the slower rank's median) / 2, divided by
  the slowest rank's median.
- ``trainer``: ``python -m seqpar.train`` tokens/s (global: batch x seq-len / step time of rank 0),
  sp = 2 on 2 processes (torchrun) / sp = 1 on one process; tiny preset, seq-len 1024, zigzag,
  OMP_NUM_THREADS=1; median over the steps after the first 2 of every run, runs alternated. Its
  note also gives the ceiling of that ratio on the machine with free communication: the sp = 1
  step / (the step of P sp = 1 copies at seq-len T/P run at once + the attention pairs a rank
  has beyond its causal T/P block, timed with SDPA).
- ``trainer-long``: the same at seq-len 8192 (6 steps a run). Not a row of the issue: at seq-len
  1024 the tiny model's step is a few thousand small ops whose fixed per-call cost does not shrink
  with the tokens; at 8192 the kernels have work, and the row shows how the same trainer scales then.

Timing: every repetition runs all the functions of a group once, in alternating order
(interleaved), after ``--warmup`` untimed rounds; on 2 ranks a ``dist.barrier()`` precedes every
timed call so both ranks start together, and a rank's time is the median of its repetitions.
Wall time decides the ratio; the same ratio from process CPU time is printed next to it (other
processes on a shared machine disturb it less, but it does not see waiting).
Backward passes use ``torch.autograd.grad`` with a fixed random output gradient (no accumulation
into ``.grad``). ``--out PATH`` writes PATH.json and PATH.md (default
benchmarks/results/overhead_cpu). With CUDA, a second table for the GPU: the single-device rows
(``linear``, ``linear-fwd``, ``softmax``) in ``--gpu-dtype`` plus flash-linear-attention's
``chunk_simple_gla`` / ``chunk_gla`` and SDPA's cuDNN backend when available (the 2-rank rows and
the trainer are CPU only).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/machine.py, also under PYTHONSAFEPATH=1
from machine import cpu_model, measured_code, usable_cores  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GROUPS = ("linear", "linear-fwd", "lasp2", "lasp1", "softmax", "softmax-sp", "trainer", "trainer-long")
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "overhead_cpu"


@dataclass
class Sizes:
    B: int = 1
    H: int = 8
    D: int = 64
    linear_T: int = 8192
    lasp_T: int = 16384  # global, 2 ranks
    softmax_T: tuple = (2048, 8192)
    sp_T: int = 8192  # global, 2 ranks
    trainer_seq_len: int = 1024
    trainer_steps: int = 12
    trainer_rounds: int = 2
    trainer_long_seq_len: int = 8192  # the "trainer-long" row: the same model with kernels that have work
    trainer_long_steps: int = 6
    repeats: int = 5
    warmup: int = 1
    world: int = 2


QUICK = dict(H=2, D=16, linear_T=512, lasp_T=1024, softmax_T=(128, 256), sp_T=256, trainer_seq_len=128,
             trainer_steps=5, trainer_rounds=1, trainer_long_seq_len=256, trainer_long_steps=4, repeats=2, warmup=1)


@dataclass
class Row:
    """One line of the table: ratio = what A / B means for the row (see ``how``)."""

    id: str
    group: str
    what: str
    target_op: str  # "<=", ">=" or "" (no target)
    target: float | None
    a_label: str
    b_label: str
    how: str
    a_ms: float | None = None
    b_ms: float | None = None
    ratio: float | None = None
    a_cpu_ms: float | None = None  # process CPU time (all threads), less disturbed by other processes
    b_cpu_ms: float | None = None
    cpu_ratio: float | None = None
    note: str = ""
    kind: str = "ratio"  # or "efficiency" (printed without the "x")
    details: dict = field(default_factory=dict)

    @property
    def holds(self) -> bool | None:
        if self.ratio is None or self.target is None or not math.isfinite(self.ratio):
            return None
        return self.ratio <= self.target if self.target_op == "<=" else self.ratio >= self.target


# ---------------------------------------------------------------------------------------------
# Timing.


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Samples:
    """Seconds of the timed repetitions of one function: wall clock and process CPU time."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def medians_ms(self) -> dict[str, float]:
        return {"wall": statistics.median(self.wall) * 1e3, "cpu": statistics.median(self.cpu) * 1e3}


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device,
                barrier: Callable[[], None] | None = None) -> dict[str, Samples]:
    """Times of each function per timed repetition; every round runs each function once, the
    order reversed every other round; ``barrier`` (if any) before every call."""
    times = {name: Samples() for name in fns}
    names = list(fns)
    for i in range(warmup + repeats):
        for name in (names if i % 2 == 0 else names[::-1]):
            if barrier is not None:
                barrier()
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            _sync(device)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if i >= warmup:
                times[name].wall.append(dt)
                times[name].cpu.append(dc)
    return times


# ---------------------------------------------------------------------------------------------
# Inputs and the functions being timed.


def linear_inputs(B: int, T: int, H: int, D: int, device, dtype, requires_grad: bool, gen: torch.Generator):
    """q, k, v [B, T, H, D], gates g = logsigmoid(randn) [B, T, H] (<= 0) and an output gradient."""
    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)
    q, k, v = rnd(B, T, H, D), rnd(B, T, H, D), rnd(B, T, H, D)
    g = F.logsigmoid(rnd(B, T, H).float()).to(dtype)
    do = rnd(B, T, H, D)
    if requires_grad:
        for x in (q, k, v, g):
            x.requires_grad_()
    return q, k, v, g, do


def softmax_inputs(B: int, T: int, H: int, D: int, device, dtype, gen: torch.Generator):
    q, k, v, do = (torch.randn(B, T, H, D, generator=gen).to(device, dtype) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_()
    return q, k, v, do


def fwd_bwd(call: Callable[[], torch.Tensor], inputs: tuple, do: torch.Tensor) -> Callable[[], None]:
    """forward, then the gradients of ``inputs`` for the output gradient ``do`` (no accumulation)."""
    def run():
        torch.autograd.grad(call(), inputs, do)
    return run


def fwd_only(call: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def run():
        with torch.no_grad():
            call()
    return run


def sdpa_call(q, k, v, backend=None) -> Callable[[], torch.Tensor]:
    """Causal SDPA on [B, T, H, D] tensors (transposed views, no copy), output [B, T, H, D]."""
    def call():
        if backend is None:
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True).transpose(1, 2)
        from torch.nn.attention import sdpa_kernel
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True).transpose(1, 2)
    return call


def chunked_loop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Gated linear attention S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t / sqrt(D), in plain
    torch: chunks of 64, chunk-local cumulative log gates (every exponent <= 0), forward only."""
    B, T, H, D = q.shape
    q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # [B, H, T, D]
    g = g.transpose(1, 2).contiguous()  # [B, H, T]
    S = q.new_zeros(B, H, D, v.shape[-1])
    o = torch.empty_like(v)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    for s in range(0, T, chunk):
        qc, kc, vc = q[:, :, s:s + chunk], k[:, :, s:s + chunk], v[:, :, s:s + chunk]
        b = g[:, :, s:s + chunk].cumsum(-1)  # [B, H, L] log decay from the chunk start, inclusive
        L, last = b.shape[-1], b[..., -1:]
        decay = (b[..., :, None] - b[..., None, :]).masked_fill(~causal[:L, :L], float("-inf")).exp()
        intra = ((qc @ kc.transpose(-1, -2)) * decay) @ vc
        o[:, :, s:s + L] = (intra + (qc * b.exp()[..., None]) @ S) * D ** -0.5
        S = S * last.exp()[..., None] + (kc * (last - b).exp()[..., None]).transpose(-1, -2) @ vc
    return o.transpose(1, 2)


def check_chunked_loop() -> str:
    """Compare :func:`chunked_loop` with the library kernel (fp64, 200 tokens); '' when they agree."""
    from seqpar.kernels.linear import chunk_linear_attention

    gen = torch.Generator().manual_seed(1)
    q, k, v, g, _ = linear_inputs(1, 200, 2, 8, "cpu", torch.float64, False, gen)
    want = chunk_linear_attention(q, k, v, g=g)[0]
    err = float((chunked_loop(q, k, v, g) - want).abs().max() / want.abs().max())
    return "" if err < 1e-10 else f"the chunked loop differs from the kernel: relative error {err:.1e}"


# ---------------------------------------------------------------------------------------------
# The rows.


def make_rows(s: Sizes, groups: set[str], prefix: str = "") -> list[Row]:
    """The rows of ``groups``. A is always seqpar's side, B the baseline; ``how`` says how the ratio
    is formed from them."""
    shape = f"B={s.B} H={s.H} D={s.D}"
    P, half = s.world, s.lasp_T // s.world
    rows: list[Row] = []

    def add(*a, **kw):
        row = Row(*a, **kw)
        row.id = prefix + row.id
        if row.group in groups:
            rows.append(row)

    add("linear-fwdbwd", "linear",
        f"linear_attention ws1 / chunk_linear_attention, per-token g, {shape}, T={s.linear_T}, fwd+bwd",
        "<=", 1.05, "seqpar.linear_attention, world size 1", "chunk_linear_attention", "A / B")
    add("linear-fwd", "linear-fwd",
        "same, fwd only: linear_attention ws1 / chunk_linear_attention",
        "<=", 1.05, "seqpar.linear_attention fwd", "chunk_linear_attention fwd", "A / B")
    add("linear-fwd-loop", "linear-fwd",
        "same, fwd only: linear_attention ws1 / 20-line chunked torch loop (chunk 64)",
        "", None, "seqpar.linear_attention fwd", "chunked loop fwd", "A / B")
    for layout, target in (("contiguous", 1.10), ("zigzag", 1.15)):
        add(f"lasp2-{layout}", "lasp2",
            f"LASP-2 {layout}, slowest of {P} ranks (T={s.lasp_T}, fwd+bwd) / chunk_linear_attention on T/{P}={half}",
            "<=", target, f"lasp2 {layout}, slowest rank", f"chunk_linear_attention on T/{P}", "A / B")
    for layout, target in (("contiguous", 1.05), ("zigzag", 1.15)):
        add(f"lasp1-{layout}", "lasp1",
            f"LASP ring (lasp1) {layout}, slowest of {P} ranks (T={s.lasp_T}, fwd+bwd) / lasp1 at world size 1 on T/{P}",
            "<=", target, f"lasp1 {layout}, slowest rank", f"linear_attention lasp1, world size 1, T/{P}", "A / B")
    for T in s.softmax_T:
        add(f"softmax-{T}", "softmax",
            f"seqpar.attention ws1 (default {'GPU' if prefix else 'CPU'} backend) / SDPA, causal, {shape}, T={T}, fwd+bwd",
            "<=", 1.05, "seqpar.attention, world size 1", "SDPA", "A / B")
    for strat in ("ring:zigzag", "allgather:zigzag", "ulysses:contiguous"):
        add(f"eff-{strat.replace(':', '-')}", "softmax-sp",
            f"{strat} efficiency, {P} ranks, T={s.sp_T}, fwd+bwd: (SDPA on full T) / {P} / slowest rank",
            ">=", 0.95, f"{strat}, slowest rank", "SDPA on the full T", f"(B / {P}) / A", kind="efficiency")
    add("trainer", "trainer",
        f"trainer tokens/s sp={P} / sp=1 (tiny, seq-len {s.trainer_seq_len}, zigzag, 1 thread per process); ms = step",
        ">=", 1.8, f"sp={P} step time (global batch)", "sp=1 step time", "B / A (= global tokens/s of A / of B)")
    add("trainer-long", "trainer-long",
        f"same, seq-len {s.trainer_long_seq_len} (not the issue's row: the same model, kernels with work); ms = step",
        ">=", 1.8, f"sp={P} step time (global batch)", "sp=1 step time", "B / A (= global tokens/s of A / of B)")
    return rows


def run_single_process(rows: list[Row], s: Sizes, device: torch.device, dtype: torch.dtype) -> None:
    """Rows 1-2 and the softmax rows: one process (this one)."""
    import seqpar
    from seqpar.kernels.linear import chunk_linear_attention

    by_id = {r.id.split(":", 1)[-1]: r for r in rows}
    gen = torch.Generator().manual_seed(0)
    if "linear-fwdbwd" in by_id:
        q, k, v, g, do = linear_inputs(s.B, s.linear_T, s.H, s.D, device, dtype, True, gen)
        t = interleaved({
            "a": fwd_bwd(lambda: seqpar.linear_attention(q, k, v, g=g, group=None)[0], (q, k, v, g), do),
            "b": fwd_bwd(lambda: chunk_linear_attention(q, k, v, g=g)[0], (q, k, v, g), do),
        }, s.repeats, s.warmup, device)
        _fill(by_id["linear-fwdbwd"], t["a"].medians_ms(), t["b"].medians_ms())
    if "linear-fwd" in by_id or "linear-fwd-loop" in by_id:
        q, k, v, g, _ = linear_inputs(s.B, s.linear_T, s.H, s.D, device, dtype, False, gen)
        t = interleaved({
            "a": fwd_only(lambda: seqpar.linear_attention(q, k, v, g=g, group=None)[0]),
            "b": fwd_only(lambda: chunk_linear_attention(q, k, v, g=g)[0]),
            "loop": fwd_only(lambda: chunked_loop(q, k, v, g)),
        }, s.repeats, s.warmup, device)
        if "linear-fwd" in by_id:
            _fill(by_id["linear-fwd"], t["a"].medians_ms(), t["b"].medians_ms())
        if "linear-fwd-loop" in by_id:
            _fill(by_id["linear-fwd-loop"], t["a"].medians_ms(), t["loop"].medians_ms())
            problem = check_chunked_loop() if device.type == "cpu" else ""
            if problem:
                by_id["linear-fwd-loop"].note = problem
    for T in s.softmax_T:
        row = by_id.get(f"softmax-{T}")
        if row is None:
            continue
        q, k, v, do = softmax_inputs(s.B, T, s.H, s.D, device, dtype, gen)
        t = interleaved({
            "a": fwd_bwd(lambda: seqpar.attention(q, k, v, strategy="ring", group=None, causal=True), (q, k, v), do),
            "b": fwd_bwd(sdpa_call(q, k, v), (q, k, v), do),
        }, s.repeats, s.warmup, device)
        _fill(row, t["a"].medians_ms(), t["b"].medians_ms())


def _fill(row: Row, a: dict[str, float], b: dict[str, float], efficiency: bool = False, world: int = 2) -> None:
    """Medians {"wall": ms, "cpu": ms} of seqpar's side (a) and of the baseline (b) into ``row``."""
    def ratio(x, y):
        return (y / world) / x if efficiency else x / y
    row.a_ms, row.b_ms, row.ratio = a["wall"], b["wall"], ratio(a["wall"], b["wall"])
    if a.get("cpu") and b.get("cpu"):
        row.a_cpu_ms, row.b_cpu_ms, row.cpu_ratio = a["cpu"], b["cpu"], ratio(a["cpu"], b["cpu"])


# ---------------------------------------------------------------------------------------------
# Two gloo ranks.


def _worker(rank: int, world: int, port: int, s: Sizes, groups: list[str], queue) -> None:
    try:
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
        import seqpar
        from seqpar.kernels.linear import chunk_linear_attention

        singles = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
        alone = singles[rank]
        cpu = torch.device("cpu")
        gen = torch.Generator().manual_seed(100 + rank)
        out: dict = {"threads": torch.get_num_threads()}
        if "lasp2" in groups or "lasp1" in groups:
            local = s.lasp_T // world
            q, k, v, g, do = linear_inputs(s.B, local, s.H, s.D, cpu, torch.float32, True, gen)
            ins = (q, k, v, g)

            def lin(strategy, layout, group):
                return fwd_bwd(lambda: seqpar.linear_attention(q, k, v, g=g, strategy=strategy, layout=layout,
                                                               group=group)[0], ins, do)
            fns = {}
            if "lasp2" in groups:
                fns["kernel"] = fwd_bwd(lambda: chunk_linear_attention(q, k, v, g=g)[0], ins, do)
                fns["lasp2:contiguous"] = lin("lasp2", "contiguous", None)
                fns["lasp2:zigzag"] = lin("lasp2", "zigzag", None)
            if "lasp1" in groups:
                fns["ws1"] = lin("lasp1", "contiguous", alone)  # the same strategy on a one-rank group
                fns["lasp1:contiguous"] = lin("lasp1", "contiguous", None)
                fns["lasp1:zigzag"] = lin("lasp1", "zigzag", None)
            t = interleaved(fns, s.repeats, s.warmup, cpu, barrier=dist.barrier)
            out["linear"] = {name: v_.medians_ms() for name, v_ in t.items()}
        if "softmax-sp" in groups:
            local = s.sp_T // world
            qf, kf, vf, dof = softmax_inputs(s.B, s.sp_T, s.H, s.D, cpu, torch.float32, gen)
            q, k, v, do = softmax_inputs(s.B, local, s.H, s.D, cpu, torch.float32, gen)
            fns = {"sdpa_full": fwd_bwd(sdpa_call(qf, kf, vf), (qf, kf, vf), dof)}
            for strat in ("ring:zigzag", "allgather:zigzag", "ulysses:contiguous"):
                name, layout = strat.split(":")
                fns[strat] = fwd_bwd(lambda name=name, layout=layout: seqpar.attention(
                    q, k, v, strategy=name, layout=layout, group=None, causal=True), (q, k, v), do)
            t = interleaved(fns, s.repeats, s.warmup, cpu, barrier=dist.barrier)
            out["softmax"] = {name: v_.medians_ms() for name, v_ in t.items()}
        queue.put((rank, out, None))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported by the parent
        queue.put((rank, None, traceback.format_exc()))
        raise


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_ranks(rows: list[Row], s: Sizes, groups: set[str]) -> None:
    import queue as queue_mod

    import torch.multiprocessing as mp

    wanted = sorted(groups & {"lasp2", "lasp1", "softmax-sp"})
    if not wanted:
        return
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, s.world, port, s, wanted, queue)) for r in range(s.world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    deadline = time.monotonic() + 3600
    while len(results) + len(errors) < s.world and time.monotonic() < deadline:
        try:
            rank, out, err = queue.get(timeout=5)
        except queue_mod.Empty:
            if any(p.exitcode not in (None, 0) for p in procs) and queue.empty():
                errors.append(f"a worker exited with {[p.exitcode for p in procs]}")
                break
            continue
        if err:
            errors.append(f"rank {rank}:\n{err}")
        else:
            results[rank] = out
    for p in procs:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
    by_id = {r.id: r for r in rows}
    if errors or len(results) < s.world:
        for r in rows:
            if r.group in wanted:
                r.note = "2-rank run failed: " + ("\n".join(errors) or "no result")[-800:]
        print("\n".join(errors), file=sys.stderr)
        return
    per_rank = [results[r] for r in range(s.world)]

    def strategy_vs(row_id, name, base, efficiency=False, section="linear"):
        row = by_id.get(row_id)
        if row is None:
            return
        # the slowest rank's median on both sides: the ranks of a strategy wait for each other, so
        # its time is the slower processor's; that processor's own baseline is the like-for-like
        # reference (the vCPUs of a shared VM differ by up to 20% in one run)
        a = {c: max(pr[section][name][c] for pr in per_rank) for c in ("wall", "cpu")}
        b = {c: max(pr[section][base][c] for pr in per_rank) for c in ("wall", "cpu")}
        _fill(row, a, b, efficiency=efficiency, world=s.world)
        b_mean = statistics.fmean(pr[section][base]["wall"] for pr in per_rank)
        row.details = {"per_rank_ms": {name: [pr[section][name] for pr in per_rank],
                                       base: [pr[section][base] for pr in per_rank]},
                       "ratio_vs_mean_baseline": (b_mean / s.world) / a["wall"] if efficiency else a["wall"] / b_mean,
                       "threads_per_rank": [pr["threads"] for pr in per_rank]}

    strategy_vs("lasp2-contiguous", "lasp2:contiguous", "kernel")
    strategy_vs("lasp2-zigzag", "lasp2:zigzag", "kernel")
    strategy_vs("lasp1-contiguous", "lasp1:contiguous", "ws1")
    strategy_vs("lasp1-zigzag", "lasp1:zigzag", "ws1")
    for strat in ("ring:zigzag", "allgather:zigzag", "ulysses:contiguous"):
        strategy_vs(f"eff-{strat.replace(':', '-')}", strat, "sdpa_full", efficiency=True, section="softmax")


# ---------------------------------------------------------------------------------------------
# The trainer.


def _tokens_per_step(seq_len: int) -> int:
    """Global tokens of one step of the tiny preset at ``seq_len`` (its batch x seq-len)."""
    from seqpar.config import TRAIN_PRESETS

    return TRAIN_PRESETS["tiny"]["batch_size"] * seq_len


def _trainer_command(sp: int, seq_len: int, steps: int, run_dir: Path) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of one trainer run into ``run_dir``."""
    args = ["-m", "seqpar.train", "--preset", "tiny", "--seq-len", str(seq_len), "--layout", "zigzag",
            "--sp", str(sp), "--steps", str(steps), "--run-dir", str(run_dir), "--no-progress",
            "--no-plot", "--keep-checkpoints", "0", "--eval-batches", "1"]
    if sp == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(sp), *args]
    env = {key: val for key, val in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return cmd, env


def _trainer_result(cmd: list[str], returncode: int, stdout: str, stderr: str, run_dir: Path
                    ) -> tuple[list[float], str]:
    """(tokens_per_s of every step after the first 2, threads line) of a finished run."""
    if returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {returncode}:\n{stdout[-1500:]}\n{stderr[-1500:]}")
    records = [json.loads(line) for line in (run_dir / "train.jsonl").read_text().splitlines() if line.strip()]
    steps = sorted((r["step"], r["tokens_per_s"]) for r in records if r.get("kind") == "train")
    threads = next((ln for ln in stdout.splitlines() if "CPU thread" in ln), "")
    return [tps for step, tps in steps if step > 2], threads


def _trainer_once(sp: int, seq_len: int, steps: int, run_dir: Path) -> tuple[list[float], str]:
    """Run the trainer into ``run_dir``; (tokens_per_s of every step after the first 2, threads line)."""
    cmd, env = _trainer_command(sp, seq_len, steps, run_dir)
    # cwd outside the repository: `python -m` puts the cwd first on sys.path, and the repository
    # root's seqpar/ folder would shadow the installed package
    proc = subprocess.run(cmd, cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=1800)
    return _trainer_result(cmd, proc.returncode, proc.stdout, proc.stderr, run_dir)


def _trainer_copies(copies: int, seq_len: int, steps: int, tmp: Path) -> list[float]:
    """Step times (s) of ``copies`` independent sp=1 trainer runs at ``seq_len``, run at the same
    time (each one process on its own core, nothing exchanged): steps after the first 2."""
    runs = []
    for i in range(copies):
        run_dir = tmp / f"copy{i}"
        cmd, env = _trainer_command(1, seq_len, steps, run_dir)
        runs.append((cmd, run_dir, subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE,
                                                    stderr=subprocess.PIPE, text=True)))
    times = []
    for cmd, run_dir, proc in runs:
        out, err = proc.communicate(timeout=1800)
        tps, _ = _trainer_result(cmd, proc.returncode, out, err, run_dir)
        times += [_tokens_per_step(seq_len) / x for x in tps]
    return times


def _extra_pairs_ms(seq_len: int, world: int, repeats: int) -> float:
    """Median ms (fwd+bwd, SDPA, this process, 1 thread) of the attention a rank of a zigzag sp run
    computes beyond a causal block of its own T/P tokens: a causal T x T mask has T^2/2 pairs, a
    rank T^2/(2P), the causal T/P block T^2/(2P^2); the rest, T^2 (P-1)/(2P^2), is timed as one
    unmasked block of T/P queries x T(P-1)/(2P) keys in the tiny preset's shapes."""
    from seqpar.config import MODEL_PRESETS, TRAIN_PRESETS

    model, train = MODEL_PRESETS["tiny"], TRAIN_PRESETS["tiny"]
    B, H, D = train["batch_size"], model["n_heads"], model["dim"] // model["n_heads"]
    gen = torch.Generator().manual_seed(7)
    tq, tk = seq_len // world, seq_len * (world - 1) // (2 * world)
    q = torch.randn(B, H, tq, D, generator=gen, requires_grad=True)
    k, v = (torch.randn(B, H, tk, D, generator=gen, requires_grad=True) for _ in range(2))
    do = torch.randn(B, H, tq, D, generator=gen)
    run = fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v), (q, k, v), do)
    return interleaved({"pairs": run}, repeats, 1, torch.device("cpu"))["pairs"].medians_ms()["wall"]


def run_trainer(rows: list[Row], s: Sizes) -> None:
    """The trainer rows ("trainer", "trainer-long") that were asked for."""
    for row in rows:
        if row.group == "trainer":
            _run_trainer_row(row, s, s.trainer_seq_len, s.trainer_steps, ceiling=True)
        elif row.group == "trainer-long":
            _run_trainer_row(row, s, s.trainer_long_seq_len, s.trainer_long_steps)


def _run_trainer_row(row: Row, s: Sizes, seq_len: int, steps: int, ceiling: bool = False) -> None:
    tps: dict[int, list[float]] = {1: [], s.world: []}
    lines = {}
    try:
        with tempfile.TemporaryDirectory(prefix="seqpar_overhead_") as tmp:
            for rnd in range(s.trainer_rounds):
                for sp in ((1, s.world) if rnd % 2 == 0 else (s.world, 1)):
                    got, lines[sp] = _trainer_once(sp, seq_len, steps, Path(tmp) / f"sp{sp}_{rnd}")
                    tps[sp] += got
    except (RuntimeError, OSError, subprocess.TimeoutExpired, ValueError, KeyError) as e:
        row.note = f"trainer run failed: {e}"[-800:]
        return
    tokens_per_step = _tokens_per_step(seq_len)
    a_tps, b_tps = statistics.median(tps[s.world]), statistics.median(tps[1])
    row.a_ms, row.b_ms, row.ratio = tokens_per_step / a_tps * 1e3, tokens_per_step / b_tps * 1e3, a_tps / b_tps
    row.note = (f"global tokens/s: sp={s.world} {a_tps:,.0f}, sp=1 {b_tps:,.0f}; "
                f"{len(tps[s.world])} + {len(tps[1])} steps")
    row.details = {"tokens_per_s": {str(k): v for k, v in tps.items()},
                   "threads_line": {str(k): v.split(": ", 1)[-1] for k, v in lines.items()}}
    if ceiling:
        _trainer_ceiling(row, s, seq_len, steps)


def _trainer_ceiling(row: Row, s: Sizes, seq_len: int, steps: int) -> None:
    """The most an sp=P step could gain on this machine with free communication: P sp=1 copies
    at seq-len T/P run at once (every layer's work on T/P tokens, per core) plus the attention
    pairs a rank has beyond its own causal block (:func:`_extra_pairs_ms`); ceiling = the sp=1
    step at T / that. Into the row's note and details."""
    try:
        with tempfile.TemporaryDirectory(prefix="seqpar_ceiling_") as tmp:
            copy_s = statistics.median(_trainer_copies(s.world, seq_len // s.world, steps, Path(tmp)))
        extra_ms = _extra_pairs_ms(seq_len, s.world, s.repeats)
    except (RuntimeError, OSError, subprocess.TimeoutExpired, ValueError, KeyError) as e:
        row.note += f"; ceiling run failed: {e}"[-400:]
        return
    bound_ms = copy_s * 1e3 + extra_ms
    ceiling = row.b_ms / bound_ms
    row.note += (f"; ceiling with free communication {ceiling:.2f}x (sp=1 step {row.b_ms:.1f} ms / "
                 f"({s.world} sp=1 copies at T/{s.world} at once {copy_s * 1e3:.1f} ms + the rank's other "
                 f"attention pairs {extra_ms:.1f} ms))")
    row.details["ceiling"] = {"ratio": ceiling, "copies_step_ms": copy_s * 1e3, "extra_pairs_ms": extra_ms}


# ---------------------------------------------------------------------------------------------
# GPU (untested here: kept simple).


def run_gpu(s: Sizes, groups: set[str], dtype: torch.dtype, device: torch.device | None = None) -> list[Row]:
    """The single-device rows on cuda:0, plus fla and SDPA cuDNN rows when available."""
    device = torch.device("cuda", 0) if device is None else device
    gpu_groups = groups & {"linear", "linear-fwd", "softmax"}
    rows = make_rows(s, gpu_groups, prefix="gpu:")
    try:
        run_single_process(rows, s, device, dtype)
    except Exception as e:  # noqa: BLE001
        for r in rows:
            r.note = r.note or f"failed: {type(e).__name__}: {e}"[:300]
    import seqpar

    gen = torch.Generator().manual_seed(2)
    extra: list[Row] = []
    if "linear" in groups:
        try:
            from fla.ops.simple_gla import chunk_simple_gla
        except Exception:  # noqa: BLE001
            chunk_simple_gla = None
        try:
            from fla.ops.gla import chunk_gla
        except Exception:  # noqa: BLE001
            chunk_gla = None
        q, k, v, g, do = linear_inputs(s.B, s.linear_T, s.H, s.D, device, dtype, True, gen)
        ours = fwd_bwd(lambda: seqpar.linear_attention(q, k, v, g=g, group=None)[0], (q, k, v, g), do)
        for name, fn in (("chunk_simple_gla", chunk_simple_gla), ("chunk_gla", chunk_gla)):
            row = Row(f"gpu:linear-vs-fla-{name}", "linear",
                      f"seqpar.linear_attention / fla {name} (g {'[B,T,H]' if name == 'chunk_simple_gla' else 'expanded to [B,T,H,D]'}), "
                      f"T={s.linear_T}, fwd+bwd", "", None, "linear_attention", name, "A / B")
            extra.append(row)
            if fn is None:
                row.note = "fla not importable"
                continue
            try:
                def gate(name=name):  # inside the timed call: its graph is freed by every backward
                    return g if name == "chunk_simple_gla" else g.unsqueeze(-1).expand(*g.shape, s.D).contiguous()
                theirs = fwd_bwd(lambda fn=fn, gate=gate: fn(q, k, v, g=gate(), scale=s.D ** -0.5)[0], (q, k, v, g), do)
                t = interleaved({"a": ours, "b": theirs}, s.repeats, s.warmup, device)
                _fill(row, t["a"].medians_ms(), t["b"].medians_ms())
            except Exception as e:  # noqa: BLE001
                row.note = f"failed: {type(e).__name__}: {e}"[:300]
    if "softmax" in groups:
        from torch.nn.attention import SDPBackend

        for T in s.softmax_T:
            row = Row(f"gpu:softmax-cudnn-{T}", "softmax", f"seqpar.attention / SDPA cuDNN backend, causal, T={T}, fwd+bwd",
                      "", None, "seqpar.attention", "SDPA cuDNN", "A / B")
            extra.append(row)
            try:
                q, k, v, do = softmax_inputs(s.B, T, s.H, s.D, device, dtype, gen)
                t = interleaved({
                    "a": fwd_bwd(lambda: seqpar.attention(q, k, v, strategy="ring", group=None), (q, k, v), do),
                    "b": fwd_bwd(sdpa_call(q, k, v, SDPBackend.CUDNN_ATTENTION), (q, k, v), do),
                }, s.repeats, s.warmup, device)
                _fill(row, t["a"].medians_ms(), t["b"].medians_ms())
            except Exception as e:  # noqa: BLE001
                row.note = f"failed: {type(e).__name__}: {e}"[:300]
    return rows + extra


# ---------------------------------------------------------------------------------------------
# Report.


def machine_info() -> dict:
    info = dict(cpu=cpu_model() or platform.processor() or platform.machine(), cores=usable_cores(),
                torch=torch.__version__, python=platform.python_version(), platform=platform.platform(),
                threads_per_process=1)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    info.update(measured_code(untracked=False))  # which code was measured
    return info


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def table(rows: list[Row]) -> list[str]:
    lines = ["| what | ratio | target | holds | seqpar median (ms) | baseline median (ms) | ratio by CPU time |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        unit = "" if r.kind == "efficiency" else "x"
        ratio = "-" if r.ratio is None else f"{r.ratio:.3f}{unit}"
        target = "none" if r.target is None else f"{r.target_op} {r.target:g}{unit}"
        holds = {True: "yes", False: "NO", None: "-"}[r.holds]
        what = r.what + (f" ({r.note.splitlines()[0][:200]})" if r.note else "")
        cpu = "-" if r.cpu_ratio is None else f"{r.cpu_ratio:.3f}{unit}"
        lines.append(f"| {what} | {ratio} | {target} | {holds} | {_fmt(r.a_ms)} | {_fmt(r.b_ms)} | {cpu} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and 2 repeats (a smoke test; every row)")
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions per function (median; default 5, quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 1)")
    p.add_argument("--rows", nargs="+", choices=GROUPS, default=list(GROUPS), help="row groups to run")
    p.add_argument("--trainer-rounds", type=int, default=None,
                   help="trainer runs at each sp, alternated (default 2, quick 1)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="writes OUT.json and OUT.md")
    p.add_argument("--gpu-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the GPU table (the CPU table is fp32)")
    p.add_argument("--no-gpu", action="store_true", help="skip the GPU table even when CUDA is available")
    args = p.parse_args(argv)
    s = Sizes(**(QUICK if args.quick else {}))
    if args.repeats is not None:
        if args.repeats < 1:
            p.error("--repeats must be >= 1")
        s.repeats = args.repeats
    if args.warmup is not None:
        s.warmup = max(0, args.warmup)
    if args.trainer_rounds is not None:
        s.trainer_rounds = max(1, args.trainer_rounds)
    groups = set(args.rows)
    torch.set_num_threads(1)
    started = time.time()
    info = machine_info()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"seqpar overhead benchmark{' (--quick)' if args.quick else ''}: CPU {info['cpu']}, {info['cores']} cores, "
          f"torch {info['torch']}, 1 torch thread per process, {s.repeats} repeats (median) after {s.warmup} warm-up",
          flush=True)

    rows = make_rows(s, groups)
    phases = {}
    for name, fn in (("single process", lambda: run_single_process(rows, s, torch.device("cpu"), torch.float32)),
                     ("2 ranks", lambda: run_two_ranks(rows, s, groups)),
                     ("trainer", lambda: run_trainer(rows, s))):
        t0 = time.time()
        fn()
        phases[name] = round(time.time() - t0, 1)
        print(f"  {name}: {phases[name]:.1f} s", flush=True)

    gpu_rows: list[Row] = []
    if torch.cuda.is_available() and not args.no_gpu:
        t0 = time.time()
        gpu_rows = run_gpu(s, groups, getattr(torch, args.gpu_dtype))
        phases["gpu"] = round(time.time() - t0, 1)

    elapsed = time.time() - started
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    code = (f"; seqpar at {info['git_commit']}" + (f" with {len(info['git_modified_files'])} modified files"
                                                   if info.get("git_modified_files") else "")) if info.get("git_commit") else ""
    header = (f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, Python {info['python']}{code}; "
              f"1 torch thread per process; {s.repeats} timed repeats after {s.warmup} warm-up, medians; "
              f"load average {load_before[0]:.2f} at start, {load_after[0]:.2f} at end; {elapsed:.0f} s in all"
              if load_before else f"Machine: {info}")
    legend = [
        "",
        "ws1 = world size 1 (group=None, no process group). seqpar / baseline columns: medians of the two sides, "
        "interleaved in one loop. Overhead rows: ratio = seqpar / baseline.",
        f"{s.world}-rank rows: seqpar = the slowest rank's median, baseline = the slower rank's median (both ranks "
        f"run it at once; the JSON also gives the ratio against the mean of the ranks' medians); "
        f"efficiency = baseline / {s.world} / seqpar.",
        "Trainer: ratio of global tokens/s (batch x seq-len / rank 0's step time) = sp=1 step time / "
        f"sp={s.world} step time; steps after the first 2 of each run.",
        "Ratio by CPU time: the same ratio from each process's CPU time (all its threads) instead of wall time: "
        "less disturbed by other processes on the machine, but blind to time spent waiting (communication, a "
        "slower peer).",
    ]
    lines = ["", header, "", "CPU (fp32):", ""] + table(rows) + legend
    if gpu_rows:
        lines += ["", f"GPU {info.get('gpu', '')} ({args.gpu_dtype}; single device):", ""] + table(gpu_rows)
    print("\n".join(lines), flush=True)

    json_path, md_path = Path(args.out + ".json"), Path(args.out + ".md")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    data = dict(machine=info, sizes=asdict(s), quick=args.quick, groups=sorted(groups), elapsed_s=round(elapsed, 1),
                phases_s=phases, load_average=dict(start=load_before, end=load_after),
                rows=[{**asdict(r), "holds": r.holds} for r in rows],
                gpu_rows=[{**asdict(r), "holds": r.holds} for r in gpu_rows])
    json_path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    md = ["# seqpar overhead (`benchmarks/overhead.py" + (" --quick" if args.quick else "") + "`)", ""] + lines[1:]
    md_path.write_text("\n".join(md) + "\n")
    print(f"\nwrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
