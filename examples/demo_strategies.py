"""Run every softmax strategy x layout on gloo processes and compare with one device.

    python examples/demo_strategies.py                       # 4 processes, causal GQA, fp64
    python examples/demo_strategies.py --world-size 2 --seq-len 96 --dtype float32 --no-causal

Every rank draws the same full random q, k, v (and loss weights) from one seed, takes its shard
under the layout, runs ``seqpar.attention`` forward and backward, and rank 0 prints the max
absolute error of o, dq, dk and dv against the single-device reference
(``seqpar.kernels.attention_reference``), with the time of one forward + backward.
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import seqpar
from seqpar.comm import all_gather, build_usp_groups
from seqpar.kernels import attention_reference
from seqpar.layout import LAYOUTS, shard_tensor, unshard_tensor


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=4, help="gloo processes (default 4)")
    parser.add_argument("--seq-len", type=int, default=256, help="global sequence length (default 256)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8, help="query heads (default 8)")
    parser.add_argument("--kv-heads", type=int, default=2, help="KV heads (default 2: GQA)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--ulysses-size", type=int, default=None,
                        help="Ulysses axis of usp (default: 2 when it divides the world size, else the world size)")
    parser.add_argument("--dtype", choices=["float64", "float32", "bfloat16"], default="float64")
    parser.add_argument("--no-causal", action="store_true", help="non-causal attention")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_full(local: torch.Tensor, layout: str, group, dim: int) -> torch.Tensor:
    shards = all_gather(local.detach().contiguous(), group).wait()
    return unshard_tensor(list(shards.unbind(0)), layout, dim=dim)


def _max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def run_rank(rank: int, args: argparse.Namespace, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=args.world_size,
                            timeout=datetime.timedelta(seconds=120))
    world_size, causal = args.world_size, not args.no_causal
    dtype = getattr(torch, args.dtype)
    ulysses_size = args.ulysses_size or (2 if world_size % 2 == 0 and world_size > 2 else world_size)
    usp_groups = build_usp_groups(list(range(world_size)), ulysses_size)

    gen = torch.Generator().manual_seed(args.seed)
    shape_q = (args.batch, args.seq_len, args.heads, args.head_dim)
    shape_kv = (args.batch, args.seq_len, args.kv_heads, args.head_dim)
    q, k, v = (torch.randn(s, generator=gen, dtype=torch.float64) for s in (shape_q, shape_kv, shape_kv))
    q, k, v = (x.to(dtype) for x in (q, k, v))
    weights = torch.randn(shape_q, generator=gen, dtype=torch.float64)
    reference_inputs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    o_ref, _ = attention_reference(*reference_inputs, causal=causal)
    (o_ref * weights).sum().backward()
    expected = [o_ref.detach()] + [x.grad for x in reference_inputs]

    rows = []
    for strategy in seqpar.STRATEGIES:
        group = usp_groups if strategy == "usp" else None
        label = f"usp {ulysses_size}x{world_size // ulysses_size}" if strategy == "usp" else strategy
        for layout in LAYOUTS:
            q_local, k_local, v_local = (shard_tensor(x, layout, rank, world_size).requires_grad_() for x in (q, k, v))
            w_local = shard_tensor(weights, layout, rank, world_size)
            try:
                dist.barrier()
                start = time.perf_counter()
                o_local = seqpar.attention(q_local, k_local, v_local, strategy=strategy, layout=layout,
                                           group=group, causal=causal)
                (o_local.double() * w_local).sum().backward()
                elapsed_ms = 1e3 * (time.perf_counter() - start)
            except ValueError as error:  # e.g. heads not divisible for Ulysses
                rows.append((label, layout, f"skipped: {error}"))
                continue
            results = [_gather_full(t, layout, None, 1) for t in (o_local, q_local.grad, k_local.grad, v_local.grad)]
            errors = [_max_error(a, b) for a, b in zip(results, expected)]
            rows.append((label, layout, errors, elapsed_ms))

    if rank == 0:
        print(f"world_size={world_size} seq_len={args.seq_len} batch={args.batch} heads={args.heads}/"
              f"{args.kv_heads} head_dim={args.head_dim} dtype={args.dtype} causal={causal}")
        header = f"{'strategy':<12} {'layout':<11} {'o':>9} {'dq':>9} {'dk':>9} {'dv':>9} {'fwd+bwd ms':>11}"
        print(header)
        print("-" * len(header))
        for row in rows:
            if len(row) == 3:
                print(f"{row[0]:<12} {row[1]:<11} {row[2]}")
            else:
                label, layout, errors, elapsed_ms = row
                print(f"{label:<12} {layout:<11} " + " ".join(f"{e:9.1e}" for e in errors) + f" {elapsed_ms:11.1f}")
    dist.destroy_process_group()


def main() -> None:
    args = parse_args()
    mp.spawn(run_rank, args=(args, _free_port()), nprocs=args.world_size, join=True)


if __name__ == "__main__":
    main()
