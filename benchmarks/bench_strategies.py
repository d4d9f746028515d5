"""Time and memory of ONE rank of a P-rank sequence-parallel job, per strategy, next to the cost model.

Runs a single real process on torch's fake process group
(``torch.testing._internal.distributed.fake_pg``): every collective is a no-op, so what is
measured is the compute, the local copies and the memory of one rank of a large job (e.g. rank 7
of P = 8 at T = 1M tokens) on one device. Communication time is *not* in the measurement: each
row carries the cost model's estimate (``seqpar.cost_model``) of the same configuration — the
forward time it predicts with overlapped communication, the bytes this strategy sends per rank
and its serial communication steps — so compute and communication can be read together.

Received buffers of the fake collectives are never written (``torch.empty``): their contents are
whatever memory held, so outputs may contain NaN / inf. That does not change the work done (no
kernel branches on values); the ``nonfinite`` column flags it and nothing asserts on values.

Rank: by default the last rank (P - 1), the busiest one of a contiguous causal ring (it sees
every earlier block); zigzag / striped / Ulysses ranks all do (about) the same work. ``--rank``
picks another.

Forward is timed without autograd (inference); fwd+bwd is forward then
``torch.autograd.grad`` of a fixed random output gradient w.r.t. q, k, v (and g).
Times: median of ``--repeats`` (CUDA events on GPU, perf_counter on CPU), after ``--warmup``
untimed calls. Memory: on CUDA the peak allocated during one call minus what was allocated
before it (inputs excluded); on CPU torch keeps no allocator statistics, so the table shows the
process' peak resident set size after the row instead (monotone over the run: it only tells
that a row raised the process peak).

    # one rank of P=8, 1M tokens, H=16 / Hkv=4, D=128, bf16 (GPU)
    python benchmarks/bench_strategies.py --world-size 8 --seq-len 1048576
    # CPU smoke test (seconds)
    python benchmarks/bench_strategies.py --seq-len 1024 --world-size 4 --heads 2 --kv-heads 2 \\
        --head-dim 16 --dtype float32 --repeats 2 --out /tmp/strategies_cpu
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import re
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
SOFTMAX_STRATEGIES = ("ring", "allgather", "ulysses", "usp")
LINEAR_STRATEGIES = ("lasp2", "lasp1", "lasp1_serial")
DEFAULT_CONFIGS = ("ring:contiguous", "ring:zigzag", "ring:striped", "allgather:zigzag", "ulysses:contiguous",
                   "usp:zigzag", "lasp2:g_gamma", "lasp2:g", "lasp1:g_gamma", "lasp1:g")


@dataclass(frozen=True)
class Config:
    """One strategy configuration: softmax ``strategy:layout`` or linear ``strategy:gate[:layout]``."""

    family: str  # softmax | linear
    strategy: str
    layout: str
    gate: str = ""  # linear only: g_gamma | g | none

    @property
    def name(self) -> str:
        if self.family == "softmax":
            return f"{self.strategy}:{self.layout}"
        return f"{self.strategy}:{self.gate}:{self.layout}"


def parse_config(spec: str) -> Config:
    """``ring:zigzag`` -> softmax; ``lasp2:g_gamma`` or ``lasp1:g:zigzag`` -> linear."""
    parts = spec.split(":")
    if parts[0] in SOFTMAX_STRATEGIES:
        if len(parts) > 2:
            raise ValueError(f"softmax config {spec!r}: expected strategy[:layout]")
        return Config("softmax", parts[0], parts[1] if len(parts) > 1 else "contiguous")
    if parts[0] in LINEAR_STRATEGIES:
        if len(parts) > 3:
            raise ValueError(f"linear config {spec!r}: expected strategy[:gate[:layout]]")
        gate = parts[1] if len(parts) > 1 else "g_gamma"
        if gate not in ("g_gamma", "g", "none"):
            raise ValueError(f"linear config {spec!r}: gate must be g_gamma, g or none; got {gate!r}")
        return Config("linear", parts[0], parts[2] if len(parts) > 2 else "contiguous", gate)
    raise ValueError(f"unknown strategy in {spec!r}; expected one of {SOFTMAX_STRATEGIES + LINEAR_STRATEGIES}")


@dataclass
class Row:
    """One measured (or skipped) configuration and mode, with the cost model's estimate."""

    config: str
    family: str
    strategy: str
    layout: str
    gate: str
    mode: str  # fwd | fwd+bwd
    ms: float | None = None
    ms_all: list[float] = field(default_factory=list)
    rank_tflop: float | None = None  # work of the measured rank for this mode (softmax: exact block plan)
    tflops: float | None = None  # rank_tflop / time
    mtok_s: float | None = None  # local tokens / time
    peak_mib: float | None = None  # CUDA: peak extra allocated during one call
    max_rss_mib: float | None = None  # CPU: process peak RSS after the row
    nonfinite: bool | None = None  # outputs contained NaN/inf (expected: fake collectives return garbage)
    model_fwd_ms: float | None = None
    model_busiest_tflop: float | None = None
    model_imbalance: float | None = None
    model_mib_sent: float | None = None
    model_serial_steps: int | None = None
    note: str = ""


