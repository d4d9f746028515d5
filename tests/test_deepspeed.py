"""DeepSpeed integration on CPU (gloo): seqpar attention on DeepSpeed's sequence-parallel group.

- seqpar's Ulysses (and ring / allgather) equals DeepSpeed's own DistributedAttention on the
  same inputs, outputs and gradients, [b, s, h, d] and [s, b, h, d], GQA;
- masks through SeqparDistributedAttention (packed documents of awkward lengths, a sliding
  window, softcap, sinks) equal a dense fp64 reference (tests/mask_reference.py): outputs and
  gradients of q, k, v and the sinks (summed over the ranks), for ulysses / ring / allgather on
  contiguous / zigzag / balanced layouts; refused arguments raise errors naming them;
- one deepspeed.initialize'd ZeRO-1 / ZeRO-2 / ZeRO-3 step of a tiny hybrid (linear + softmax)
  model with sequence parallelism over 2 ranks (with sink parameters, a window, softcap) equals
  the step without it; ZeRO-3's default reduce-scatter scales the gradients by 1/sp (pinned, and
  refused by check_zero_config).

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
# Masks through SeqparDistributedAttention against the dense fp64 oracle.

# 16 tokens on 2 ranks: a 1-token document first, a document across the rank boundary (5..11,
# and across the zigzag / balanced chunk boundaries at 4, 8, 12), another 1-token document.
DOCS = [0, 1, 5, 11, 12, 16]


def case_masks(ctx: WorkerContext, strategy: str, layout: str, batch_dim_idx: int, documents: bool, causal: bool,
               window, softcap, sinks: bool) -> bool:
    """sp=2 output and gradients (q, k, v, sinks summed over ranks) equal the unsharded dense fp64
    computation (tolerances: rtol 1e-9, atol 1e-10)."""
    import seqpar
    from mask_reference import global_mask, masked_attention

    from seqpar.integrations.deepspeed import SeqparDistributedAttention
    from seqpar.layout import shard_tensor

    torch.manual_seed(0)
    B, T, H, HKV, D = (1 if documents else 2), 16, 4, 2, 8
    q = torch.randn(B, T, H, D, dtype=torch.float64)
    k = torch.randn(B, T, HKV, D, dtype=torch.float64)
    v = torch.randn(B, T, HKV, D, dtype=torch.float64)
    do = torch.randn(B, T, H, D, dtype=torch.float64)
    sink = torch.linspace(-1.0, 1.5, H, dtype=torch.float64) if sinks else None
    cu = torch.tensor(DOCS, dtype=torch.int32) if documents else None
    if layout == "balanced":
        layout = seqpar.balanced_layout(DOCS, WORLD, chunks_per_rank=2, causal=causal)

    # the oracle: every token of the row at once
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    sr = sink.clone().requires_grad_(True) if sinks else None
    pos = torch.arange(T)
    mask = global_mask(pos, pos, causal=causal, window=window, cu_seqlens=DOCS if documents else None)
    o_ref, _ = masked_attention(qr, kr, vr, mask, scale=D ** -0.5, softcap=softcap, sinks=sr)
    o_ref.backward(do)
    plain, _ = masked_attention(q, k, v, torch.ones(T, T, dtype=torch.bool), scale=D ** -0.5)
    assert (o_ref.detach() - plain).abs().max() > 1e-2  # the mask / score change matters here

    attn = SeqparDistributedAttention(None, ctx.group, strategy=strategy, layout=layout, causal=causal,
                                      window=window, softcap=softcap)
    local = [shard_tensor(t, layout, ctx.rank, WORLD) for t in (q, k, v, do)]
    if batch_dim_idx == 1:
        local = [t.transpose(0, 1) for t in local]
    ql, kl, vl = (t.clone().requires_grad_(True) for t in local[:3])
    sl = sink.clone().requires_grad_(True) if sinks else None
    kwargs = {}
    if documents:
        kwargs["cu_seqlens"] = cu
    if sinks:
        kwargs["sinks"] = sl
    o = attn(ql, kl, vl, batch_dim_idx, **kwargs)
    o.backward(local[3])
    back = (lambda t: t) if batch_dim_idx == 0 else (lambda t: t.transpose(0, 1))  # noqa: E731
    tol = dict(rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(back(o.detach()), shard_tensor(o_ref.detach(), layout, ctx.rank, WORLD), **tol)
    for name, mine, full in (("dq", ql, qr), ("dk", kl, kr), ("dv", vl, vr)):
        torch.testing.assert_close(back(mine.grad), shard_tensor(full.grad, layout, ctx.rank, WORLD), **tol,
                                   msg=lambda m: f"{name}: {m}")
    if sinks:  # each rank holds its part; the sum over the group (what ZeRO's reduction does) is the total
        dsinks = sl.grad.clone()
        torch.distributed.all_reduce(dsinks, group=ctx.group)
        assert sr.grad.abs().max() > 1e-3
        torch.testing.assert_close(dsinks, sr.grad, **tol)
    return True


@pytest.mark.parametrize("strategy,layout,batch_dim_idx,documents,causal,window,softcap,sinks", [
    ("ulysses", "contiguous", 0, True, True, None, None, True),
    ("ulysses", "zigzag", 1, True, True, 3, None, False),
    ("ring", "contiguous", 0, True, True, 5, 2.0, True),
    ("ring", "zigzag", 1, True, True, None, 1.5, True),
    ("ring", "balanced", 0, True, True, None, None, True),
    ("allgather", "zigzag", 0, True, False, None, 2.5, True),
    ("allgather", "contiguous", 1, False, True, 3, None, True),
    ("ring", "contiguous", 0, False, True, 6, 3.0, False),
])
def test_masks_match_dense_reference(dspool, strategy, layout, batch_dim_idx, documents, causal, window, softcap,
                                     sinks):
    assert all(dspool.run(case_masks, WORLD, strategy=strategy, layout=layout, batch_dim_idx=batch_dim_idx,
                          documents=documents, causal=causal, window=window, softcap=softcap, sinks=sinks))


def case_local_cu_seqlens(ctx: WorkerContext) -> bool:
    """Boundaries of the local shard instead of the global row: both ranks raise."""
    from seqpar.integrations.deepspeed import SeqparDistributedAttention

    q = torch.randn(1, 8, 4, 8, dtype=torch.float64)
    attn = SeqparDistributedAttention(None, ctx.group, strategy="ring")
    attn(q, q, q, 0, cu_seqlens=torch.tensor([0, 3, 8]))
    return True


def test_local_cu_seqlens_are_refused(dspool):
    with pytest.raises(AssertionError, match="global sequence length 16") as info:
        dspool.run(case_local_cu_seqlens, WORLD)
    assert "rank 0" in str(info.value) and "rank 1" in str(info.value)


def test_refused_arguments():
    """What SeqparDistributedAttention cannot honour raises an error naming it (single process)."""
    from seqpar.integrations.deepspeed import SeqparDistributedAttention, SeqparDistributedLinearAttention

    q = torch.randn(1, 8, 4, 8, dtype=torch.float64)
    attn = SeqparDistributedAttention(None, None, strategy="ring")
    with pytest.raises(TypeError, match=r"keyword argument\(s\) attention_mask.*cu_seqlens=, sinks="):
        attn(q, q, q, 0, attention_mask=torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"cu_seqlens_k, cu_seqlens_q.*pass cu_seqlens="):
        attn(q, q, q, 0, cu_seqlens_q=torch.tensor([0, 8]), cu_seqlens_k=torch.tensor([0, 8]))
    with pytest.raises(TypeError, match=r"1 extra positional argument\(s\) after rotary_pos_emb \(Tensor\)"):
        attn(q, q, q, 0, None, torch.tensor([0, 8]))
    with pytest.raises(NotImplementedError, match="RoPE"):
        attn(q, q, q, 0, (q, q))
    # documents need one packed row; the error names the batch axis of the DeepSpeed layout
    q2 = torch.randn(2, 8, 4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"ONE packed row.*\[b, s, h, d\] \(batch_dim_idx=0\) has batch size 2"):
        attn(q2, q2, q2, 0, cu_seqlens=torch.tensor([0, 3, 8]))
    with pytest.raises(ValueError, match=r"\[s, b, h, d\] \(batch_dim_idx=1\) has batch size 2"):
        attn(*(t.transpose(0, 1) for t in (q2, q2, q2)), 1, cu_seqlens=torch.tensor([0, 3, 8]))
    with pytest.raises(ValueError, match="sinks must have shape"):  # seqpar's own check
        attn(q, q, q, 0, sinks=torch.zeros(3, dtype=torch.float64))
    # a ZeRO-3 parameter that was not gathered for this forward (0 local elements)
    partitioned = torch.nn.Parameter(torch.empty(0, dtype=torch.float64))
    partitioned.ds_id, partitioned.ds_shape = 7, torch.Size([4])
    with pytest.raises(ValueError, match=r"sinks is a ZeRO-3 partitioned parameter that is not gathered"):
        attn(q, q, q, 0, sinks=partitioned)
    # per-layer options fail when the layer is built
    with pytest.raises(ValueError, match=r"SeqparDistributedAttention\(window=4, causal=False\).*needs causal=True"):
        SeqparDistributedAttention(None, None, causal=False, window=4)
    with pytest.raises(ValueError, match=r"SeqparDistributedAttention: window must be >= 1"):
        SeqparDistributedAttention(None, None, window=0)
    with pytest.raises(TypeError, match=r"SeqparDistributedAttention: window must be an int"):
        SeqparDistributedAttention(None, None, window=2.5)
    with pytest.raises(ValueError, match=r"SeqparDistributedAttention: softcap"):
        SeqparDistributedAttention(None, None, softcap=-1.0)
    # linear attention: gates of another shape than the query's [b, s, h] (per key: [b, s, h, dk]),
    # several rows with documents, a striped layout
    lin = SeqparDistributedLinearAttention(None)
    with pytest.raises(ValueError, match=r"g must be \[b, s, h\] or \[b, s, h, dk\].*\(1, 8, 4\) or "
                                         r"\(1, 8, 4, 8\); got \(1, 8, 3\)"):
        lin(q, q, q, 0, g=torch.zeros(1, 8, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"beta must be \[s, b, h\] like the query \[s, b, h, d\] "
                                         r"\(batch_dim_idx=1\), i.e. \(8, 1, 4\); got \(8, 1, 4, 8\)"):
        lin(*(t.transpose(0, 1) for t in (q, q, q)), 1, beta=torch.full((8, 1, 4, 8), 0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"ONE packed row.*batch size 2"):
        lin(q2, q2, q2, 0, cu_seqlens=torch.tensor([0, 3, 8]))
    with pytest.raises(ValueError, match="linear layout 'striped'"):
        SeqparDistributedLinearAttention(None, layout="striped")


# ---------------------------------------------------------------------------------------------
# Linear attention: every family and packed documents on DeepSpeed's group against the per-document
# fp64 recurrence of the unsharded row.

# family -> (gate: None / "head" / "key", beta, use_qk_l2norm)
LINEAR_FAMILIES = {"scalar": ("head", False, False), "gla": ("key", False, False),
                   "gated_delta": ("head", True, True), "kda": ("key", True, False)}
LINEAR_TOL = dict(rtol=1e-9, atol=1e-10)


def _linear_inputs(family: str, B: int, T: int, H: int, DK: int, DV: int, seed: int) -> dict:
    gate, use_beta, l2 = LINEAR_FAMILIES[family]
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    x = dict(q=rnd(B, T, H, DK), k=rnd(B, T, H, DK), v=rnd(B, T, H, DV), do=rnd(B, T, H, DV), g=None, beta=None)
    if use_beta and not l2:  # the delta rule wants unit keys
        x["q"], x["k"] = (torch.nn.functional.normalize(x[n], dim=-1) for n in ("q", "k"))
    if gate is not None:
        x["g"] = torch.nn.functional.logsigmoid(rnd(B, T, H, *((DK,) if gate == "key" else ())) + 1.5)
    if use_beta:
        x["beta"] = torch.sigmoid(rnd(B, T, H))
    return x


def _linear_oracle(x: dict, docs: list[int] | None, h0: torch.Tensor | None, l2: bool):
    """(o, final states, grads of <o, do> + <final, dfinal>) by the fp64 recurrence, document by document."""
    from seqpar.kernels.delta_reference import gated_delta_recurrent_reference
    from seqpar.kernels.gla_reference import gla_recurrent_reference
    from seqpar.kernels.linear_reference import linear_attention_recurrent_reference

    names = [n for n in ("q", "k", "v", "g", "beta") if x[n] is not None]
    leaves = {n: x[n].clone().requires_grad_(True) for n in names}
    if h0 is not None:
        leaves["h0"] = h0.clone().requires_grad_(True)

    def run(sl, h):
        q, k, v = (leaves[n][:, sl] for n in ("q", "k", "v"))
        g = leaves["g"][:, sl] if "g" in leaves else None
        if "beta" in leaves:
            return gated_delta_recurrent_reference(q, k, v, leaves["beta"][:, sl], g=g, initial_state=h,
                                                   output_final_state=True, use_qk_l2norm=l2)
        if g is not None and g.dim() == 4:
            return gla_recurrent_reference(q, k, v, g, initial_state=h, output_final_state=True)
        return linear_attention_recurrent_reference(q, k, v, g=g, initial_state=h, output_final_state=True)

    T = x["q"].shape[1]
    bounds = docs or [0, T]
    parts = [run(slice(a, b), None if h0 is None else (leaves["h0"][i:i + 1] if docs else leaves["h0"]))
             for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
    o = torch.cat([p[0] for p in parts], dim=1)
    final = torch.cat([p[1] for p in parts], dim=0)
    dfinal = torch.linspace(-1.0, 1.0, final.numel(), dtype=torch.float64).view_as(final)
    loss = (o * x["do"]).sum() + (final * dfinal).sum()
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    return o.detach(), final.detach(), dfinal, grads


def case_linear_families(ctx: WorkerContext, family: str, strategy: str, layout: str, batch_dim_idx: int,
                         documents: bool, with_state: bool) -> bool:
    """SeqparDistributedLinearAttention at sp=2: o, the final states and the gradients of q, k, v,
    g, beta (this rank's shard) and of the initial states (summed over ranks) equal the fp64
    recurrence of the unsharded row run on each document alone (LINEAR_TOL)."""
    import seqpar
    from seqpar.integrations.deepspeed import SeqparDistributedLinearAttention
    from seqpar.layout import shard_tensor

    B, T, H, DK, DV = (1 if documents else 2), 28, 2, 5, 3
    docs = DOCS_LINEAR if documents else None
    x = _linear_inputs(family, B, T, H, DK, DV, seed=7)
    l2 = LINEAR_FAMILIES[family][2]
    h0 = None
    if with_state:
        h0 = torch.randn(len(docs) - 1 if docs else B, H, DK, DV, generator=torch.Generator().manual_seed(8),
                         dtype=torch.float64)
    o_ref, final_ref, dfinal, grads_ref = _linear_oracle(x, docs, h0, l2)
    if layout == "balanced":
        layout = seqpar.balanced_layout(docs or [0, T], WORLD, chunks_per_rank=2)
    attn = SeqparDistributedLinearAttention(ctx.group, strategy=strategy, layout=layout, use_qk_l2norm=l2)
    to_layout = (lambda t: t) if batch_dim_idx == 0 else (lambda t: t.transpose(0, 1))  # noqa: E731
    shard = lambda t: shard_tensor(t, layout, ctx.rank, WORLD)  # noqa: E731
    local = {n: to_layout(shard(t)).clone().requires_grad_(True) for n, t in x.items()
             if t is not None and n != "do"}
    h0_local = h0.clone().requires_grad_(True) if with_state else None
    o, final = attn(local["q"], local["k"], local["v"], batch_dim_idx, local.get("g"), h0_local, True,
                    beta=local.get("beta"), cu_seqlens=None if docs is None else torch.tensor(docs))
    ((o * to_layout(shard(x["do"]))).sum() + (final * dfinal).sum() / WORLD).backward()
    torch.testing.assert_close(o.detach(), to_layout(shard(o_ref)), **LINEAR_TOL)
    torch.testing.assert_close(final.detach(), final_ref, **LINEAR_TOL)
    for name, t in local.items():
        torch.testing.assert_close(t.grad, to_layout(shard(grads_ref[name])), **LINEAR_TOL,
                                   msg=lambda m: f"d{name}: {m}")
    if with_state:
        dh0 = h0_local.grad.clone()
        torch.distributed.all_reduce(dh0, group=ctx.group)
        torch.testing.assert_close(dh0, grads_ref["h0"], **LINEAR_TOL)
    return True


# 28 tokens on 2 ranks (zigzag / balanced chunks of 7): a 1-token document, documents across the
# chunk boundaries at 7 and 21, one ending and one starting on the rank boundary at 14, a 1-token
# document last.
DOCS_LINEAR = [0, 1, 9, 14, 19, 27, 28]


@pytest.mark.parametrize("family,strategy,layout,batch_dim_idx,documents,with_state", [
    ("scalar", "lasp2", "contiguous", 0, True, True),
    ("gla", "lasp1", "zigzag", 1, False, True),
    ("gla", "lasp2", "balanced", 0, True, False),
    ("gated_delta", "lasp2", "zigzag", 1, True, True),
    ("kda", "lasp1", "contiguous", 0, True, False),
])
def test_linear_families_and_documents_match_recurrence(dspool, family, strategy, layout, batch_dim_idx,
                                                        documents, with_state):
    assert all(dspool.run(case_linear_families, WORLD, family=family, strategy=strategy, layout=layout,
                          batch_dim_idx=batch_dim_idx, documents=documents, with_state=with_state))


def test_masks_single_process_match_reference():
    """Without torch.distributed (one process): the same options, against the oracle (rtol 1e-9)."""
    from mask_reference import global_mask, masked_attention

    from seqpar.integrations.deepspeed import SeqparDistributedAttention

    torch.manual_seed(3)
    T, H, D = 12, 4, 8
    q, k, v = (torch.randn(1, T, H, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    sinks = torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=torch.float64, requires_grad=True)
    attn = SeqparDistributedAttention(None, None, strategy="ring", window=4, softcap=2.0)
    o = attn(q, k, v, 0, cu_seqlens=torch.tensor([0, 1, 7, 12]), sinks=sinks)
    pos = torch.arange(T)
    o_ref, _ = masked_attention(q, k, v, global_mask(pos, pos, causal=True, window=4, cu_seqlens=[0, 1, 7, 12]),
                                scale=D ** -0.5, softcap=2.0, sinks=sinks)
    torch.testing.assert_close(o, o_ref, rtol=1e-9, atol=1e-10)
    g = torch.autograd.grad(o.sum(), (q, k, v, sinks))
    g_ref = torch.autograd.grad(o_ref.sum(), (q, k, v, sinks))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_check_zero_config():
    from seqpar.integrations.deepspeed import check_zero_config

    class Engine:
        def __init__(self, stage, reduce_scatter, sp):
            self.stage, self.rs, self.sequence_parallel_size = stage, reduce_scatter, sp

        def zero_optimization_stage(self):
            return self.stage

        def zero_reduce_scatter(self):
            return self.rs

    with pytest.raises(ValueError, match=r"reduce_scatter.*2x too small.*\"reduce_scatter\": false"):
        check_zero_config(Engine(3, True, 2))
    for ok in (Engine(3, False, 2), Engine(3, True, 1), Engine(2, True, 2), Engine(1, True, 4), Engine(0, True, 2)):
        check_zero_config(ok)


# ---------------------------------------------------------------------------------------------
# ZeRO steps of the example's tiny hybrid model on DeepSpeed's sequence-parallel group.


def _example_model(sp_source, layout: str, strategy: str, **masks) -> nn.Module:
    """The tiny hybrid model of examples/deepspeed_train.py (so the example is what is tested):
    pattern LS, the softmax layer on ``strategy`` and ``layout``; linear layers cannot be striped.
    ``masks``: the example's window / softcap / sinks options (sinks start away from 0)."""
    from example_loader import load_example

    example = load_example("deepspeed_train")
    model = example.HybridLM(sp_source, pattern="LS", vocab=48, dim=32, heads=4, kv_heads=2, max_len=64,
                             strategy=strategy, layout=layout, **masks)
    for blk in model.blocks:
        blk.attn.layout = layout if blk.kind == "S" or layout != "striped" else "contiguous"
        if blk.sinks is not None:
            blk.sinks.data.copy_(torch.linspace(-1.0, 1.0, blk.sinks.numel()))
    return model


def case_zero_step(ctx: WorkerContext, stage: int, strategy: str, layout: str, zero: dict | None = None,
                   masks: dict | None = None, grad_scale: float = 1.0) -> bool:
    """One ZeRO step with sp=2 gives the same loss, gradients and parameters as sp=1.

    ``zero``: extra "zero_optimization" settings; ``masks``: the example model's window / softcap /
    sinks; ``grad_scale``: the factor DeepSpeed's reduction puts on the sp=2 gradients (1 when
    right; the test of ZeRO-3's default reduce-scatter pins its 1/sp, and then only the gradients
    are compared)."""
    _quiet_deepspeed(ctx)
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    from seqpar.integrations.deepspeed import (SequenceParallelMPU, check_zero_config,
                                               resolve_sequence_parallel_group)
    from seqpar.layout import shard_tensor

    torch.manual_seed(0)
    B, T, vocab = 2, 16, 48
    tokens = torch.randint(0, vocab, (B, T))
    labels = torch.roll(tokens, -1, dims=1)
    positions = torch.arange(T).expand(B, T)
    config = {"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage, **(zero or {})}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10 ** 6}
    out = {}
    for sp in (1, WORLD):
        mpu = SequenceParallelMPU(sp)
        torch.manual_seed(1)
        model = _example_model(mpu, layout, strategy, **(masks or {}))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, mpu=mpu)
        from deepspeed.comm import comm as ds_comm

        assert ds_comm.cdb.shm_comm_op is None  # no JIT build
        if sp > 1:  # the engine trains on the group the attention runs on
            assert engine.get_sequence_parallel_group() is mpu.get_sequence_parallel_group()
            assert resolve_sequence_parallel_group(engine) is model.blocks[0].attn.group
        if grad_scale == 1.0 or sp == 1:
            check_zero_config(engine)
        else:  # the configuration whose reduction is wrong is refused
            with pytest.raises(ValueError, match="reduce_scatter"):
                check_zero_config(engine)
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
        # full fp32 parameters (ZeRO-3 keeps only a partition in each module parameter)
        params = {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}
        out[sp] = (total, grads, params)
        engine.destroy()
    (l1, g1, p1), (l2, g2, p2) = out[1], out[WORLD]
    assert sorted(g1) == sorted(g2)
    if (masks or {}).get("sinks"):  # the sink gradient is far above the tolerance (atol 1e-6) below
        assert g1["blocks.1.sinks"].abs().max() > 1e-4, g1["blocks.1.sinks"]
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name] * grad_scale, rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"grad {name}: {m}")
        if grad_scale == 1.0:
            torch.testing.assert_close(p2[name], p1[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"param {name}: {m}")
    return True


@pytest.mark.parametrize("strategy,batch_dim_idx,hkv", [("ulysses", 0, 4), ("ulysses", 1, 2),
                                                        ("ring", 1, 2), ("allgather", 0, 2)])
def test_matches_deepspeed_distributed_attention(dspool, strategy, batch_dim_idx, hkv):
    assert all(dspool.run(case_matches_distributed_attention, WORLD, strategy=strategy,
                          batch_dim_idx=batch_dim_idx, hkv=hkv))


@pytest.mark.parametrize("stage,strategy,layout,zero,masks", [
    (1, "ulysses", "contiguous", None, None),
    (2, "ring", "zigzag", None, None),
    (2, "ulysses", "zigzag", None, dict(sinks=True, softcap=3.0)),
    (3, "ulysses", "contiguous", {"reduce_scatter": False}, dict(sinks=True, window=5)),
    (3, "ring", "zigzag", {"reduce_scatter": False}, dict(sinks=True, softcap=3.0, window=6)),
])
def test_zero_step_with_sequence_parallel_equals_without(dspool, stage, strategy, layout, zero, masks):
    """Loss (rtol 1e-5), full gradients and parameters after the step (rtol 1e-4, atol 1e-6)."""
    assert all(dspool.run(case_zero_step, WORLD, stage=stage, strategy=strategy, layout=layout, zero=zero,
                          masks=masks))


def test_zero3_default_reduce_scatter_scales_gradients_by_one_over_sp(dspool):
    """DeepSpeed 0.19.8's ZeRO-3 reduce-scatter (the default) averages over the sequence-parallel
    ranks too: with sp=2 every gradient is half that of sp=1. Pinned so that a DeepSpeed that
    fixes it fails here (then check_zero_config and the docs can drop the requirement)."""
    assert all(dspool.run(case_zero_step, WORLD, stage=3, strategy="ulysses", layout="contiguous",
                          masks=dict(sinks=True), grad_scale=1.0 / WORLD))


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
