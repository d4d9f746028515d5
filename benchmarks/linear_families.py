"""Linear-attention families: single-device kernel time, and the bytes each strategy sends per rank.

Part 1, ``timing``: each family's single-device chunked kernel (``seqpar.kernels.linear``),
forward and forward+backward, median of ``--repeats`` timed repetitions after ``--warmup``
untimed ones, every function of a (family, T, mode) group run once per repetition in
alternating order:

- scalar decay (``g`` [B, T, H] = logsigmoid(randn)),
- GLA (``g`` [B, T, H, Dk] = logsigmoid(randn) / 16),
- gated delta rule (``beta`` [B, T, H] = sigmoid(randn), ``g`` [B, T, H] as scalar; q, k unit-norm),
- KDA (``beta`` as delta, ``g`` [B, T, H, Dk] as GLA; q, k unit-norm; torch backend only).

``--via autograd`` (default): ``chunk_linear_attention`` -- forward under ``torch.no_grad()``;
forward+backward = forward then ``torch.autograd.grad`` of a fixed random output gradient w.r.t.
q, k, v and the gates (what a training step pays: the backward recomputes the chunk states).
``--via stages``: the run's stages directly -- forward = ``states()`` + ``outputs()``;
forward+backward adds ``state_grads()`` + ``input_grads()`` (no recomputation).
On CPU: torch backend, fp32, 1 torch thread (``--threads``). On CUDA: backend triton (KDA: torch,
it has no Triton kernel), bf16, and flash-linear-attention's ``chunk_simple_gla`` / ``chunk_gla`` /
``chunk_gated_delta_rule`` / ``chunk_kda`` on the same tensors in the same groups when ``fla``
imports (gates fp32 as fla expects, beta in the input dtype), with the relative max error of their
outputs against ours at the first T. Ratio column: ms / ms of the scalar family of the same
implementation, T and mode (fla rows: / ``chunk_simple_gla``); ``vs fla``: ours / fla. On CPU
the median process CPU time (and its ratio) is reported next to the wall time: with one torch
thread it is the compute time, which other processes on a shared machine disturb less.

Part 2, ``bytes``: ONE process runs ``seqpar.linear_attention`` on torch's fake process group
(``init_process_group("fake", store=FakeStore(), rank=r, world_size=P)``, re-initialised for
every rank r: its collectives are no-ops and received buffers are garbage, only the bytes
``comm_stats`` records matter) for every family, P, layout and strategy, forward and backward with
``output_final_state=True``, and compares each rank's bytes per pass with the formula of
docs/linear.md ("Bytes per pass"). Any mismatch: the script exits 1 (after writing the JSON). A
path the fake group cannot run becomes a row "n/a (fake pg: reason)" with the formula only. The
bytes part runs on CPU (bytes do not depend on the device or backend).

    python benchmarks/linear_families.py                         # CPU: both parts (~2-3 min, 2 cores)
    python benchmarks/linear_families.py --parts bytes           # the bytes table alone (~10 s)
    python benchmarks/linear_families.py --T 16384 65536 --heads 16 --dk 128 --dv 128   # a GPU
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/machine.py, also under PYTHONSAFEPATH=1
from machine import cpu_model, measured_code, usable_cores  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FAMILIES = ("scalar", "gla", "delta", "kda")
FLA_BASELINES = {"scalar": "chunk_simple_gla", "gla": "chunk_gla", "delta": "chunk_gated_delta_rule",
                 "kda": "chunk_kda"}
FLA_MODULES = {"chunk_simple_gla": "fla.ops.simple_gla", "chunk_gla": "fla.ops.gla",
               "chunk_gated_delta_rule": "fla.ops.gated_delta_rule", "chunk_kda": "fla.ops.kda"}
# the bytes table: "scalar" with per-token gates (its transition travels); "scalar-g_gamma": a fixed
# per-head decay (known on every rank, nothing but states travels)
BYTES_FAMILIES = ("scalar", "scalar-g_gamma", "gla", "delta", "kda")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
MIB = 1 << 20


# ---------------------------------------------------------------------------------------------
# Inputs.


def family_inputs(family: str, B: int, T: int, H: int, Dk: int, Dv: int, device: torch.device, dtype: torch.dtype,
                  gen: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({"q", "k", "v", plus "g" / "beta" / "g_gamma" of the family}, an output gradient do).
    q, k, v, beta in ``dtype``; log gates in fp32 (as fla takes them); the delta-rule families get
    unit-norm q, k. Every tensor is a leaf on ``device``."""
    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32)

    q, k, v, do = rnd(B, T, H, Dk), rnd(B, T, H, Dk), rnd(B, T, H, Dv), rnd(B, T, H, Dv)
    inputs: dict[str, torch.Tensor] = {}
    if family in ("delta", "kda"):
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        inputs["beta"] = torch.sigmoid(rnd(B, T, H)).to(dtype)
    if family in ("scalar", "delta"):
        inputs["g"] = F.logsigmoid(rnd(B, T, H))
    elif family in ("gla", "kda"):
        inputs["g"] = F.logsigmoid(rnd(B, T, H, Dk)) / 16
    elif family == "scalar-g_gamma":
        inputs["g_gamma"] = -torch.exp2(-8.0 * (torch.arange(H, dtype=torch.float32) + 1) / H)
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES + BYTES_FAMILIES}")
    inputs.update(q=q.to(dtype), k=k.to(dtype), v=v.to(dtype))
    return {name: t.to(device).contiguous() for name, t in inputs.items()}, do.to(device, dtype)


