"""Train a tiny Megatron-core GPTModel with seqpar attention on Megatron's context-parallel group.

    torchrun --nproc-per-node 2 examples/megatron_train.py --cp 2 --pattern LLLS --strategy ring

Each CP rank keeps Megatron's head-tail share of every sequence (``get_batch_on_this_cp_rank``,
seqpar's "zigzag" layout); softmax layers run a seqpar strategy and linear layers LASP-2 on
``parallel_state.get_context_parallel_group()``. Positions are learned absolute embeddings fed
with the global position ids of the local tokens.

The loss follows Megatron-core's per-token convention (``calculate_per_token_loss=True``): the
loss function returns ``(sum of this rank's masked token losses, its token count, report)``,
the schedule back-propagates the sum unscaled, and ``finalize_grads`` (the config's
``finalize_model_grads_func``) sums the gradients over the data x context-parallel group and
divides them by the global token count. That is the gradient of the mean loss over every token
of the global batch, for any cp size, micro-batch count and loss mask.

On a GPU the micro-batches go through Megatron's own ``get_forward_backward_func``. On CPU
(gloo) that schedule does not run (it allocates its token counter with device="cuda"), so
``forward_backward_cpu`` runs the same loop with Megatron's own ``forward_step`` and
``backward_step``. A torch optimizer (AdamW here) then steps. The data are synthetic (arithmetic
token sequences: learnable, so the loss falls).
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


def synthetic_batch(args: argparse.Namespace, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Arithmetic sequences mod vocab: token t+1 = token t + stride (per sequence)."""
    b, s = args.micro_batch, args.seq_len
    start = torch.randint(0, args.vocab, (b, 1), generator=generator)
    stride = torch.randint(1, 4, (b, 1), generator=generator)
    seq = (start + stride * torch.arange(s + 1)) % args.vocab
    return {"tokens": seq[:, :-1].contiguous(), "labels": seq[:, 1:].contiguous(),
            "loss_mask": torch.ones(b, s), "position_ids": torch.arange(s).expand(b, s).contiguous()}


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Megatron's per-token loss form: ``(loss sum, token count, {"lm loss": [sum, count]})``.

    ``output_tensor`` holds this rank's per-token losses [b, s_local]. The sum is returned
    unnormalised: with ``calculate_per_token_loss=True`` Megatron's schedule back-propagates it
    as it is and ``finalize_grads`` divides by the global token count. The sum is taken in fp64
    (Megatron's per-token losses are fp32): its rounding does not grow with the token count.
    """
    losses = output_tensor.reshape(-1).to(torch.float64)
    mask = loss_mask.reshape(-1).to(torch.float64)
    loss_sum = (losses * mask).sum()
    num_tokens = loss_mask.reshape(-1).count_nonzero().to(torch.int)
    report = torch.stack([loss_sum.detach(), num_tokens.to(torch.float64)])
    return loss_sum, num_tokens, {"lm loss": report}


def dp_cp_group() -> dist.ProcessGroup:
    """The data x context-parallel group: where gradients and token counts are summed."""
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def finalize_grads(model_list: list[torch.nn.Module], num_tokens: torch.Tensor | None, pg_collection=None,
                   force_all_reduce: bool = False) -> None:
    """Megatron's ``finalize_model_grads_func`` for a model without Megatron's DDP wrapper.

    Sums every gradient over the dp x cp group (one flat all-reduce) and, with the per-token
    loss, divides by ``num_tokens`` summed over the same group (the global loss-token count).
    Without a token count (``calculate_per_token_loss=False``) gradients are averaged over the
    group, as Megatron's DDP does.
    """
    group = pg_collection.dp_cp if pg_collection is not None else dp_cp_group()
    grads = [p.grad for model in model_list for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    if num_tokens is None:
        divisor = dist.get_world_size(group)
    else:
        total = num_tokens.detach().clone()
        dist.all_reduce(total, group=group)
        divisor = max(int(total), 1)
    flat /= divisor
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def forward_step(data_iterator, model):
    """Megatron forward step: slice the batch for this CP rank, run the model, return the loss fn."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    batch = next(data_iterator)
    device = next(model.parameters()).device
    batch = get_batch_on_this_cp_rank({k: v.to(device) for k, v in batch.items()})
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


def forward_backward_cpu(model: torch.nn.Module, data_iterator, num_microbatches: int) -> list[dict]:
    """Megatron's no-pipelining schedule without its one CUDA allocation.

    The same calls in the same order: Megatron's own ``forward_step`` (which applies its loss
    convention to ``loss_func``'s output) and ``backward_step`` per micro-batch, then the config's
    ``finalize_model_grads_func`` with the summed token count. Returns the per-micro-batch reports.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel.schedules import backward_step
    from megatron.core.pipeline_parallel.schedules import forward_step as megatron_forward_step
    from megatron.core.utils import get_model_config, get_model_type

    config = get_model_config(model)
    reports: list[dict] = []
    total_tokens = torch.zeros([], dtype=torch.int)
    cp_size = parallel_state.get_context_parallel_world_size()
    for i in range(num_microbatches):
        output, num_tokens = megatron_forward_step(forward_step, data_iterator, model, num_microbatches, None, reports,
                                                   config, cp_size, is_first_microbatch=i == 0, current_microbatch=i)
        total_tokens += num_tokens
        backward_step(None, output, None, get_model_type(model), config)
    if config.finalize_model_grads_func is not None:
        config.finalize_model_grads_func([model], total_tokens if config.calculate_per_token_loss else None)
    return reports


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[dict[str, torch.Tensor]],
               seq_len: int, micro_batch: int) -> float:
    """One optimizer step over ``batches`` (this data-parallel replica's micro-batches, full
    sequences; each CP rank slices its share). Returns the mean loss per token of the global
    batch (every dp x cp rank gets the same number)."""
    from megatron.core import parallel_state

    optimizer.zero_grad(set_to_none=True)
    data = iter(batches)
    if next(model.parameters()).is_cuda:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        reports = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data, model=model, num_microbatches=len(batches),
            seq_length=seq_len // parallel_state.get_context_parallel_world_size(),
            micro_batch_size=micro_batch, forward_only=False)
    else:
        reports = forward_backward_cpu(model, data, len(batches))
    optimizer.step()
    summed = torch.stack([r["lm loss"] for r in reports]).sum(0)
    dist.all_reduce(summed, group=dp_cp_group())
    return float(summed[0] / summed[1].clamp(min=1))


def build_model(args: argparse.Namespace, cp: int, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The hybrid GPTModel (seqpar core attention), its config set for Megatron's per-token loss."""
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from seqpar.integrations.megatron import hybrid_layer_specs

    config = TransformerConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                               num_query_groups=args.query_groups, ffn_hidden_size=4 * args.hidden,
                               use_cpu_initialization=True, context_parallel_size=cp, attention_dropout=0.0,
                               hidden_dropout=0.0, bias_dropout_fusion=False, masked_softmax_fusion=False,
                               gradient_accumulation_fusion=False, persist_layer_norm=False, apply_rope_fusion=False,
                               params_dtype=dtype, calculate_per_token_loss=True,
                               finalize_model_grads_func=finalize_grads)
    spec = hybrid_layer_specs(args.pattern, config=config, softmax_strategy=args.strategy,
                              linear_strategy=args.linear_strategy)
    model = GPTModel(config, spec, vocab_size=args.vocab, max_sequence_length=args.seq_len,
                     position_embedding_type="learned_absolute")
    return model.to(dtype)  # the torch norms Megatron falls back to without Apex ignore params_dtype


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
    if cp < 1 or world % cp != 0:
        raise SystemExit(f"--cp {cp} must be a positive divisor of the world size {world}")
    torch.manual_seed(args.seed)

    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(context_parallel_size=cp, create_gloo_process_groups=False)
    model = build_model(args, cp)
    if use_cuda:
        model.cuda()
    for p in model.parameters():  # same initial weights on every rank
        dist.broadcast(p.data, src=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    dp_rank = parallel_state.get_data_parallel_rank()
    generator = torch.Generator().manual_seed(args.seed + dp_rank)  # CP ranks of one replica share data

    if rank == 0:
        layers = "".join(c for c in (args.pattern * args.layers)[: args.layers])
        print(f"world={world} cp={cp} dp={world // cp} layers={layers} strategy={args.strategy} "
              f"seq_len={args.seq_len} device={'cuda' if use_cuda else 'cpu'}")
    start = time.time()
    for step in range(args.steps):
        batches = [synthetic_batch(args, generator) for _ in range(args.micro_batches)]
        loss = train_step(model, optimizer, batches, args.seq_len, args.micro_batch)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss:.4f}  {time.time() - start:.1f}s", flush=True)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
