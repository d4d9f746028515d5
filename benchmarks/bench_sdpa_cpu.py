"""One softmax attention block, forward and backward, per dispatcher backend (CPU by default).

    python benchmarks/bench_sdpa_cpu.py --batch 1 --heads 4 --length 4096 --head-dim 64

Prints the best of ``--repeats`` times (wall, and with ``--cpu-time`` process CPU time, which a
busy shared machine disturbs less; use it with ``--threads 1``) for each mask and backend (``torch`` = the reference,
``sdpa`` = torch's fused attention ops, see docs/kernels.md). On a GPU (untested):
``--device cuda --dtype bfloat16 --backends triton sdpa``.
"""
from __future__ import annotations

import argparse
import time

import torch

from seqpar.kernels import attention_block_backward, attention_block_forward


def time_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, backend: str,
               offset: int | None, repeats: int, clock=time.perf_counter) -> tuple[float, float]:
    """Best (forward, backward) seconds of ``clock`` over ``repeats`` runs after one warm-up."""
    scale = q.shape[-1] ** -0.5
    sync = torch.cuda.synchronize if q.is_cuda else (lambda: None)
    best_f = best_b = float("inf")
    for _ in range(repeats + 1):
        sync()
        t0 = clock()
        o, lse = attention_block_forward(q, k, v, scale=scale, diagonal_offset=offset, backend=backend)
        sync()
        t1 = clock()
        delta = (o * do.to(o.dtype)).sum(-1).transpose(1, 2).contiguous()
        sync()
        t2 = clock()
        attention_block_backward(do, q, k, v, lse, delta, scale=scale, diagonal_offset=offset, backend=backend)
        sync()
        t3 = clock()
        best_f, best_b = min(best_f, t1 - t0), min(best_b, t3 - t2)
    return best_f, best_b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=["torch", "sdpa"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--cpu-time", action="store_true", help="time.process_time instead of wall time")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.length, args.heads, args.head_dim)
    q, k, v, do = (torch.randn(shape, generator=g).to(args.device, getattr(torch, args.dtype)) for _ in range(4))
    print(f"B={args.batch} H={args.heads} T={args.length} D={args.head_dim} {args.dtype} {args.device} "
          f"torch {torch.__version__} threads {torch.get_num_threads()} {'cpu' if args.cpu_time else 'wall'} time")
    for offset in (0, -1, None):
        totals = {}
        for backend in args.backends:
            f, b = time_block(q, k, v, do, backend, offset, args.repeats, clock)
            totals[backend] = f + b
            print(f"mask={str(offset):>4} {backend:6s} fwd {f:7.3f} s  bwd {b:7.3f} s  total {f + b:7.3f} s", flush=True)
        if "torch" in totals:
            print("    speed-up vs torch: " + ", ".join(f"{n} {totals['torch'] / t:.1f}x" for n, t in totals.items()))


if __name__ == "__main__":
    main()