def _differentiable(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fresh leaves that require grad (g_gamma is a fixed buffer: no gradient)."""
    return {n: t.detach().clone().requires_grad_(n != "g_gamma") for n, t in inputs.items()}


# ---------------------------------------------------------------------------------------------
# The functions being timed.


def ours(inputs: dict[str, torch.Tensor], do: torch.Tensor, backend: str, mode: str, via: str) -> Callable[[], object]:
    """One call of our chunked kernel: ``mode`` 'fwd' or 'fwd+bwd', ``via`` 'autograd' or 'stages'."""
    from seqpar.kernels.linear import chunk_linear_attention, chunked_run

    if via == "stages":
        x = {n: t.detach() for n, t in inputs.items()}

        def run_stages() -> object:
            with torch.no_grad():
                run = chunked_run(x["q"], x["k"], x["v"], g=x.get("g"), beta=x.get("beta"), backend=backend)
                states = run.states()
                o = run.outputs(states)
                if mode == "fwd":
                    return o
                grads = run.state_grads(do)
                return run.input_grads(do, states, grads)
        return run_stages
    if mode == "fwd":
        x = {n: t.detach() for n, t in inputs.items()}

        def run_fwd() -> object:
            with torch.no_grad():
                return chunk_linear_attention(x["q"], x["k"], x["v"], g=x.get("g"), beta=x.get("beta"),
                                              backend=backend)[0]
        return run_fwd
    x = _differentiable(inputs)
    leaves = tuple(x.values())

    def run_fwd_bwd() -> object:
        o = chunk_linear_attention(x["q"], x["k"], x["v"], g=x.get("g"), beta=x.get("beta"), backend=backend)[0]
        return torch.autograd.grad(o, leaves, do)
    return run_fwd_bwd


def load_fla(name: str) -> Callable | None:
    """fla's ``name`` (e.g. 'chunk_gla'), or None when fla does not import."""
    try:
        module = __import__(FLA_MODULES[name], fromlist=[name])
        return getattr(module, name)
    except Exception:  # noqa: BLE001 -- any import failure means: no baseline
        return None


def fla_call(fn: Callable, inputs: dict[str, torch.Tensor], do: torch.Tensor, mode: str) -> Callable[[], object]:
    """One call of fla's chunk function on the same tensors (autograd for fwd+bwd)."""
    x = {n: t.detach() for n, t in inputs.items()} if mode == "fwd" else _differentiable(inputs)
    kwargs = {n: t for n, t in x.items() if n in ("g", "beta")}

    def call() -> torch.Tensor:
        return fn(x["q"], x["k"], x["v"], **kwargs, scale=x["q"].shape[-1] ** -0.5)[0]
    if mode == "fwd":
        def run_fwd() -> object:
            with torch.no_grad():
                return call()
        return run_fwd
    leaves = tuple(x.values())

    def run_fwd_bwd() -> object:
        return torch.autograd.grad(call(), leaves, do)
    return run_fwd_bwd


# ---------------------------------------------------------------------------------------------
# Timing.


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_ms(fns: dict[str, Callable[[], object]], repeats: int, warmup: int,
                   device: torch.device) -> dict[str, tuple[list[float], list[float]]]:
    """(wall ms, process CPU ms) of each function per timed repetition; every repetition runs each
    function once, the order reversed every other repetition."""
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in fns}
    names = list(fns)
    for i in range(warmup + repeats):
        for name in (names if i % 2 == 0 else names[::-1]):
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            _sync(device)
            if i >= warmup:
                times[name][0].append((time.perf_counter() - t0) * 1e3)
                times[name][1].append((time.process_time() - c0) * 1e3)
    return times


