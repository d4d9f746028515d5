"""Megatron-core integration: seqpar attention as Megatron ``core_attention`` modules.

Megatron's ``SelfAttention`` projects Q/K/V, applies positional embeddings and calls its
``core_attention`` submodule with ``query [s, b, n, d]``, ``key``/``value [s, b, n_kv, d]`` and
expects ``[s, b, n * d]`` back. With context parallelism every tensor holds this rank's tokens
of the sequence, in the order Megatron's batch slicing produces
(``megatron.core.utils.get_batch_on_this_cp_rank``: 2 * cp chunks, rank r keeps chunks r and
2 * cp - 1 - r, i.e. seqpar's ``"zigzag"`` layout).

- :class:`SeqparCoreAttention` runs any seqpar softmax strategy (ring, allgather, ulysses) on the
  context-parallel group of the layer's ``pg_collection`` (by default Megatron's
  ``parallel_state.get_context_parallel_group()``).
- :class:`SeqparLinearCoreAttention` runs causal linear attention (LASP-2 / LASP) in the same slot,
  so that a GPTModel becomes a hybrid by layer pattern.
- :class:`SeqparGatedDeltaNet` is a gated delta-rule layer (Gated DeltaNet) for the
  ``self_attention`` slot: it needs the hidden states (its gates are projections of them), which
  the core-attention slot does not receive.
- :func:`get_gpt_layer_spec` and :func:`hybrid_layer_specs` build the layer / block specs.

Every layer honours packed rows (``packed_seq_params``, qkv_format ``"thd"``: GLOBAL boundaries,
tokens split per document as Megatron's ``get_thd_batch_on_this_cp_rank`` does, or with the
layer's layout over the whole row, ``packed_split="row"``); the linear and delta-rule layers reset
their state at every document start. The softmax core honours ``config.window_size`` /
``window_attn_skip_freq`` (causal left windows) and ``config.softmax_type`` off-by-one /
learnable (seqpar sinks). What a layer cannot honour exactly raises an error.

Usage::

    from seqpar.integrations.megatron import hybrid_layer_specs
    config = TransformerConfig(..., context_parallel_size=2, attention_dropout=0.0)
    spec = hybrid_layer_specs("LLLS", config=config)
    model = GPTModel(config, transformer_layer_spec=spec, ..., position_embedding_type="learned_absolute")
    batch = get_batch_on_this_cp_rank({"tokens": ..., "labels": ..., "position_ids": ..., ...})

Nothing in Megatron is patched: the modules are ordinary ModuleSpec entries.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from seqpar.integrations._common import (
    FEATURE_MAPS,
    LINEAR_STRATEGIES,
    SOFTMAX_STRATEGIES,
    check_choice,
    default_scale,
    linear_attention_heads,
    retnet_decay,
)
from seqpar.kernels.softmax_reference import compute_dtype
from seqpar.layout import BalancedLayout
from seqpar.masks import boundary_list
from seqpar.validation import check_head_axis

#: Epsilon of the linear core's parameter-free RMS norm of each head's output.
_NORM_EPS = 1e-6

#: The seqpar layout of Megatron's context-parallel batch slicing (get_batch_on_this_cp_rank).
MEGATRON_CP_LAYOUT = "zigzag"

#: Megatron's ``cp_comm_type`` names and the seqpar strategies that do the same job.
CP_COMM_TYPE_TO_STRATEGY = {"p2p": "ring", "all_gather": "allgather", "a2a": "ulysses"}


def _strategy_for(config: TransformerConfig, layer_number: int, cp_comm_type: Optional[str]) -> str:
    """The seqpar strategy that matches Megatron's ``cp_comm_type`` for this layer (ring if unset)."""
    comm = cp_comm_type
    if comm is None:
        comm = config.cp_comm_type
        if isinstance(comm, list):
            comm = comm[layer_number - 1]
    if comm is None:
        return "ring"
    if comm not in CP_COMM_TYPE_TO_STRATEGY:
        raise ValueError(f"cp_comm_type {comm!r} has no seqpar equivalent here; expected one of "
                         f"{tuple(CP_COMM_TYPE_TO_STRATEGY)} or pass strategy= explicitly")
    return CP_COMM_TYPE_TO_STRATEGY[comm]


#: How the tokens of a packed row (``PackedSeqParams``) are split over the cp ranks.
#: ``"document"``: Megatron's / Transformer Engine's THD convention (``get_thd_batch_on_this_cp_rank``,
#: ``tex.thd_get_partitioned_indices``, and what Megatron's THD RoPE assumes): every padded document
#: is cut into 2 * cp chunks and rank r keeps chunks r and 2 * cp - 1 - r of EVERY document.
#: ``"row"``: the core's seqpar ``layout`` (zigzag by default, or a BalancedLayout) applied to the
#: whole packed row, i.e. ``get_batch_on_this_cp_rank`` on the row.
PACKED_SPLITS = ("document", "row")

#: Mask types whose padding a packed row's ``cu_seqlens`` describe (accepted only with packed_seq_params).
_PADDING_MASKS = {AttnMaskType.padding: False, AttnMaskType.padding_causal: True}


