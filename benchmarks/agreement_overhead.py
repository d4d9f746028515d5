"""Per-call cost of the default cross-rank agreement check (``validate="cached"``) and of the
one-thread-per-group guard, against a 4K-token forward+backward step on CPU.

    python benchmarks/agreement_overhead.py                    # 2 gloo ranks, T = 4096, H = 8, D = 64
    python benchmarks/agreement_overhead.py --seq-len 1024 --repeats 1   # quicker

Runs ``--world-size`` gloo processes on this machine (one thread each). On every rank:

1. **Added code per call, cached path** (no communication): what ``seqpar.attention`` /
   ``seqpar.linear_attention`` run on top of the previous release once a signature is agreed:
   building the signature, the cache lookup, and the group guard (entered by the public call,
   which covers the autograd forward, and by the backward: 2 times per forward+backward). Timed over ``--calls`` loops,
   best of 5 blocks; that is the number the fraction uses.
2. **End to end, tiny call**: a tiny forward+backward (ring, 4 tokens per rank) with
   ``validate="off"`` and ``"cached"``, interleaved; the difference is within the noise of the
   gloo collectives, printed for reference.
3. **First call**: the digest exchange of a new signature (one all-gather of 24 bytes), median
   of 20.
4. **Steps**: one softmax attention call (ring, zigzag, causal, fp32, B = 1) at a global
   ``--seq-len`` with ``--heads`` x ``--head-dim``, forward+backward; and the ``tiny`` model preset
   (2 layers: 1 linear + 1 softmax, ring / lasp2, zigzag) at the same global length,
   forward+backward; best of ``--repeats``.

Overhead fraction = calls per step x added time per call / step time. Rank 0 prints the table.
"""
from __future__ import annotations

