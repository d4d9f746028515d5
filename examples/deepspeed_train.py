"""Train a tiny hybrid (linear + softmax attention) LM with DeepSpeed ZeRO and seqpar sequence
parallelism on DeepSpeed's sequence-parallel group.

    deepspeed --num_gpus 2 examples/deepspeed_train.py --deepspeed_config examples/deepspeed_config.json --sp 2

(on a CPU-only machine the same command starts 2 CPU processes on gloo; ``--num_gpus`` is an alias
of ``--num_accelerators``). The world is split into data-parallel replicas of ``--sp`` ranks; each
replica's sequences are sharded over its ranks (``--layout``), the attention layers are seqpar's
drop-ins for ``deepspeed.sequence.layer.DistributedAttention`` on the group of the ``mpu`` given to
``deepspeed.initialize``, and ZeRO reduces gradients over all ranks. Each rank's loss is its
share of the replica's mean loss, so the gradients equal those of the unsharded model.

On CPU, DeepSpeed would JIT-compile its shared-memory allreduce op on first use (~100 s); this
example marks it unavailable unless ``--allow-jit-ops`` is given, and uses a torch optimizer
(no FusedAdam build).

Mask options of the softmax layers (exact across ranks, see docs/masks.md): ``--window W``
(causal sliding window), ``--softcap C`` (logit softcap) and ``--sinks`` (a learned per-head sink
logit, an ``nn.Parameter`` of each softmax block passed as ``attn(..., sinks=self.sinks)``).
With ZeRO-3 set ``"reduce_scatter": false`` in the config: ``check_zero_config`` refuses the
default, whose reduction scales the gradients of sequence parallelism by 1/sp.
"""
from __future__ import annotations

import argparse
import os
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    """Pre-norm block: linear-attention (``L``) or softmax-attention (``S``) mixer, then an MLP."""

    def __init__(self, kind: str, dim: int, heads: int, kv_heads: int, mpu, strategy: str, layout: str,
                 window: int | None = None, softcap: float | None = None, sinks: bool = False) -> None:
        super().__init__()
        from seqpar.integrations._common import retnet_decay
        from seqpar.integrations.deepspeed import SeqparDistributedAttention, SeqparDistributedLinearAttention

        self.kind, self.heads, self.kv_heads, self.hd = kind, heads, kv_heads, dim // heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.hd, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        # a sink logit per head (GPT-OSS); a parameter of this block, so ZeRO-3 gathers it for its forward
        self.sinks = nn.Parameter(torch.zeros(heads)) if sinks and kind == "S" else None
        if kind == "S":
            self.attn = SeqparDistributedAttention(None, mpu, strategy=strategy, layout=layout, window=window,
                                                   softcap=softcap)
        else:
            self.attn = SeqparDistributedLinearAttention(mpu, strategy="lasp2", layout=layout,
                                                         g_gamma=retnet_decay(heads, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).split([self.heads * self.hd, self.kv_heads * self.hd,
                                                 self.kv_heads * self.hd], dim=-1)
        q, k, v = q.view(b, s, -1, self.hd), k.view(b, s, -1, self.hd), v.view(b, s, -1, self.hd)
        if self.kind == "L":  # feature map, and K/V heads repeated to Q's (states travel, not K/V)
            rep = self.heads // self.kv_heads
            q, k = F.silu(q), F.silu(k)
            k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
        if self.sinks is not None:
            o = self.attn(q, k, v, 0, sinks=self.sinks)  # batch_dim_idx=0: [b, s_local, h, d]
        else:
            o = self.attn(q, k, v, 0)
        x = x + self.proj(o.reshape(b, s, -1))
        return x + self.mlp(self.norm2(x))


class HybridLM(nn.Module):
    def __init__(self, mpu, *, pattern: str, vocab: int, dim: int, heads: int, kv_heads: int, max_len: int,
                 strategy: str, layout: str, window: int | None = None, softcap: float | None = None,
                 sinks: bool = False) -> None:
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(c, dim, heads, kv_heads, mpu, strategy, layout, window, softcap, sinks)
                                    for c in pattern)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def parse_args() -> argparse.Namespace:
    import deepspeed

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    p.add_argument("--sp", type=int, default=None, help="sequence-parallel size (default: world size)")
    p.add_argument("--pattern", default="LLLS", help="layers: L = linear, S = softmax attention")
    p.add_argument("--strategy", default="ulysses", choices=["ulysses", "ring", "allgather"])
    p.add_argument("--layout", default="contiguous", choices=["contiguous", "zigzag"])
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--window", type=int, default=None, help="causal sliding window of the softmax layers")
    p.add_argument("--softcap", type=float, default=None, help="logit softcap of the softmax layers")
    p.add_argument("--sinks", action="store_true", help="a learned attention-sink logit per head")
    p.add_argument("--allow-jit-ops", action="store_true", help="let DeepSpeed build its CPU shm comm op")
    p = deepspeed.add_config_arguments(p)
    return p.parse_args()


