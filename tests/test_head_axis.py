"""Tensors with the head and token axes swapped (issue 13 item 9).

``seqpar.attention`` / ``seqpar.linear_attention`` take [B, T_local, H, D]; a [B, H, T, D]
tensor is in general indistinguishable from valid input there (both axes are just sizes). The
entry points that know their configured head count check the head axis of what they hand to
seqpar and raise a ValueError naming the expected and the received shapes:

- ``seqpar.model`` attention modules (``mix`` under context parallelism): n_heads / n_kv_heads;
- the transformers adapter (expects transformers' own [b, h, s, d]): the config's head counts,
  or both divided by one factor (tensor-parallel shards are accepted);
- Megatron core attention ([s, b, n, d]): heads and query groups of this tensor-parallel rank;
- DeepSpeed modules: ``num_kv_heads`` when given, the length of ``g_gamma`` for linear attention.

Every case also runs the valid layout through the same entry point (one process, no
torch.distributed), so the checks are shown not to reject it. Small sizes; a few seconds.
"""
from __future__ import annotations

import types
import warnings

import pytest
import torch

B, T, D = 2, 6, 8


def _raises_with_shapes(fn, *tensors, expected: str):
    """fn() raises a ValueError whose message names ``expected`` and the received shapes."""
    with pytest.raises(ValueError) as info:
        fn()
    msg = str(info.value)
    assert expected in msg, msg
    for t in tensors:
        assert str(tuple(t.shape)) in msg, msg
    assert "swapped" in msg, msg


# --- seqpar.model ----------------------------------------------------------------------------------

def _model_layers():
    from seqpar.config import ModelConfig
    from seqpar.model import ContextParallel, HybridLM, LinearAttention, SoftmaxAttention

    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, pattern="LS", gate_rank=8,
                      feature_map="elu1", tie_embeddings=False)
    model = HybridLM(cfg).double()
    for m in model.attention_modules():  # context parallelism over a single process (group None)
        m.context_parallel = ContextParallel(group=None, strategy="ring" if m.kind == "softmax" else "lasp2",
                                             validate=False)
    soft = next(m for m in model.attention_modules() if isinstance(m, SoftmaxAttention))
    lin = next(m for m in model.attention_modules() if isinstance(m, LinearAttention))
    return soft, lin


def test_model_softmax_mix_rejects_head_token_swap():
    soft, _ = _model_layers()
    q, k, v = (torch.randn(B, T, h, D, dtype=torch.float64) for h in (4, 2, 2))
    assert soft.mix(q, k, v).shape == q.shape  # the right layout passes
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    _raises_with_shapes(lambda: soft.mix(qt, kt, vt), qt, kt, vt, expected="query [b, s, 4, d] and key/value [b, s, 2, d]")
    # MHA-like swap where only the KV side is wrong is caught too
    _raises_with_shapes(lambda: soft.mix(q, kt, vt), q, kt, vt, expected="key/value [b, s, 2, d]")


def test_model_linear_mix_rejects_head_token_swap():
    _, lin = _model_layers()
    q, k, v = (torch.randn(B, T, 4, D, dtype=torch.float64) for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, 4, dtype=torch.float64))
    assert lin.mix(q, k, v, g, None).shape == q.shape
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    _raises_with_shapes(lambda: lin.mix(qt, kt, vt, None, None), qt, kt, vt, expected="query [b, s, 4, d]")


# --- transformers ----------------------------------------------------------------------------------

def _tiny_llama_attention():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    from seqpar.integrations.hf import apply_sequence_parallel

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attention_dropout=0.0, use_cache=False, attn_implementation="sdpa")
    model = apply_sequence_parallel(LlamaForCausalLM(config).double(), None, strategy="ring", layout="contiguous")
    return model.model.layers[0].self_attn


def test_hf_adapter_rejects_seqpar_layout():
    """The adapter expects transformers' [b, h, s, d] and transposes it itself; a [b, s, h, d]
    tensor (seqpar's layout) would reach seqpar as [b, h, s, d]."""
    from seqpar.integrations.hf import seqpar_attention_forward

    attn = _tiny_llama_attention()
    q, k, v = (torch.randn(B, h, T, D, dtype=torch.float64) for h in (4, 2, 2))  # [b, h, s, d]: valid
    o, _ = seqpar_attention_forward(attn, q, k, v, None, scaling=D ** -0.5)
    assert o.shape == (B, T, 4, D)
    # a tensor-parallel shard (half the heads of each kind) is valid input too
    o, _ = seqpar_attention_forward(attn, q[:, :2], k[:, :1], v[:, :1], None)
    assert o.shape == (B, T, 2, D)
    qs, ks, vs = (x.transpose(1, 2) for x in (q, k, v))  # [b, s, h, d]
    _raises_with_shapes(lambda: seqpar_attention_forward(attn, qs, ks, vs, None), qs, ks, vs,
                        expected="query [b, 4, s, d] and key/value [b, 2, s, d]")


