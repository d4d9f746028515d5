"""Hugging Face transformers integration: Llama-family models with seqpar attention on local shards.

:func:`apply_sequence_parallel` makes one model instance run its attention through seqpar over a
process group. It uses transformers' own extension points and patches nothing:

- the attention function is registered in transformers' ``AttentionInterface`` under the name
  ``"seqpar"`` (a registry entry, unused unless a model selects it);
- the model selects it with ``model.set_attn_implementation("seqpar")`` (its own config only);
- the group / strategy / layout are stored on that model's attention modules
  (``module.seqpar_attention``), so two models can use different groups.

Every rank then feeds its own tokens (``seqpar.shard``, or :func:`shard_batch`) with
``position_ids`` = the global positions of those tokens, so RoPE sees the right positions and the
causal mask is that of the global sequence. Labels must be shifted globally before sharding (a
local shift would drop the label of each shard's last token): pass ``shift_labels`` and
``num_items_in_batch`` (the global count) so that each rank's loss is its share of the global
mean; the shares sum to the unsharded loss and their gradients to the unsharded gradients.

Not supported under sequence parallelism: padding / custom attention masks (the model must be
given ``attention_mask=None``), KV caches and generation (``use_cache`` is turned off),
attention dropout, sliding windows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from seqpar.integrations._common import SOFTMAX_STRATEGIES, check_choice

#: The name of seqpar's function in transformers' AttentionInterface.
ATTN_IMPLEMENTATION = "seqpar"


@dataclass(frozen=True)
class SeqparAttentionSettings:
    """What the attention function of one model needs: group, strategy, layout, kernel backend."""

    group: Any
    strategy: str = "ring"
    layout: str = "zigzag"
    backend: str = "auto"


def seqpar_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                             scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: query [b, h, s_local, d], key/value [b, h_kv, s_local, d]
    (transformers' own layout, transposed here to seqpar's [b, s_local, h, d])
    -> ([b, s_local, h, d], None), with the settings that :func:`apply_sequence_parallel` put on
    ``module``. Query / key / value whose dim 1 does not hold the config's head counts (e.g. a
    [b, s, h, d] tensor passed in seqpar's layout) raise a ValueError naming both shapes."""
    import seqpar

    settings: Optional[SeqparAttentionSettings] = getattr(module, "seqpar_attention", None)
    if settings is None:
        raise RuntimeError(f"{type(module).__name__} selects attn_implementation={ATTN_IMPLEMENTATION!r} but has no "
                           f"seqpar settings; call seqpar.integrations.hf.apply_sequence_parallel(model, group)")
    if dropout:
        raise ValueError(f"seqpar attention has no attention dropout (got dropout={dropout}); set "
                         f"config.attention_dropout = 0.0")
    if attention_mask is not None:
        raise ValueError("seqpar attention does not take attention masks (padding / custom masks); call the model "
                         "with attention_mask=None and global position_ids")
    if getattr(module, "sliding_window", None):
        raise ValueError("seqpar attention does not support sliding-window attention")
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    _check_heads(module, query, key, value)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    o = seqpar.attention(q, k, v, strategy=settings.strategy, layout=settings.layout, group=settings.group,
                         causal=causal, scale=scaling, backend=settings.backend)
    return o, None


