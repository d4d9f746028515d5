"""Print the cost model of every strategy at million-token lengths and write it to a file.

    python benchmarks/cost_model.py --seq-len 1048576 --world-sizes 8 16 64 --out benchmarks/results/cost_model.md

Work per rank is exact (the block plan the strategies run); times are estimates for the machine
given by the flags (see seqpar.cost_model.Machine). ``--window`` models a causal sliding window
(softmax strategies; the ring then visits and sends only the K/V blocks some query sees). For
windows and packed documents per layout see benchmarks/masks.py."""
from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from seqpar.cost_model import Machine, Shape, linear_estimate, softmax_estimate
from seqpar.masks import AttentionMask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=1 << 20)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--attention-tflops", type=float, default=Machine.attention_tflops)
    parser.add_argument("--link-gbytes-s", type=float, default=Machine.link_gbytes_s)
    parser.add_argument("--window", type=int, default=None, help="causal sliding window (softmax), tokens")
    parser.add_argument("--out", type=Path, default=None, help="markdown file to write the table to")
    args = parser.parse_args()

    shape = Shape(seq_len=args.seq_len, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim)
    machine = Machine(attention_tflops=args.attention_tflops, link_gbytes_s=args.link_gbytes_s)
    mask = AttentionMask(causal=True, window=args.window)
    rows = []
    for P in args.world_sizes:
        for strategy, layout in [("ring", "contiguous"), ("ring", "zigzag"), ("ring", "striped"),
                                 ("allgather", "zigzag"), ("ulysses", "contiguous")]:
            if strategy == "ulysses" and args.kv_heads % P != 0 and args.heads % P != 0:
                continue
            rows.append(softmax_estimate(strategy, layout, P, shape, machine, mask=mask))
        if P % 8 == 0 and P > 8:
            rows.append(softmax_estimate("usp", "zigzag", P, shape, machine, ulysses_size=8, mask=mask))
        rows.append(linear_estimate("lasp2", P, shape, machine))
        rows.append(linear_estimate("lasp1", P, shape, machine))

    header = "| P | strategy | layout | busiest rank TFLOP | imbalance | MB sent/rank | serial steps | fwd ms |"
    window = "" if args.window is None else f", softmax window {args.window}"
    lines = [f"Cost model, one layer, B=1, T={args.seq_len}, H={args.heads}, Hkv={args.kv_heads}, D={args.head_dim}, "
             f"bf16{window}; machine: {asdict(machine)}", "", header, "|" + "---|" * 8]
    for e in rows:
        lines.append(f"| {e.world_size} | {e.strategy} | {e.layout} | {e.max_rank_tflop:.1f} | {e.imbalance:.2f} | "
                     f"{e.bytes_sent_per_rank / 2**20:.1f} | {e.serial_steps} | {e.fwd_ms:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
