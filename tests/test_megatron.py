"""Megatron-core integration on CPU: context_parallel_size=2 (gloo) equals context_parallel_size=1.

Megatron's parallel_state is per process, so this file starts its own pool of 2 gloo processes
(once for every case here) and (re)initialises Megatron's model parallelism inside each case.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import warnings

import pytest
import torch

pytest.importorskip("megatron.core")

from distributed_pool import GlooPool, WorkerContext  # noqa: E402
from example_loader import load_example  # noqa: E402

WORLD = 2
SEQ = 16
VOCAB = 64


@pytest.fixture(scope="module")
def mpool():
    p = GlooPool(size=WORLD, timeout_s=240.0)
    yield p
    p.close()


def _init_megatron(cp: int) -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(context_parallel_size=cp, create_gloo_process_groups=False)


def _config(cp: int, num_layers: int, gqa: bool):
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=num_layers, hidden_size=32, num_attention_heads=4,
                               num_query_groups=2 if gqa else 4, ffn_hidden_size=64, kv_channels=8,
                               use_cpu_initialization=True, context_parallel_size=cp, attention_dropout=0.0,
                               hidden_dropout=0.0, params_dtype=torch.float32, bias_dropout_fusion=False,
                               masked_softmax_fusion=False, gradient_accumulation_fusion=False,
                               persist_layer_norm=False, apply_rope_fusion=False)
    _small_delta_sizes(config)
    return config


def _small_delta_sizes(config) -> None:
    """Megatron's GDN size fields for the 'D' layers: 2 q / k heads repeated to 4 value heads, Dk != Dv."""
    config.linear_num_key_heads, config.linear_num_value_heads = 2, 4
    config.linear_key_head_dim, config.linear_value_head_dim = 8, 6


def _spec(config, pattern: str | None, strategy: str | None, stock: bool):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from seqpar.integrations.megatron import get_gpt_layer_spec, hybrid_layer_specs

    if stock:  # plain SDPA core attention (cp=1 only): the reference of the softmax math
        from megatron.core.transformer.spec_utils import ModuleSpec

        from seqpar.integrations.megatron import _with_core_attention

        return _with_core_attention(get_gpt_layer_local_spec(), ModuleSpec(module=_reference_core()))
    if pattern is None:
        return get_gpt_layer_spec("softmax", strategy=strategy)
    return hybrid_layer_specs(pattern, config=config, softmax_strategy=strategy)


def _reference_core():
    """A core attention with torch SDPA on the full sequence (Megatron's own DotProductAttention
    needs CUDA): the single-device oracle of the softmax layers."""
    from megatron.core.transformer.module import MegatronModule

    class ReferenceCoreAttention(MegatronModule):
        def __init__(self, config, layer_number, attn_mask_type, attention_type="self", attention_dropout=None,
                     softmax_scale=None, cp_comm_type=None, pg_collection=None):
            super().__init__(config=config)

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            q, k, v = (t.permute(1, 2, 0, 3).double() for t in (query, key, value))  # [b, n, s, d]
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            s, b, n, d = query.shape
            return o.permute(2, 0, 1, 3).reshape(s, b, n * d).to(query.dtype)

    return ReferenceCoreAttention


def _copy_state(module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items() if torch.is_tensor(v)}