def _check_heads(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """ValueError when the head axis (dim 1 of transformers' [b, h, s, d]) of query / key / value
    does not hold the heads of the module's config: ``num_attention_heads`` and
    ``num_key_value_heads``, or both divided by the same factor (tensor-parallel shards). Skipped
    when the config does not give both counts as integers or the module's ``num_key_value_groups``
    differs from their ratio (a layer with its own head counts). A swap is caught under GQA, and
    under MHA unless the local length divides the head count."""
    config = getattr(module, "config", None)
    hq, hkv = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    hkv = hq if hkv is None else hkv
    if not (isinstance(hq, int) and isinstance(hkv, int) and 0 < hkv <= hq and hq % hkv == 0):
        return
    if getattr(module, "num_key_value_groups", hq // hkv) != hq // hkv:
        return
    if any(not isinstance(t, torch.Tensor) or t.dim() != 4 for t in (query, key, value)):
        return  # seqpar.attention names the problem
    lq, lk, lv = query.shape[1], key.shape[1], value.shape[1]
    if lq > 0 and hq % lq == 0 and lk == lv and lq * hkv == lk * hq:
        return
    from seqpar.validation import head_axis_error

    raise head_axis_error(f"seqpar attention function of {type(module).__name__}", "[b, h, s, d]", query, key,
                          value, q_heads=hq, kv_heads=hkv)


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "config")]


def apply_sequence_parallel(model: torch.nn.Module, group: Any, *, strategy: str = "ring",
                            layout: str = "zigzag", backend: str = "auto") -> torch.nn.Module:
    """Make ``model`` (a transformers Llama-family model) run attention with seqpar over ``group``.

    ``strategy``: ring, allgather, ulysses (or usp with ``group`` a ``seqpar.comm.UspGroups``);
    ``layout``: how the tokens are split (contiguous, zigzag, striped; see ``seqpar.shard``).
    Registers ``"seqpar"`` in transformers' AttentionInterface (idempotent), stores the settings
    on this model's attention modules, selects ``"seqpar"`` for this model only and turns its
    ``use_cache`` off. Returns the model.
    """
    from transformers import AttentionInterface

    check_choice("strategy", strategy, SOFTMAX_STRATEGIES)
    from seqpar.layout import check_layout

    check_layout(layout)
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"found no attention modules (classes named *Attention with a config) in {type(model).__name__}")
    if getattr(model.config, "attention_dropout", 0.0):
        raise ValueError(f"seqpar attention has no attention dropout; set config.attention_dropout=0.0 "
                         f"(got {model.config.attention_dropout})")
    AttentionInterface.register(ATTN_IMPLEMENTATION, seqpar_attention_forward)
    settings = SeqparAttentionSettings(group=group, strategy=strategy, layout=layout, backend=backend)
    for m in modules:
        m.seqpar_attention = settings
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    model.config.use_cache = False
    return model


def remove_sequence_parallel(model: torch.nn.Module, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """Undo :func:`apply_sequence_parallel`: drop the settings and select ``attn_implementation``
    (``config.use_cache`` stays False)."""
    for m in _attention_modules(model):
        if hasattr(m, "seqpar_attention"):
            del m.seqpar_attention
    model.set_attn_implementation(attn_implementation)
    return model


def shard_batch(input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                group: Any = None, layout: str = "zigzag", ignore_index: int = -100) -> dict[str, Any]:
    """This rank's part of a full batch, as keyword arguments of a causal-LM forward.

    Returns ``input_ids`` and ``position_ids`` (global positions) of the local tokens and, with
    ``labels`` (unshifted, as given to an unsharded model), ``labels`` and ``shift_labels``
    (shifted over the global sequence, then sharded) and ``num_items_in_batch`` (the global
    count of labelled tokens), so that the model's loss is this rank's share of the global mean.
    ``group`` is the sequence-parallel group (or the ``UspGroups`` given to apply_sequence_parallel).
    """
    from seqpar.comm.groups import group_rank_and_size
    from seqpar.layout import shard_tensor

    rank, world = group_rank_and_size(getattr(group, "sp", group))  # UspGroups: the whole sp group
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    out: dict[str, Any] = {"input_ids": shard_tensor(input_ids, layout, rank, world),
                           "position_ids": shard_tensor(positions, layout, rank, world)}
    if labels is not None:
        shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=ignore_index)
        local = shard_tensor(shifted, layout, rank, world)
        out.update(labels=local, shift_labels=local, num_items_in_batch=int((shifted != ignore_index).sum()))
    return out
