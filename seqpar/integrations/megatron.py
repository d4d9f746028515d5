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
from typing import Optional

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
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"seqpar core attention supports softmax_type='vanilla' only, got {config.softmax_type!r}")
        if getattr(config, "window_size", None) is not None:
            raise ValueError("seqpar core attention does not support sliding-window attention (config.window_size)")
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
        if packed_seq_params is not None:
            raise NotImplementedError("seqpar core attention does not support packed sequences (thd format)")
        if attention_bias is not None:
            raise NotImplementedError("seqpar core attention does not support attention_bias")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if mask_type in (AttnMaskType.causal, AttnMaskType.causal_bottom_right):
            # As TE does for a causal mask type: the causal mask is implied by global positions,
            # and a dense [s, s] mask of the local shard would be wrong under context parallelism.
            return True
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
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str = "self", attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None, *, strategy: Optional[str] = None,
                 layout: str = MEGATRON_CP_LAYOUT, backend: str = "auto") -> None:
        super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout, softmax_scale,
                         cp_comm_type, pg_collection, layout=layout, backend=backend)
        if strategy is None:
            strategy = _strategy_for(config, self.layer_number, cp_comm_type)
        self.strategy = check_choice("strategy", strategy, SOFTMAX_STRATEGIES)
        if self.strategy == "usp":
            raise ValueError("strategy 'usp' needs 2-D groups; use ring / allgather / ulysses on Megatron's cp group")

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias: Optional[Tensor] = None,
                packed_seq_params=None) -> Tensor:
        """[s, b, n, d] query, [s, b, n_kv, d] key/value (local shards) -> [s, b, n * d]."""
        import seqpar

        causal = self._causal(attention_mask, attn_mask_type, attention_bias, packed_seq_params)
        self._check_heads(query, key, value)
        o = seqpar.attention(self._to_bshd(query), self._to_bshd(key), self._to_bshd(value),
                             strategy=self.strategy, layout=self.layout, group=self.cp_group, causal=causal,
                             scale=self.softmax_scale, backend=self.backend)
        return self._to_sbh(o)


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
        self.strategy = check_choice("linear strategy", strategy, LINEAR_STRATEGIES)
        self.feature_map = check_choice("feature map", feature_map, FEATURE_MAPS)
        self.normalize = normalize
        self.decay = decay

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias: Optional[Tensor] = None,
                packed_seq_params=None) -> Tensor:
        """[s, b, n, d] query, [s, b, n_kv, d] key/value (local shards) -> [s, b, n * d]."""
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
                       decay: bool = True, normalize: bool = True, backend: str = "auto") -> ModuleSpec:
    """A GPT TransformerLayer spec (Megatron's local, non-TE spec) with a seqpar core attention.

    ``kind`` is ``"softmax"`` (``strategy`` one of ring / allgather / ulysses, default from
    ``cp_comm_type``) or ``"linear"`` (``strategy`` lasp2 / lasp1, default lasp2, with the
    feature-map / decay / normalize options of :class:`SeqparLinearCoreAttention`).
    """
    base = get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm)
    if kind == "softmax":
        core = ModuleSpec(module=SeqparCoreAttention,
                          params={"strategy": strategy, "layout": layout, "backend": backend})
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
                       vp_stage: Optional[int] = None):
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
    softmax = get_gpt_layer_spec("softmax", strategy=softmax_strategy, **common)
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
