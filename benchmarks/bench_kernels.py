"""Benchmark seqpar's Triton kernels on one GPU against torch SDPA and flash-linear-attention.

Softmax (causal, bf16, B=1, H=16, D=128 by default): ours (attention_block_forward_triton /
attention_block_backward_triton) vs torch SDPA with the flash backend and with the cuDNN backend
(torch.nn.attention.sdpa_kernel), forward and forward+backward.
Linear (decay per head, g_gamma): ours vs fla.ops.simple_gla.chunk_simple_gla when importable.

Timing: triton.testing.do_bench, median. FLOPs of causal attention (the usual convention): forward
2*B*H*T^2*D, backward 2.5x forward, so fwd+bwd = 3.5 * 2*B*H*T^2*D. Peak memory is the peak
allocated during one call minus what was allocated before it (inputs excluded).

Correctness is checked against SDPA (and fla) at one size before anything is timed.

    python benchmarks/bench_kernels.py --out results/kernels.json
    python benchmarks/bench_kernels.py --softmax-T 4096 16384 --linear-T 65536 --out r.json
"""
from __future__ import annotations

import argparse
import datetime as _dt
import inspect
import json
import math
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Row:
    """One measured (or failed) configuration."""
    family: str          # softmax | linear
    impl: str            # ours | sdpa-flash | sdpa-cudnn | fla-chunk_simple_gla
    mode: str            # fwd | fwd+bwd
    T: int
    ms: float | None
    tflops: float | None
    mtok_s: float | None
    peak_mib: float | None
    note: str = ""


def attention_flops(B: int, H: int, T: int, D: int, mode: str) -> float:
    """Causal attention FLOPs by the usual convention (fwd 2*B*H*T^2*D, bwd 2.5x fwd)."""
    fwd = 2.0 * B * H * T * T * D
    return fwd if mode == "fwd" else 3.5 * fwd


def _measure(fn: Callable[[], object], warmup: int, rep: int) -> tuple[float, float]:
    """(median ms, peak extra MiB) of fn."""
    import triton.testing

    torch.cuda.synchronize()
    fn()  # compile / autotune outside the timed and measured region
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    return float(ms), float(peak)


def _run(rows: list[Row], family: str, impl: str, mode: str, T: int, fn: Callable[[], object],
         flops: float | None, tokens: int, args) -> None:
    try:
        ms, peak = _measure(fn, args.warmup, args.rep)
        rows.append(Row(family, impl, mode, T, ms, flops / ms / 1e9 if flops else None,
                        tokens / ms / 1e3, peak))
    except torch.cuda.OutOfMemoryError:
        rows.append(Row(family, impl, mode, T, None, None, None, None, "OOM"))
    except Exception as exc:  # a backend that does not support the shape: record, keep going
        rows.append(Row(family, impl, mode, T, None, None, None, None, f"{type(exc).__name__}: {exc}"[:160]))
    finally:
        torch.cuda.empty_cache()
    r = rows[-1]
    print(f"  {family:8s} {impl:22s} {mode:8s} T={T:7d}  "
          + (f"{r.ms:9.3f} ms" if r.ms is not None else f"  {r.note}"), flush=True)


# --------------------------------------------------------------------------------------------
# softmax
# --------------------------------------------------------------------------------------------

def _softmax_inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, do = (torch.randn(B, T, H, D, device="cuda", dtype=dtype, generator=g) for _ in range(4))
    return q, k, v, do


def _ours_softmax(q, k, v, do, scale: float):
    from seqpar.kernels.softmax_triton import attention_block_backward_triton, attention_block_forward_triton

    def fwd():
        return attention_block_forward_triton(q, k, v, scale=scale, diagonal_offset=0)

    def fwd_bwd():
        o, lse = attention_block_forward_triton(q, k, v, scale=scale, diagonal_offset=0)
        delta = (o * do.float()).sum(-1).transpose(1, 2).contiguous()
        return attention_block_backward_triton(do, q, k, v, lse, delta, scale=scale, diagonal_offset=0)

    return fwd, fwd_bwd