def _grads(model, group) -> dict[str, torch.Tensor]:
    """Parameter gradients summed over the context-parallel group (what DDP's dp-cp reduce does)."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad.detach().clone()
        if group is not None:
            torch.distributed.all_reduce(g, group=group)
        out[name] = g
    return out


def case_layout_matches_megatron_slicing(ctx: WorkerContext) -> bool:
    """seqpar's "zigzag" is what Megatron's get_batch_on_this_cp_rank keeps on each cp rank."""
    _init_megatron(cp=WORLD)
    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank

    from seqpar.integrations.megatron import MEGATRON_CP_LAYOUT
    from seqpar.layout import shard_tensor

    tokens = torch.arange(2 * 24).view(2, 24)
    mask = torch.ones(2, 1, 24, 24)
    batch = get_batch_on_this_cp_rank({"tokens": tokens.clone(), "attention_mask": mask})
    rank = parallel_state.get_context_parallel_rank()
    expected = shard_tensor(tokens, MEGATRON_CP_LAYOUT, rank, WORLD, dim=1)
    assert torch.equal(batch["tokens"], expected), (batch["tokens"], expected)
    assert batch["attention_mask"].shape == (2, 1, 12, 24)
    return True


def case_transformer_layer(ctx: WorkerContext, kind: str, strategy: str | None, gqa: bool) -> bool:
    """One TransformerLayer: cp=2 outputs and gradients equal cp=1 (softmax: vs Megatron's own attention)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_layer import TransformerLayer
    from megatron.core.utils import get_batch_on_this_cp_rank

    from seqpar.integrations.megatron import get_gpt_layer_spec

    torch.manual_seed(0)
    x = torch.randn(2, SEQ, 32, dtype=torch.float32)  # [b, s, h]; Megatron wants [s, b, h]
    results = {}
    for cp in (1, WORLD):
        _init_megatron(cp)
        config = _config(cp, 1, gqa)
        spec = _spec(config, None, strategy, stock=(cp == 1 and kind == "softmax"))
        if kind == "linear":
            spec = get_gpt_layer_spec("linear", strategy=strategy)
        torch.manual_seed(1)
        layer = TransformerLayer(config, spec.submodules, layer_number=1)
        if cp == 1:
            state = _copy_state(layer)
        else:
            missing, unexpected = layer.load_state_dict(state, strict=False)
            assert not [k for k in missing if "_extra_state" not in k] and not unexpected, (missing, unexpected)
        xin = get_batch_on_this_cp_rank({"x": x.clone()})["x"] if cp > 1 else x.clone()
        xin = xin.transpose(0, 1).contiguous().requires_grad_(True)
        out, _ = layer(xin, attention_mask=None)
        (out.float() ** 2).sum().backward()
        group = parallel_state.get_context_parallel_group() if cp > 1 else None
        results[cp] = (out.detach(), xin.grad.detach(), _grads(layer, group))

    o1, dx1, g1 = results[1]
    o2, dx2, g2 = results[WORLD]
    rank = parallel_state.get_context_parallel_rank()
    shard = lambda t: get_batch_on_this_cp_rank({"t": t.transpose(0, 1)}, )["t"].transpose(0, 1)  # noqa: E731
    torch.testing.assert_close(o2, shard(o1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dx2, shard(dx1), rtol=1e-4, atol=1e-5)
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert rank == ctx.rank
    return True


def case_gpt_model(ctx: WorkerContext, pattern: str | None, strategy: str | None) -> bool:
    """A small GPTModel (learned absolute positions): cp=2 loss, logits and grads equal cp=1."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.utils import get_batch_on_this_cp_rank

    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    labels = torch.roll(tokens, -1, dims=1)
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(2, -1).contiguous()
    results = {}
    for cp in (1, WORLD):
        _init_megatron(cp)
        num_layers = 4 if pattern else 2
        config = _config(cp, num_layers, gqa=True)
        spec = _spec(config, pattern, strategy, stock=(cp == 1 and pattern is None))
        torch.manual_seed(1)
        model = GPTModel(config, spec, vocab_size=VOCAB, max_sequence_length=SEQ,
                         position_embedding_type="learned_absolute")
        if cp == 1:
            state = _copy_state(model)
        else:
            missing, unexpected = model.load_state_dict(state, strict=False)
            assert not [k for k in missing if "_extra_state" not in k] and not unexpected, (missing, unexpected)
        batch = {"tokens": tokens.clone(), "labels": labels.clone(), "position_ids": position_ids.clone()}
        if cp > 1:
            batch = get_batch_on_this_cp_rank(batch)
        loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])  # [b, s_local]
        group = parallel_state.get_context_parallel_group() if cp > 1 else None
        (loss.sum() / labels.numel()).backward()
        total = loss.detach().sum()
        if group is not None:
            torch.distributed.all_reduce(total, group=group)
        results[cp] = (loss.detach(), total, _grads(model, group))

    l1, t1, g1 = results[1]
    l2, t2, g2 = results[WORLD]
    shard = get_batch_on_this_cp_rank({"l": l1})["l"]
    torch.testing.assert_close(l2, shard, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(t2, t1, rtol=1e-5, atol=1e-5)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    return True


def _max_rel_err(got: dict, ref: dict) -> float:
    """Largest |got - ref| of each tensor relative to that tensor's largest reference entry."""
    assert got.keys() == ref.keys()
    return max(float((got[n] - ref[n]).abs().max()) / (float(ref[n].abs().max()) or 1.0) for n in ref)


def case_example_sgd_step(ctx: WorkerContext, pattern: str, strategy: str, linear_strategy: str) -> dict:
    """One SGD step of examples/megatron_train.py's own model, loss function, schedule and gradient
    finalisation, in fp64, at cp=1 (dp=2, both replicas fed the same batches) and at cp=2, against
    an oracle that knows nothing of Megatron's schedules: plain autograd of the global mean loss
    (masked token losses of every micro-batch summed, over the global token count) on the
    unsharded model. Loss masks are random, so every micro-batch and every cp rank has its own
    token count (a mean of per-rank means would be wrong). Returns the relative errors."""
    example = load_example("megatron_train")
    args = argparse.Namespace(pattern=pattern, strategy=strategy, linear_strategy=linear_strategy, layers=4,
                              hidden=32, heads=4, query_groups=2, vocab=VOCAB, seq_len=SEQ, micro_batch=2)
    gen = torch.Generator().manual_seed(5)
    batches = [example.synthetic_batch(args, gen) for _ in range(3)]
    for b in batches:
        b["loss_mask"] = (torch.rand(b["loss_mask"].shape, generator=gen) > 0.3).to(torch.float64)
    lr = 0.1
    errors = {}
    for cp in (1, WORLD):
        _init_megatron(cp)
        torch.manual_seed(1)
        model = example.build_model(args, cp, dtype=torch.float64)
        if cp == 1:
            state = _copy_state(model)
            oracle = example.build_model(args, cp, dtype=torch.float64)
            oracle.load_state_dict(state, strict=False)
            losses = [oracle(b["tokens"], b["position_ids"], None, labels=b["labels"]) for b in batches]
            total_tokens = sum(b["loss_mask"].sum() for b in batches)
            ref_sum = sum((l * b["loss_mask"]).sum() for l, b in zip(losses, batches))
            # Megatron's cross entropy runs in fp32 even for an fp64 model: back-propagate the sum
            # and divide after, so that no fp32 rounding of 1 / total_tokens enters the oracle.
            ref_sum.backward()
            ref_loss = ref_sum / total_tokens
            ref_grads = {n: p.grad / total_tokens for n, p in oracle.named_parameters()}
        else:
            missing, unexpected = model.load_state_dict(state, strict=False)
            assert not [k for k in missing if "_extra_state" not in k] and not unexpected, (missing, unexpected)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        loss = example.train_step(model, optimizer, copy.deepcopy(batches), SEQ, args.micro_batch)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        steps = {n: (before[n] - p.detach()) / lr for n, p in model.named_parameters()}
        errors[cp] = {"loss": abs(loss - float(ref_loss)) / float(ref_loss),
                      "grad": _max_rel_err(grads, ref_grads), "sgd_step": _max_rel_err(steps, ref_grads)}
    return errors


def case_linear_core_fp64(ctx: WorkerContext, strategy: str) -> dict:
    """SeqparLinearCoreAttention in fp64 (cp=1 and cp=2, GQA) against the token-by-token fp64
    recurrence with the decay ladder log(1 - 2^(-5 - 5h/H)) written out here in fp64, the silu
    feature map and the RMS norm: outputs and q/k/v gradients. Returns the relative errors."""
    from megatron.core import parallel_state
    from megatron.core.transformer.enums import AttnMaskType

    from seqpar.integrations.megatron import MEGATRON_CP_LAYOUT, SeqparLinearCoreAttention
    from seqpar.kernels.linear_reference import linear_attention_recurrent_reference
    from seqpar.layout import shard_tensor

    S, B, H, HKV, D, eps = 20, 2, 4, 2, 8, 1e-6
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(S, B, n, D, generator=gen, dtype=torch.float64) for n in (H, HKV, HKV))
    w = torch.randn(S, B, H * D, generator=gen, dtype=torch.float64)

    # The oracle: [s, b, n, d] -> [b, s, n, d], heads repeated, recurrence, RMS norm.
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    bshd = lambda t: t.transpose(0, 1).repeat_interleave(H // t.shape[2], dim=2)  # noqa: E731
    log_decay = torch.log(1.0 - 2.0 ** (-5.0 - 5.0 * torch.arange(H, dtype=torch.float64) / H))
    o_ref, _ = linear_attention_recurrent_reference(torch.nn.functional.silu(bshd(qr)),
                                                    torch.nn.functional.silu(bshd(kr)), bshd(vr),
                                                    g_gamma=log_decay, scale=D ** -0.5)
    o_ref = o_ref * torch.rsqrt(o_ref.pow(2).mean(-1, keepdim=True) + eps)
    o_ref = o_ref.transpose(0, 1).reshape(S, B, H * D)
    (o_ref * w).sum().backward()

    errors = {}
    for cp in (1, WORLD):
        _init_megatron(cp)
        rank = parallel_state.get_context_parallel_rank()
        shard = lambda t: shard_tensor(t, MEGATRON_CP_LAYOUT, rank, cp, dim=0)  # noqa: E731
        config = _config(cp, 1, gqa=True)
        config.params_dtype = torch.float64
        core = SeqparLinearCoreAttention(config, 1, AttnMaskType.causal, strategy=strategy)
        ql, kl, vl = (shard(t).clone().requires_grad_(True) for t in (q, k, v))
        o = core(ql, kl, vl, attention_mask=None)
        assert o.dtype == torch.float64
        (o * shard(w)).sum().backward()
        got = {"o": o.detach(), "dq": ql.grad, "dk": kl.grad, "dv": vl.grad}
        want = {"o": shard(o_ref.detach()), "dq": shard(qr.grad), "dk": shard(kr.grad), "dv": shard(vr.grad)}
        errors[cp] = {n: _max_rel_err({n: got[n]}, {n: want[n]}) for n in got}
    return errors


# ---------------------------------------------------------------------------------------------
# Packed documents (THD), sliding windows and sinks from the TransformerConfig.

# Real document lengths (a 1-token document, documents crossing the cp rank boundary) and, for
# Megatron's per-document THD split, their lengths padded to multiples of 2 * cp = 4.
PACKED_REAL = [1, 6, 3, 9, 4]
PACKED_PADDED = [4, 8, 4, 12, 4]          # 32 tokens in all
ROW_REAL = [1, 9, 5, 13, 4]               # 32 tokens, no padding (row split: any lengths)
PACKED_TOL = dict(rtol=1e-4, atol=1e-5)   # fp32 model against the fp64-attention oracle


def _cumsum(lengths):
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def _thd_indices(padded_bounds, rank, cp):
    """Megatron / TE's THD split (tex.thd_get_partitioned_indices), written out here: every padded
    document is cut into 2 * cp chunks and rank r keeps chunks r and 2 * cp - 1 - r of each."""
    idx = []
    for a, b in zip(padded_bounds[:-1], padded_bounds[1:]):
        c = (b - a) // (2 * cp)
        for k in (rank, 2 * cp - 1 - rank):
            idx.extend(range(a + k * c, a + (k + 1) * c))
    return torch.tensor(idx)


def _oracle_core():
    """fp64 softmax attention written out (causal, TE-convention window of the layer from the
    config, softmax_type sinks as an extra logit column, parameter ``softmax_offset`` as in
    Megatron): the single-document oracle, run on each document separately at cp=1."""
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.utils import is_layer_window_attention

    class OracleCoreAttention(MegatronModule):
        def __init__(self, config, layer_number, attn_mask_type, attention_type="self", attention_dropout=None,
                     softmax_scale=None, cp_comm_type=None, pg_collection=None):
            super().__init__(config=config)
            self.window = None
            if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
                self.window = config.window_size
            if config.softmax_type == "learnable":
                self.softmax_offset = torch.nn.Parameter(torch.zeros(config.num_attention_heads))

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            assert packed_seq_params is None
            s, b, n, d = query.shape
            q, k, v = (t.permute(1, 2, 0, 3).double().repeat_interleave(n // t.shape[2], dim=1)
                       for t in (query, key, value))
            scores = q @ k.transpose(-1, -2) / math.sqrt(d)
            i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
            visible = j <= i
            if self.window is not None and self.window[0] >= 0:
                visible &= j >= i - self.window[0]
            scores = scores.masked_fill(~visible, float("-inf"))
            if self.config.softmax_type != "vanilla":
                sink = (self.softmax_offset.double() if self.config.softmax_type == "learnable"
                        else torch.zeros(n, dtype=torch.float64))
                scores = torch.cat([scores, sink.view(1, n, 1, 1).expand(b, n, s, 1)], dim=-1)
            p = torch.softmax(scores, dim=-1)[..., :s]
            o = p @ v
            return o.permute(2, 0, 1, 3).reshape(s, b, n * d).to(query.dtype)

    return OracleCoreAttention


def _linear_oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The linear core's math written out in fp64 on [b, s, n, d] (k / v heads repeated): silu
    feature maps, the decay ladder log(1 - 2^(-5 - 5h/H)), the token-by-token recurrence, the
    parameter-free RMS norm (eps 1e-6)."""
    from seqpar.kernels.linear_reference import linear_attention_recurrent_reference

    H, D = q.shape[2], q.shape[3]
    q, k, v = (t.double().repeat_interleave(H // t.shape[2], dim=2) for t in (q, k, v))
    log_decay = torch.log(1.0 - 2.0 ** (-5.0 - 5.0 * torch.arange(H, dtype=torch.float64) / H))
    o, _ = linear_attention_recurrent_reference(torch.nn.functional.silu(q), torch.nn.functional.silu(k), v,
                                                g_gamma=log_decay, scale=D ** -0.5)
    return o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6)


def _oracle_linear_core():
    """The linear core attention of one unpacked document, in fp64 (:func:`_linear_oracle`)."""
    from megatron.core.transformer.module import MegatronModule

    class OracleLinearCore(MegatronModule):
        def __init__(self, config, layer_number, attn_mask_type, attention_type="self", attention_dropout=None,
                     softmax_scale=None, cp_comm_type=None, pg_collection=None):
            super().__init__(config=config)

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            assert packed_seq_params is None
            s, b, n, d = query.shape
            o = _linear_oracle(*(t.transpose(0, 1) for t in (query, key, value)))
            return o.transpose(0, 1).reshape(s, b, n * d).to(query.dtype)

    return OracleLinearCore


def _oracle_delta_layer():
    """SeqparGatedDeltaNet whose token mixing is the fp64 token-by-token gated delta rule (one
    unpacked document at a time): same parameters, projections and gates."""
    from seqpar.integrations.megatron import SeqparGatedDeltaNet
    from seqpar.kernels.delta_reference import gated_delta_recurrent_reference

    class OracleGatedDeltaNet(SeqparGatedDeltaNet):
        def mix(self, q, k, v, g, beta, *, layout, cu_seqlens):
            assert cu_seqlens is None
            o, _ = gated_delta_recurrent_reference(q.double(), k.double(), v.double(), beta.double(), g=g.double(),
                                                   use_qk_l2norm=True)
            return o.to(q.dtype)

    return OracleGatedDeltaNet


def _oracle_block_spec(pattern: str, num_layers: int):
    """The block spec of the per-document oracle: fp64 softmax (S), linear (L) and delta (D) mixing."""
    from megatron.core.models.gpt.gpt_layer_specs import LNImpl, get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from seqpar.integrations.megatron import _with_core_attention, expand_pattern

    base = get_gpt_layer_local_spec()
    by_letter = {"S": _with_core_attention(base, ModuleSpec(module=_oracle_core())),
                 "L": _with_core_attention(base, ModuleSpec(module=_oracle_linear_core())),
                 "D": dataclasses.replace(base, submodules=dataclasses.replace(
                     base.submodules, self_attention=ModuleSpec(module=_oracle_delta_layer())))}
    return TransformerBlockSubmodules(layer_specs=[by_letter[c] for c in expand_pattern(pattern, num_layers)],
                                      layer_norm=LNImpl)


def _rope_on_cpu(model) -> None:
    """Megatron 0.16.1's RotaryEmbedding.get_emb moves its inv_freq to CUDA; on a CPU-only torch
    this model's rotary module computes the same table on CPU instead (an attribute of this one
    instance; the THD application path stays Megatron's)."""
    import types

    def get_emb(emb_self, max_seq_len, offset=0):
        assert not emb_self.rotary_interleaved
        freqs = emb_self.get_freqs_non_repeated(max_seq_len, offset)
        return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]

    model.rotary_pos_emb.get_emb = types.MethodType(get_emb, model.rotary_pos_emb)


def _packed_config(cp, window, skip_freq, softmax_type, rope):
    config = _config(cp, 2, gqa=True)
    config.window_size = window
    config.window_attn_skip_freq = skip_freq
    config.softmax_type = softmax_type
    return config


def case_packed_gpt_model(ctx: WorkerContext, split: str, strategy: str, rope: bool, window, skip_freq,
                          softmax_type: str, pattern: str = "SS", linear_strategy: str = "lasp2") -> bool:
    """A 2-layer GPTModel (layers by ``pattern``: S softmax, L linear core, D gated delta rule)
    fed ONE packed row of documents with PackedSeqParams (qkv_format 'thd', global boundaries), at
    cp=1 and cp=2, against an oracle that knows nothing of packing: the cp=1 model with written-out
    fp64 token mixing (softmax, linear recurrence, delta-rule recurrence) run on each document
    separately (positions restarting at 0). Per-token losses of the real tokens, their sum and
    every parameter gradient (summed over cp) must agree; padding tokens are masked out of the loss."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.packed_seq_params import PackedSeqParams

    import seqpar
    from seqpar.integrations.megatron import hybrid_layer_specs

    real = PACKED_REAL if split == "document" else ROW_REAL
    padded = PACKED_PADDED if split == "document" else ROW_REAL
    rb, pb = _cumsum(real), _cumsum(padded)
    T = pb[-1]
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (1, T), generator=gen)
    labels = torch.randint(0, VOCAB, (1, T), generator=gen)
    position_ids = torch.zeros(1, T, dtype=torch.long)
    loss_mask = torch.zeros(1, T)
    for d in range(len(real)):
        position_ids[0, pb[d]: pb[d + 1]] = torch.arange(padded[d])
        loss_mask[0, pb[d]: pb[d] + real[d]] = 1.0
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=torch.tensor(rb, dtype=torch.int32),
                             cu_seqlens_kv=torch.tensor(rb, dtype=torch.int32),
                             max_seqlen_q=max(padded), max_seqlen_kv=max(padded))
    if split == "document":
        params.cu_seqlens_q_padded = torch.tensor(pb, dtype=torch.int32)
        params.cu_seqlens_kv_padded = torch.tensor(pb, dtype=torch.int32)
    pos_type = "rope" if rope else "learned_absolute"

    def build(cp, spec_of_config):
        config = _packed_config(cp, window, skip_freq, softmax_type, rope)
        spec = spec_of_config(config)
        torch.manual_seed(1)
        model = GPTModel(config, spec, vocab_size=VOCAB, max_sequence_length=T, position_embedding_type=pos_type)
        if rope:
            _rope_on_cpu(model)
        return model

    results = {}
    for cp in (1, WORLD):
        _init_megatron(cp)
        layout = seqpar.balanced_layout(torch.tensor(rb), cp) if split == "balanced" else "zigzag"
        model = build(cp, lambda config: hybrid_layer_specs(
            pattern, config=config, softmax_strategy=strategy, linear_strategy=linear_strategy, layout=layout,
            packed_split="document" if split == "document" else "row"))
        if cp == 1:
            state = _copy_state(model)
            # The oracle: each document alone through the unpacked model with fp64 token mixing.
            oracle = build(1, lambda config: _oracle_block_spec(pattern, config.num_layers))
            missing, unexpected = oracle.load_state_dict(state, strict=False)
            assert not [k for k in missing if "_extra_state" not in k] and not unexpected, (missing, unexpected)
            ref_loss = torch.zeros(1, T)
            for d in range(len(real)):
                sl = slice(pb[d], pb[d] + real[d])
                out = oracle(tokens[:, sl], torch.arange(real[d]).unsqueeze(0), None, labels=labels[:, sl])
                ref_loss[:, sl] = out
            ref_loss.sum().backward()
            ref_grads = {n: p.grad.detach().clone() for n, p in oracle.named_parameters()}
        else:
            missing, unexpected = model.load_state_dict(state, strict=False)
            assert not [k for k in missing if "_extra_state" not in k] and not unexpected, (missing, unexpected)
        rank = parallel_state.get_context_parallel_rank()
        if cp == 1:
            index = torch.arange(T)
        elif split == "document":
            index = _thd_indices(pb, rank, cp)
        else:
            index = seqpar.layout.global_positions(layout, rank, cp, T // cp)
        batch = {k: v[:, index] for k, v in dict(tokens=tokens, labels=labels, pos=position_ids,
                                                  mask=loss_mask, ref=ref_loss).items()}
        loss = model(batch["tokens"], batch["pos"], None, labels=batch["labels"], packed_seq_params=params)
        assert loss.shape == (1, T // cp), loss.shape
        (loss * batch["mask"]).sum().backward()
        group = parallel_state.get_context_parallel_group() if cp > 1 else None
        torch.testing.assert_close(loss.detach() * batch["mask"], batch["ref"].detach(), **PACKED_TOL,
                                   msg=lambda m: f"cp={cp} token losses: {m}")
        grads = _grads(model, group)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], **PACKED_TOL,
                                       msg=lambda m: f"cp={cp} grad {name}: {m}")
        results[cp] = True
    return all(results.values())


def _packed_row_fp64():
    """(PackedSeqParams of the padded THD row PACKED_REAL / PACKED_PADDED, the oracle's documents:
    every real run and every padding run, as global [start, end) pairs, row length)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    rb, pb = _cumsum(PACKED_REAL), _cumsum(PACKED_PADDED)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=torch.tensor(rb, dtype=torch.int32),
                             cu_seqlens_kv=torch.tensor(rb, dtype=torch.int32),
                             cu_seqlens_q_padded=torch.tensor(pb, dtype=torch.int32),
                             cu_seqlens_kv_padded=torch.tensor(pb, dtype=torch.int32),
                             max_seqlen_q=max(PACKED_PADDED), max_seqlen_kv=max(PACKED_PADDED))
    runs = []
    for start, n, room in zip(pb[:-1], PACKED_REAL, PACKED_PADDED):
        runs.append((start, start + n))
        if n < room:
            runs.append((start + n, start + room))
    return params, runs, pb[-1]


def _per_run(fn, runs, *tensors, dim: int):
    """``fn`` applied to each run of tokens (along ``dim``) alone, the results concatenated."""
    outs = [fn(*(t.narrow(dim, a, b - a) for t in tensors)) for a, b in runs]
    return torch.cat(outs, dim=dim)


def case_linear_core_packed_fp64(ctx: WorkerContext, strategy: str) -> dict:
    """SeqparLinearCoreAttention in fp64 on one packed THD row (padded documents, Megatron's
    per-document split) at cp=1 and cp=2 against :func:`_linear_oracle` run on every document and
    every padding run alone: outputs and q/k/v gradients. Returns the relative errors."""
    from megatron.core import parallel_state
    from megatron.core.transformer.enums import AttnMaskType

    from seqpar.integrations.megatron import SeqparLinearCoreAttention

    params, runs, T = _packed_row_fp64()
    H, HKV, D = 4, 2, 8
    gen = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(T, n, D, generator=gen, dtype=torch.float64) for n in (H, HKV, HKV))
    w = torch.randn(T, H * D, generator=gen, dtype=torch.float64)
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    oracle = lambda q, k, v: _linear_oracle(q[None], k[None], v[None])[0].reshape(q.shape[0], H * D)  # noqa: E731
    o_ref = _per_run(oracle, runs, qr, kr, vr, dim=0)
    (o_ref * w).sum().backward()
    errors = {}
    for cp in (1, WORLD):
        _init_megatron(cp)
        rank = parallel_state.get_context_parallel_rank()
        index = _thd_indices(_cumsum(PACKED_PADDED), rank, cp) if cp > 1 else torch.arange(T)
        config = _config(cp, 1, gqa=True)
        config.params_dtype = torch.float64
        core = SeqparLinearCoreAttention(config, 1, AttnMaskType.padding_causal, strategy=strategy)
        ql, kl, vl = (t[index].clone().requires_grad_(True) for t in (q, k, v))
        o = core(ql, kl, vl, None, packed_seq_params=params)
        (o * w[index]).sum().backward()
        got = {"o": o.detach(), "dq": ql.grad, "dk": kl.grad, "dv": vl.grad}
        want = {"o": o_ref.detach()[index], "dq": qr.grad[index], "dk": kr.grad[index], "dv": vr.grad[index]}
        errors[cp] = {n: _max_rel_err({n: got[n]}, {n: want[n]}) for n in got}
    return errors