def layer_window(config: TransformerConfig, layer_number: int, causal: bool) -> Optional[int]:
    """The seqpar ``window`` of layer ``layer_number`` (1-based) from ``config.window_size``.

    megatron-core 0.16.1 follows Transformer Engine: ``window_size = (left, right)`` lets query i
    see keys ``i - left <= j <= i + right``, -1 meaning unbounded, on the layers where
    ``is_layer_window_attention(window_size, window_attn_skip_freq, layer_number)`` holds (the
    others are full attention). A causal ``(left, 0)`` or ``(left, -1)`` (the causal mask bounds
    the right side, as TE does) is seqpar's ``window = left + 1``; ``left = -1`` is no window.
    Anything else (``right > 0`` with a causal mask, a window on a non-causal layer other than
    ``(-1, -1)``) raises a ValueError naming the value.
    """
    from megatron.core.transformer.utils import is_layer_window_attention

    size = config.window_size
    if size is None or not is_layer_window_attention(size, config.window_attn_skip_freq, layer_number):
        return None
    try:
        left, right = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"config.window_size must be a (left, right) pair of ints, got {size!r}") from None
    if left < -1 or right < -1:
        raise ValueError(f"config.window_size={tuple(size)!r}: window sides must be >= 0 or -1 (unbounded)")
    if not causal:
        if (left, right) == (-1, -1):
            return None
        raise ValueError(f"config.window_size={tuple(size)!r} on a non-causal layer (layer {layer_number}): "
                         f"seqpar supports causal sliding windows only")
    if right > 0:
        raise ValueError(f"config.window_size={tuple(size)!r} has right={right} > 0 on a causal layer "
                         f"(layer {layer_number}): seqpar supports causal left windows (left, 0) only")
    return None if left == -1 else left + 1


