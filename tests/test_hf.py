"""transformers integration: a small random LlamaForCausalLM sharded over 2 gloo ranks with
seqpar attention gives the logits, loss and gradients of the unsharded model (torch SDPA)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from distributed_pool import WorkerContext  # noqa: E402

WORLD = 2


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attention_dropout=0.0, use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def case_llama_sharded_equals_unsharded(ctx: WorkerContext, strategy: str, layout: str) -> bool:
    warnings.filterwarnings("ignore")
    from seqpar.integrations.hf import apply_sequence_parallel, shard_batch
    from seqpar.layout import shard_tensor

    group = ctx.usp_groups[(1, WORLD)] if strategy == "usp" else ctx.group  # usp: 1 x 2 (a ring of 2)
    reference = _tiny_llama()
    model = apply_sequence_parallel(copy.deepcopy(reference), group, strategy=strategy, layout=layout)
    assert reference.config._attn_implementation == "sdpa"  # only the adapted model changed
    assert model.config._attn_implementation == "seqpar"

    torch.manual_seed(0)
    B, T = 2, 16
    input_ids = torch.randint(0, 64, (B, T))
    labels = input_ids.clone()
    labels[0, 3] = -100  # an ignored label changes the token count; the loss must still agree

    ref = reference(input_ids=input_ids, labels=labels)
    ref.loss.backward()

    batch = shard_batch(input_ids, labels, group=group, layout=layout)
    out = model(**batch)
    out.loss.backward()

    torch.testing.assert_close(out.logits, shard_tensor(ref.logits.detach(), layout, ctx.rank, WORLD),
                               rtol=1e-4, atol=1e-5)
    total = out.loss.detach().clone()
    torch.distributed.all_reduce(total, group=ctx.group)
    torch.testing.assert_close(total, ref.loss.detach(), rtol=1e-5, atol=1e-6)
    ref_grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        g = p.grad.clone()
        torch.distributed.all_reduce(g, group=ctx.group)
        torch.testing.assert_close(g, ref_grads[name].grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    return True


def case_settings_are_per_model(ctx: WorkerContext) -> bool:
    from seqpar.integrations.hf import apply_sequence_parallel, remove_sequence_parallel

    a, b = _tiny_llama(), _tiny_llama()
    apply_sequence_parallel(a, ctx.group)
    x = torch.randint(0, 64, (1, 8))
    b(input_ids=x)  # an unadapted model still runs its own attention
    remove_sequence_parallel(a)
    assert a.config._attn_implementation == "sdpa"
    torch.testing.assert_close(a(input_ids=x).logits, b(input_ids=x).logits)
    return True


@pytest.mark.parametrize("strategy,layout", [("ring", "zigzag"), ("allgather", "contiguous"), ("ulysses", "striped"),
                                             ("usp", "zigzag")])
def test_llama_sharded_equals_unsharded(pool, strategy, layout):
    assert all(pool.run(case_llama_sharded_equals_unsharded, WORLD, strategy=strategy, layout=layout))


def test_settings_are_per_model(pool):
    assert all(pool.run(case_settings_are_per_model, WORLD))


def test_errors():
    from seqpar.integrations.hf import apply_sequence_parallel, seqpar_attention_forward

    model = _tiny_llama()
    with pytest.raises(ValueError, match="strategy"):
        apply_sequence_parallel(model, None, strategy="nope")
    attn = model.model.layers[0].self_attn
    q = torch.zeros(1, 4, 8, 8)
    with pytest.raises(RuntimeError, match="apply_sequence_parallel"):
        seqpar_attention_forward(attn, q, q, q, None)


def test_import_seqpar_does_not_import_frameworks():
    import subprocess
    import sys

    code = ("import sys, seqpar, seqpar.integrations; "
            "bad = [m for m in ('megatron', 'deepspeed', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
