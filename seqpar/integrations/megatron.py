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
- :func:`get_gpt_layer_spec` and :func:`hybrid_layer_specs` build the layer / block specs.

The softmax core honours packed rows (``packed_seq_params``, qkv_format ``"thd"``: GLOBAL
boundaries, tokens split per document as Megatron's ``get_thd_batch_on_this_cp_rank`` does, or
with the core's layout over the whole row, ``packed_split="row"``), ``config.window_size`` /
``window_attn_skip_freq`` (causal left windows) and ``config.softmax_type`` off-by-one /
learnable (seqpar sinks). What it cannot honour exactly raises an error.

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


class _SeqparCoreBase(MegatronModule):
    """What the softmax and linear cores share: config checks, groups, layout and mask handling."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str = "self", attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None, *, layout: str = MEGATRON_CP_LAYOUT,
                 backend: str = "auto") -> None:
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
        if attention_bias is not None:
            raise NotImplementedError("seqpar core attention does not support attention_bias")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
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
                         cp_comm_type, pg_collection, layout=layout, backend=backend)
        if strategy is None:
            strategy = _strategy_for(config, self.layer_number, cp_comm_type)
        self.strategy = check_choice("strategy", strategy, SOFTMAX_STRATEGIES)
        if self.strategy == "usp":
            raise ValueError("strategy 'usp' needs 2-D groups; use ring / allgather / ulysses on Megatron's cp group")
        if packed_split is None:
            packed_split = "row" if isinstance(layout, BalancedLayout) else "document"
        self.packed_split = check_choice("packed_split", packed_split, PACKED_SPLITS)
        if isinstance(layout, BalancedLayout) and packed_split == "document":
            raise ValueError("a BalancedLayout describes the split of the whole packed row: use it with "
                             "packed_split='row'")
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

    def _packed(self, packed_seq_params, local_len: int):
        """(layout, cu_seqlens list) of a packed row."""
        world = self.cp_group.size() if self.cp_group is not None else 1
        padded, documents = packed_documents(packed_seq_params, local_len * world)
        if self.packed_split == "document":
            return document_zigzag_layout(padded, world), documents
        return self.layout, documents

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias: Optional[Tensor] = None,
                packed_seq_params=None) -> Tensor:
        """[s, b, n, d] query, [s, b, n_kv, d] key/value (local shards) -> [s, b, n * d]; with
        packed_seq_params (qkv_format 'thd') [t, n, d] (or [t, 1, n, d]) -> [t, n * d]."""
        import seqpar

        causal = self._causal(attention_mask, attn_mask_type, attention_bias, packed_seq_params)
        window = layer_window(self.config, self.layer_number, causal)
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
            layout, cu_seqlens = self._packed(packed_seq_params, query.shape[0])
            cu_seqlens = torch.tensor(cu_seqlens, dtype=torch.int64, device=query.device)
        o = seqpar.attention(self._to_bshd(query), self._to_bshd(key), self._to_bshd(value),
                             strategy=self.strategy, layout=layout, group=self.cp_group, causal=causal,
                             scale=self.softmax_scale, backend=self.backend, cu_seqlens=cu_seqlens,
                             window=window, sinks=self._sinks(query))
        o = self._to_sbh(o)
        return o.squeeze(1) if thd else o


class SeqparLinearCoreAttention(_SeqparCoreBase):
    """Causal linear attention (LASP-2 / LASP) in the core-attention slot of a Megatron layer.

    Uses the layer's Q/K/V projections: ``o = norm(phi(q) S)`` with feature map ``phi``
    (``feature_map``: identity, silu, elu1, relu), an optional per-head constant decay
    (``decay=True``: RetNet / Lightning-style ``log(1 - 2**(-5 - 5h/H))``) and a parameter-free RMS
    norm of each head's output (``normalize``). K/V heads are repeated to the query heads (GQA).
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str = "self", attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None, *, strategy: str = "lasp2",
                 layout: str = MEGATRON_CP_LAYOUT, feature_map: str = "silu", decay: bool = True,
                 normalize: bool = True, backend: str = "auto") -> None:
        super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout, softmax_scale,
                         cp_comm_type, pg_collection, layout=layout, backend=backend)
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"seqpar linear core attention has no softmax: softmax_type must be 'vanilla', "
                             f"got {config.softmax_type!r}")
        from megatron.core.transformer.utils import is_layer_window_attention

        if config.window_size is not None and is_layer_window_attention(
                config.window_size, config.window_attn_skip_freq, self.layer_number):
            raise ValueError(f"seqpar linear core attention cannot take a sliding window: layer {self.layer_number} "
                             f"is a window layer under config.window_size={tuple(config.window_size)!r}, "
                             f"window_attn_skip_freq={config.window_attn_skip_freq!r}; make the linear layers "
                             f"full-attention layers in window_attn_skip_freq")
        self.strategy = check_choice("linear strategy", strategy, LINEAR_STRATEGIES)
        self.feature_map = check_choice("feature map", feature_map, FEATURE_MAPS)
        self.normalize = normalize
        self.decay = decay

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias: Optional[Tensor] = None,
                packed_seq_params=None) -> Tensor:
        """[s, b, n, d] query, [s, b, n_kv, d] key/value (local shards) -> [s, b, n * d]."""
        if packed_seq_params is not None:
            raise NotImplementedError("seqpar linear core attention cannot take packed sequences "
                                      "(packed_seq_params): linear attention has no document resets yet, so "
                                      "its state would flow across documents; use softmax layers for packed rows")
        if not self._causal(attention_mask, attn_mask_type, attention_bias, packed_seq_params):
            raise NotImplementedError("seqpar linear core attention is causal only")
        self._check_heads(query, key, value)
        # The decay is made per call in the compute dtype (fp32, fp64 for fp64 inputs), not held as
        # a buffer that Float16Module / model.bfloat16() would round to bf16.
        gamma = None
        if self.decay:
            gamma = retnet_decay(self.num_heads_per_partition, self.head_offset, self.config.num_attention_heads,
                                 device=query.device, dtype=compute_dtype(query.dtype))
        o = linear_attention_heads(self._to_bshd(query), self._to_bshd(key), self._to_bshd(value),
                                   strategy=self.strategy, layout=self.layout, group=self.cp_group,
                                   feature=self.feature_map, g_gamma=gamma, scale=self.softmax_scale,
                                   normalize=self.normalize)
        return self._to_sbh(o)