import argparse
import datetime
import os
import queue
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _best_block(fn, calls: int, blocks: int = 5) -> float:
    """Seconds per call of ``fn``: the best of ``blocks`` blocks of ``calls`` calls."""
    best = float("inf")
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def _step_time(fn, repeats: int) -> float:
    fn()  # warm-up (and the first call's exchange)
    best = float("inf")
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    import seqpar
    from seqpar.attention import _signature as softmax_signature
    from seqpar.comm import check_agreement, clear_agreement_cache, exclusive_use
    from seqpar.config import ModelConfig, SequenceParallelConfig, MODEL_PRESETS
    from seqpar.linear.api import _signature as linear_signature
    from seqpar.model import HybridLM
    from seqpar.parallelize import shard_batch

    group = dist.new_group(list(range(world)))
    gen = torch.Generator().manual_seed(rank)
    out: dict = {}

    # 1. the added code of one call once its signature is agreed
    q = torch.randn(1, 4, 2, 8, generator=gen)
    seqpar.attention(q, q, q, strategy="ring", group=group)
    seqpar.linear_attention(q, q, q, group=group, g_gamma=torch.full((2,), -0.1))

    def softmax_added():
        check_agreement(softmax_signature(q, q, q, "ring", "contiguous", True, 0.35, group, False), group,
                        what="seqpar.attention(validate='cached')", mode="cached")

    def linear_added():
        check_agreement(linear_signature(q, q, q, "lasp2", "contiguous", g=None, g_gamma=q, beta=None,
                                         use_qk_l2norm=False, documents=None, initial_state=None, scale=0.35,
                                         output_final_state=False), group,
                        what="seqpar.linear_attention(validate='cached')", mode="cached")

    def guard():
        with exclusive_use(group, what="bench"):
            pass

    # register the two signatures used above (first call of each: one exchange)
    softmax_added()
    linear_added()
    out["softmax_check_us"] = _best_block(softmax_added, args.calls) * 1e6
    out["linear_check_us"] = _best_block(linear_added, args.calls) * 1e6
    out["guard_us"] = _best_block(guard, args.calls) * 1e6

    # 2. end to end, tiny calls
    qs = [torch.randn(1, 4, 2, 8, generator=gen).requires_grad_() for _ in range(3)]

    def tiny(mode):
        def run():
            seqpar.attention(*qs, strategy="ring", group=group, validate=mode).sum().backward()
        return run

    tiny("off")(), tiny("cached")()
    off, cached = [], []
    for _ in range(args.tiny_blocks):
        dist.barrier()
        off.append(_best_block(tiny("off"), 50, blocks=1))
        dist.barrier()
        cached.append(_best_block(tiny("cached"), 50, blocks=1))
    out["tiny_off_us"], out["tiny_cached_us"] = statistics.median(off) * 1e6, statistics.median(cached) * 1e6

    # 3. the first call of a signature: one digest exchange
    firsts = []
    for i in range(20):
        clear_agreement_cache(group)
        dist.barrier()
        t0 = time.perf_counter()
        softmax_added()
        firsts.append(time.perf_counter() - t0)
    out["first_call_us"] = statistics.median(firsts) * 1e6

    # 4. steps at the global length
    T, H, D = args.seq_len, args.heads, args.head_dim
    local = T // world
    x = [torch.randn(1, local, H, D, generator=gen).requires_grad_() for _ in range(3)]

    def attention_step():
        seqpar.attention(*x, strategy="ring", layout="zigzag", group=group).sum().backward()

    out["attention_step_s"] = _step_time(attention_step, args.repeats)

    torch.manual_seed(0)
    cfg = ModelConfig(**MODEL_PRESETS["tiny"])
    model = HybridLM(cfg)
    sp = SequenceParallelConfig(sp_size=world, layout="zigzag")
    seqpar.parallelize_model(model, sp, group)
    tokens = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(1))
    batch = shard_batch(tokens, tokens, sp.layout, group)

    def model_step():
        logits = model(batch.tokens, batch.positions)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels.flatten()).backward()

    out["model_step_s"] = _step_time(model_step, args.repeats)
    out["model_calls"] = len(model.attention_modules())
    results.put((rank, out))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=4096, help="global tokens of a step")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed steps (best of)")
    p.add_argument("--calls", type=int, default=20000, help="loops per block of the added-code timing")
    p.add_argument("--tiny-blocks", type=int, default=10)
    args = p.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, args.world_size, port, args, results)) for r in range(args.world_size)]
    for proc in procs:
        proc.start()
    per_rank = {}
    while len(per_rank) < len(procs):  # a worker that died (an exception) ends the run instead of a hang
        try:
            rank, value = results.get(timeout=5)
            per_rank[rank] = value
        except queue.Empty:
            dead = [r for r, proc in enumerate(procs) if proc.exitcode not in (None, 0) and r not in per_rank]
            if dead:
                for proc in procs:
                    proc.kill()
                raise SystemExit(f"agreement_overhead: worker(s) {dead} failed (exit codes "
                                 f"{[procs[r].exitcode for r in dead]}); see their traceback above")
    for proc in procs:
        proc.join()
    r = per_rank[0]
    per_call_added = lambda check: check + 2 * r["guard_us"]  # noqa: E731 (public call with its forward, backward)
    soft_us = per_call_added(r["softmax_check_us"])
    lin_us = per_call_added(r["linear_check_us"])
    model_us = soft_us + lin_us  # the tiny preset: one softmax and one linear layer (calls per step below)
    rows = [
        ("signature + cache lookup, softmax call", f"{r['softmax_check_us']:.2f} us", ""),
        ("signature + cache lookup, linear call", f"{r['linear_check_us']:.2f} us", ""),
        ("group guard, one enter/exit (2 per fwd+bwd call)", f"{r['guard_us']:.2f} us", ""),
        ("added per softmax fwd+bwd call", f"{soft_us:.2f} us", ""),
        ("tiny call fwd+bwd, validate='off' / 'cached' (end to end, noisy)",
         f"{r['tiny_off_us']:.0f} / {r['tiny_cached_us']:.0f} us", ""),
        ("first call of a signature: digest exchange", f"{r['first_call_us']:.0f} us", "once per signature and group"),
        (f"attention step: ring zigzag causal fp32, T={args.seq_len}, H={args.heads}, D={args.head_dim}, "
         f"P={args.world_size}, fwd+bwd", f"{r['attention_step_s'] * 1e3:.1f} ms",
         f"added {soft_us:.2f} us = {soft_us / (r['attention_step_s'] * 1e6) * 100:.5f} %"),
        (f"tiny model preset step (1 softmax + 1 linear layer), T={args.seq_len}, P={args.world_size}, fwd+bwd",
         f"{r['model_step_s'] * 1e3:.1f} ms",
         f"added {model_us:.2f} us = {model_us / (r['model_step_s'] * 1e6) * 100:.5f} %"),
    ]
    print(f"Agreement check (validate='cached') and group guard, rank 0 of {args.world_size} gloo ranks, "
          f"1 thread each, torch {torch.__version__}")
    print()
    print("| what | time | overhead on the step |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