@functools.lru_cache(maxsize=64)
def _document_zigzag(boundaries: tuple[int, ...], world_size: int) -> BalancedLayout:
    lengths = [b - a for a, b in zip(boundaries[:-1], boundaries[1:])]
    n = 2 * world_size
    bad = [length for length in lengths if length % n]
    if bad:
        raise ValueError(f"packed sequences split per document over {world_size} cp ranks need every padded "
                         f"document length divisible by 2 * cp = {n} (Megatron / TE THD convention; pad "
                         f"with cu_seqlens_q_padded), got boundaries {list(boundaries)}")
    chunk = functools.reduce(math.gcd, [length // n for length in lengths if length])
    assignment: list[list[int]] = [[] for _ in range(world_size)]
    for start, length in zip(boundaries[:-1], lengths):
        part = length // n
        for r in range(world_size):
            for k in (r, n - 1 - r):
                first = (start + k * part) // chunk
                assignment[r].extend(range(first, first + part // chunk))
    return BalancedLayout(world_size, chunk, tuple(tuple(a) for a in assignment))


def document_zigzag_layout(cu_seqlens: Union[Tensor, Sequence[int]], world_size: int) -> Union[str, BalancedLayout]:
    """The seqpar layout of Megatron's THD context-parallel split (``get_thd_batch_on_this_cp_rank``
    = ``tex.thd_get_partitioned_indices``): every document of the (padded) global boundaries
    ``cu_seqlens`` is cut into 2 * world_size chunks and rank r keeps chunks r and
    2 * world_size - 1 - r of each document, documents in order. Each document length must be
    divisible by 2 * world_size. Use it with ``seqpar.shard`` / ``unshard`` / ``local_positions``."""
    boundaries = tuple(int(b) for b in (cu_seqlens.tolist() if isinstance(cu_seqlens, Tensor) else cu_seqlens))
    if world_size == 1:
        return "contiguous"
    return _document_zigzag(boundaries, world_size)


def _boundaries(name: str, value) -> Optional[list[int]]:
    return None if value is None else boundary_list(value, name=f"packed_seq_params.{name}")


def packed_documents(packed_seq_params, global_len: int) -> tuple[list[int], list[int]]:
    """``(padded, documents)`` of a packed row: ``padded`` are the global document boundaries the
    tokens are laid out by (``cu_seqlens_q_padded``, else ``cu_seqlens_q``), ``documents`` the
    seqpar ``cu_seqlens``: each document's real tokens, then its padding (at the end of the
    padded document, as Megatron and TE place it) as a document of its own, so that no real
    token sees padding and padding sees no real token, causal or not. Refuses q / kv
    boundaries that differ (cross-document patterns), naming both."""
    p = packed_seq_params
    fmt = getattr(p, "qkv_format", None)
    if fmt != "thd":
        raise NotImplementedError(f"seqpar core attention takes packed_seq_params with qkv_format='thd' only, "
                                  f"got qkv_format={fmt!r}")
    if getattr(p, "local_cp_size", None) is not None:
        raise NotImplementedError(f"seqpar core attention does not support hybrid context parallelism "
                                  f"(packed_seq_params.local_cp_size={p.local_cp_size})")
    q, kv = _boundaries("cu_seqlens_q", p.cu_seqlens_q), _boundaries("cu_seqlens_kv", p.cu_seqlens_kv)
    qp = _boundaries("cu_seqlens_q_padded", p.cu_seqlens_q_padded)
    kvp = _boundaries("cu_seqlens_kv_padded", p.cu_seqlens_kv_padded)
    for what, a, b in (("cu_seqlens", q, kv), ("cu_seqlens_padded", qp, kvp)):
        if a is not None and b is not None and a != b or (a is None) != (b is None):
            raise NotImplementedError(f"seqpar core attention needs the same documents for queries and keys "
                                      f"(self-attention); got {what}_q={a} and {what}_kv={b}")
    if q is None and qp is None:
        raise ValueError("packed_seq_params has neither cu_seqlens_q nor cu_seqlens_q_padded")
    padded = qp if qp is not None else q
    real = q if q is not None else qp
    if len(real) != len(padded):
        raise ValueError(f"packed_seq_params: cu_seqlens_q={real} and cu_seqlens_q_padded={padded} "
                         f"have different numbers of documents")
    if padded[-1] != global_len:
        raise ValueError(f"packed_seq_params boundaries {padded} end at {padded[-1]}, but the packed row "
                         f"has {global_len} tokens (local length x cp size); the boundaries must be the "
                         f"GLOBAL ones of the whole row, the same on every cp rank")
    documents = [0]
    for i in range(len(padded) - 1):
        length, room = real[i + 1] - real[i], padded[i + 1] - padded[i]
        if length > room:
            raise ValueError(f"packed_seq_params: document {i} has {length} tokens (cu_seqlens_q={real}) "
                             f"but only {room} padded slots (cu_seqlens_q_padded={padded})")
        if 0 < length < room:
            documents.append(padded[i] + length)
        documents.append(padded[i + 1])
    return padded, documents


def resolve_packed_split(packed_split: Optional[str], layout: Union[str, BalancedLayout]) -> str:
    """``packed_split`` checked against :data:`PACKED_SPLITS`; None means ``"row"`` for a
    BalancedLayout (which already describes the split of the whole row) and ``"document"`` else."""
    if packed_split is None:
        return "row" if isinstance(layout, BalancedLayout) else "document"
    check_choice("packed_split", packed_split, PACKED_SPLITS)
    if isinstance(layout, BalancedLayout) and packed_split == "document":
        raise ValueError("a BalancedLayout describes the split of the whole packed row: use it with "
                         "packed_split='row'")
    return packed_split


def packed_token_layout(packed_seq_params, local_len: int, world_size: int, packed_split: str,
                        layout: Union[str, BalancedLayout]) -> tuple[Union[str, BalancedLayout], list[int]]:
    """``(layout, cu_seqlens)`` of one packed row of ``local_len`` tokens per cp rank: the seqpar
    layout of the tokens (:func:`document_zigzag_layout` of the padded boundaries for
    ``packed_split="document"``, ``layout`` for ``"row"``) and the seqpar documents of
    :func:`packed_documents` (each padding run a document of its own)."""
    padded, documents = packed_documents(packed_seq_params, local_len * world_size)
    if packed_split == "document":
        return document_zigzag_layout(padded, world_size), documents
    return layout, documents


def _is_causal(mask_type: AttnMaskType, attention_mask: Optional[Tensor], attention_bias: Optional[Tensor],
               packed_seq_params) -> bool:
    """Whether a call with this mask type is causal; what no seqpar layer honours raises."""
    if attention_bias is not None:
        raise NotImplementedError("seqpar core attention does not support attention_bias")
    if mask_type in (AttnMaskType.causal, AttnMaskType.causal_bottom_right):
        # As TE does for a causal mask type: the causal mask is implied by global positions,
        # and a dense [s, s] mask of the local shard would be wrong under context parallelism.
        return True
    if packed_seq_params is not None and mask_type in _PADDING_MASKS:
        # A packed row's padding is described by its cu_seqlens (as in TE's THD path).
        return _PADDING_MASKS[mask_type]
    if mask_type == AttnMaskType.no_mask or attention_mask is None:
        return False
    raise NotImplementedError(f"seqpar core attention supports causal / no_mask attention only, "
                              f"got attn_mask_type={mask_type} with an explicit attention_mask")


def _refuse_window_layer(config: TransformerConfig, layer_number: int, what: str) -> None:
    """A recurrent layer (linear attention, delta rule) has no sliding window: raise on a layer
    that ``window_size`` / ``window_attn_skip_freq`` make a window layer."""
    from megatron.core.transformer.utils import is_layer_window_attention

    if config.window_size is not None and is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, layer_number):
        raise ValueError(f"{what} cannot take a sliding window: layer {layer_number} "
                         f"is a window layer under config.window_size={tuple(config.window_size)!r}, "
                         f"window_attn_skip_freq={config.window_attn_skip_freq!r}; make the recurrent layers "
                         f"full-attention layers in window_attn_skip_freq")


def _group_size(group) -> int:
    return group.size() if group is not None else 1


class _SeqparCoreBase(MegatronModule):
    """What the softmax and linear cores share: config checks, groups, layout and mask handling."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str = "self", attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None, *, layout: str = MEGATRON_CP_LAYOUT,
                 backend: str = "auto", packed_split: Optional[str] = None) -> None:
        super().__init__(config=config)
        if attention_type != "self":
            raise ValueError(f"seqpar core attention supports self-attention only, got attention_type={attention_type!r}")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout != 0.0:
            raise ValueError(f"seqpar core attention has no attention dropout; set TransformerConfig("
                             f"attention_dropout=0.0) (got {dropout})")
        if getattr(config, "qk_clip", False) or getattr(config, "log_max_attention_logit", False):
            raise ValueError("seqpar core attention does not compute the max attention logit that "
                             "TransformerConfig(qk_clip / log_max_attention_logit) need; turn them off")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.pg_collection = pg_collection
        self.cp_group = pg_collection.cp
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.layout = layout
        self.backend = backend
        self.packed_split = resolve_packed_split(packed_split, layout)
        tp_size = pg_collection.tp.size()
        self.num_heads_per_partition = config.num_attention_heads // tp_size
        # Megatron hands the core K/V with num_query_groups / tp heads (1 when there are fewer groups
        # than tp ranks; its local DotProductAttention repeats them itself); K/V already repeated to
        # num_heads_per_partition heads are accepted too.
        groups = config.num_query_groups or config.num_attention_heads
        self.num_kv_heads_per_partition = (max(1, groups // tp_size), self.num_heads_per_partition)
        self.head_offset = pg_collection.tp.rank() * self.num_heads_per_partition
        self.head_dim = config.kv_channels
        self.softmax_scale = default_scale(self.head_dim) if softmax_scale is None else softmax_scale

    def _causal(self, attention_mask: Optional[Tensor], attn_mask_type: Optional[AttnMaskType],
                attention_bias: Optional[Tensor], packed_seq_params) -> bool:
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        return _is_causal(mask_type, attention_mask, attention_bias, packed_seq_params)

    def _inputs(self, query: Tensor, key: Tensor, value: Tensor, packed_seq_params):
        """``(q, k, v [b, s, n, d], layout, cu_seqlens or None, thd)`` of a call: THD inputs
        ``[t, n, d]`` get a batch axis of 1, and a packed row its token layout and documents."""
        thd = query.dim() == 3
        if thd:
            if packed_seq_params is None:
                raise ValueError(f"3-D query {tuple(query.shape)} ([t, n, d], THD) needs packed_seq_params")
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
        self._check_heads(query, key, value)
        layout, cu_seqlens = self.layout, None
        if packed_seq_params is not None:
            if query.shape[1] != 1:
                raise ValueError(f"packed sequences need batch 1 (one packed row), got query {tuple(query.shape)}")
            layout, documents = packed_token_layout(packed_seq_params, query.shape[0], _group_size(self.cp_group),
                                                    self.packed_split, self.layout)
            cu_seqlens = torch.tensor(documents, dtype=torch.int64, device=query.device)
        return self._to_bshd(query), self._to_bshd(key), self._to_bshd(value), layout, cu_seqlens, thd

    def _output(self, o: Tensor, thd: bool) -> Tensor:
        """[b, s, n, d] -> [s, b, n * d], or [t, n * d] for THD."""
        o = self._to_sbh(o)
        return o.squeeze(1) if thd else o

    def _check_heads(self, query: Tensor, key: Tensor, value: Tensor) -> None:
        """ValueError naming both shapes when dim 2 of Megatron's [s, b, n, d] does not hold this
        partition's heads (e.g. a [b, n, s, d] or [s, n, b, d] tensor)."""
        check_head_axis(type(self).__name__, "[s, b, h, d]", query, key, value,
                        num_heads=self.num_heads_per_partition, num_kv_heads=self.num_kv_heads_per_partition)

    @staticmethod
    def _to_bshd(x: Tensor) -> Tensor:
        return x.permute(1, 0, 2, 3)

    @staticmethod
    def _to_sbh(o: Tensor) -> Tensor:
        b, s, n, d = o.shape
        return o.permute(1, 0, 2, 3).reshape(s, b, n * d)


class SeqparCoreAttention(_SeqparCoreBase):
    """Softmax core attention over Megatron's context-parallel group with a seqpar strategy.

    ``strategy`` (``"ring"``, ``"allgather"``, ``"ulysses"``) defaults to the equivalent of the
    layer's ``cp_comm_type`` (p2p -> ring, all_gather -> allgather, a2a -> ulysses; ring if unset).
    Pass it through ``ModuleSpec(params={"strategy": ...})`` or :func:`get_gpt_layer_spec`.

    From the TransformerConfig it honours ``window_size`` / ``window_attn_skip_freq`` (causal
    left windows, see :func:`layer_window`) and ``softmax_type``: ``"off-by-one"`` is a sink
    logit 0 per head, ``"learnable"`` a learnable per-head sink logit ``softmax_offset``
    ([heads per tp partition], named and initialised as in Megatron's DotProductAttention), both
    as seqpar ``sinks``. Packed rows (``packed_seq_params``, qkv_format ``"thd"``) take GLOBAL
    boundaries and the token split ``packed_split`` (see :data:`PACKED_SPLITS`; default
    ``"document"``, Megatron's THD split, or ``"row"`` when ``layout`` is a BalancedLayout).
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str = "self", attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None, *, strategy: Optional[str] = None,
                 layout: str = MEGATRON_CP_LAYOUT, backend: str = "auto", packed_split: Optional[str] = None) -> None:
        super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout, softmax_scale,
                         cp_comm_type, pg_collection, layout=layout, backend=backend, packed_split=packed_split)
        if strategy is None:
            strategy = _strategy_for(config, self.layer_number, cp_comm_type)
        self.strategy = check_choice("strategy", strategy, SOFTMAX_STRATEGIES)
        if self.strategy == "usp":
            raise ValueError("strategy 'usp' needs 2-D groups; use ring / allgather / ulysses on Megatron's cp group")
        # Fail at build time on a window this layer cannot honour (the mask type may still change per call).
        if attn_mask_type is not None:
            layer_window(config, self.layer_number,
                         attn_mask_type in (AttnMaskType.causal, AttnMaskType.causal_bottom_right,
                                            AttnMaskType.padding_causal))
        self.softmax_type = getattr(config, "softmax_type", "vanilla")
        if self.softmax_type == "learnable":
            device = "cpu" if config.use_cpu_initialization or not torch.cuda.is_available() \
                else torch.cuda.current_device()
            self.softmax_offset = torch.nn.Parameter(
                torch.empty(self.num_heads_per_partition, device=device, dtype=config.params_dtype))
            if config.perform_initialization:
                config.init_method(self.softmax_offset)
            else:
                torch.nn.init.zeros_(self.softmax_offset)
        elif self.softmax_type not in ("vanilla", "off-by-one"):
            raise ValueError(f"unknown softmax_type {self.softmax_type!r}; expected 'vanilla', 'off-by-one' "
                             f"or 'learnable'")

    def _sinks(self, query: Tensor) -> Optional[Tensor]:
        if self.softmax_type == "learnable":
            return self.softmax_offset
        if self.softmax_type == "off-by-one":  # exp(0) = 1 added to every denominator
            return torch.zeros(self.num_heads_per_partition, device=query.device, dtype=compute_dtype(query.dtype))
        return None

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias: Optional[Tensor] = None,
                packed_seq_params=None) -> Tensor:
        """[s, b, n, d] query, [s, b, n_kv, d] key/value (local shards) -> [s, b, n * d]; with
        packed_seq_params (qkv_format 'thd') [t, n, d] (or [t, 1, n, d]) -> [t, n * d]."""
        import seqpar

        causal = self._causal(attention_mask, attn_mask_type, attention_bias, packed_seq_params)
        window = layer_window(self.config, self.layer_number, causal)
        q, k, v, layout, cu_seqlens, thd = self._inputs(query, key, value, packed_seq_params)
        o = seqpar.attention(q, k, v, strategy=self.strategy, layout=layout, group=self.cp_group, causal=causal,
                             scale=self.softmax_scale, backend=self.backend, cu_seqlens=cu_seqlens,
                             window=window, sinks=self._sinks(query))
        return self._output(o, thd)


class SeqparLinearCoreAttention(_SeqparCoreBase):
    """Causal linear attention (LASP-2 / LASP) in the core-attention slot of a Megatron layer.

    Uses the layer's Q/K/V projections: ``o = norm(phi(q) S)`` with feature map ``phi``
    (``feature_map``: identity, silu, elu1, relu), an optional per-head constant decay
    (``decay=True``: RetNet / Lightning-style ``log(1 - 2**(-5 - 5h/H))``) and a parameter-free RMS
    norm of each head's output (``normalize``). K/V heads are repeated to the query heads (GQA).

    Packed rows (``packed_seq_params``, qkv_format ``"thd"``) are split over the cp ranks as
    ``packed_split`` says (as for :class:`SeqparCoreAttention`); the state resets at every document
    start and at every padding run. The core only receives q, k, v: data-dependent gates (GLA,
    the delta rule) need projections of the hidden states, see :class:`SeqparGatedDeltaNet`.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str = "self", attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None, *, strategy: str = "lasp2",
                 layout: str = MEGATRON_CP_LAYOUT, feature_map: str = "silu", decay: bool = True,
                 normalize: bool = True, backend: str = "auto", packed_split: Optional[str] = None) -> None:
        super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout, softmax_scale,
                         cp_comm_type, pg_collection, layout=layout, backend=backend, packed_split=packed_split)
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"seqpar linear core attention has no softmax: softmax_type must be 'vanilla', "
                             f"got {config.softmax_type!r}")
        _refuse_window_layer(config, self.layer_number, "seqpar linear core attention")
        self.strategy = check_choice("linear strategy", strategy, LINEAR_STRATEGIES)
        self.feature_map = check_choice("feature map", feature_map, FEATURE_MAPS)
        self.normalize = normalize
        self.decay = decay

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias: Optional[Tensor] = None,
                packed_seq_params=None) -> Tensor:
        """[s, b, n, d] query, [s, b, n_kv, d] key/value (local shards) -> [s, b, n * d]; with
        packed_seq_params (qkv_format 'thd') [t, n, d] (or [t, 1, n, d]) -> [t, n * d]."""
        if not self._causal(attention_mask, attn_mask_type, attention_bias, packed_seq_params):
            raise NotImplementedError("seqpar linear core attention is causal only")
        q, k, v, layout, cu_seqlens, thd = self._inputs(query, key, value, packed_seq_params)
        # The decay is made per call in the compute dtype (fp32, fp64 for fp64 inputs), not held as
        # a buffer that Float16Module / model.bfloat16() would round to bf16.
        gamma = None
        if self.decay:
            gamma = retnet_decay(self.num_heads_per_partition, self.head_offset, self.config.num_attention_heads,
                                 device=query.device, dtype=compute_dtype(query.dtype))
        o = linear_attention_heads(q, k, v, strategy=self.strategy, layout=layout, group=self.cp_group,
                                   feature=self.feature_map, g_gamma=gamma, scale=self.softmax_scale,
                                   normalize=self.normalize, eps=_NORM_EPS, cu_seqlens=cu_seqlens,
                                   backend=self.backend)
        return self._output(o, thd)