# --- Megatron --------------------------------------------------------------------------------------

class _FakeGroup:
    def __init__(self, size: int, rank: int = 0):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def _megatron_core(kind: str, tp: int = 1):
    pytest.importorskip("megatron.core")
    warnings.filterwarnings("ignore")
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from seqpar.integrations.megatron import SeqparCoreAttention, SeqparLinearCoreAttention

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                               kv_channels=D, use_cpu_initialization=True, attention_dropout=0.0,
                               hidden_dropout=0.0)
    pgs = types.SimpleNamespace(tp=_FakeGroup(tp), cp=None)  # cp None: one process
    cls = SeqparCoreAttention if kind == "softmax" else SeqparLinearCoreAttention
    return cls(config, 1, AttnMaskType.causal, pg_collection=pgs)


@pytest.mark.parametrize("kind", ["softmax", "linear"])
def test_megatron_core_rejects_head_token_swap(kind):
    core = _megatron_core(kind)
    q, k, v = (torch.randn(T, B, h, D, dtype=torch.float64) for h in (4, 2, 2))  # [s, b, n, d]: valid
    assert core(q, k, v, None).shape == (T, B, 4 * D)
    qt, kt, vt = (x.permute(1, 2, 0, 3) for x in (q, k, v))  # [b, n, s, d]
    _raises_with_shapes(lambda: core(qt, kt, vt, None), qt, kt, vt,
                        expected="query [s, b, 4, d] and key/value [s, b, 2 or 4, d]")


def test_megatron_core_heads_per_tensor_parallel_rank():
    core = _megatron_core("softmax", tp=2)  # 2 query heads and 1 query group on this rank
    q, k, v = (torch.randn(T, B, h, D, dtype=torch.float64) for h in (2, 1, 1))
    assert core(q, k, v, None).shape == (T, B, 2 * D)
    q4 = torch.randn(T, B, 4, D, dtype=torch.float64)
    _raises_with_shapes(lambda: core(q4, k, v, None), q4, k, v, expected="query [s, b, 2, d]")


# --- DeepSpeed -------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch_dim_idx", [0, 1])
def test_deepspeed_attention_checks_num_kv_heads(batch_dim_idx):
    pytest.importorskip("deepspeed")
    warnings.filterwarnings("ignore")
    from seqpar.integrations.deepspeed import SeqparDistributedAttention

    attn = SeqparDistributedAttention(None, None, num_kv_heads=2, strategy="ring")
    q, k, v = (torch.randn(B, T, h, D, dtype=torch.float64) for h in (4, 2, 2))  # [b, s, h, d]
    if batch_dim_idx == 1:
        q, k, v = (x.transpose(0, 1) for x in (q, k, v))  # [s, b, h, d]
    assert attn(q, k, v, batch_dim_idx).shape == q.shape
    to_bhsd = (lambda x: x.transpose(1, 2)) if batch_dim_idx == 0 else (lambda x: x.permute(1, 2, 0, 3))
    qt, kt, vt = (to_bhsd(x) for x in (q, k, v))  # transformers' [b, h, s, d] given instead
    layout = "[b, s, 2, d]" if batch_dim_idx == 0 else "[s, b, 2, d]"
    _raises_with_shapes(lambda: attn(qt, kt, vt, batch_dim_idx), qt, kt, vt, expected=f"key/value {layout}")


def test_deepspeed_linear_attention_checks_g_gamma_heads():
    pytest.importorskip("deepspeed")
    warnings.filterwarnings("ignore")
    from seqpar.integrations._common import retnet_decay
    from seqpar.integrations.deepspeed import SeqparDistributedLinearAttention

    attn = SeqparDistributedLinearAttention(None, g_gamma=retnet_decay(4, dtype=torch.float64))
    q, k, v = (torch.randn(B, T, 4, D, dtype=torch.float64) for _ in range(3))
    assert attn(q, k, v, 0).shape == q.shape
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    _raises_with_shapes(lambda: attn(qt, kt, vt, 0), qt, kt, vt, expected="query [b, s, 4, d]")
