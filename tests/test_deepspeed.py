"""DeepSpeed integration on CPU (gloo): seqpar attention on DeepSpeed's sequence-parallel group.

- seqpar's Ulysses (and ring / allgather) equals DeepSpeed's own DistributedAttention on the
  same inputs, outputs and gradients, [b, s, h, d] and [s, b, h, d], GQA;
- one deepspeed.initialize'd ZeRO-1 / ZeRO-2 step of a tiny hybrid (linear + softmax) model with
  sequence parallelism over 2 ranks equals the step without it.

This file starts its own pool of 2 gloo processes (DeepSpeed keeps per-process state).
DeepSpeed's JIT ops are kept out: the optimizer is a torch one, and the shared-memory comm op
(a ~100 s C++ build on first use) is marked unavailable before DeepSpeed builds its backend.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn as nn

pytest.importorskip("deepspeed")

from distributed_pool import GlooPool, WorkerContext  # noqa: E402

WORLD = 2


@pytest.fixture(scope="module")
def dspool():
    p = GlooPool(size=WORLD, timeout_s=240.0)
    yield p
    p.close()


def _quiet_deepspeed(ctx: WorkerContext) -> None:
    """Per-process DeepSpeed setup for CPU tests: env of a launcher, no JIT comm op, quiet logs."""
    warnings.filterwarnings("ignore")
    os.environ.update(RANK=str(ctx.rank), LOCAL_RANK=str(ctx.rank), WORLD_SIZE=str(WORLD),
                      DS_ACCELERATOR="cpu")
    import logging

    import deepspeed.ops

    # DeepSpeed builds its shared-memory allreduce op (JIT C++, ~100 s) whenever an op is marked
    # compatible; DeepSpeed keeps this table per process for exactly such overrides.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")  # adopts the pool's gloo group
    from deepspeed.utils import logger

    logger.setLevel(logging.ERROR)


def _sdpa_local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch_dim_idx: int = 0) -> torch.Tensor:
    """DeepSpeed's local attention: causal SDPA over the full sequence of a head slice."""
    if batch_dim_idx == 1:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    o = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                         is_causal=True, enable_gqa=True).transpose(1, 2)
    return o if batch_dim_idx == 0 else o.transpose(0, 1)


class _LocalAttention(nn.Module):
    def __init__(self, batch_dim_idx: int) -> None:
        super().__init__()
        self.batch_dim_idx = batch_dim_idx

    def forward(self, q, k, v, *args, **kwargs):
        return _sdpa_local_attention(q, k, v, self.batch_dim_idx)