class SeqparGatedDeltaNet(MegatronModule):
    """A gated delta-rule layer (Gated DeltaNet, the linear layers of Qwen3-Next) for the
    ``self_attention`` slot of a Megatron TransformerLayer, over the context-parallel group.

    Megatron's core-attention slot only receives q, k, v, but the delta rule's gates are
    projections of the hidden states, so this module replaces the whole ``SelfAttention`` (as
    Megatron's own ``megatron.core.ssm.gated_delta_net.GatedDeltaNet`` does). Sizes come from
    Megatron's GDN config fields: ``linear_num_key_heads`` (q / k heads), ``linear_num_value_heads``
    (H, a multiple of them; q and k are repeated), ``linear_key_head_dim`` (Dk) and
    ``linear_value_head_dim`` (Dv). For hidden states x [s, b, hidden]:

        q, k = silu(W_q x), silu(W_k x)        [b, s, H, Dk]  (L2-normalised in the kernel)
        v, z = silu(W_v x), W_z x              [b, s, H, Dv]
        beta = sigmoid(W_b x)                  [b, s, H]
        g = -exp(A_log) * softplus(W_a x + dt_bias)        [b, s, H]  (log decay <= 0)
        S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = Dk^-1/2 S_t^T q_t
        out = W_o (RMSNorm(o) * silu(z))       (per-head gated RMS norm)

    Each W is its own Column/RowParallelLinear (heads split over tensor parallelism, plain TP
    checkpoints); ``A_log`` / ``dt_bias`` [H / tp] are initialised as in Megatron's GDN
    (A ~ U(``A_init_range``), dt_bias = 1). Differences from Megatron's GDN: no short causal
    convolution on q, k, v (under context parallelism it would need the previous rank's last
    tokens, a halo exchange seqpar does not have; the SiLU that follows it there is applied to
    the projections), separate projections instead of one fused ``in_proj``, so checkpoints do
    not carry over. No positional embedding (``rotary_pos_emb`` is not used, as in Megatron's GDN).

    Causal; packed rows (``packed_seq_params``, qkv_format ``"thd"``) reset the state at every
    document start, split over the cp ranks as ``packed_split`` says (see
    :class:`SeqparCoreAttention`). ``strategy``: ``lasp2`` / ``lasp1``; ``layout``: the token layout
    of unpacked rows (Megatron's zigzag by default, or a BalancedLayout).
    """

    def __init__(self, config: TransformerConfig, layer_number: int, cp_comm_type: Optional[str] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None, *, strategy: str = "lasp2",
                 layout: Union[str, BalancedLayout] = MEGATRON_CP_LAYOUT, packed_split: Optional[str] = None,
                 backend: str = "auto", A_init_range: tuple[float, float] = (1.0, 16.0)) -> None:
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        super().__init__(config=config)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.pg_collection = pg_collection
        self.cp_group = pg_collection.cp
        self.layer_number = max(1, layer_number)
        _refuse_window_layer(config, self.layer_number, "SeqparGatedDeltaNet")
        self.strategy = check_choice("linear strategy", strategy, LINEAR_STRATEGIES)
        if layout == "striped":
            raise ValueError("SeqparGatedDeltaNet needs runs of consecutive tokens per rank: layout 'striped' "
                             "is not supported (use 'zigzag', 'contiguous' or a BalancedLayout)")
        self.layout = layout
        self.packed_split = resolve_packed_split(packed_split, layout)
        self.backend = backend
        if not 0 < A_init_range[0] <= A_init_range[1]:
            raise ValueError(f"A_init_range must be (low, high) with 0 < low <= high, got {A_init_range}")
        tp = pg_collection.tp.size()
        key_heads, heads = config.linear_num_key_heads, config.linear_num_value_heads
        self.key_dim, self.value_dim = config.linear_key_head_dim, config.linear_value_head_dim
        sizes = dict(linear_num_key_heads=key_heads, linear_num_value_heads=heads,
                     linear_key_head_dim=self.key_dim, linear_value_head_dim=self.value_dim)
        if any(not isinstance(n, int) or n < 1 for n in sizes.values()):
            raise ValueError(f"SeqparGatedDeltaNet needs positive TransformerConfig sizes, got {sizes}")
        if heads % key_heads or key_heads % tp:
            raise ValueError(f"SeqparGatedDeltaNet needs linear_num_value_heads ({heads}) to be a multiple of "
                             f"linear_num_key_heads ({key_heads}), and those a multiple of the tensor-parallel "
                             f"size ({tp})")
        self.key_heads, self.heads = key_heads // tp, heads // tp  # per tensor-parallel partition
        column = dict(config=config, init_method=config.init_method, bias=False, gather_output=False,
                      tp_group=pg_collection.tp)
        hidden = config.hidden_size
        self.linear_q = ColumnParallelLinear(hidden, key_heads * self.key_dim, **column)
        self.linear_k = ColumnParallelLinear(hidden, key_heads * self.key_dim, **column)
        self.linear_v = ColumnParallelLinear(hidden, heads * self.value_dim, **column)
        self.linear_z = ColumnParallelLinear(hidden, heads * self.value_dim, **column)
        self.linear_beta = ColumnParallelLinear(hidden, heads, **column)
        self.linear_a = ColumnParallelLinear(hidden, heads, **column)
        device = "cpu" if config.use_cpu_initialization or not torch.cuda.is_available() \
            else torch.cuda.current_device()
        self.A_log = torch.nn.Parameter(torch.empty(self.heads, device=device, dtype=config.params_dtype))
        self.dt_bias = torch.nn.Parameter(torch.empty(self.heads, device=device, dtype=config.params_dtype))
        for p in (self.A_log, self.dt_bias):  # as Megatron marks TP-partitioned parameters
            setattr(p, "tensor_model_parallel", True)
            setattr(p, "partition_dim", 0)
            setattr(p, "partition_stride", 1)
        self.out_norm = torch.nn.RMSNorm(self.value_dim, eps=config.layernorm_epsilon, device=device,
                                         dtype=config.params_dtype)
        self.out_proj = RowParallelLinear(heads * self.value_dim, hidden, config=config,
                                          init_method=config.output_layer_init_method, bias=False,
                                          input_is_parallel=True, skip_bias_add=True, tp_group=pg_collection.tp)
        self.A_init_range = A_init_range
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Megatron's GDN initialisation: A_log = log(A), A ~ U(A_init_range); dt_bias = 1."""
        if self.config.perform_initialization:
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(*self.A_init_range).log())
            self.dt_bias.fill_(1.0)
        else:
            self.A_log.zero_()
            self.dt_bias.zero_()

    def gates(self, hidden_states: Tensor) -> tuple[Tensor, Tensor]:
        """(g, beta) [b, s, H] of hidden states [s, b, hidden], in the compute dtype (fp32, fp64 for fp64)."""
        a, _ = self.linear_a(hidden_states)
        b, _ = self.linear_beta(hidden_states)
        cd = compute_dtype(a.dtype)
        a, b = (t.transpose(0, 1).to(cd) for t in (a, b))
        g = -torch.exp(self.A_log.to(cd)) * torch.nn.functional.softplus(a + self.dt_bias.to(cd))
        return g, torch.sigmoid(b)

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                key_value_states: Optional[Tensor] = None, inference_context=None, rotary_pos_emb=None,
                rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                attention_bias: Optional[Tensor] = None, packed_seq_params=None, sequence_len_offset=None, *,
                inference_params=None) -> tuple[Tensor, Optional[Tensor]]:
        """hidden_states [s, b, hidden] (this rank's tokens; [t, 1, hidden] for a packed row) ->
        (output [s, b, hidden], None), as Megatron's SelfAttention. The dense ``attention_mask``
        is not used (the layer is causal by construction)."""
        if key_value_states is not None:
            raise NotImplementedError("SeqparGatedDeltaNet is self-attention only (key_value_states was given)")
        if inference_context is not None or inference_params is not None:
            raise NotImplementedError("SeqparGatedDeltaNet has no inference (KV-cache / state) path")
        _is_causal(AttnMaskType.causal, attention_mask, attention_bias, packed_seq_params)
        if hidden_states.dim() != 3:
            raise ValueError(f"SeqparGatedDeltaNet expects hidden_states [s, b, hidden], "
                             f"got {tuple(hidden_states.shape)}")
        if packed_seq_params is not None and hidden_states.shape[1] != 1:
            raise ValueError(f"packed sequences need batch 1 (one packed row), got hidden_states "
                             f"{tuple(hidden_states.shape)} [s, b, hidden]")

        def heads(linear, n: int, dim: int) -> Tensor:  # [s, b, n * dim] -> [b, s, n, dim]
            x, _ = linear(hidden_states)  # all of this cp rank's tokens, also under TP sequence_parallel
            return x.transpose(0, 1).reshape(x.shape[1], x.shape[0], n, dim)

        silu = torch.nn.functional.silu
        q = silu(heads(self.linear_q, self.key_heads, self.key_dim))
        layout, cu_seqlens = self.layout, None
        if packed_seq_params is not None:
            layout, documents = packed_token_layout(packed_seq_params, q.shape[1], _group_size(self.cp_group),
                                                    self.packed_split, self.layout)
            cu_seqlens = torch.tensor(documents, dtype=torch.int64, device=q.device)
        k = silu(heads(self.linear_k, self.key_heads, self.key_dim))
        v = silu(heads(self.linear_v, self.heads, self.value_dim))
        z = heads(self.linear_z, self.heads, self.value_dim)
        if self.heads != self.key_heads:
            q, k = (t.repeat_interleave(self.heads // self.key_heads, dim=2) for t in (q, k))
        g, beta = self.gates(hidden_states)
        o = self.mix(q, k, v, g, beta, layout=layout, cu_seqlens=cu_seqlens)
        cd = compute_dtype(o.dtype)
        o = (self.out_norm(o.to(self.out_norm.weight.dtype)).to(cd) * silu(z.to(cd))).to(hidden_states.dtype)
        b, s = o.shape[:2]
        out, bias = self.out_proj(o.reshape(b, s, -1).transpose(0, 1).contiguous())
        return out, bias

    def mix(self, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *, layout: Union[str, BalancedLayout],
            cu_seqlens: Optional[Tensor]) -> Tensor:
        """The gated delta rule over the cp group: q, k [b, s, H, Dk], v [b, s, H, Dv], g and beta
        [b, s, H] (this rank's tokens in ``layout``) -> o [b, s, H, Dv]; q and k are L2-normalised
        in the kernel; ``cu_seqlens`` the GLOBAL documents of a packed row."""
        import seqpar

        o, _ = seqpar.linear_attention(q, k, v, strategy=self.strategy, layout=layout, group=self.cp_group, g=g,
                                       beta=beta, use_qk_l2norm=True, cu_seqlens=cu_seqlens, backend=self.backend)
        return o

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """Megatron's default, with ``A_log`` / ``dt_bias`` sharded over tensor parallelism (dim 0)."""
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

        out = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        own: dict = {}
        self._save_to_state_dict(own, "", keep_vars=True)
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        out.update(make_sharded_tensors_for_checkpoint(own, prefix, {"A_log": 0, "dt_bias": 0}, sharded_offsets,
                                                       tp_group=self.pg_collection.tp,
                                                       dp_cp_group=metadata["dp_cp_group"]))
        return out


def _with_core_attention(layer_spec: ModuleSpec, core: ModuleSpec) -> ModuleSpec:
    """A copy of a TransformerLayer spec whose self-attention uses ``core`` as core attention."""
    attn = layer_spec.submodules.self_attention
    attn = dataclasses.replace(attn, submodules=dataclasses.replace(attn.submodules, core_attention=core))
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(layer_spec.submodules, self_attention=attn))


#: Layer kinds of :func:`get_gpt_layer_spec` and their letters in :func:`hybrid_layer_specs` patterns.
LAYER_KINDS = {"S": "softmax", "L": "linear", "D": "delta"}


def get_gpt_layer_spec(kind: str = "softmax", *, strategy: Optional[str] = None, layout: str = MEGATRON_CP_LAYOUT,
                       normalization: Optional[str] = None, qk_layernorm: bool = False, feature_map: str = "silu",
                       decay: bool = True, normalize: bool = True, backend: str = "auto",
                       packed_split: Optional[str] = None) -> ModuleSpec:
    """A GPT TransformerLayer spec (Megatron's local, non-TE spec) with a seqpar token mixer.

    ``kind`` is ``"softmax"`` (core attention :class:`SeqparCoreAttention`, ``strategy`` one of
    ring / allgather / ulysses, default from ``cp_comm_type``), ``"linear"`` (core attention
    :class:`SeqparLinearCoreAttention`, ``strategy`` lasp2 / lasp1, default lasp2, with its
    feature-map / decay / normalize options) or ``"delta"`` (the whole ``self_attention`` is a
    :class:`SeqparGatedDeltaNet`, ``strategy`` lasp2 / lasp1, sizes from the config's
    ``linear_*`` GDN fields). ``packed_split`` is how packed rows are split over the cp ranks
    (see :data:`PACKED_SPLITS`); give every layer of a model the same.
    """
    base = get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm)
    if kind == "softmax":
        core = ModuleSpec(module=SeqparCoreAttention,
                          params={"strategy": strategy, "layout": layout, "backend": backend,
                                  "packed_split": packed_split})
    elif kind == "linear":
        core = ModuleSpec(module=SeqparLinearCoreAttention,
                          params={"strategy": strategy or "lasp2", "layout": layout, "feature_map": feature_map,
                                  "decay": decay, "normalize": normalize, "backend": backend,
                                  "packed_split": packed_split})
    elif kind == "delta":
        mixer = ModuleSpec(module=SeqparGatedDeltaNet,
                           params={"strategy": strategy or "lasp2", "layout": layout, "backend": backend,
                                   "packed_split": packed_split})
        return dataclasses.replace(base, submodules=dataclasses.replace(base.submodules, self_attention=mixer))
    else:
        raise ValueError(f"unknown layer kind {kind!r}; expected one of {tuple(LAYER_KINDS.values())}")
    return _with_core_attention(base, core)