def case_delta_layer_fp64(ctx: WorkerContext, strategy: str, packed: bool) -> dict:
    """SeqparGatedDeltaNet in fp64 at cp=1 and cp=2 (Megatron's zigzag rows, or one packed THD row
    with the per-document split) against its formulas written out here: silu projections, 2 q / k
    heads repeated to 4 value heads, beta = sigmoid(W_b x), g = -exp(A_log) softplus(W_a x +
    dt_bias), the fp64 token-by-token gated delta rule with L2-normalised q / k (on each document
    and padding run alone), the per-head gated RMS norm and the output projection. Compares the
    output, the input gradient and every parameter gradient (summed over cp). Returns the
    relative errors."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing import ShardedTensor

    from seqpar.integrations.megatron import MEGATRON_CP_LAYOUT, SeqparGatedDeltaNet
    from seqpar.kernels.delta_reference import gated_delta_recurrent_reference
    from seqpar.layout import shard_tensor

    silu = torch.nn.functional.silu
    if packed:
        params, runs, S = _packed_row_fp64()
        B = 1
    else:
        params, S, B = None, 20, 2
        runs = [(0, S)]
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(S, B, 32, generator=gen, dtype=torch.float64)
    w = torch.randn(S, B, 32, generator=gen, dtype=torch.float64)
    errors, state = {}, None
    for cp in (1, WORLD):
        _init_megatron(cp)
        rank = parallel_state.get_context_parallel_rank()
        if packed:
            index = _thd_indices(_cumsum(PACKED_PADDED), rank, cp) if cp > 1 else torch.arange(S)
        else:
            index = shard_tensor(torch.arange(S), MEGATRON_CP_LAYOUT, rank, cp, dim=0)
        config = _config(cp, 1, gqa=True)
        config.params_dtype = torch.float64
        torch.manual_seed(1)
        layer = SeqparGatedDeltaNet(config, 1, strategy=strategy, A_init_range=(0.05, 0.5))
        if state is None:
            with torch.no_grad():  # random, not Megatron's all-ones, so the bias matters
                layer.dt_bias.copy_(torch.linspace(-1.0, 1.0, layer.dt_bias.numel(), dtype=torch.float64))
                layer.out_norm.weight.copy_(torch.linspace(0.5, 1.5, 6, dtype=torch.float64))
            state = _copy_state(layer)
            # the oracle, on the parameters of the cp=1 layer
            P = {n: t.clone().requires_grad_(True) for n, t in state.items()}
            xr = x.clone().requires_grad_(True)

            def proj(name, n, d):  # [S, B, hidden] -> [B, S, n, d]
                return (xr @ P[f"{name}.weight"].T).transpose(0, 1).reshape(B, S, n, d)

            q = silu(proj("linear_q", 2, 8)).repeat_interleave(2, dim=2)
            k = silu(proj("linear_k", 2, 8)).repeat_interleave(2, dim=2)
            v, z = silu(proj("linear_v", 4, 6)), proj("linear_z", 4, 6)
            beta = torch.sigmoid(proj("linear_beta", 4, 1)[..., 0])
            g = -torch.exp(P["A_log"]) * torch.nn.functional.softplus(proj("linear_a", 4, 1)[..., 0] + P["dt_bias"])
            rule = lambda q, k, v, beta, g: gated_delta_recurrent_reference(  # noqa: E731
                q, k, v, beta, g=g, use_qk_l2norm=True)[0]
            o = _per_run(rule, runs, q, k, v, beta, g, dim=1)
            o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + config.layernorm_epsilon) * P["out_norm.weight"]
            out_ref = (o * silu(z)).reshape(B, S, 24).transpose(0, 1) @ P["out_proj.weight"].T
            (out_ref * w).sum().backward()
            want_grads = {n: t.grad for n, t in P.items()}
        else:
            missing, unexpected = layer.load_state_dict(state, strict=False)
            assert not [k for k in missing if "_extra_state" not in k] and not unexpected, (missing, unexpected)
        xl = x[index].clone().requires_grad_(True)
        out, bias = layer(xl, None, packed_seq_params=params)
        assert bias is None and out.dtype == torch.float64 and out.shape == xl.shape
        (out * w[index]).sum().backward()
        grads = _grads(layer, parallel_state.get_context_parallel_group() if cp > 1 else None)
        errors[cp] = {"out": _max_rel_err({"o": out.detach()}, {"o": out_ref.detach()[index]}),
                      "dx": _max_rel_err({"dx": xl.grad}, {"dx": xr.grad[index]}),
                      "params": _max_rel_err(grads, want_grads)}
        if not packed:  # A_log / dt_bias are sharded over tensor parallelism in distributed checkpoints
            sharded = layer.sharded_state_dict(prefix="layer.")
            assert isinstance(sharded["layer.A_log"], ShardedTensor) and "layer.linear_q.weight" in sharded
    return errors


@pytest.mark.parametrize("strategy", ["lasp2", "lasp1"])
def test_linear_core_packed_fp64_matches_per_document_recurrence(mpool, strategy):
    for errors in mpool.run(case_linear_core_packed_fp64, WORLD, strategy=strategy):
        for cp, errs in errors.items():
            assert max(errs.values()) < FP64_REL_TOL, (cp, errs)


@pytest.mark.parametrize("strategy,packed", [("lasp2", False), ("lasp1", True)])
def test_delta_layer_fp64_matches_written_out_formulas(mpool, strategy, packed):
    """SeqparGatedDeltaNet (fp64) at cp=1 and cp=2 equals Gated DeltaNet written out (relative 1e-10)."""
    for errors in mpool.run(case_delta_layer_fp64, WORLD, strategy=strategy, packed=packed):
        for cp, errs in errors.items():
            assert max(errs.values()) < FP64_REL_TOL, (cp, errs)


def test_layout_matches_megatron_batch_slicing(mpool):
    assert all(mpool.run(case_layout_matches_megatron_slicing, WORLD))


@pytest.mark.parametrize("strategy", ["ring", "allgather", "ulysses"])
def test_transformer_layer_softmax_cp2_equals_cp1(mpool, strategy):
    assert all(mpool.run(case_transformer_layer, WORLD, kind="softmax", strategy=strategy, gqa=True))


@pytest.mark.parametrize("strategy", ["lasp2", "lasp1"])
def test_transformer_layer_linear_cp2_equals_cp1(mpool, strategy):
    assert all(mpool.run(case_transformer_layer, WORLD, kind="linear", strategy=strategy, gqa=False))


@pytest.mark.parametrize("pattern,strategy", [(None, "ring"), ("LS", "allgather"), ("LLLS", "ulysses"),
                                              ("DS", "allgather")])
def test_gpt_model_cp2_equals_cp1(mpool, pattern, strategy):
    assert all(mpool.run(case_gpt_model, WORLD, pattern=pattern, strategy=strategy))


def test_specs_and_errors():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from seqpar.integrations.megatron import (
        SeqparCoreAttention,
        SeqparLinearCoreAttention,
        expand_pattern,
        hybrid_layer_specs,
    )

    assert expand_pattern("LS", 4) == "LSLS"
    with pytest.raises(ValueError, match="does not tile"):
        expand_pattern("LLS", 4)
    with pytest.raises(ValueError, match="'S'"):
        expand_pattern("LX", 2)
    block = hybrid_layer_specs("LLLS", num_layers=8)
    cores = [s.submodules.self_attention.submodules.core_attention.module for s in block.layer_specs]
    assert cores == [SeqparLinearCoreAttention] * 3 + [SeqparCoreAttention] + [SeqparLinearCoreAttention] * 3 + [SeqparCoreAttention]
    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True)
    with pytest.raises(ValueError, match="attention_dropout"):
        SeqparCoreAttention(config, 1, None, pg_collection=object())


# Tolerances of the fp64 cases: rounding only (the bug these guard against gave 2.0 and 7e-7).
FP64_REL_TOL = 1e-10


@pytest.mark.parametrize("pattern,strategy,linear_strategy", [("LS", "ring", "lasp2"), ("SL", "ulysses", "lasp1")])
def test_example_sgd_step_cp2_equals_cp1_and_global_mean(mpool, pattern, strategy, linear_strategy):
    """examples/megatron_train.py's loss convention gives the gradient of the global mean loss:
    cp=2 equals cp=1 equals plain autograd (a cp-times scale would show as an error of 1.0)."""
    for errors in mpool.run(case_example_sgd_step, WORLD, pattern=pattern, strategy=strategy,
                            linear_strategy=linear_strategy):
        for cp, errs in errors.items():
            assert max(errs.values()) < FP64_REL_TOL, (cp, errs)


@pytest.mark.parametrize("strategy", ["lasp2", "lasp1"])
def test_linear_core_fp64_matches_recurrence(mpool, strategy):
    for errors in mpool.run(case_linear_core_fp64, WORLD, strategy=strategy):
        for cp, errs in errors.items():
            assert max(errs.values()) < FP64_REL_TOL, (cp, errs)


def test_retnet_decay_dtype():
    """The decay ladder is computed in fp64 and returned in the asked dtype."""
    from seqpar.integrations._common import retnet_decay

    exact = torch.log(1.0 - 2.0 ** (-5.0 - 5.0 * torch.arange(2, 6, dtype=torch.float64) / 8))
    d64 = retnet_decay(4, head_offset=2, total_heads=8, dtype=torch.float64)
    assert d64.dtype == torch.float64
    torch.testing.assert_close(d64, exact, rtol=1e-12, atol=0)  # log(1 - x) loses ~1e-13 to log1p(-x)
    d32 = retnet_decay(4, head_offset=2, total_heads=8)
    assert d32.dtype == torch.float32 and torch.equal(d32, d64.float())


def test_example_script_trains():
    """examples/megatron_train.py end to end under torchrun (2 gloo ranks, cp=2): the loss it
    prints is finite and falls."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "examples/megatron_train.py", "--cp", "2", "--steps", "6", "--lr", "1e-2"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [float(v) for v in re.findall(r"loss (\S+)", proc.stdout)]
    assert len(losses) == 2 and all(map(math.isfinite, losses)) and losses[-1] < losses[0] - 0.1, proc.stdout