def case_matches_distributed_attention(ctx: WorkerContext, strategy: str, batch_dim_idx: int, hkv: int) -> bool:
    _quiet_deepspeed(ctx)
    from deepspeed.sequence.layer import DistributedAttention

    from seqpar.integrations.deepspeed import SeqparDistributedAttention
    from seqpar.layout import shard_tensor

    torch.manual_seed(0)
    B, T, H, D = 2, 16, 4, 8
    q = torch.randn(B, T, H, D, dtype=torch.float64)
    k = torch.randn(B, T, hkv, D, dtype=torch.float64)
    v = torch.randn(B, T, hkv, D, dtype=torch.float64)
    do = torch.randn(B, T, H, D, dtype=torch.float64)
    local = [shard_tensor(t, "contiguous", ctx.rank, WORLD).clone() for t in (q, k, v, do)]
    if batch_dim_idx == 1:
        local = [t.transpose(0, 1).contiguous() for t in local]
    results = []
    for module in (DistributedAttention(_LocalAttention(batch_dim_idx), ctx.group),
                   SeqparDistributedAttention(None, ctx.group, strategy=strategy)):
        ql, kl, vl = (t.clone().requires_grad_(True) for t in local[:3])
        o = module(ql, kl, vl, batch_dim_idx)
        o.backward(local[3])
        results.append((o.detach(), ql.grad, kl.grad, vl.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)
    return True


# ---------------------------------------------------------------------------------------------
# ZeRO steps of the example's tiny hybrid model on DeepSpeed's sequence-parallel group.


def _example_model(sp_source, layout: str, strategy: str) -> nn.Module:
    """The tiny hybrid model of examples/deepspeed_train.py (so the example is what is tested):
    pattern LS, the softmax layer on ``strategy`` and ``layout``; linear layers cannot be striped."""
    from example_loader import load_example

    example = load_example("deepspeed_train")
    model = example.HybridLM(sp_source, pattern="LS", vocab=48, dim=32, heads=4, kv_heads=2, max_len=64,
                             strategy=strategy, layout=layout)
    for blk in model.blocks:
        blk.attn.layout = layout if blk.kind == "S" or layout != "striped" else "contiguous"
    return model


def case_zero_step(ctx: WorkerContext, stage: int, strategy: str, layout: str) -> bool:
    """One ZeRO step with sp=2 gives the same loss, gradients and parameters as sp=1."""
    _quiet_deepspeed(ctx)
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from seqpar.integrations.deepspeed import SequenceParallelMPU, resolve_sequence_parallel_group
    from seqpar.layout import shard_tensor

    torch.manual_seed(0)
    B, T, vocab = 2, 16, 48
    tokens = torch.randint(0, vocab, (B, T))
    labels = torch.roll(tokens, -1, dims=1)
    positions = torch.arange(T).expand(B, T)
    config = {"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10 ** 6}
    out = {}
    for sp in (1, WORLD):
        mpu = SequenceParallelMPU(sp)
        torch.manual_seed(1)
        model = _example_model(mpu, layout, strategy)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, mpu=mpu)
        from deepspeed.comm import comm as ds_comm

        assert ds_comm.cdb.shm_comm_op is None  # no JIT build
        if sp > 1:  # the engine trains on the group the attention runs on
            assert engine.get_sequence_parallel_group() is mpu.get_sequence_parallel_group()
            assert resolve_sequence_parallel_group(engine) is model.blocks[0].attn.group
        rank = mpu.get_sequence_parallel_rank()
        shard = lambda t: shard_tensor(t, layout if sp > 1 else "contiguous", rank, sp)  # noqa: E731
        logits = engine(shard(tokens), shard(positions))
        # Each rank's loss is its share of the global mean; DeepSpeed sums the shares.
        loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), shard(labels).reshape(-1),
                                           reduction="sum") / labels.numel()
        engine.backward(loss)
        grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
        assert any(g.abs().max() > 0 for g in grads.values())
        engine.step()
        total = loss.detach().clone()
        torch.distributed.all_reduce(total, group=mpu.get_sequence_parallel_group())
        params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        out[sp] = (total, grads, params)
        engine.destroy()
    (l1, g1, p1), (l2, g2, p2) = out[1], out[WORLD]
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"grad {name}: {m}")
        torch.testing.assert_close(p2[name], p1[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"param {name}: {m}")
    return True


@pytest.mark.parametrize("strategy,batch_dim_idx,hkv", [("ulysses", 0, 4), ("ulysses", 1, 2),
                                                        ("ring", 1, 2), ("allgather", 0, 2)])
def test_matches_deepspeed_distributed_attention(dspool, strategy, batch_dim_idx, hkv):
    assert all(dspool.run(case_matches_distributed_attention, WORLD, strategy=strategy,
                          batch_dim_idx=batch_dim_idx, hkv=hkv))


@pytest.mark.parametrize("stage,strategy,layout", [(1, "ulysses", "contiguous"), (2, "ring", "zigzag")])
def test_zero_step_with_sequence_parallel_equals_without(dspool, stage, strategy, layout):
    assert all(dspool.run(case_zero_step, WORLD, stage=stage, strategy=strategy, layout=layout))


def test_group_resolution_errors():
    from seqpar.integrations.deepspeed import SeqparDistributedAttention, resolve_sequence_parallel_group

    with pytest.raises(TypeError, match="get_sequence_parallel_group"):
        resolve_sequence_parallel_group(object())
    with pytest.raises(ValueError, match="strategy"):
        SeqparDistributedAttention(None, None, strategy="nope")


def test_linear_attention_decay_is_not_rounded_by_module_casts():
    """The engine casts the module (``bfloat16()`` / ``half()``): the constant decay must keep the
    precision it was given (it is used in the compute dtype of each call)."""
    from seqpar.integrations._common import retnet_decay
    from seqpar.integrations.deepspeed import SeqparDistributedLinearAttention

    decay = retnet_decay(4, dtype=torch.float64)
    attn = SeqparDistributedLinearAttention(None, g_gamma=decay).bfloat16()
    assert attn.g_gamma.dtype == torch.float64 and torch.equal(attn.g_gamma, decay)