def _sdpa(q, k, v, do, backend):
    from torch.nn.attention import sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
    dot = do.transpose(1, 2)

    def fwd():
        with sdpa_kernel(backend), torch.no_grad():
            return sdpa(qt, kt, vt, is_causal=True)

    def fwd_bwd():
        with sdpa_kernel(backend):
            o = sdpa(qt, kt, vt, is_causal=True)
        return torch.autograd.grad(o, (qt, kt, vt), dot)

    return fwd, fwd_bwd


def check_softmax(T: int, H: int, D: int, dtype: torch.dtype) -> dict:
    """Max abs differences of ours vs SDPA (flash) at one size: o and dq/dk/dv."""
    from torch.nn.attention import SDPBackend

    q, k, v, do = _softmax_inputs(1, T, H, D, dtype, seed=1)
    scale = D ** -0.5
    o, _ = _ours_softmax(q, k, v, do, scale)[0]()
    grads = _ours_softmax(q, k, v, do, scale)[1]()
    ref_o = _sdpa(q, k, v, do, SDPBackend.FLASH_ATTENTION)[0]().transpose(1, 2).float()
    ref_g = [g.transpose(1, 2).float() for g in _sdpa(q, k, v, do, SDPBackend.FLASH_ATTENTION)[1]()]
    errs = {"o": (o - ref_o).abs().max().item()}
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_g):
        errs[name] = ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
    ok = errs["o"] < 2e-2 and all(errs[n] < 5e-2 for n in ("dq", "dk", "dv"))
    return {"T": T, "max_abs_err_o": errs["o"], "rel_err_grads": {n: errs[n] for n in ("dq", "dk", "dv")}, "ok": ok}


def bench_softmax(args, rows: list[Row]) -> None:
    from torch.nn.attention import SDPBackend

    dtype = DTYPES[args.dtype]
    for T in args.softmax_T:
        q, k, v, do = _softmax_inputs(args.B, T, args.H, args.D, dtype)
        scale = args.D ** -0.5
        impls = {"ours": _ours_softmax(q, k, v, do, scale),
                 "sdpa-flash": _sdpa(q, k, v, do, SDPBackend.FLASH_ATTENTION),
                 "sdpa-cudnn": _sdpa(q, k, v, do, SDPBackend.CUDNN_ATTENTION)}
        for impl, (fwd, fwd_bwd) in impls.items():
            for mode, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                if mode not in args.modes:
                    continue
                _run(rows, "softmax", impl, mode, T, fn, attention_flops(args.B, args.H, T, args.D, mode),
                     args.B * T, args)
        del q, k, v, do, impls
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# linear
# --------------------------------------------------------------------------------------------

def _fla():
    try:
        from fla.ops.simple_gla import chunk_simple_gla
        return chunk_simple_gla
    except Exception:
        return None