def main() -> None:
    warnings.filterwarnings("ignore")
    args = parse_args()
    import deepspeed
    import deepspeed.ops

    from seqpar.integrations.deepspeed import SequenceParallelMPU, check_zero_config
    from seqpar.layout import shard_tensor

    use_cuda = torch.cuda.is_available()
    if not use_cuda and not args.allow_jit_ops:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no ~100 s JIT build on CPU
    if use_cuda:
        torch.cuda.set_device(args.local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    sp = args.sp or world
    mpu = SequenceParallelMPU(sp)

    torch.manual_seed(0)  # same initial weights everywhere (DeepSpeed also broadcasts them)
    model = HybridLM(mpu, pattern=args.pattern, vocab=args.vocab, dim=args.dim, heads=args.heads,
                     kv_heads=args.kv_heads, max_len=args.seq_len, strategy=args.strategy, layout=args.layout,
                     window=args.window, softcap=args.softcap, sinks=args.sinks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    engine, _, _, _ = deepspeed.initialize(args=args, model=model, optimizer=optimizer, mpu=mpu)
    check_zero_config(engine)  # ZeRO-3 needs "reduce_scatter": false with sequence parallelism
    device = engine.device
    sp_rank, dp_rank = mpu.get_sequence_parallel_rank(), rank // sp
    micro = engine.train_micro_batch_size_per_gpu()
    generator = torch.Generator().manual_seed(1000 + dp_rank)  # one data stream per replica
    if rank == 0:
        print(f"world={world} sp={sp} dp={world // sp} pattern={args.pattern} strategy={args.strategy} "
              f"layout={args.layout} zero={engine.zero_optimization_stage()} device={device} window={args.window} "
              f"softcap={args.softcap} sinks={args.sinks}")
    start = time.time()
    for step in range(args.steps):
        # Arithmetic sequences mod vocab (learnable), the full sequence on every rank of the replica.
        first = torch.randint(0, args.vocab, (micro, 1), generator=generator)
        stride = torch.randint(1, 4, (micro, 1), generator=generator)
        seq = (first + stride * torch.arange(args.seq_len + 1)) % args.vocab
        tokens, labels = seq[:, :-1], seq[:, 1:]
        positions = torch.arange(args.seq_len).expand(micro, -1)
        local = [shard_tensor(t, args.layout, sp_rank, sp).to(device) for t in (tokens, labels, positions)]
        logits = engine(local[0], local[2])
        loss = F.cross_entropy(logits.float().reshape(-1, args.vocab), local[1].reshape(-1),
                               reduction="sum") / labels.numel()
        engine.backward(loss)
        engine.step()
        if step % 5 == 0 or step == args.steps - 1:
            total = loss.detach().clone()
            torch.distributed.all_reduce(total)  # sum of shares = mean per replica, summed over replicas
            if rank == 0:
                print(f"step {step:4d}  loss {total.item() / (world // sp):.4f}  {time.time() - start:.1f}s",
                      flush=True)


if __name__ == "__main__":
    main()
