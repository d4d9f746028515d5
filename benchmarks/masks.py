"""Cost model of the attention masks: causal, sliding window, packed documents, documents + window.

    python benchmarks/masks.py                # T = 1M, P = 8; writes benchmarks/results/masks_cost_model.{md,json}
    python benchmarks/masks.py --quick        # T = 64K, P = 8, a few seconds; writes only with --out

Per mask, layout (contiguous, zigzag, striped, and the document-aware ``balanced`` layout built
for the mask by ``seqpar.layout.balanced_layout``) and strategy (ring, allgather, ulysses where the
heads split over P): kernel calls per rank (max), forward TFLOP per rank (max and mean),
imbalance (max / mean), MiB each rank sends per forward pass, ring steps (K/V blocks a ring
visits, its own included) and the estimated forward time. Work, calls, steps and bytes are exact:
they come from the block plan the strategies run (``seqpar.layout.plan_blocks`` under the
``seqpar.masks.AttentionMask``, ``seqpar.softmax.plan.ring_steps``). Only the times depend on the
machine, a cost model (``seqpar.cost_model.Machine``), not a measurement.

Documents: lengths drawn log-normal (median 2K tokens, sigma 1.75, fixed seed) until they fill
the sequence (the last one cut to fit), so that a few documents are longer than a rank's shard.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

from seqpar.cost_model import Machine, Shape, block_tasks_per_rank, softmax_estimate
from seqpar.layout import LAYOUTS, balanced_layout
from seqpar.masks import AttentionMask

RESULTS = Path(__file__).resolve().parent / "results" / "masks_cost_model"
STRATEGIES = ("ring", "allgather", "ulysses")
LAYOUT_NAMES = LAYOUTS + ("balanced",)


def lognormal_documents(seq_len: int, median: int, sigma: float, seed: int) -> tuple[int, ...]:
    """Document boundaries (0, e_1, ..., seq_len) of log-normal lengths (the last cut to fit)."""
    rng = random.Random(seed)
    bounds = [0]
    while bounds[-1] < seq_len:
        length = max(1, round(rng.lognormvariate(math.log(median), sigma)))
        bounds.append(min(seq_len, bounds[-1] + length))
    return tuple(bounds)


def document_stats(documents: tuple[int, ...], long: int) -> dict:
    lengths = [b - a for a, b in zip(documents, documents[1:])]
    return dict(count=len(lengths), largest=max(lengths), median_length=sorted(lengths)[len(lengths) // 2],
                longer_than=long, count_longer=sum(n > long for n in lengths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (T = 64K): a few seconds")
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None,
                        help=f"write OUT.md and OUT.json (default: {RESULTS.relative_to(RESULTS.parents[2])} "
                             f"for the full run, nothing with --quick)")
    args = parser.parse_args()
    out = args.out if args.out is not None or args.quick else RESULTS
    started = time.perf_counter()

    P = args.world_size
    seq_len = (1 << 16) if args.quick else (1 << 20)
    shape = Shape(batch=1, seq_len=seq_len, heads=32, kv_heads=8, head_dim=128, element_bytes=2)
    machine = Machine()
    median, sigma, long = 2048, 1.75, 100_000
    documents = lognormal_documents(seq_len, median, sigma, args.seed)
    docs = document_stats(documents, long if not args.quick else seq_len // P)
    masks = [("causal", AttentionMask(causal=True)),
             ("window 4K", AttentionMask(causal=True, window=4096)),
             (f"{docs['count']} documents", AttentionMask(causal=True, documents=documents)),
             (f"{docs['count']} documents + window 8K", AttentionMask(causal=True, window=8192, documents=documents))]

    rows = []
    for mask_name, mask in masks:
        # the document-aware layout is built for each mask (its documents and window)
        balanced = balanced_layout(mask.documents or (0, seq_len), P, window=mask.window)
        for layout_name, layout in [(name, name) for name in LAYOUTS] + [("balanced", balanced)]:
            for strategy in STRATEGIES:
                if strategy == "ulysses" and (shape.heads % P or shape.kv_heads % P):
                    continue  # heads do not split over P (the strategy would repeat KV heads)
                t0 = time.perf_counter()
                est = softmax_estimate(strategy, layout, P, shape, machine, mask=mask)
                model_s = time.perf_counter() - t0
                tasks = block_tasks_per_rank(strategy, layout, P, seq_len, mask)
                rows.append(dict(mask=mask_name, layout=layout_name, strategy=strategy, tasks_max=max(tasks),
                                 tflop_max=est.max_rank_tflop, tflop_mean=est.mean_rank_tflop,
                                 imbalance=est.imbalance, mib_sent=est.bytes_sent_per_rank / 2 ** 20,
                                 ring_steps=est.ring_steps if strategy == "ring" else None,
                                 serial_steps=est.serial_steps, fwd_ms=est.fwd_ms, model_s=model_s))

    command = "python benchmarks/masks.py" + (" --quick" if args.quick else "")
    kv_mib = 2 * shape.batch * (seq_len // P) * shape.kv_heads * shape.head_dim * shape.element_bytes / 2 ** 20
    lines = [
        f"# Cost model of attention masks (T = {seq_len}, P = {P})", "",
        f"Command: `{command}` (seqpar.cost_model; runtime {{runtime}}).", "",
        f"Shape: B=1, T={seq_len} (T_local={seq_len // P}), H={shape.heads}, Hkv={shape.kv_heads}, "
        f"D={shape.head_dim}, bf16; one layer, forward. A rank's local K/V block is {kv_mib:.0f} MiB.", "",
        f"Machine (assumed, a cost model, not measured): {machine.name}: softmax attention "
        f"{machine.attention_tflops:g} TFLOP/s sustained, links {machine.link_gbytes_s:g} GB/s per direction, "
        f"{machine.latency_us:g} us per message; times overlap compute and communication per step.", "",
        f"Documents: log-normal lengths, median {median}, sigma {sigma}, seed {args.seed}: {docs['count']} "
        f"documents, the largest {docs['largest']} tokens, {docs['count_longer']} longer than {docs['longer_than']} "
        f"(median length {docs['median_length']}).", "",
        "Exact (from the strategies' block plan): kernel calls per rank = merged block tasks summed over the K/V "
        "blocks visited (per KV-head group); TFLOP = 4 B H D x visible (query, key) pairs; MiB = what a rank "
        "sends in one forward, the busiest sender (ring: ring steps - 1 hops, each carrying the key range of a block "
        "that the ranks it visits see; allgather: every rank's K/V, or with a window or documents only the key range "
        "each reader sees; ulysses: the q / o / K/V all-to-alls); ring steps = K/V blocks a ring visits, its own "
        "included (fewer than P when no query sees further back).", "",
        "| mask | layout | strategy | calls/rank max | TFLOP/rank max | TFLOP/rank mean | imbalance | "
        "MiB sent/rank | ring steps | fwd ms (est.) |",
        "|" + "---|" * 10,
    ]
    for r in rows:
        lines.append(f"| {r['mask']} | {r['layout']} | {r['strategy']} | {r['tasks_max']} | {r['tflop_max']:.2f} | "
                     f"{r['tflop_mean']:.2f} | {r['imbalance']:.3f} | {r['mib_sent']:.0f} | "
                     f"{'-' if r['ring_steps'] is None else r['ring_steps']} | {r['fwd_ms']:.2f} |")

    def pivot(title: str, cell) -> None:
        lines.extend(["", title, "", "| mask | " + " | ".join(f"{s} {lay}" for s in STRATEGIES for lay in LAYOUT_NAMES)
                      + " |", "|" + "---|" * (1 + len(STRATEGIES) * len(LAYOUT_NAMES))])
        for mask_name, _ in masks:
            by = {(r["strategy"], r["layout"]): r for r in rows if r["mask"] == mask_name}
            lines.append(f"| {mask_name} | " + " | ".join(cell(by[s, lay]) if (s, lay) in by else "-"
                                                          for s in STRATEGIES for lay in LAYOUT_NAMES) + " |")

    pivot("Imbalance (busiest rank / mean rank):", lambda r: f"{r['imbalance']:.3f}")
    pivot("MiB sent per rank per forward (ring: steps in parentheses):",
          lambda r: f"{r['mib_sent']:.0f}" + (f" ({r['ring_steps']})" if r["ring_steps"] is not None else ""))
    lines.extend(["", "Why the ring sends what it sends with a window: contiguous ranks need keys from the rank before "
                  "only (ceil((window - 1) / T_local) + 1 blocks); zigzag's late chunk (2P-1-r) needs the end of chunk "
                  "2P-2-r, held by rank r+1, which is P-1 ring steps away, so the ring still goes all the way round "
                  "(the steps in between carry K/V and compute nothing); striped ranks interleave token by token, so "
                  "every rank needs every other rank's keys. The ring carries only the keys a later rank sees (a 4K window: "
                  "the last 4095 keys of a block). With a window or documents the all-gather sends each reader only the "
                  "key range it sees (zero-redundant), whatever the layout. Documents shorten a contiguous ring to the "
                  "ranks the longest document spans."])
    runtime = time.perf_counter() - started
    text = "\n".join(lines).replace("{runtime}", f"{runtime:.1f} s")
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(text + "\n")
        meta = dict(command=command, runtime_s=runtime, world_size=P, shape=asdict(shape), machine=asdict(machine),
                    documents=dict(median=median, sigma=sigma, seed=args.seed, **docs, boundaries=list(documents)),
                    masks={name: dict(causal=m.causal, window=m.window,
                                      documents=None if m.documents is None else len(m.documents) - 1)
                           for name, m in masks})
        out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
        print(f"\nwrote {out.with_suffix('.md')} and {out.with_suffix('.json')}", file=sys.stderr)


if __name__ == "__main__":
    main()
