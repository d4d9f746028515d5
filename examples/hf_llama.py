"""Fine-tune a transformers Llama model with its sequences sharded over ranks (seqpar attention).

    torchrun --nproc-per-node 2 examples/hf_llama.py --strategy ring --layout zigzag
    torchrun --nproc-per-node 2 examples/hf_llama.py --packed --check   # packed SFT rows (DataCollatorWithFlattening)
    torchrun --nproc-per-node 2 examples/hf_llama.py --model /path/to/llama --seq-len 4096   # a local checkpoint

Without ``--model`` the model is a small randomly initialised LlamaForCausalLM built from a config
(nothing is downloaded). Every rank of the group holds a share of each sequence
(``seqpar.integrations.hf.shard_batch``: local tokens, their global position ids and the
globally shifted labels); ``apply_sequence_parallel`` makes the model's attention run through
seqpar on the group. With ``--packed`` each step is one row of several documents packed by
transformers' ``DataCollatorWithFlattening`` (position ids restart per document): the documents
never see each other, on any rank. Each rank's loss is its share of the global mean, so summing gradients over
the group gives the gradients of the unsharded model; ``--check`` verifies that on the first step.
"""
from __future__ import annotations

import argparse
import copy
import os
import time
import warnings

import torch
import torch.distributed as dist


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="local path of a Llama-family checkpoint (default: random tiny)")
    p.add_argument("--strategy", default="ring", choices=["ring", "allgather", "ulysses"])
    p.add_argument("--layout", default="zigzag", choices=["contiguous", "zigzag", "striped", "balanced"])
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--packed", action="store_true", help="one row of packed documents per step (batch 1)")
    p.add_argument("--check", action="store_true", help="compare step 0 with the unsharded model")
    return p.parse_args()


def build_model(args: argparse.Namespace):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32, attn_implementation="sdpa")
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq_len,
                         attention_dropout=0.0, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def make_batch(args: argparse.Namespace, vocab: int, generator: torch.Generator):
    """(input_ids, labels, position_ids, document ends) of one step: ``--batch`` rows of simple
    arithmetic sequences, or with ``--packed`` one row of documents of random lengths packed by
    DataCollatorWithFlattening (labels of each document's first token are -100)."""
    def sequence(n: int) -> list[int]:
        first, stride = (int(torch.randint(lo, hi, (1,), generator=generator)) for lo, hi in ((0, vocab), (1, 4)))
        return [(first + stride * i) % vocab for i in range(n)]

    if not args.packed:
        ids = torch.tensor([sequence(args.seq_len) for _ in range(args.batch)])
        return ids, ids, torch.arange(args.seq_len).expand_as(ids), [0, args.seq_len]
    from transformers import DataCollatorWithFlattening

    lengths, left = [], args.seq_len
    while left:
        lengths.append(min(left, int(torch.randint(1, max(2, args.seq_len // 2), (1,), generator=generator))))
        left -= lengths[-1]
    features = [{"input_ids": s, "labels": s} for s in map(sequence, lengths)]
    batch = DataCollatorWithFlattening()(features, return_tensors="pt")
    ends = [0] + torch.tensor(lengths).cumsum(0).tolist()
    return batch["input_ids"], batch["labels"], batch["position_ids"], ends


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore")
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if use_cuda else torch.device("cpu")
    group = dist.group.WORLD  # the sequence-parallel group: every rank here

    from seqpar.integrations.hf import apply_sequence_parallel, shard_batch

    model = build_model(args).to(device)
    for p in model.parameters():
        dist.broadcast(p.data, src=0)
    reference = copy.deepcopy(model) if args.check else None
    apply_sequence_parallel(model, group, strategy=args.strategy, layout=args.layout)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)  # the same batches on every rank of the group
    if rank == 0:
        print(f"world={world} strategy={args.strategy} layout={args.layout} seq_len={args.seq_len} device={device}")
    start = time.time()
    for step in range(args.steps):
        ids, labels, positions, documents = make_batch(args, vocab, generator)
        ids, labels, positions = ids.to(device), labels.to(device), positions.to(device)
        batch = shard_batch(ids, labels, position_ids=positions, group=group, layout=args.layout)
        loss = model(**batch).loss  # this rank's share of the global mean
        loss.backward()
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=group)
        if reference is not None and step == 0:
            count = int((labels[:, 1:] != -100).sum())  # each document alone: what packing means
            ref_loss = sum(reference(input_ids=ids[:, a:b], labels=labels[:, a:b], num_items_in_batch=count).loss
                           for a, b in zip(documents[:-1], documents[1:]))
            ref_loss.backward()
            total = loss.detach().clone()
            dist.all_reduce(total, group=group)
            err = max((p.grad - r.grad).abs().max().item() for p, r in zip(model.parameters(), reference.parameters()))
            if rank == 0:
                print(f"check: loss sharded {total.item():.6f} unsharded {ref_loss.item():.6f}, max grad diff {err:.2e}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 5 == 0 or step == args.steps - 1:
            total = loss.detach().clone()
            dist.all_reduce(total, group=group)
            if rank == 0:
                print(f"step {step:4d}  loss {total.item():.4f}  {time.time() - start:.1f}s", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