def _linear_inputs(B: int, T: int, H: int, D: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, do = (torch.randn(B, T, H, D, device="cuda", dtype=dtype, generator=g) for _ in range(4))
    k = k * D ** -0.5  # keep the no-decay state magnitude moderate
    # per-head log decay with ALiBi / Lightning-Attention slopes: -2^(-8 (h + 1) / H)
    g_gamma = -torch.exp2(-8.0 * (torch.arange(H, device="cuda", dtype=torch.float32) + 1) / H)
    return q, k, v, do, g_gamma


def _ours_linear(q, k, v, do, g_gamma):
    from seqpar.kernels.linear_triton import (
        chunk_linear_attention_backward_triton,
        chunk_linear_attention_forward_triton,
    )

    def fwd():
        return chunk_linear_attention_forward_triton(q, k, v, g_gamma=g_gamma)

    def fwd_bwd():
        chunk_linear_attention_forward_triton(q, k, v, g_gamma=g_gamma)
        return chunk_linear_attention_backward_triton(do, q, k, v, g_gamma=g_gamma)

    return fwd, fwd_bwd


def _fla_linear(chunk_simple_gla, q, k, v, do, g_gamma):
    kwargs = {"g_gamma": g_gamma}
    if "head_first" in inspect.signature(chunk_simple_gla).parameters:
        kwargs["head_first"] = False
    qf, kf, vf = (x.detach().requires_grad_() for x in (q, k, v))

    def fwd():
        with torch.no_grad():
            return chunk_simple_gla(qf, kf, vf, **kwargs)

    def fwd_bwd():
        o = chunk_simple_gla(qf, kf, vf, **kwargs)[0]
        return torch.autograd.grad(o, (qf, kf, vf), do)

    return fwd, fwd_bwd


def check_linear(T: int, H: int, D: int, dtype: torch.dtype) -> dict:
    """Ours vs the fp32 chunked reference (and fla when importable) at one size."""
    from seqpar.kernels.linear_reference import chunk_linear_attention_forward_reference

    q, k, v, do, g_gamma = _linear_inputs(1, T, H, D, dtype, seed=1)
    o = _ours_linear(q, k, v, do, g_gamma)[0]()[0]
    ref = chunk_linear_attention_forward_reference(q.float(), k.float(), v.float(), g_gamma=g_gamma)[0]
    out = {"T": T, "rel_err_o_vs_reference": ((o - ref).abs().max() / ref.abs().max()).item()}
    fla = _fla()
    if fla is not None:
        of = _fla_linear(fla, q, k, v, do, g_gamma)[0]()[0].float()
        out["rel_err_o_vs_fla"] = ((o - of).abs().max() / of.abs().max()).item()
    out["ok"] = out["rel_err_o_vs_reference"] < 3e-2 and out.get("rel_err_o_vs_fla", 0.0) < 3e-2
    return out


def bench_linear(args, rows: list[Row]) -> None:
    dtype = DTYPES[args.dtype]
    fla = _fla()
    for T in args.linear_T:
        q, k, v, do, g_gamma = _linear_inputs(args.B, T, args.H, args.D, dtype)
        impls = {"ours": _ours_linear(q, k, v, do, g_gamma)}
        if fla is not None:
            impls["fla-chunk_simple_gla"] = _fla_linear(fla, q, k, v, do, g_gamma)
        for impl, (fwd, fwd_bwd) in impls.items():
            for mode, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                if mode in args.modes:
                    _run(rows, "linear", impl, mode, T, fn, None, args.B * T, args)
        del q, k, v, do, impls
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------

def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(rows: list[Row]) -> str:
    """A markdown table of the rows (readable as plain text too)."""
    head = ["family", "impl", "mode", "T", "ms", "TFLOP/s", "Mtok/s", "peak MiB", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.family, r.impl, r.mode, str(r.T), _fmt(r.ms, ".3f"), _fmt(r.tflops, ".1f"),
                 _fmt(r.mtok_s, ".2f"), _fmt(r.peak_mib, ".0f"), r.note]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--softmax-T", type=int, nargs="*", default=[4096, 16384, 65536, 131072])
    p.add_argument("--linear-T", type=int, nargs="*", default=[4096, 16384, 65536, 262144])
    p.add_argument("--modes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"])
    p.add_argument("--check-T", type=int, default=4096, help="size of the correctness check before timing")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    p.add_argument("--out", type=Path, default=None,
                   help="write results as JSON here and as markdown next to it (.md)")
    p.add_argument("--check-only", action="store_true", help="run the correctness checks and exit")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU; none is available.", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = DTYPES[args.dtype]
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)

    checks = {}
    if args.softmax_T:
        checks["softmax"] = check_softmax(args.check_T, args.H, args.D, dtype)
        print("softmax check vs SDPA flash:", checks["softmax"], flush=True)
    if args.linear_T:
        checks["linear"] = check_linear(args.check_T, args.H, args.D, dtype)
        print("linear check:", checks["linear"], flush=True)
    if not all(c["ok"] for c in checks.values()):
        print("correctness check FAILED: not timing", file=sys.stderr)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"checks": checks, "rows": []}, indent=2))
        return 1
    if args.check_only:
        return 0

    rows: list[Row] = []
    if args.softmax_T:
        bench_softmax(args, rows)
    if args.linear_T:
        bench_linear(args, rows)
    md = table(rows)
    print(md)
    if args.out:
        import triton

        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                "python": platform.python_version(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                "B": args.B, "H": args.H, "D": args.D, "dtype": args.dtype, "causal": True,
                "flops_convention": "fwd 2*B*H*T^2*D, fwd+bwd 3.5x that", "fla_available": _fla() is not None}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "checks": checks, "rows": [asdict(r) for r in rows]}, indent=2))
        args.out.with_suffix(".md").write_text(
            f"# Kernel benchmark ({meta['device']}, {args.dtype}, B={args.B}, H={args.H}, D={args.D}, causal)\n\n"
            + md + "\n")
        print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
