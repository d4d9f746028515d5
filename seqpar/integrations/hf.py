"""Hugging Face transformers integration: decoder models with seqpar attention on local shards.

:func:`apply_sequence_parallel` makes one model instance run its attention through seqpar over a
process group. It uses transformers' and PyTorch's own extension points and patches nothing:

- the attention function is registered in transformers' ``AttentionInterface`` under the name
  ``"seqpar"`` (a registry entry, unused unless a model selects it);
- the model selects it with ``model.set_attn_implementation("seqpar")`` (its own config only);
- the group / strategy / layout are stored on that model's attention modules
  (``module.seqpar_attention``), so two models can use different groups;
- a forward pre-hook on the model's base model (``model.base_model``) checks the arguments of
  each forward and turns packed rows into documents (see below).

Every rank feeds its own tokens (:func:`shard_batch`, or ``seqpar.shard``) with
``position_ids`` = the global positions of those tokens, so RoPE sees the right positions and
the masks are those of the global sequence. Labels must be shifted globally before sharding (a
local shift would drop the label of each shard's last token): pass ``shift_labels`` and
``num_items_in_batch`` (the global count) so that each rank's loss is its share of the global
mean; the shares sum to the unsharded loss and their gradients to the unsharded gradients.

Every keyword argument transformers passes to an attention function is either honoured exactly or
refused with an error naming it and the model class (see :data:`HONOURED_ARGUMENTS` and
:data:`PASSIVE_ARGUMENTS`): sliding windows (``sliding_window``), logit soft-capping
(``softcap``, Gemma 2), attention sinks (``s_aux``, GPT-OSS; their gradient is each rank's part,
summed by the data-parallel gradient reduction over the group), ``scaling``, ``is_causal``,
``dropout`` (0 only: models pass 0 in eval mode) and packed documents (``cu_seq_lens_q/k``, or
``position_ids`` that restart inside a row, as ``DataCollatorWithFlattening`` produces; the same
rule as transformers' own mask code). An unknown argument with a value other than None / False is
refused, never ignored.

Refused under sequence parallelism: padding masks (an ``attention_mask`` with zeros; pack the
documents instead), KV caches and generation (``use_cache`` is turned off), returned attention
weights (``output_attentions=True``), attention dropout in training.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Optional

import torch

from seqpar.integrations._common import SOFTMAX_STRATEGIES, check_choice

#: The name of seqpar's function in transformers' AttentionInterface.
ATTN_IMPLEMENTATION = "seqpar"

#: The adapter's layouts: seqpar's names, plus ``"balanced"``: each packed row split by
#: ``seqpar.balanced_layout`` of its documents (shard_batch and the attention derive the same
#: layout from the row's global boundaries; a row without documents is one document).
LAYOUTS = ("contiguous", "zigzag", "striped", "balanced")

#: Keyword arguments of transformers' attention functions that seqpar honours exactly.
HONOURED_ARGUMENTS = ("dropout", "scaling", "is_causal", "sliding_window", "softcap", "s_aux",
                      "cu_seq_lens_q", "cu_seq_lens_k")

#: Keyword arguments that transformers forwards to every attention function but that do not
#: change attention itself, with the reason they are not read here.
PASSIVE_ARGUMENTS = {
    "position_ids": "read by RoPE before attention; packed rows become documents in the model's pre-hook",
    "max_length_q": "derived from cu_seq_lens_q",
    "max_length_k": "derived from cu_seq_lens_k",
    "num_items_in_batch": "read by the loss",
    "shift_labels": "read by the loss",
    "output_hidden_states": "read by the model",
    "output_router_logits": "read by the mixture-of-experts layers",
    "return_dict": "read by the model",
    "cache_position": "positions of the (absent) cache",
}

#: Arguments accepted only with a false value, and why.
_FALSE_ONLY = {
    "use_cache": "KV caches and generation are not supported under sequence parallelism",
    "output_attentions": "seqpar never forms the attention weights; call with output_attentions=False",
}


@dataclass(frozen=True)
class SeqparAttentionSettings:
    """What the attention function of one model needs: group, strategy, layout, kernel backend."""

    group: Any
    strategy: str = "ring"
    layout: str = "zigzag"
    backend: str = "auto"


def _refuse(module: torch.nn.Module, what: str) -> ValueError:
    return ValueError(f"seqpar attention of {type(module).__name__}: {what}")


def _check_arguments(module: torch.nn.Module, kwargs: dict[str, Any]) -> None:
    """ValueError for any argument that is neither honoured nor passive (unless None / False)."""
    for name, value in kwargs.items():
        if name in _FALSE_ONLY:
            if value:
                raise _refuse(module, f"{name}={value!r} is not supported: {_FALSE_ONLY[name]}")
        elif name not in PASSIVE_ARGUMENTS and value is not None and value is not False:
            shown = f"tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
            raise _refuse(module, f"unknown keyword argument {name}={shown} from transformers; seqpar refuses "
                                  f"arguments it does not implement rather than ignore them (honoured: "
                                  f"{', '.join(HONOURED_ARGUMENTS)})")


def _documents(module: torch.nn.Module, cu_seq_lens_q: Optional[torch.Tensor],
               cu_seq_lens_k: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The global document boundaries of ``cu_seq_lens_q/k`` (which must be equal), or None."""
    if cu_seq_lens_q is None and cu_seq_lens_k is None:
        return None
    if cu_seq_lens_q is None or cu_seq_lens_k is None:
        raise _refuse(module, "cu_seq_lens_q and cu_seq_lens_k must be given together (got only "
                              f"{'cu_seq_lens_q' if cu_seq_lens_k is None else 'cu_seq_lens_k'})")
    if cu_seq_lens_q.shape != cu_seq_lens_k.shape or not torch.equal(cu_seq_lens_q, cu_seq_lens_k.to(cu_seq_lens_q)):
        raise _refuse(module, f"cu_seq_lens_q {cu_seq_lens_q.tolist()} != cu_seq_lens_k {cu_seq_lens_k.tolist()}: "
                              f"queries and keys must come from the same packed documents")
    return cu_seq_lens_q