@dataclass
class Setup:
    """Everything a measurement needs that the command line fixes."""

    world_size: int
    rank: int
    seq_len: int
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    causal: bool
    usp_ulysses: int
    backend: str
    chunk_size: int
    warmup: int
    repeats: int

    @property
    def local_len(self) -> int:
        return self.seq_len // self.world_size


# ---------------------------------------------------------------------------------------------
# work counts and the cost model


def softmax_rank_pairs(layout: str, strategy: str, setup: Setup) -> int:
    """(query, key) pairs the measured rank computes in one forward.

    ring / allgather: exact, from the block plan the drivers run. ulysses / usp: after the head
    exchange every rank holds 1/P of the heads' full work (for usp, ring rank r of its row):
    approximated by the average, pairs over all heads / P (reported per Hq heads as the others).
    """
    from seqpar.cost_model import visible_pairs
    from seqpar.layout import plan_blocks, segments

    P, L, r = setup.world_size, setup.local_len, setup.rank
    if strategy in ("ring", "allgather"):
        mine = segments(layout, r, P, L)
        return sum(visible_pairs(t.q_len, t.k_len, t.diagonal_offset)
                   for src in range(P) for t in plan_blocks(mine, segments(layout, src, P, L), setup.causal))
    return visible_pairs(setup.seq_len, setup.seq_len, 0 if setup.causal else None) // P


def cost_model_row(cfg: Config, setup: Setup, machine) -> dict:
    """The cost model's forward estimate of ``cfg`` as Row fields (or a note when it has none)."""
    from seqpar.cost_model import Shape, linear_estimate, softmax_estimate

    shape = Shape(batch=setup.batch, seq_len=setup.seq_len, heads=setup.heads,
                  kv_heads=setup.kv_heads if cfg.family == "softmax" else setup.heads,
                  head_dim=setup.head_dim, element_bytes=torch.finfo(setup.dtype).bits // 8)
    try:
        if cfg.family == "softmax":
            est = softmax_estimate(cfg.strategy, cfg.layout, setup.world_size, shape, machine, causal=setup.causal,
                                   ulysses_size=setup.usp_ulysses)
        else:
            # lasp1_serial sends what lasp1 sends; the model has no serial-compute variant
            est = linear_estimate("lasp1" if cfg.strategy == "lasp1_serial" else cfg.strategy, setup.world_size,
                                  shape, machine, chunks_per_rank=2 if cfg.layout == "zigzag" else 1)
    except ValueError as exc:
        return {"note": f"cost model: {exc}"}
    return dict(model_fwd_ms=est.fwd_ms, model_busiest_tflop=est.max_rank_tflop, model_imbalance=est.imbalance,
                model_mib_sent=est.bytes_sent_per_rank / 2 ** 20, model_serial_steps=est.serial_steps)


# ---------------------------------------------------------------------------------------------
# inputs and the calls being timed


def make_call(cfg: Config, setup: Setup, mode: str, usp_groups, gen: torch.Generator
              ) -> tuple[Callable[[], list[torch.Tensor]], int]:
    """Inputs for ``cfg`` on this rank and a closure running one ``mode`` call; returns
    (call, local tokens). The closure returns the tensors it produced (outputs or grads)."""
    import seqpar

    B, L, D, dev, dt = setup.batch, setup.local_len, setup.head_dim, setup.device, setup.dtype
    grad = mode == "fwd+bwd"

    def draw(*shape: int, scale: float = 1.0, dtype: torch.dtype = dt) -> torch.Tensor:
        x = torch.randn(*shape, generator=gen, dtype=torch.float32) * scale
        return x.to(device=dev, dtype=dtype).requires_grad_(grad)

    if cfg.family == "softmax":
        q, k, v = draw(B, L, setup.heads, D), draw(B, L, setup.kv_heads, D), draw(B, L, setup.kv_heads, D)
        group = usp_groups if cfg.strategy == "usp" else None
        inputs = [q, k, v]

        def forward() -> torch.Tensor:
            return seqpar.attention(q, k, v, strategy=cfg.strategy, layout=cfg.layout, group=group,
                                    causal=setup.causal, backend=setup.backend)
    else:
        H = setup.heads
        q, k, v = draw(B, L, H, D, scale=D ** -0.5), draw(B, L, H, D, scale=D ** -0.5), draw(B, L, H, D)
        inputs = [q, k, v]
        kwargs: dict = {}
        if cfg.gate == "g_gamma":  # RetNet / Lightning per-head decays, a fixed buffer
            kwargs["g_gamma"] = torch.log1p(-torch.pow(2.0, -5.0 - torch.arange(H, dtype=torch.float32))).to(dev)
        elif cfg.gate == "g":  # GLA-style data-dependent gates, kept in fp32
            g = (torch.nn.functional.logsigmoid(torch.randn(B, L, H, generator=gen)) / 16).to(dev).requires_grad_(grad)
            kwargs["g"] = g
            inputs.append(g)

        def forward() -> torch.Tensor:
            o, _ = seqpar.linear_attention(q, k, v, strategy=cfg.strategy, layout=cfg.layout, group=None,
                                           backend=setup.backend, chunk_size=setup.chunk_size, **kwargs)
            return o

    if not grad:
        def call() -> list[torch.Tensor]:
            with torch.no_grad():
                return [forward()]
        return call, B * L

    d_out = torch.randn(q.shape, generator=gen, dtype=torch.float32).to(device=dev, dtype=dt)

    def call() -> list[torch.Tensor]:
        o = forward()
        return [o, *torch.autograd.grad(o, inputs, d_out)]

    return call, B * L


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)