@pytest.mark.parametrize("split,strategy,rope,window,skip_freq,softmax_type", [
    ("document", "ring", True, None, None, "vanilla"),            # Megatron THD split + THD RoPE
    ("document", "allgather", True, (3, 0), 2, "learnable"),      # window on layer 1, full layer 2, sinks
    ("row", "ulysses", False, (4, -1), None, "off-by-one"),       # zigzag over the row
    ("balanced", "ring", False, (5, 0), None, "learnable"),       # BalancedLayout of the documents
])
def test_packed_gpt_model_cp2_equals_per_document_oracle(mpool, split, strategy, rope, window, skip_freq,
                                                         softmax_type):
    """Tolerances: PACKED_TOL (fp32 model vs fp64-attention oracle) on token losses and grads."""
    assert all(mpool.run(case_packed_gpt_model, WORLD, split=split, strategy=strategy, rope=rope, window=window,
                         skip_freq=skip_freq, softmax_type=softmax_type))


@pytest.mark.parametrize("split,pattern,strategy,linear_strategy,rope,window,skip_freq,softmax_type", [
    # linear core on the per-document zigzag (a BalancedLayout) of Megatron's THD split, THD RoPE
    ("document", "LS", "ring", "lasp2", True, None, None, "vanilla"),
    # delta-rule layer on the THD split; softmax layer 1 with a window and learnable sinks
    ("document", "SD", "allgather", "lasp1", True, (3, 0), 2, "learnable"),
    # both recurrent layers on the zigzag row split (unpadded documents)
    ("row", "LD", "ulysses", "lasp1", False, None, None, "vanilla"),
    # a BalancedLayout of the documents; window on the softmax layer only
    ("balanced", "SD", "ring", "lasp2", False, (5, 0), [1, 0], "off-by-one"),
])
def test_packed_recurrent_layers_cp2_equal_per_document_oracle(mpool, split, pattern, strategy, linear_strategy,
                                                               rope, window, skip_freq, softmax_type):
    """Linear-core and gated delta-rule layers on packed rows: the state resets at every document
    (and padding) start. Tolerances: PACKED_TOL on token losses and every parameter gradient."""
    assert all(mpool.run(case_packed_gpt_model, WORLD, split=split, strategy=strategy, rope=rope, window=window,
                         skip_freq=skip_freq, softmax_type=softmax_type, pattern=pattern,
                         linear_strategy=linear_strategy))