def _with_core_attention(layer_spec: ModuleSpec, core: ModuleSpec) -> ModuleSpec:
    """A copy of a TransformerLayer spec whose self-attention uses ``core`` as core attention."""
    attn = layer_spec.submodules.self_attention
    attn = dataclasses.replace(attn, submodules=dataclasses.replace(attn.submodules, core_attention=core))
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(layer_spec.submodules, self_attention=attn))


def get_gpt_layer_spec(kind: str = "softmax", *, strategy: Optional[str] = None, layout: str = MEGATRON_CP_LAYOUT,
                       normalization: Optional[str] = None, qk_layernorm: bool = False, feature_map: str = "silu",
                       decay: bool = True, normalize: bool = True, backend: str = "auto",
                       packed_split: Optional[str] = None) -> ModuleSpec:
    """A GPT TransformerLayer spec (Megatron's local, non-TE spec) with a seqpar core attention.

    ``kind`` is ``"softmax"`` (``strategy`` one of ring / allgather / ulysses, default from
    ``cp_comm_type``) or ``"linear"`` (``strategy`` lasp2 / lasp1, default lasp2, with the
    feature-map / decay / normalize options of :class:`SeqparLinearCoreAttention`).
    ``packed_split`` (softmax only) is how packed rows are split over the cp ranks, see
    :class:`SeqparCoreAttention`.
    """
    base = get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm)
    if kind == "softmax":
        core = ModuleSpec(module=SeqparCoreAttention,
                          params={"strategy": strategy, "layout": layout, "backend": backend,
                                  "packed_split": packed_split})
    elif kind == "linear":
        core = ModuleSpec(module=SeqparLinearCoreAttention,
                          params={"strategy": strategy or "lasp2", "layout": layout, "feature_map": feature_map,
                                  "decay": decay, "normalize": normalize, "backend": backend})
    else:
        raise ValueError(f"unknown layer kind {kind!r}; expected 'softmax' or 'linear'")
    return _with_core_attention(base, core)


def expand_pattern(pattern: str, num_layers: int) -> str:
    """``pattern`` of ``S`` (softmax) / ``L`` (linear) letters repeated to ``num_layers`` layers."""
    pattern = pattern.upper()
    if not pattern or set(pattern) - {"S", "L"}:
        raise ValueError(f"layer pattern {pattern!r} must be a non-empty string of 'S' (softmax) and 'L' (linear)")
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
    pattern (tiled to the number of layers) has ``S`` and linear where it has ``L``.

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
    common = dict(layout=layout, normalization=normalization, qk_layernorm=qk_layernorm, backend=backend)
    softmax = get_gpt_layer_spec("softmax", strategy=softmax_strategy, packed_split=packed_split, **common)
    linear = get_gpt_layer_spec("linear", strategy=linear_strategy, feature_map=feature_map, decay=decay,
                                normalize=normalize, **common)
    specs = [softmax if c == "S" else linear for c in full]
    if config is not None and config.pipeline_model_parallel_size > 1:
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
        specs = specs[offset: offset + get_num_layers_to_build(config, vp_stage=vp_stage)]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=LNImpl)


def context_parallel_group() -> torch.distributed.ProcessGroup:
    """Megatron's context-parallel group (after ``parallel_state.initialize_model_parallel``)."""
    from megatron.core import parallel_state

    return parallel_state.get_context_parallel_group()