@dataclass
class TimingRow:
    family: str
    impl: str  # "seqpar" or the fla function
    backend: str  # torch | triton | fla
    T: int
    mode: str  # fwd | fwd+bwd
    ms: float | None = None  # median wall time
    samples_ms: list[float] = field(default_factory=list)
    cpu_ms: float | None = None  # median process CPU time (CPU runs only: less disturbed by other processes)
    mtok_s: float | None = None
    ratio_to_scalar: float | None = None  # ms / ms of the scalar family (same impl, T, mode)
    ratio_to_scalar_cpu: float | None = None  # the same from process CPU time (CPU runs)
    vs_fla: float | None = None  # ours / fla, same family, T and mode
    rel_err_vs_fla: float | None = None  # max |o_ours - o_fla| / max |o_fla| (fwd rows, first T)
    note: str = ""


def run_timing(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[TimingRow]:
    """Every family x T x mode; on CUDA with fla next to ours in the same groups."""
    rows: list[TimingRow] = []
    cuda = device.type == "cuda"
    for T in args.T:
        for family in FAMILIES:
            backend = args.backend or ("triton" if cuda and family != "kda" else "torch")
            if family == "kda" and backend == "triton":
                backend = "torch"  # KDA has no Triton kernel
            fla_name = FLA_BASELINES[family]
            use_fla = args.fla == "on" or (args.fla == "auto" and cuda)
            fla_fn = load_fla(fla_name) if use_fla else None
            gen = torch.Generator().manual_seed(1000 * T + FAMILIES.index(family))
            inputs, do = family_inputs(family, args.batch, T, args.heads, args.dk, args.dv, device, dtype, gen)
            for mode in args.modes:
                ours_row = TimingRow(family, "seqpar", backend, T, mode)
                fla_row = TimingRow(family, fla_name, "fla", T, mode) if use_fla else None
                if fla_row is not None and fla_fn is None:
                    fla_row.note = "fla not importable"
                fns: dict[str, Callable[[], object]] = {}
                try:
                    fns["ours"] = ours(inputs, do, backend, mode, args.via)
                except Exception as e:  # noqa: BLE001
                    ours_row.note = f"failed: {type(e).__name__}: {e}"[:300]
                if fla_fn is not None:
                    fns["fla"] = fla_call(fla_fn, inputs, do, mode)
                    if mode == "fwd" and T == args.T[0]:  # same outputs? (also the first, compiling call)
                        outputs = {}
                        for name, row in (("ours", ours_row), ("fla", fla_row)):
                            try:
                                outputs[name] = fns[name]().float() if name in fns else None
                            except Exception as e:  # noqa: BLE001
                                row.note = f"failed: {type(e).__name__}: {e}"[:300]
                                del fns[name]
                        if outputs.get("ours") is not None and outputs.get("fla") is not None:
                            a, b = outputs["ours"], outputs["fla"]
                            fla_row.rel_err_vs_fla = ours_row.rel_err_vs_fla = (
                                ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item())
                        del outputs
                try:
                    times = interleaved_ms(fns, args.repeats, args.warmup, device)
                except Exception:  # noqa: BLE001 -- time each alone so one failure keeps the other
                    times = {}
                    for name, fn in fns.items():
                        try:
                            times.update(interleaved_ms({name: fn}, args.repeats, args.warmup, device))
                        except Exception as e2:  # noqa: BLE001
                            row = ours_row if name == "ours" else fla_row
                            row.note = f"failed: {type(e2).__name__}: {e2}"[:300]
                for name, row in (("ours", ours_row), ("fla", fla_row)):
                    if row is None or name not in times:
                        continue
                    wall, cpu = times[name]
                    row.samples_ms = [round(t, 4) for t in wall]
                    row.ms = statistics.median(wall)
                    row.cpu_ms = statistics.median(cpu) if device.type == "cpu" else None
                    row.mtok_s = args.batch * T / row.ms / 1e3
                rows.append(ours_row)
                if fla_row is not None:
                    rows.append(fla_row)
                if ours_row.ms is not None and fla_row is not None and fla_row.ms is not None:
                    ours_row.vs_fla = ours_row.ms / fla_row.ms
                print("  " + " ".join(_fmt_timing(r) for r in (ours_row, fla_row) if r is not None), flush=True)
            del inputs, do
            if cuda:
                torch.cuda.empty_cache()
    for r in rows:  # ratio to the scalar family of the same implementation, T and mode
        base = next((b for b in rows if b.family == "scalar" and b.T == r.T and b.mode == r.mode
                     and (b.impl == "seqpar") == (r.impl == "seqpar")), None)
        if r.ms is not None and base is not None and base.ms is not None:
            r.ratio_to_scalar = r.ms / base.ms
        if r.cpu_ms is not None and base is not None and base.cpu_ms:
            r.ratio_to_scalar_cpu = r.cpu_ms / base.cpu_ms
    return rows


def _fmt_timing(r: TimingRow) -> str:
    ms = "-" if r.ms is None else f"{r.ms:.2f} ms"
    return f"{r.family:6s} {r.impl:22s} T={r.T:<6d} {r.mode:8s} {ms:>12s} {r.note}"


# ---------------------------------------------------------------------------------------------
# Bytes per rank per pass.


def transition_bytes(family: str, B: int, H: int, Dk: int, itemsize: int = 4) -> int:
    """docs/linear.md: the bytes of one piece's transition on the wire (0: known on every rank)."""
    return {"scalar": B * H, "scalar-g_gamma": 0, "gla": B * H * Dk, "delta": B * H * Dk * Dk,
            "kda": B * H * Dk * Dk}[family] * itemsize


def formula_bytes(family: str, strategy: str, layout: str, P: int, rank: int, B: int, H: int, Dk: int, Dv: int,
                  final_state: bool = True, itemsize: int = 4) -> dict[str, int]:
    """{"forward": bytes, "backward": bytes} this rank sends, by docs/linear.md "Bytes per pass"
    (one sequence, no documents): lasp2 forward n (state + a) and backward F state + n state;
    lasp1 forward hops_out state + F state and backward F state + hops_back state, with hops
    contiguous 1 forward on ranks 0..P-2 and backward on ranks 1..P-1, zigzag 1 on ranks 0 and P-1
    and 2 on the others in both passes."""
    state = B * H * Dk * Dv * itemsize
    F_ = 1 if final_state else 0
    n = 2 if layout == "zigzag" else 1
    if strategy == "lasp2":
        return {"forward": n * (state + transition_bytes(family, B, H, Dk, itemsize)),
                "backward": F_ * state + n * state}
    if layout == "zigzag":
        hops_out = hops_back = 1 if rank in (0, P - 1) else 2
    else:
        hops_out, hops_back = int(rank < P - 1), int(rank > 0)
    return {"forward": hops_out * state + F_ * state, "backward": F_ * state + hops_back * state}


@dataclass
class BytesRow:
    family: str
    strategy: str
    layout: str
    P: int
    # per rank: formula and measured bytes per pass (measured None: not run)
    formula: dict[str, list[int]] = field(default_factory=dict)
    measured: dict[str, list[int] | None] = field(default_factory=dict)
    ops: dict[str, list[list[str]]] = field(default_factory=dict)  # per pass, per rank: the comm calls
    match: bool | None = None
    note: str = ""


def measure_bytes_one_rank(family: str, strategy: str, layout: str, P: int, rank: int, args: argparse.Namespace
                           ) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Bytes and comm calls of ``rank`` per pass: seqpar.linear_attention forward and backward on
    the fake process group (already initialised as this rank)."""
    import seqpar
    from seqpar.linear import CommStats

    gen = torch.Generator().manual_seed(rank)
    inputs, do = family_inputs(family, args.bytes_batch, args.bytes_local_len, args.bytes_heads, args.bytes_dk,
                               args.bytes_dv, torch.device("cpu"), torch.float32, gen)
    x = _differentiable(inputs)
    stats = CommStats()
    o, final = seqpar.linear_attention(x["q"], x["k"], x["v"], g=x.get("g"), g_gamma=x.get("g_gamma"),
                                       beta=x.get("beta"), strategy=strategy, layout=layout, output_final_state=True,
                                       backend="torch", comm_stats=stats, validate="off")
    leaves = tuple(t for n, t in x.items() if t.requires_grad)
    torch.autograd.grad((o, final), leaves, (do, torch.ones_like(final)))
    passes = ("forward", "backward")
    return {p: stats.bytes_sent(p) for p in passes}, {p: stats.ops(p) for p in passes}


def run_bytes(args: argparse.Namespace) -> list[BytesRow]:
    """Every family x P x layout x strategy, every rank, on the fake process group."""
    import torch.distributed as dist

    rows: list[BytesRow] = []
    fake_error = None
    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except Exception as e:  # noqa: BLE001
        FakeStore, fake_error = None, f"{type(e).__name__}: {e}"
    B, H, Dk, Dv = args.bytes_batch, args.bytes_heads, args.bytes_dk, args.bytes_dv
    for family in args.bytes_families:
        for P in args.bytes_world_sizes:
            for layout in ("contiguous", "zigzag"):
                for strategy in args.bytes_strategies:
                    row = BytesRow(family, strategy, layout, P)
                    per_rank = [formula_bytes(family, strategy, layout, P, r, B, H, Dk, Dv) for r in range(P)]
                    row.formula = {p: [f[p] for f in per_rank] for p in ("forward", "backward")}
                    measured: dict[str, list[int]] = {"forward": [], "backward": []}
                    ops: dict[str, list[list[str]]] = {"forward": [], "backward": []}
                    error = fake_error
                    for r in range(P):
                        if error is not None:
                            break
                        try:
                            dist.init_process_group("fake", store=FakeStore(), rank=r, world_size=P)
                            nbytes, calls = measure_bytes_one_rank(family, strategy, layout, P, r, args)
                        except Exception as e:  # noqa: BLE001 -- a path the fake group cannot run
                            error = f"{type(e).__name__}: {e}".splitlines()[0][:200]
                        finally:
                            if dist.is_initialized():
                                dist.destroy_process_group()
                        if error is None:
                            for p in ("forward", "backward"):
                                measured[p].append(nbytes[p])
                                ops[p].append(calls[p])
                    if error is not None:
                        row.measured = {"forward": None, "backward": None}
                        row.note = f"n/a (fake pg: {error})"
                    else:
                        row.measured, row.ops = measured, ops
                        row.match = measured == row.formula
                    rows.append(row)
                    status = "n/a" if row.match is None else "ok" if row.match else "MISMATCH"
                    print(f"  bytes {family:14s} P={P} {layout:10s} {strategy:5s} {status} {row.note}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# Report.


def machine_info(device: torch.device, threads: int) -> dict:
    """The machine, torch version and threads, and which code was measured."""
    model = cpu_model()
    info = dict(cpu=platform.processor() or model or platform.machine(), cpu_model=model,
                cores=usable_cores(), torch=torch.__version__, python=platform.python_version(),
                platform=platform.platform(), torch_threads=torch.get_num_threads(), threads_flag=threads,
                device=str(device), load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    for name in ("triton", "fla"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            info[name] = None
    info.update(measured_code())
    return info


def machine_name(info: dict) -> str:
    if info.get("gpu"):
        return f"{info['gpu']}, torch {info['torch']}, Triton {info.get('triton')}, fla {info.get('fla') or '-'}"
    cpu = info.get("cpu_model") or info["cpu"]
    return f"{cpu} ({info['cores']} cores), torch {info['torch']}, {info['torch_threads']} torch thread(s)"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def timing_table(rows: list[TimingRow]) -> list[str]:
    lines = ["| family | impl | backend | T | mode | ms | Mtok/s | / scalar | CPU ms | / scalar (CPU) | vs fla "
             "| note |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r.ratio_to_scalar is None else f"{r.ratio_to_scalar:.2f}x"
        ratio_cpu = "-" if r.ratio_to_scalar_cpu is None else f"{r.ratio_to_scalar_cpu:.2f}x"
        vs = "-" if r.vs_fla is None else f"{r.vs_fla:.2f}x"
        note = r.note or ("" if r.rel_err_vs_fla is None else f"o rel err vs fla {r.rel_err_vs_fla:.1e}")
        lines.append(f"| {r.family} | {r.impl} | {r.backend} | {r.T} | {r.mode} | {_num(r.ms, '.2f')} | "
                     f"{_num(r.mtok_s, '.3g')} | {ratio} | {_num(r.cpu_ms, '.2f')} | {ratio_cpu} | {vs} | {note} |")
    return lines


def exact_size(nbytes: int) -> str:
    """Bytes, exactly, in MiB + KiB + B: '2 MiB + 16 KiB', '264 B', '0'."""
    mib, rest = divmod(nbytes, MIB)
    kib, b = divmod(rest, 1024)
    parts = [f"{n} {unit}" for n, unit in ((mib, "MiB"), (kib, "KiB"), (b, "B")) if n]
    return " + ".join(parts) or "0"


def _per_rank(values: list[int] | None) -> str:
    """Bytes per rank, runs of equal ranks merged: '2 MiB (r0-6), 1 MiB (r7)'."""
    if values is None:
        return "n/a"
    if len(set(values)) == 1:
        return f"{exact_size(values[0])} (all)"
    parts, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            ranks = f"r{start}" if i - 1 == start else f"r{start}-{i - 1}"
            parts.append(f"{exact_size(values[start])} ({ranks})")
            start = i
    return ", ".join(parts)


def bytes_table(rows: list[BytesRow]) -> list[str]:
    lines = ["| family | strategy | layout | P | forward measured | forward formula | backward measured | "
             "backward formula | match |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        match = r.note if r.match is None else "yes" if r.match else "**NO**"
        lines.append(f"| {r.family} | {r.strategy} | {r.layout} | {r.P} | {_per_rank(r.measured['forward'])} | "
                     f"{_per_rank(r.formula['forward'])} | {_per_rank(r.measured['backward'])} | "
                     f"{_per_rank(r.formula['backward'])} | {match} |")
    return lines


# ---------------------------------------------------------------------------------------------
# Main.


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=("timing", "bytes"), default=["timing", "bytes"])
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=("auto",) + tuple(DTYPES), help="auto: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--backend", default=None, choices=("torch", "triton"),
                   help="our kernels' backend (default: torch on CPU, triton on CUDA; KDA always torch)")
    p.add_argument("--via", default="autograd", choices=("autograd", "stages"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dk", type=int, default=64)
    p.add_argument("--dv", type=int, default=64)
    p.add_argument("--T", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--modes", nargs="+", choices=("fwd", "fwd+bwd"), default=["fwd", "fwd+bwd"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default 1 on CPU, torch's default with CUDA)")
    p.add_argument("--fla", default="auto", choices=("auto", "on", "off"),
                   help="flash-linear-attention baselines: auto = on CUDA only; on = also on CPU")
    p.add_argument("--bytes-world-sizes", type=int, nargs="+", default=[2, 8])
    p.add_argument("--bytes-strategies", nargs="+", choices=("lasp2", "lasp1", "lasp1_serial"),
                   default=["lasp2", "lasp1"])
    p.add_argument("--bytes-families", nargs="+", choices=BYTES_FAMILIES, default=list(BYTES_FAMILIES))
    p.add_argument("--bytes-batch", type=int, default=1)
    p.add_argument("--bytes-heads", type=int, default=16)
    p.add_argument("--bytes-dk", type=int, default=128)
    p.add_argument("--bytes-dv", type=int, default=128)
    p.add_argument("--bytes-local-len", type=int, default=32, help="tokens per rank (bytes do not depend on it)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/linear_families_<cpu|gpu name>.json)")
    args = p.parse_args(argv)
    for name in ("batch", "heads", "dk", "dv", "repeats", "bytes_batch", "bytes_heads", "bytes_dk", "bytes_dv",
                 "bytes_local_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or any(t < 1 for t in args.T) or any(P < 2 for P in args.bytes_world_sizes):
        p.error(f"need --warmup >= 0 (got {args.warmup}), every --T >= 1 (got {args.T}) and every "
                f"--bytes-world-sizes >= 2 (got {args.bytes_world_sizes})")
    if args.bytes_local_len % 2:
        p.error(f"--bytes-local-len must be even (zigzag splits it in two), got {args.bytes_local_len}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    threads = args.threads if args.threads is not None else (0 if device.type == "cuda" else 1)
    if threads > 0:
        torch.set_num_threads(threads)
    info = machine_info(device, threads)
    tag = "cpu" if device.type == "cpu" else info["gpu"].lower().replace("nvidia", "").strip().replace(" ", "_")
    out = args.out if args.out is not None else RESULTS / f"linear_families_{tag}.json"
    print(f"linear_families: {machine_name(info)}; {str(dtype).replace('torch.', '')} on {device}", flush=True)
    result: dict = dict(script="benchmarks/linear_families.py",
                        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                        argv=sys.argv[1:] if argv is None else argv, machine=info, machine_name=machine_name(info),
                        timing_setup=dict(B=args.batch, H=args.heads, Dk=args.dk, Dv=args.dv, T=args.T,
                                          dtype=str(dtype).replace("torch.", ""), via=args.via, repeats=args.repeats,
                                          warmup=args.warmup, chunk_size=64),
                        bytes_setup=dict(B=args.bytes_batch, H=args.bytes_heads, Dk=args.bytes_dk, Dv=args.bytes_dv,
                                         local_len=args.bytes_local_len, dtype="float32", output_final_state=True,
                                         world_sizes=args.bytes_world_sizes, unit="bytes per rank per pass"),
                        timing=[], bytes=[])
    start = time.perf_counter()
    if "timing" in args.parts:
        result["timing"] = [asdict(r) for r in run_timing(args, device, dtype)]
    if "bytes" in args.parts:
        result["bytes"] = [asdict(r) for r in run_bytes(args)]
    result["elapsed_s"] = round(time.perf_counter() - start, 1)
    result["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")

    if result["timing"]:
        print(f"\nSingle-device chunked kernels ({args.via}), B={args.batch}, H={args.heads}, Dk={args.dk}, "
              f"Dv={args.dv}, {result['timing_setup']['dtype']}, median of {args.repeats}; {machine_name(info)}")
        print("\n".join(timing_table([TimingRow(**r) for r in result["timing"]])))
    mismatches = 0
    if result["bytes"]:
        rows = [BytesRow(**r) for r in result["bytes"]]
        mismatches = sum(r.match is False for r in rows)
        print(f"\nBytes per rank per pass (seqpar.linear_attention on torch's fake process group, "
              f"B={args.bytes_batch}, H={args.bytes_heads}, Dk={args.bytes_dk}, Dv={args.bytes_dv}, fp32, "
              f"output_final_state=True; formula: docs/linear.md)")
        print("\n".join(bytes_table(rows)))
    print(f"\nwrote {out} ({result['elapsed_s']} s)")
    if mismatches:
        print(f"ERROR: {mismatches} bytes row(s) differ from the formula of docs/linear.md", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