def measure(call: Callable[[], list[torch.Tensor]], setup: Setup) -> dict:
    """Run ``call`` warmup + repeats times; median ms, all ms, peak extra MiB (CUDA), non-finite flag."""
    dev = setup.device
    out = call()  # first call: compiles / autotunes, outside timing
    nonfinite = any(not bool(torch.isfinite(t).all()) for t in out if t is not None and t.is_floating_point())
    del out
    for _ in range(setup.warmup):
        call()
    _sync(dev)
    times = []
    for _ in range(setup.repeats):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e3)
    result = dict(ms=statistics.median(times), ms_all=times, nonfinite=nonfinite)
    if dev.type == "cuda":
        _sync(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        call()
        _sync(dev)
        result["peak_mib"] = (torch.cuda.max_memory_allocated(dev) - base) / 2 ** 20
    else:
        result["max_rss_mib"] = _max_rss_mib()
    return result


def run_config(cfg: Config, mode: str, setup: Setup, usp_groups, machine) -> Row:
    """Measure one configuration and mode; a failure (bad shape, OOM...) gives a row with a note."""
    row = Row(cfg.name, cfg.family, cfg.strategy, cfg.layout, cfg.gate, mode)
    model = cost_model_row(cfg, setup, machine)
    note = model.pop("note", "")
    for key, value in model.items():
        setattr(row, key, value)
    gen = torch.Generator().manual_seed(1234)
    try:
        call, tokens = make_call(cfg, setup, mode, usp_groups, gen)
        got = measure(call, setup)
    except (ValueError, RuntimeError, torch.cuda.OutOfMemoryError) as exc:  # a row, not a crash
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        row.note = "; ".join(x for x in (f"skipped: {type(exc).__name__}: {msg[:200]}", note) if x)
        if setup.device.type == "cuda":
            torch.cuda.empty_cache()
        return row
    finally:
        call = None  # drop the inputs before the next row
    for key, value in got.items():
        setattr(row, key, value)
    seconds = row.ms / 1e3
    row.mtok_s = tokens / seconds / 1e6 if seconds > 0 else None
    if cfg.family == "softmax":
        fwd = 4.0 * setup.batch * setup.heads * setup.head_dim * softmax_rank_pairs(cfg.layout, cfg.strategy, setup)
    else:
        fwd = (row.model_busiest_tflop or 0.0) * 1e12
    row.rank_tflop = (fwd if mode == "fwd" else 3.5 * fwd) / 1e12
    row.tflops = row.rank_tflop / seconds if seconds > 0 and row.rank_tflop else None
    if row.nonfinite:
        note = "; ".join(x for x in (note, "outputs non-finite (fake collectives: garbage received buffers)") if x)
    row.note = note
    return row


# ---------------------------------------------------------------------------------------------
# output


def _fmt(x: float | int | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown(rows: list[Row], meta: dict) -> str:
    """The header lines and the table of ``rows``."""
    s = meta["setup"]
    mem = "peak extra MiB" if s["device"].startswith("cuda") else "proc max RSS MiB"
    lines = [
        f"# seqpar strategies, one rank of a P-rank job ({meta['device_name']})",
        "",
        f"Measured rank {s['rank']} of P={s['world_size']} on torch's fake process group (collectives are no-ops: "
        f"times are this rank's compute and local copies only). B={s['batch']}, T={s['seq_len']} "
        f"(local {s['seq_len'] // s['world_size']}), H={s['heads']}, Hkv={s['kv_heads']} (linear: H for q, k, v), "
        f"D={s['head_dim']}, {s['dtype']}, causal={s['causal']}, usp ulysses size {s['usp_ulysses']}, "
        f"backend {s['backend']}; median of {s['repeats']} after {s['warmup']} warmup. "
        f"TFLOP/s: this rank's work (softmax: exact block plan, fwd+bwd = 3.5x fwd; linear: cost-model count) "
        f"over the time. model: seqpar.cost_model forward estimate for {meta['machine']['name']} "
        f"(busiest rank, with communication), MiB sent per rank and serial communication steps.",
        "",
        f"| config | mode | ms | rank TFLOP | TFLOP/s | Mtok/s | {mem} | model fwd ms | model MiB sent | model steps | "
        f"model imbalance | note |",
        "|" + "---|" * 12,
    ]
    for r in rows:
        memv = r.peak_mib if r.peak_mib is not None else r.max_rss_mib
        lines.append(f"| {r.config} | {r.mode} | {_fmt(r.ms, '.3f')} | {_fmt(r.rank_tflop, '.4g')} | {_fmt(r.tflops, '.3g')} | "
                     f"{_fmt(r.mtok_s, '.3g')} | {_fmt(memv, '.0f')} | {_fmt(r.model_fwd_ms, '.3f')} | "
                     f"{_fmt(r.model_mib_sent, '.2f')} | {_fmt(r.model_serial_steps, 'd')} | "
                     f"{_fmt(r.model_imbalance, '.2f')} | {r.note} |")
    return "\n".join(lines)


def write_results(stem: Path, rows: list[Row], meta: dict) -> None:
    """Write ``stem``.json (rows + metadata) and ``stem``.md (the table)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(rows, meta) + "\n")


def device_tag(device: torch.device) -> str:
    """``cpu`` or a short GPU name such as ``h100`` for default file names."""
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device).lower()
    m = re.search(r"\b([a-z]\d{2,4}[a-z]?)\b", name)
    return m.group(1) if m else re.sub(r"[^a-z0-9]+", "_", name).strip("_")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=8, help="P, the ranks of the job being simulated")
    p.add_argument("--rank", type=int, default=None, help="the rank measured (default P - 1, busiest of contiguous causal)")
    p.add_argument("--seq-len", type=int, default=1 << 20, help="global sequence length T")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16, help="query heads (and linear-attention heads)")
    p.add_argument("--kv-heads", type=int, default=None,
                   help="softmax K/V heads (GQA); default 4 when --heads is a multiple of 4, else --heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=["auto"] + sorted(DTYPES), default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS),
                   help="softmax strategy:layout or linear strategy:gate[:layout] (gate g_gamma|g|none)")
    p.add_argument("--modes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"])
    p.add_argument("--no-causal", dest="causal", action="store_false", help="softmax without the causal mask")
    p.add_argument("--usp-ulysses", type=int, default=2, help="Ulysses size of usp (ring size = P / this)")
    p.add_argument("--backend", default="auto", help="block kernel backend: auto | torch | triton")
    p.add_argument("--chunk-size", type=int, default=64, help="linear-attention chunk size")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after the first (compile) call")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--time-budget-s", type=float, default=0.0,
                   help="stop starting new rows after this many seconds (0: no limit); results so far are written")
    p.add_argument("--attention-tflops", type=float, default=None, help="cost model machine (default: its H100)")
    p.add_argument("--linear-tflops", type=float, default=None)
    p.add_argument("--link-gbytes-s", type=float, default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 on CPU, where several threads on a shared machine thrash; "
                        "torch's default with CUDA)")
    p.add_argument("--out", type=Path, default=None,
                   help="output stem: writes STEM.json and STEM.md (default benchmarks/results/strategies_<device>)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda_run = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    threads = args.threads if args.threads is not None else (0 if cuda_run else 1)
    if threads > 0:
        torch.set_num_threads(threads)
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from seqpar.comm import build_usp_groups
    from seqpar.cost_model import Machine

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    P = args.world_size
    rank = P - 1 if args.rank is None else args.rank
    if not 0 <= rank < P:
        raise SystemExit(f"--rank {rank} outside 0..{P - 1}")
    if args.seq_len % P != 0:
        raise SystemExit(f"--seq-len {args.seq_len} is not divisible by --world-size {P}")
    try:
        configs = [parse_config(c) for c in args.configs]
    except ValueError as exc:
        raise SystemExit(f"--configs: {exc}") from None
    machine_kw = {k: v for k, v in dict(attention_tflops=args.attention_tflops, linear_tflops=args.linear_tflops,
                                         link_gbytes_s=args.link_gbytes_s).items() if v is not None}
    machine = Machine(**machine_kw)
    kv_heads = args.kv_heads if args.kv_heads is not None else (4 if args.heads % 4 == 0 else args.heads)
    setup = Setup(P, rank, args.seq_len, args.batch, args.heads, kv_heads, args.head_dim, dtype, device,
                  args.causal, args.usp_ulysses, args.backend, args.chunk_size, args.warmup, args.repeats)
    stem = args.out if args.out is not None else Path(__file__).resolve().parent / "results" / f"strategies_{device_tag(device)}"
    if stem.suffix in (".json", ".md"):
        stem = stem.with_suffix("")

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=P)
    try:
        usp_groups = None
        if any(c.strategy == "usp" for c in configs) and P % args.usp_ulysses == 0:
            usp_groups = build_usp_groups(list(range(P)), args.usp_ulysses)
        meta = dict(
            script="benchmarks/bench_strategies.py",
            date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            torch=torch.__version__, python=platform.python_version(), argv=sys.argv[1:] if argv is None else argv,
            setup={**{k: v for k, v in asdict(setup).items() if k not in ("dtype", "device")},
                   "dtype": str(dtype).replace("torch.", ""), "device": str(device)},
            machine=asdict(machine), complete=False)
        rows: list[Row] = []
        start = time.perf_counter()
        print(f"bench_strategies: rank {rank} of P={P} (fake process group), T={args.seq_len}, local "
              f"{setup.local_len}, {meta['setup']['dtype']} on {device}; writing {stem}.json/.md", flush=True)
        for cfg in configs:
            for mode in args.modes:
                if args.time_budget_s and time.perf_counter() - start > args.time_budget_s:
                    rows.append(Row(cfg.name, cfg.family, cfg.strategy, cfg.layout, cfg.gate, mode,
                                    note=f"not run: --time-budget-s {args.time_budget_s:g} spent"))
                    continue
                if cfg.strategy == "usp" and usp_groups is None:
                    rows.append(Row(cfg.name, cfg.family, cfg.strategy, cfg.layout, cfg.gate, mode,
                                    note=f"skipped: --usp-ulysses {args.usp_ulysses} does not divide P={P}"))
                    continue
                row = run_config(cfg, mode, setup, usp_groups, machine)
                rows.append(row)
                print(f"  {row.config:28s} {row.mode:8s} ms={_fmt(row.ms, '.3f'):>10s} "
                      f"TFLOP/s={_fmt(row.tflops, '.3g'):>8s} model_fwd_ms={_fmt(row.model_fwd_ms, '.3f')} {row.note}",
                      flush=True)
                write_results(stem, rows, meta)  # partial results survive a timeout
        meta["complete"] = True
        meta["elapsed_s"] = time.perf_counter() - start
        write_results(stem, rows, meta)
        print(markdown(rows, meta))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