def expand_pattern(pattern: str, num_layers: int) -> str:
    """``pattern`` of ``S`` (softmax) / ``L`` (linear) / ``D`` (gated delta rule) letters repeated
    to ``num_layers`` layers."""
    pattern = pattern.upper()
    if not pattern or set(pattern) - set(LAYER_KINDS):
        raise ValueError(f"layer pattern {pattern!r} must be a non-empty string of 'S' (softmax), 'L' (linear) "
                         f"and 'D' (gated delta rule)")
    if num_layers % len(pattern) != 0:
        raise ValueError(f"layer pattern {pattern!r} (length {len(pattern)}) does not tile num_layers={num_layers}")
    return pattern * (num_layers // len(pattern))


def hybrid_layer_specs(pattern: str = "LLLS", *, config: Optional[TransformerConfig] = None,
                       num_layers: Optional[int] = None, softmax_strategy: Optional[str] = None,
                       linear_strategy: str = "lasp2", layout: str = MEGATRON_CP_LAYOUT,
                       normalization: Optional[str] = None, qk_layernorm: bool = False, feature_map: str = "silu",
                       decay: bool = True, normalize: bool = True, backend: str = "auto",
                       vp_stage: Optional[int] = None, packed_split: Optional[str] = None):
    """Block spec (``TransformerBlockSubmodules``) of a hybrid GPT: layer i is softmax where the
    pattern (tiled to the number of layers) has ``S``, linear where it has ``L`` and a gated
    delta-rule layer (:class:`SeqparGatedDeltaNet`) where it has ``D``; the linear and delta
    layers run ``linear_strategy``, every layer splits packed rows by ``packed_split``.

    Pass ``config`` to take the number of layers and the normalization from it and to keep only
    the layers of this pipeline stage (as Megatron's ``get_gpt_decoder_block_spec`` does); or
    ``num_layers`` alone for a spec of every layer.
    """
    from megatron.core.models.gpt.gpt_layer_specs import LNImpl
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    if config is None and num_layers is None:
        raise ValueError("hybrid_layer_specs needs config= or num_layers=")
    total = config.num_layers if config is not None else num_layers
    if config is not None and normalization is None:
        normalization = config.normalization
    full = expand_pattern(pattern, total)
    common = dict(layout=layout, normalization=normalization, qk_layernorm=qk_layernorm, backend=backend,
                  packed_split=packed_split)
    by_letter = {"S": get_gpt_layer_spec("softmax", strategy=softmax_strategy, **common),
                 "L": get_gpt_layer_spec("linear", strategy=linear_strategy, feature_map=feature_map, decay=decay,
                                         normalize=normalize, **common),
                 "D": get_gpt_layer_spec("delta", strategy=linear_strategy, **common)}
    specs = [by_letter[c] for c in full]
    if config is not None and config.pipeline_model_parallel_size > 1:
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
        specs = specs[offset: offset + get_num_layers_to_build(config, vp_stage=vp_stage)]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=LNImpl)


def context_parallel_group() -> torch.distributed.ProcessGroup:
    """Megatron's context-parallel group (after ``parallel_state.initialize_model_parallel``)."""
    from megatron.core import parallel_state

    return parallel_state.get_context_parallel_group()
