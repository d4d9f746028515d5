"""Tiny random configurations of the transformers architectures in docs/integrations.md's table.

Each row is one architecture with or without its sliding window / softcap / sinks. Windows are
shorter than the test sequences and crossing rank boundaries; the softcap is small enough to
change the scores of a tiny random model (Gemma 2's default 50 would not); sink logits are drawn
from N(0, 1). ``CONTROLS`` pairs each featured row with a row of identical weights without the
feature, so a test can check that the feature really changes the model's output.
"""
from __future__ import annotations

import torch

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, use_cache=False, attention_dropout=0.0,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.3)
WINDOW = 5
SOFTCAP = 1.0
_FULL = ["full_attention"] * 2
_MIXED = ["sliding_attention", "full_attention"]
_MOE = dict(num_local_experts=4, num_experts_per_tok=2)


def _configs() -> dict:
    import transformers as tf

    return {
        "llama": lambda: tf.LlamaConfig(**COMMON),
        "llama-bias": lambda: tf.LlamaConfig(**COMMON, attention_bias=True),
        "qwen2": lambda: tf.Qwen2Config(**COMMON),
        "qwen2-window": lambda: tf.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=WINDOW,
                                               layer_types=_MIXED),
        "qwen3": lambda: tf.Qwen3Config(**COMMON, head_dim=8),
        "qwen3-window": lambda: tf.Qwen3Config(**COMMON, head_dim=8, use_sliding_window=True, sliding_window=WINDOW,
                                               layer_types=_MIXED),
        "mistral": lambda: tf.MistralConfig(**COMMON, sliding_window=None),
        "mistral-window": lambda: tf.MistralConfig(**COMMON, sliding_window=WINDOW),
        "phi3": lambda: tf.Phi3Config(**COMMON, sliding_window=None),
        "phi3-window": lambda: tf.Phi3Config(**COMMON, sliding_window=WINDOW),
        "gemma2": lambda: tf.Gemma2Config(**COMMON, head_dim=8, attn_logit_softcapping=None, layer_types=_FULL),
        "gemma2-softcap": lambda: tf.Gemma2Config(**COMMON, head_dim=8, attn_logit_softcapping=SOFTCAP,
                                                  layer_types=_FULL),
        "gemma2-softcap-window": lambda: tf.Gemma2Config(**COMMON, head_dim=8, attn_logit_softcapping=SOFTCAP,
                                                         sliding_window=WINDOW, layer_types=_MIXED),
        "gemma3": lambda: tf.Gemma3TextConfig(**COMMON, head_dim=8, layer_types=_FULL),
        "gemma3-window": lambda: tf.Gemma3TextConfig(**COMMON, head_dim=8, sliding_window=WINDOW, layer_types=_MIXED),
        "starcoder2": lambda: tf.Starcoder2Config(**COMMON, sliding_window=None),
        "starcoder2-window": lambda: tf.Starcoder2Config(**COMMON, sliding_window=WINDOW),
        "gpt-oss": lambda: tf.GptOssConfig(**COMMON, head_dim=8, layer_types=_FULL, **_MOE),
        "gpt-oss-window": lambda: tf.GptOssConfig(**COMMON, head_dim=8, sliding_window=WINDOW, layer_types=_MIXED,
                                                  **_MOE),
        "olmo2": lambda: tf.Olmo2Config(**COMMON),
    }


NAMES = ("llama", "llama-bias", "qwen2", "qwen2-window", "qwen3", "qwen3-window", "mistral", "mistral-window",
         "phi3", "phi3-window", "gemma2", "gemma2-softcap", "gemma2-softcap-window", "gemma3", "gemma3-window",
         "starcoder2", "starcoder2-window", "gpt-oss", "gpt-oss-window", "olmo2")

#: featured row -> (row with the same weights without the feature, what the feature is)
CONTROLS = {"qwen2-window": ("qwen2", "window"), "qwen3-window": ("qwen3", "window"),
            "mistral-window": ("mistral", "window"), "phi3-window": ("phi3", "window"),
            "gemma2-softcap": ("gemma2", "softcap"), "gemma2-softcap-window": ("gemma2-softcap", "window"),
            "gemma3-window": ("gemma3", "window"), "starcoder2-window": ("starcoder2", "window"),
            "gpt-oss": ("gpt-oss", "sinks"), "gpt-oss-window": ("gpt-oss", "window")}


def build(name: str, *, seed: int = 0, sinks: bool = True) -> torch.nn.Module:
    """The row's model in fp32 with eager attention (the reference), seeded; with ``sinks=False``
    GPT-OSS's sink logits are -inf (no sink)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    config = _configs()[name]()
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if param_name.endswith(".sinks"):
                p.copy_(torch.randn(p.shape, generator=generator) if sinks else torch.full_like(p, float("-inf")))
    return model.train()
