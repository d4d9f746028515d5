"""Train a tiny Megatron-core GPTModel with seqpar attention on Megatron's context-parallel group.

    torchrun --nproc-per-node 2 examples/megatron_train.py --cp 2 --pattern LLLS --strategy ring

Each CP rank keeps Megatron's head-tail share of every sequence (``get_batch_on_this_cp_rank``,
seqpar's "zigzag" layout); softmax layers run a seqpar strategy and linear layers LASP-2 on
``parallel_state.get_context_parallel_group()``. Positions are learned absolute embeddings fed
with the global position ids of the local tokens.

On a GPU the micro-batches go through Megatron's own ``get_forward_backward_func``. On CPU
(gloo) that schedule does not run (it allocates its token counter with device="cuda"), so the
same ``forward_step`` / loss run in a plain loop that applies the same loss scaling
(local mean x cp size / micro-batches). Gradients are then averaged over the data-parallel x
context-parallel group, as Megatron's DDP does, and a torch AdamW steps. The data are synthetic
(arithmetic token sequences: learnable, so the loss falls).
"""
from __future__ import annotations

import argparse
import os
import time
import warnings
from functools import partial

import torch
import torch.distributed as dist


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cp", type=int, default=None, help="context-parallel size (default: world size)")
    p.add_argument("--pattern", default="LLLS", help="layer pattern, S = softmax, L = linear (tiled to --layers)")
    p.add_argument("--strategy", default="ring", choices=["ring", "allgather", "ulysses"])
    p.add_argument("--linear-strategy", default="lasp2", choices=["lasp2", "lasp1"])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--query-groups", type=int, default=2)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--micro-batches", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def synthetic_batch(step: int, args: argparse.Namespace, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Arithmetic sequences mod vocab: token t+1 = token t + stride (per sequence)."""
    b, s = args.micro_batch, args.seq_len
    start = torch.randint(0, args.vocab, (b, 1), generator=generator)
    stride = torch.randint(1, 4, (b, 1), generator=generator)
    seq = (start + stride * torch.arange(s + 1)) % args.vocab
    return {"tokens": seq[:, :-1].contiguous(), "labels": seq[:, 1:].contiguous(),
            "loss_mask": torch.ones(b, s), "position_ids": torch.arange(s).expand(b, s).contiguous()}


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Mean loss over this rank's tokens (Megatron's convention; the schedule multiplies by cp)."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss = (losses * mask).sum() / mask.sum()
    reported = loss.detach().clone()
    dist.all_reduce(reported, group=dist_groups()["dp_cp"])
    reported /= dist.get_world_size(dist_groups()["dp_cp"])
    return loss, {"lm loss": reported}


def dist_groups() -> dict:
    from megatron.core import parallel_state

    return {"cp": parallel_state.get_context_parallel_group(),
            "dp_cp": parallel_state.get_data_parallel_group(with_context_parallel=True)}


def forward_step(data_iterator, model):
    """Megatron forward step: slice the batch for this CP rank, run the model, return the loss fn."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    batch = next(data_iterator)
    device = next(model.parameters()).device
    batch = get_batch_on_this_cp_rank({k: v.to(device) for k, v in batch.items()})
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    cp = args.cp or world
    torch.manual_seed(args.seed)

    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from seqpar.integrations.megatron import hybrid_layer_specs

    parallel_state.initialize_model_parallel(context_parallel_size=cp, create_gloo_process_groups=False)
    config = TransformerConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                               num_query_groups=args.query_groups, ffn_hidden_size=4 * args.hidden,
                               use_cpu_initialization=True, context_parallel_size=cp, attention_dropout=0.0,
                               hidden_dropout=0.0, bias_dropout_fusion=False, masked_softmax_fusion=False,
                               gradient_accumulation_fusion=False, persist_layer_norm=False, apply_rope_fusion=False,
                               params_dtype=torch.float32)
    spec = hybrid_layer_specs(args.pattern, config=config, softmax_strategy=args.strategy,
                              linear_strategy=args.linear_strategy)
    model = GPTModel(config, spec, vocab_size=args.vocab, max_sequence_length=args.seq_len,
                     position_embedding_type="learned_absolute")
    if use_cuda:
        model.cuda()
    for p in model.parameters():  # same initial weights on every rank
        dist.broadcast(p.data, src=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    groups = dist_groups()
    dp_cp_size = dist.get_world_size(groups["dp_cp"])
    dp_rank = parallel_state.get_data_parallel_rank()
    generator = torch.Generator().manual_seed(args.seed + dp_rank)  # CP ranks of one replica share data

    if use_cuda:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        forward_backward = get_forward_backward_func()
    if rank == 0:
        layers = "".join(c for c in (args.pattern * args.layers)[: args.layers])
        print(f"world={world} cp={cp} dp={world // cp} layers={layers} strategy={args.strategy} "
              f"seq_len={args.seq_len} device={'cuda' if use_cuda else 'cpu'}")
    start = time.time()
    for step in range(args.steps):
        optimizer.zero_grad(set_to_none=True)
        data = iter([synthetic_batch(step, args, generator) for _ in range(args.micro_batches)])
        if use_cuda:
            stats = forward_backward(forward_step_func=forward_step, data_iterator=data, model=model,
                                     num_microbatches=args.micro_batches, seq_length=args.seq_len // cp,
                                     micro_batch_size=args.micro_batch, forward_only=False)
        else:  # the same loss scaling as Megatron's schedule
            stats = []
            for _ in range(args.micro_batches):
                output, fn = forward_step(data, model)
                loss, logs = fn(output)
                (loss * cp / args.micro_batches).backward()
                stats.append(logs)
        for p in model.parameters():  # what Megatron's DDP does over the dp x cp group
            if p.grad is not None:
                dist.all_reduce(p.grad, group=groups["dp_cp"])
                p.grad /= dp_cp_size
        optimizer.step()
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            loss = sum(float(s["lm loss"]) for s in stats) / len(stats)
            print(f"step {step:4d}  loss {loss:.4f}  {time.time() - start:.1f}s", flush=True)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