class _FakeGroup:
    def __init__(self, size=1, rank=0):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def rank(self):
        return self._rank


def _fake_pgs(cp_size=1):
    import types

    return types.SimpleNamespace(tp=_FakeGroup(), cp=None if cp_size == 1 else _FakeGroup(cp_size))


def _small_config(**kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, kv_channels=8,
                             use_cpu_initialization=True, attention_dropout=0.0, **kw)


def test_layer_window_mapping():
    """TE's (left, right) -> seqpar window = left + 1 on the window layers of window_attn_skip_freq."""
    from seqpar.integrations.megatron import layer_window

    assert layer_window(_small_config(window_size=(3, 0)), 1, True) == 4
    assert layer_window(_small_config(window_size=(3, -1)), 2, True) == 4
    assert layer_window(_small_config(window_size=(0, 0)), 1, True) == 1
    assert layer_window(_small_config(window_size=(-1, 0)), 1, True) is None
    assert layer_window(_small_config(window_size=(-1, -1)), 1, False) is None
    assert layer_window(_small_config(), 1, True) is None
    skip = _small_config(window_size=(3, 0), window_attn_skip_freq=2)
    assert [layer_window(skip, n, True) for n in (1, 2)] == [4, None]
    listed = _small_config(window_size=(3, 0), window_attn_skip_freq=[0, 1])
    assert [layer_window(listed, n, True) for n in (1, 2)] == [None, 4]
    with pytest.raises(ValueError, match=r"right=2 > 0"):
        layer_window(_small_config(window_size=(3, 2)), 1, True)
    with pytest.raises(ValueError, match=r"\(3, 0\) on a non-causal layer"):
        layer_window(_small_config(window_size=(3, 0)), 1, False)