@functools.lru_cache(maxsize=64)
def _balanced(boundaries: tuple[int, ...], world_size: int):
    from seqpar.layout import balanced_layout

    return balanced_layout(list(boundaries), world_size)


def row_layout(layout: str, documents: Optional[torch.Tensor], global_len: int, world_size: int):
    """The seqpar layout of one row: ``layout`` itself, or for ``"balanced"`` the
    ``seqpar.balanced_layout`` of the row's documents (``[0, global_len]`` without documents)."""
    if layout != "balanced":
        return layout
    boundaries = (0, global_len) if documents is None else tuple(int(b) for b in documents.tolist())
    return _balanced(boundaries, world_size)


def seqpar_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                             scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                             sliding_window: Optional[int] = None, softcap: Optional[float] = None,
                             s_aux: Optional[torch.Tensor] = None, cu_seq_lens_q: Optional[torch.Tensor] = None,
                             cu_seq_lens_k: Optional[torch.Tensor] = None,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: query [b, h, s_local, d], key/value [b, h_kv, s_local, d]
    (transformers' own layout, transposed here to seqpar's [b, s_local, h, d])
    -> ([b, s_local, h, d], None), with the settings that :func:`apply_sequence_parallel` put on
    ``module``. ``sliding_window`` (query i sees keys i - W < j <= i), ``softcap``, ``s_aux``
    (per-head sink logits [h]) and ``cu_seq_lens_q/k`` (GLOBAL document boundaries of one packed
    row, b = 1) are honoured exactly; any other argument not in :data:`PASSIVE_ARGUMENTS` must be
    None or False. Query / key / value whose dim 1 does not hold the config's head counts raise a
    ValueError naming both shapes."""
    import seqpar

    settings: Optional[SeqparAttentionSettings] = getattr(module, "seqpar_attention", None)
    if settings is None:
        raise RuntimeError(f"{type(module).__name__} selects attn_implementation={ATTN_IMPLEMENTATION!r} but has no "
                           f"seqpar settings; call seqpar.integrations.hf.apply_sequence_parallel(model, group)")
    _check_arguments(module, kwargs)
    if dropout:
        raise _refuse(module, f"attention dropout is not supported (got dropout={dropout}); set "
                              f"config.attention_dropout = 0.0 or run in eval mode")
    if attention_mask is not None:
        raise _refuse(module, f"attention masks (padding / custom masks) are not supported (got one of shape "
                              f"{tuple(attention_mask.shape)}); call the model with attention_mask=None and global "
                              f"position_ids, and pack documents instead of padding")
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    _check_heads(module, query, key, value)
    documents = _documents(module, cu_seq_lens_q, cu_seq_lens_k)
    layout = settings.layout
    if layout == "balanced":
        from seqpar.comm.groups import group_rank_and_size

        world = group_rank_and_size(settings.group)[1]
        layout = row_layout(layout, documents, query.shape[2] * world, world)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    o = seqpar.attention(q, k, v, strategy=settings.strategy, layout=layout, group=settings.group,
                         causal=causal, scale=scaling, backend=settings.backend, cu_seqlens=documents,
                         window=sliding_window or None, softcap=softcap or None, sinks=s_aux)
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


def documents_from_position_ids(position_ids: torch.Tensor) -> Optional[torch.Tensor]:
    """Document boundaries ``[0, e_1, ..., T]`` of one packed row from its ``position_ids`` [1, T]
    (or [T]), by transformers' rule (``masking_utils.find_packed_sequence_indices``): a new
    document starts wherever the position does not grow by exactly 1. None when the row is one
    document. Rows of a batch with B > 1 that are packed raise a ValueError (seqpar's documents
    need one packed row: flatten the batch, as ``DataCollatorWithFlattening`` does)."""
    rows = position_ids.reshape(-1, position_ids.shape[-1]) if position_ids.dim() > 1 else position_ids[None]
    starts = torch.diff(rows, dim=-1) != 1
    packed = starts.any(dim=-1)
    if not bool(packed.any()):
        return None
    if rows.shape[0] != 1:
        raise ValueError(f"packed rows (position_ids that restart inside a row) need batch size 1 under sequence "
                         f"parallelism, got {rows.shape[0]} rows of which {int(packed.sum())} are packed; flatten "
                         f"the batch into one row (transformers' DataCollatorWithFlattening does)")
    inner = torch.nonzero(starts[0]).flatten() + 1
    ends = torch.tensor([0, rows.shape[-1]], dtype=inner.dtype, device=inner.device)
    return torch.cat([ends[:1], inner, ends[1:]]).to(torch.int64)


class _ForwardChecks:
    """The base model's forward pre-hook: refuses what sequence parallelism cannot honour (padding
    masks, caches, missing position ids) and turns packed ``position_ids`` into global
    ``cu_seq_lens_q/k`` (one all-gather of the position ids per forward)."""

    def __init__(self, settings: SeqparAttentionSettings, signature: inspect.Signature, name: str) -> None:
        self.settings, self.signature, self.name = settings, signature, name
        self.var_keyword = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
        from seqpar.comm.groups import group_rank_and_size

        bound = self.signature.bind_partial(*args, **kwargs).arguments
        extra = bound.get(self.var_keyword, {}) if self.var_keyword else {}
        get = lambda key: bound.get(key, extra.get(key))  # noqa: E731
        for key in ("cache", "past_key_values"):
            if get(key) is not None:
                raise ValueError(f"{self.name} under seqpar: {key} (a KV cache) is not supported under sequence "
                                 f"parallelism")
        if get("use_cache"):
            raise ValueError(f"{self.name} under seqpar: use_cache=True is not supported under sequence parallelism")
        mask = get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
            raise ValueError(f"{self.name} under seqpar: only a 2-D padding attention_mask without zeros can be "
                             f"given (got {type(mask).__name__} of shape {tuple(getattr(mask, 'shape', ()))}); "
                             f"custom masks are not supported under sequence parallelism")
        if mask is not None and not bool(mask.bool().all()):
            raise ValueError(f"{self.name} under seqpar: padding masks are not supported (attention_mask of shape "
                             f"{tuple(mask.shape)} has {int((~mask.bool()).sum())} zeros); pack documents into one "
                             f"row instead (position_ids restarting per document, or cu_seq_lens_q/k)")
        if get("cu_seq_lens_q") is not None or get("cu_seq_lens_k") is not None:
            return None
        _, world = group_rank_and_size(self.settings.group)
        positions = get("position_ids")
        if positions is None:
            if world > 1:
                raise ValueError(f"{self.name} under seqpar on {world} ranks needs position_ids: the global "
                                 f"positions of this rank's tokens (seqpar.integrations.hf.shard_batch returns them)")
            return None
        if mask is not None:  # transformers finds packed rows only without an attention mask
            return None
        if world > 1:
            from seqpar.comm import all_gather
            from seqpar.layout import unshard_tensor

            sp = getattr(self.settings.group, "sp", self.settings.group)
            gathered = all_gather(positions.contiguous(), sp).wait()
            # "balanced" without boundaries: the layout of a row of one document (shard_batch's)
            layout = row_layout(self.settings.layout, None, positions.shape[-1] * world, world)
            positions = unshard_tensor(list(gathered.unbind(0)), layout, dim=positions.dim() - 1)
        try:
            documents = documents_from_position_ids(positions)
        except ValueError as e:
            raise ValueError(f"{self.name} under seqpar: {e}") from None
        if documents is None:
            return None
        if self.settings.layout == "balanced" and world > 1:
            raise ValueError(f"{self.name} under seqpar: a packed row under layout='balanced' needs its global "
                             f"boundaries as cu_seq_lens_q/k (the split depends on them); "
                             f"shard_batch(..., layout='balanced') returns them")
        kwargs = dict(kwargs, cu_seq_lens_q=documents, cu_seq_lens_k=documents)
        return args, kwargs


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "config")]


def apply_sequence_parallel(model: torch.nn.Module, group: Any, *, strategy: str = "ring",
                            layout: str = "zigzag", backend: str = "auto") -> torch.nn.Module:
    """Make ``model`` (a transformers decoder, e.g. Llama, Qwen, Mistral, Gemma, GPT-OSS; see
    docs/integrations.md for the tested list) run attention with seqpar over ``group``.

    ``strategy``: ring, allgather, ulysses (or usp with ``group`` a ``seqpar.comm.UspGroups``);
    ``layout``: how the tokens are split (contiguous, zigzag, striped; see ``seqpar.shard``; or
    ``"balanced"``: each packed row by ``seqpar.balanced_layout`` of its documents, with
    :func:`shard_batch`).
    Registers ``"seqpar"`` in transformers' AttentionInterface (idempotent), stores the settings
    on this model's attention modules, adds the forward pre-hook on ``model.base_model``,
    selects ``"seqpar"`` for this model only and turns its ``use_cache`` off. Returns the model.
    """
    from transformers import AttentionInterface

    check_choice("strategy", strategy, SOFTMAX_STRATEGIES)
    if not isinstance(layout, str):
        raise TypeError(f"layout must be one of {LAYOUTS}, got a {type(layout).__name__}: a BalancedLayout fits "
                        f"one row's documents only; layout='balanced' builds one per row")
    check_choice("layout", layout, LAYOUTS)
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"found no attention modules (classes named *Attention with a config) in {type(model).__name__}")
    if hasattr(model, "_seqpar_forward_checks"):
        remove_sequence_parallel(model)
    AttentionInterface.register(ATTN_IMPLEMENTATION, seqpar_attention_forward)
    settings = SeqparAttentionSettings(group=group, strategy=strategy, layout=layout, backend=backend)
    for m in modules:
        m.seqpar_attention = settings
    base = getattr(model, "base_model", model)
    checks = _ForwardChecks(settings, inspect.signature(base.forward), type(model).__name__)
    model._seqpar_forward_checks = base.register_forward_pre_hook(checks, with_kwargs=True)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    model.config.use_cache = False
    return model


def remove_sequence_parallel(model: torch.nn.Module, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """Undo :func:`apply_sequence_parallel`: drop the settings and the pre-hook and select
    ``attn_implementation`` (``config.use_cache`` stays False)."""
    for m in _attention_modules(model):
        if hasattr(m, "seqpar_attention"):
            del m.seqpar_attention
    handle = getattr(model, "_seqpar_forward_checks", None)
    if handle is not None:
        handle.remove()
        del model._seqpar_forward_checks
    model.set_attn_implementation(attn_implementation)
    return model


def shard_batch(input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                position_ids: Optional[torch.Tensor] = None, group: Any = None, layout: str = "zigzag",
                ignore_index: int = -100) -> dict[str, Any]:
    """This rank's part of a full batch, as keyword arguments of a causal-LM forward.

    Returns ``input_ids`` and ``position_ids`` of the local tokens: global positions
    ``0 .. T-1`` or, when ``position_ids`` [B, T] is given (e.g. a packed row from
    ``DataCollatorWithFlattening``, restarting per document), those, sharded. A packed row also
    gives ``cu_seq_lens_q`` / ``cu_seq_lens_k``: the global document boundaries (the same on every
    rank; the model's pre-hook then has nothing to gather). With ``labels`` (unshifted, as given
    to an unsharded model): ``labels`` and ``shift_labels`` (shifted over the global sequence,
    then sharded) and ``num_items_in_batch`` (the global count of labelled tokens), so that the
    model's loss is this rank's share of the global mean. ``group`` is the sequence-parallel
    group (or the ``UspGroups`` given to apply_sequence_parallel); ``layout`` the one given to
    apply_sequence_parallel (``"balanced"``: :func:`row_layout` of the row's documents).
    """
    from seqpar.comm.groups import group_rank_and_size
    from seqpar.layout import shard_tensor

    rank, world = group_rank_and_size(group)  # UspGroups: the whole sp group
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    elif position_ids.shape[-1] != input_ids.shape[1]:
        raise ValueError(f"position_ids {tuple(position_ids.shape)} and input_ids {tuple(input_ids.shape)} differ "
                         f"in length")
    check_choice("layout", layout, LAYOUTS)
    documents = documents_from_position_ids(position_ids)
    split = row_layout(layout, documents, input_ids.shape[1], world)
    out: dict[str, Any] = {"input_ids": shard_tensor(input_ids, split, rank, world),
                           "position_ids": shard_tensor(position_ids, split, rank, world)}
    if documents is not None:
        out.update(cu_seq_lens_q=documents, cu_seq_lens_k=documents)
    if labels is not None:
        shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=ignore_index)
        local = shard_tensor(shifted, split, rank, world)
        out.update(labels=local, shift_labels=local, num_items_in_batch=int((shifted != ignore_index).sum()))
    return out