def test_document_zigzag_layout_is_megatron_thd_split():
    """document_zigzag_layout holds the tokens of Megatron's THD split, in its order, and merges
    adjacent chunks into few segments."""
    from seqpar.integrations.megatron import document_zigzag_layout
    from seqpar.layout import global_positions

    for cp, lengths in [(2, PACKED_PADDED), (2, [8, 24]), (3, [6, 12, 0, 18])]:
        bounds = _cumsum(lengths)
        layout = document_zigzag_layout(torch.tensor(bounds), cp)
        for r in range(cp):
            got = global_positions(layout, r, cp, bounds[-1] // cp)
            assert torch.equal(got, _thd_indices(bounds, r, cp)), (cp, lengths, r)
            assert len(layout.segments(r)) <= 2 * len(lengths)
    assert document_zigzag_layout([0, 5, 9], 1) == "contiguous"
    with pytest.raises(ValueError, match=r"divisible by 2 \* cp = 4.*\[0, 3, 8\]"):
        document_zigzag_layout([0, 3, 8], 2)


def test_packed_and_config_errors():
    """Refused combinations raise errors that name what was refused."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from seqpar.integrations.megatron import SeqparCoreAttention, SeqparLinearCoreAttention, packed_documents

    causal = AttnMaskType.causal
    with pytest.raises(ValueError, match=r"right=1 > 0"):
        SeqparCoreAttention(_small_config(window_size=(4, 1)), 1, causal, pg_collection=_fake_pgs())
    with pytest.raises(ValueError, match="non-causal"):
        SeqparCoreAttention(_small_config(window_size=(4, 0)), 1, AttnMaskType.no_mask, pg_collection=_fake_pgs())
    SeqparCoreAttention(_small_config(window_size=(4, 0), window_attn_skip_freq=[0, 1]), 1, AttnMaskType.no_mask,
                        pg_collection=_fake_pgs())  # layer 1 is a full-attention layer: fine
    with pytest.raises(ValueError, match="sliding window.*layer 1"):
        SeqparLinearCoreAttention(_small_config(window_size=(4, 0)), 1, causal, pg_collection=_fake_pgs())
    with pytest.raises(ValueError, match="softmax_type must be 'vanilla'"):
        SeqparLinearCoreAttention(_small_config(softmax_type="learnable"), 1, causal, pg_collection=_fake_pgs())
    with pytest.raises(ValueError, match="qk_clip"):
        SeqparCoreAttention(_small_config(log_max_attention_logit=True), 1, causal, pg_collection=_fake_pgs())

    thd = lambda q, kv, **kw: PackedSeqParams(qkv_format="thd", cu_seqlens_q=torch.tensor(q),  # noqa: E731
                                              cu_seqlens_kv=torch.tensor(kv), **kw)
    with pytest.raises(NotImplementedError, match=r"cu_seqlens_q=\[0, 3, 8\] and cu_seqlens_kv=\[0, 4, 8\]"):
        packed_documents(thd([0, 3, 8], [0, 4, 8]), 8)
    with pytest.raises(NotImplementedError, match="qkv_format='sbhd'"):
        packed_documents(PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=torch.tensor([0, 8])), 8)
    with pytest.raises(ValueError, match="GLOBAL"):
        packed_documents(thd([0, 3, 4], [0, 3, 4]), 8)
    # padding at the end of each padded document is a document of its own
    assert packed_documents(thd([0, 1, 3], [0, 1, 3], cu_seqlens_q_padded=torch.tensor([0, 4, 8]),
                                cu_seqlens_kv_padded=torch.tensor([0, 4, 8])), 8) == ([0, 4, 8], [0, 1, 4, 6, 8])

    q = torch.randn(8, 4, 8)
    kv = torch.randn(8, 2, 8)
    # the linear core on a packed row (one process): the state resets at the document start at 3
    linear = SeqparLinearCoreAttention(_small_config(), 1, causal, pg_collection=_fake_pgs())
    packed = linear(q.unsqueeze(1), kv.unsqueeze(1), kv.unsqueeze(1), None, packed_seq_params=thd([0, 3, 8], [0, 3, 8]))
    alone = linear(q[3:].unsqueeze(1), kv[3:].unsqueeze(1), kv[3:].unsqueeze(1), None)
    assert packed.shape == (8, 1, 32)
    torch.testing.assert_close(packed[3:], alone, rtol=1e-5, atol=1e-6)
    assert (linear(q.unsqueeze(1), kv.unsqueeze(1), kv.unsqueeze(1), None)[3:] - alone).abs().max() > 1e-3
    with pytest.raises(NotImplementedError, match="causal only"):
        linear(q, kv, kv, None, attn_mask_type=AttnMaskType.padding, packed_seq_params=thd([0, 3, 8], [0, 3, 8]))
    core = SeqparCoreAttention(_small_config(), 1, causal, pg_collection=_fake_pgs())
    assert core(q, kv, kv, None, packed_seq_params=thd([0, 3, 8], [0, 3, 8])).shape == (8, 32)
    with pytest.raises(ValueError, match="needs packed_seq_params"):
        core(q, kv, kv, None)
    import seqpar

    balanced = seqpar.balanced_layout(torch.tensor([0, 8]), 2)
    for cls in (SeqparCoreAttention, SeqparLinearCoreAttention):
        with pytest.raises(ValueError, match="BalancedLayout"):
            cls(_small_config(), 1, causal, pg_collection=_fake_pgs(), layout=balanced, packed_split="document")


def test_delta_layer_spec_and_errors():
    """The 'D' letter builds SeqparGatedDeltaNet in the self-attention slot; what it cannot honour
    raises an error naming it (one process: Megatron's parallel linear layers need torch.distributed
    to run, so the layer's outputs are tested on the pool)."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.transformer_config import TransformerConfig

    import seqpar
    from seqpar.integrations.megatron import (
        SeqparCoreAttention,
        SeqparGatedDeltaNet,
        SeqparLinearCoreAttention,
        expand_pattern,
        get_gpt_layer_spec,
        hybrid_layer_specs,
    )

    assert expand_pattern("ld", 4) == "LDLD"
    block = hybrid_layer_specs("LDS", num_layers=3, packed_split="row")
    attn = [s.submodules.self_attention for s in block.layer_specs]
    assert attn[1].module is SeqparGatedDeltaNet and attn[1].params["packed_split"] == "row"
    assert [a.submodules.core_attention.module for a in (attn[0], attn[2])] == [SeqparLinearCoreAttention,
                                                                               SeqparCoreAttention]
    assert attn[0].submodules.core_attention.params["packed_split"] == "row"
    with pytest.raises(ValueError, match="unknown layer kind 'gdn'"):
        get_gpt_layer_spec("gdn")

    def config(**kw):
        c = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True,
                              attention_dropout=0.0, **kw)
        _small_delta_sizes(c)
        return c

    with pytest.raises(ValueError, match="SeqparGatedDeltaNet cannot take a sliding window: layer 1"):
        SeqparGatedDeltaNet(config(window_size=(4, 0)), 1, pg_collection=_fake_pgs())
    bad = config()
    bad.linear_num_value_heads = 3
    with pytest.raises(ValueError, match=r"linear_num_value_heads \(3\) to be a multiple of "
                                         r"linear_num_key_heads \(2\)"):
        SeqparGatedDeltaNet(bad, 1, pg_collection=_fake_pgs())
    with pytest.raises(ValueError, match="'striped' is not supported"):
        SeqparGatedDeltaNet(config(), 1, pg_collection=_fake_pgs(), layout="striped")
    with pytest.raises(ValueError, match="BalancedLayout"):
        SeqparGatedDeltaNet(config(), 1, pg_collection=_fake_pgs(), packed_split="document",
                            layout=seqpar.balanced_layout(torch.tensor([0, 8]), 2))
    layer = SeqparGatedDeltaNet(config(window_size=(4, 0), window_attn_skip_freq=[0, 1]), 1,
                                pg_collection=_fake_pgs())  # layer 1 is a full-attention layer: fine
    x = torch.randn(9, 1, 32)
    with pytest.raises(NotImplementedError, match="self-attention only"):
        layer(x, None, key_value_states=x)
    with pytest.raises(NotImplementedError, match="attention_bias"):
        layer(x, None, attention_bias=torch.zeros(1))
    with pytest.raises(NotImplementedError, match="no inference"):
        layer(x, None, inference_context=object())
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=torch.tensor([0, 4, 9]),
                             cu_seqlens_kv=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match=r"batch 1.*\(9, 2, 32\)"):
        layer(x.expand(9, 2, 32), None, packed_seq_params=params)
