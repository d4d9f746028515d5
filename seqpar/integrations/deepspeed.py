"""DeepSpeed integration: seqpar attention on DeepSpeed's sequence-parallel group.

DeepSpeed-Ulysses is ``deepspeed.sequence.layer.DistributedAttention(local_attn, sp_group)``,
called as ``attn(query, key, value, batch_dim_idx)`` on this rank's contiguous slice of the
sequence, ``[b, s/p, h, d]`` (``batch_dim_idx=0``) or ``[s/p, b, h, d]`` (``batch_dim_idx=1``).
:class:`SeqparDistributedAttention` takes the same call and runs a seqpar softmax strategy
(ulysses, ring, allgather; zigzag / striped layouts for load-balanced causal rings) on the same
group; :class:`SeqparDistributedLinearAttention` runs linear attention (LASP-2 / LASP) of every
seqpar family (constant, per-head and per-key gates, the gated delta rule, KDA), packed
documents included.

The group is the one DeepSpeed trains with: pass a ``ProcessGroup``, the ``mpu`` given to
``deepspeed.initialize(..., mpu=mpu)`` or the engine (anything with
``get_sequence_parallel_group()``); it is looked up at the first forward, so a model can be
built before ``deepspeed.initialize``. :class:`SequenceParallelMPU` builds such an mpu (the
same groups and methods as ``deepspeed.runtime.sequence_parallel.parallel_state_sp``, held by an
object instead of module globals): ZeRO then partitions and reduces over the sequence-data
parallel group and divides gradients by the pure data-parallel size, so each rank's loss must be
its share of the global mean (sum of local token losses / global token count).

Masks: ``SeqparDistributedAttention(..., window=W, softcap=c)`` (fixed per layer) and the call's
``cu_seqlens=`` (global document boundaries of one packed row) and ``sinks=`` (per-head logits
[Hq], usually the model's parameter) are honoured exactly (see docs/masks.md). ZeRO-3 reduces
with the right scale only with ``"reduce_scatter": false``: :func:`check_zero_config` checks an
engine for that.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from seqpar.comm.groups import group_timeout
from seqpar.integrations._common import LINEAR_STRATEGIES, SOFTMAX_STRATEGIES, check_choice
from seqpar.layout import BalancedLayout
from seqpar.masks import check_softcap, check_window
from seqpar.validation import check_head_axis

_LAYOUTS = {0: "[b, s, h, d]", 1: "[s, b, h, d]"}  # DeepSpeed's batch_dim_idx; heads on dim 2 in both
from seqpar.kernels.softmax_reference import compute_dtype


def resolve_sequence_parallel_group(source: Any) -> Optional[dist.ProcessGroup]:
    """The process group of ``source``: a ProcessGroup (or None: the default group) as is; an
    mpu / DeepSpeed engine through its ``get_sequence_parallel_group()``."""
    if source is None or isinstance(source, dist.ProcessGroup):
        return source
    getter = getattr(source, "get_sequence_parallel_group", None)
    if getter is None:
        raise TypeError(f"expected a ProcessGroup, an mpu or a DeepSpeed engine with get_sequence_parallel_group(), "
                        f"got {type(source).__name__}")
    group = getter()
    if group is None:
        raise ValueError(f"{type(source).__name__}.get_sequence_parallel_group() returned None "
                         f"(is sequence parallelism configured?)")
    return group


def check_zero_config(engine: Any) -> None:
    """Raise a ValueError if ``engine`` (from ``deepspeed.initialize``) would scale the gradients of
    sequence parallelism wrongly.

    ZeRO-3's default gradient reduction (``"reduce_scatter": true``) averages over the whole
    sequence-data-parallel group, sequence-parallel ranks included, so with sequence parallel
    size sp every gradient comes out sp times too small (DeepSpeed 0.19.8,
    ``DeepSpeedZeroOptimizer_Stage3.__avg_scatter_grads``). ZeRO-1/2, no ZeRO, and ZeRO-3 with
    ``"reduce_scatter": false`` divide by the pure data-parallel size, which is what the loss
    convention of this module (each rank's loss is its share of the global mean) needs."""
    stage = engine.zero_optimization_stage()
    sp = getattr(engine, "sequence_parallel_size", 1)
    if stage == 3 and sp > 1 and engine.zero_reduce_scatter():
        raise ValueError(f"ZeRO stage 3 with \"reduce_scatter\": true averages gradients over all "
                         f"{sp} sequence-parallel ranks as if they were data-parallel replicas (gradients "
                         f"{sp}x too small). Set \"zero_optimization\": {{\"stage\": 3, \"reduce_scatter\": false}}")


class SequenceParallelMPU:
    """A Megatron-style ``mpu`` with sequence-parallel groups for ``deepspeed.initialize(mpu=...)``.

    Consecutive blocks of ``sequence_parallel_size`` ranks form the sequence-parallel groups; all
    ranks form the sequence-data-parallel group (what ZeRO partitions and reduces over). Same
    layout and methods as ``deepspeed.runtime.sequence_parallel.parallel_state_sp``, but the
    groups live on this object, and size 1 is allowed (plain data parallelism). Every rank must
    construct it (``new_group`` is collective). Every group gets ``timeout_s`` (default
    ``seqpar.comm.groups.DEFAULT_TIMEOUT_S``), so a stopped rank becomes an error in that time.
    """

    def __init__(self, sequence_parallel_size: int, timeout_s: float | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed must be initialised before SequenceParallelMPU")
        world = dist.get_world_size()
        if sequence_parallel_size < 1 or world % sequence_parallel_size != 0:
            raise ValueError(f"sequence_parallel_size {sequence_parallel_size} must be >= 1 and divide the "
                             f"world size {world}")
        rank = dist.get_rank()
        timeout = group_timeout(timeout_s)
        self._sp_group: Optional[dist.ProcessGroup] = None
        for start in range(0, world, sequence_parallel_size):
            ranks = list(range(start, start + sequence_parallel_size))
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                self._sp_group = group
        self._sdp_group = dist.new_group(list(range(world)), timeout=timeout)

    def initialize_sequence_parallel(self, sequence_parallel_size: int) -> None:
        """Present because DeepSpeed recognises a sequence-parallel mpu by this method; the groups
        are built in the constructor, so calling it is an error."""
        raise RuntimeError("SequenceParallelMPU builds its groups in __init__")

    def get_sequence_parallel_group(self) -> dist.ProcessGroup:
        return self._sp_group

    def get_sequence_data_parallel_group(self) -> dist.ProcessGroup:
        return self._sdp_group

    def get_sequence_parallel_world_size(self) -> int:
        return dist.get_world_size(self._sp_group)

    def get_sequence_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self._sdp_group)

    def get_sequence_parallel_rank(self) -> int:
        return dist.get_rank(self._sp_group)

    def get_sequence_data_parallel_rank(self) -> int:
        return dist.get_rank(self._sdp_group)

    # DeepSpeed aliases model parallelism to sequence parallelism for this kind of mpu.
    get_model_parallel_rank = get_sequence_parallel_rank
    get_model_parallel_world_size = get_sequence_parallel_world_size
    get_model_parallel_group = get_sequence_parallel_group


def _to_bshd(x: Tensor, batch_dim_idx: int) -> Tensor:
    if batch_dim_idx == 0:
        return x
    if batch_dim_idx == 1:
        return x.transpose(0, 1)
    raise ValueError(f"batch_dim_idx must be 0 ([b, s, h, d]) or 1 ([s, b, h, d]), got {batch_dim_idx}")


class _GroupResolver(torch.nn.Module):
    def __init__(self, sequence_process_group: Any) -> None:
        super().__init__()
        self._group_source = sequence_process_group
        self._group: Optional[dist.ProcessGroup] = None
        self._resolved = False

    @property
    def group(self) -> Optional[dist.ProcessGroup]:
        """The sequence-parallel process group (resolved from the mpu / engine on first use)."""
        if not self._resolved:
            self._group = resolve_sequence_parallel_group(self._group_source)
            self._resolved = True
        return self._group


class SeqparDistributedAttention(_GroupResolver):
    """Drop-in for ``deepspeed.sequence.layer.DistributedAttention`` running a seqpar strategy.

    ``SeqparDistributedAttention(None, sp_group)`` is called like DeepSpeed's module:
    ``attn(query, key, value, batch_dim_idx)`` with this rank's tokens ``[b, s/p, h, d]``
    (``batch_dim_idx=0``) or ``[s/p, b, h, d]`` (``batch_dim_idx=1``); K/V may have fewer heads
    (GQA); returns the output in the input's layout. seqpar computes ``softmax(q k^T * scale) v``
    itself (``causal``, ``scale``), so the ``local_attention`` of DeepSpeed's signature is not
    used (a warning says so if one is given); ``scatter_idx``/``gather_idx``/``sp_stream`` are
    accepted for the same reason. ``num_kv_heads`` (as in DeepSpeed: the KV head count of ``key``,
    which DeepSpeed otherwise reads off ``key.shape[2]``), when given, is checked: key / value
    whose head axis (dim 2) holds another count, or a query whose head count is not a multiple of
    it, raise a ValueError naming the expected and received shapes (a [b, h, s, d] tensor passed
    as [b, s, h, d] is the usual cause). ``layout`` is how the tokens are split over the group:
    ``"contiguous"`` (what DeepSpeed's data loaders produce), or ``"zigzag"``/``"striped"``
    (or a ``seqpar.BalancedLayout``) with data sharded by ``seqpar.shard``.

    Masks (docs/masks.md), honoured exactly by every strategy and layout: ``window`` (a causal
    sliding window: query i sees keys i - window < j <= i) and ``softcap`` (scores become
    softcap * tanh(s / softcap)) are fixed per layer; each call may pass ``cu_seqlens=`` (the
    GLOBAL document boundaries ``[0, e_1, ..., T_global]`` of one packed row, so the batch must
    be 1, the same tensor on every rank) and ``sinks=`` (per-head logits [Hq], usually the
    model's ``nn.Parameter``; each rank gets its part of the gradient and ZeRO's reduction over
    the sequence-data-parallel group adds them). Any other extra argument raises a TypeError
    naming it: nothing is ignored.
    """

    def __init__(self, local_attention: Optional[torch.nn.Module] = None, sequence_process_group: Any = None,
                 scatter_idx: int = 2, gather_idx: int = 0, sp_stream: Any = None, num_kv_heads: Optional[int] = None,
                 *, strategy: str = "ulysses", layout: str = "contiguous", causal: bool = True,
                 scale: Optional[float] = None, backend: str = "auto", window: Optional[int] = None,
                 softcap: Optional[float] = None) -> None:
        super().__init__(sequence_process_group)
        name = type(self).__name__
        try:  # at construction, so that a bad layer fails when the model is built
            window, softcap = check_window(window), check_softcap(softcap)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{name}: {e}") from None
        if window is not None and not causal:
            raise ValueError(f"{name}(window={window}, causal=False): a sliding window needs causal=True "
                             f"(query i sees keys i - window < j <= i); non-causal windows are not supported")
        if local_attention is not None:
            warnings.warn("SeqparDistributedAttention computes attention with seqpar; local_attention is not used",
                          stacklevel=2)
        self.strategy = check_choice("strategy", strategy, SOFTMAX_STRATEGIES)
        if self.strategy == "usp":
            raise ValueError("strategy 'usp' needs seqpar.comm.UspGroups; DeepSpeed has one sequence-parallel group")
        self.layout = layout
        self.causal = causal
        self.scale = scale
        self.backend = backend
        self.num_kv_heads = num_kv_heads
        self.window = window
        self.softcap = softcap

    def forward(self, query: Tensor, key: Tensor, value: Tensor, batch_dim_idx: int, rotary_pos_emb: Any = None,
                *args: Any, cu_seqlens: Optional[Tensor] = None, sinks: Optional[Tensor] = None,
                **kwargs: Any) -> Tensor:
        """Attention of this rank's queries over the whole sequence; same shape and layout as ``query``.

        ``cu_seqlens`` (keyword): global document boundaries of one packed row (batch 1);
        ``sinks`` (keyword): per-head sink logits [Hq]. Other extra arguments raise a TypeError."""
        import seqpar

        name = type(self).__name__
        if rotary_pos_emb is not None:
            raise NotImplementedError("apply RoPE before the call, with the global positions of the local tokens "
                                      "(seqpar.local_positions)")
        _refuse_extra_arguments(f"{name}.forward", args, kwargs, accepted="cu_seqlens=, sinks=")
        q, k, v = (_to_bshd(t, batch_dim_idx) for t in (query, key, value))
        if cu_seqlens is not None and q.dim() == 4 and q.shape[0] != 1:
            raise ValueError(f"{name}: cu_seqlens gives the documents of ONE packed row, but the query "
                             f"{_LAYOUTS[batch_dim_idx]} (batch_dim_idx={batch_dim_idx}) has batch size "
                             f"{q.shape[0]} (shape {tuple(query.shape)}); pack the batch into one row")
        if sinks is not None:
            _check_gathered(name, "sinks", sinks)
        if self.num_kv_heads is not None:
            check_head_axis(name, _LAYOUTS[batch_dim_idx], query, key, value, num_heads=None,
                            num_kv_heads=self.num_kv_heads)
        o = seqpar.attention(q, k, v, strategy=self.strategy, layout=self.layout, group=self.group,
                             causal=self.causal, scale=self.scale, backend=self.backend, cu_seqlens=cu_seqlens,
                             window=self.window, softcap=self.softcap, sinks=sinks)
        return o if batch_dim_idx == 0 else o.transpose(0, 1)


def _refuse_extra_arguments(where: str, args: tuple, kwargs: dict, accepted: str) -> None:
    """Raise a TypeError naming every extra positional / keyword argument (none is ignored)."""
    if not args and not kwargs:
        return
    parts = []
    if args:
        parts.append(f"{len(args)} extra positional argument(s) after rotary_pos_emb "
                     f"({', '.join(type(a).__name__ for a in args)})")
    if kwargs:
        parts.append(f"keyword argument(s) {', '.join(sorted(kwargs))}")
    hint = ""
    if any(name in kwargs for name in ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")):
        hint = ("; for packed documents pass cu_seqlens= (GLOBAL boundaries of the packed row, the same on every "
                "rank), one tensor for queries and keys")
    elif any(name in kwargs for name in ("attention_mask", "attn_mask", "mask", "is_causal", "causal")):
        hint = "; the mask is causal=, window= (constructor) and cu_seqlens= (call): arbitrary masks are not supported"
    raise TypeError(f"{where} got {' and '.join(parts)}; seqpar computes the attention itself and accepts only "
                    f"{accepted} besides query, key, value, batch_dim_idx (nothing is silently ignored){hint}")


def _check_gathered(where: str, what: str, tensor: Any) -> None:
    """A ZeRO-3 partitioned parameter that was not gathered for this forward has 0 elements: say so."""
    if isinstance(tensor, Tensor) and tensor.numel() == 0 and hasattr(tensor, "ds_id"):
        raise ValueError(f"{where}: {what} is a ZeRO-3 partitioned parameter that is not gathered (ds_shape "
                         f"{tuple(getattr(tensor, 'ds_shape', ()))}, local shape {tuple(tensor.shape)}). Make it a "
                         f"parameter of the module whose forward calls the attention (ZeRO-3 gathers a module's "
                         f"parameters for its forward), or use deepspeed.zero.GatheredParameters / "
                         f"register_external_parameter")


class SeqparDistributedLinearAttention(_GroupResolver):
    """Causal linear attention (``lasp2`` or ``lasp1``) of this rank's tokens over DeepSpeed's
    sequence-parallel group, with DistributedAttention's call shape.

    ``attn(query, key, value, batch_dim_idx, g=None, initial_state=None, output_final_state=False,
    *, beta=None, cu_seqlens=None)``: q/k/v as for :class:`SeqparDistributedAttention` (feature
    maps already applied by the model; k and v with q's head count) and the gates of the family
    (see :func:`seqpar.linear_attention`), each this rank's tokens in the layout of the inputs
    (``[b, s/p, h, ...]`` for ``batch_dim_idx=0``, ``[s/p, b, h, ...]`` for 1):

    - ``g`` ``[b, s/p, h]``: a per-token log decay per head (Mamba2 / gated linear attention);
      ``[b, s/p, h, dk]``: per key channel (GLA);
    - ``beta`` ``[b, s/p, h]`` in (0, 1]: the delta rule (Gated DeltaNet with ``g [b, s/p, h]``,
      KDA with ``g [b, s/p, h, dk]``). The delta rule expects unit-norm q and k: normalise them,
      or build the module with ``use_qk_l2norm=True``;
    - the module's per-head constant log-decay ``g_gamma`` ``[h]`` (no gradient).

    Log gates must be <= 0. ``cu_seqlens`` (keyword): the GLOBAL document boundaries
    ``[0, e_1, ..., T_global]`` of one packed row (batch 1), the same tensor on every rank; the
    state resets at every document start, and ``initial_state`` / the final state are then one
    per document, ``[n_docs, h, dk, dv]``. Layouts: contiguous, zigzag or a
    ``seqpar.BalancedLayout`` (shard with ``seqpar.shard``). With ``output_final_state`` returns
    ``(o, final_state [b or n_docs, h, dk, dv])``.

    ``g_gamma`` is kept as given (a plain attribute, not a buffer, so that the engine's
    ``module.bfloat16()`` / ``half()`` cannot round it) and used in the compute dtype of each
    call: fp32, or fp64 for fp64 inputs. Give it in fp64 (``retnet_decay(h, dtype=torch.float64)``)
    for fp64 accuracy. When ``g_gamma`` is given its length is the head count: q / k / v whose
    head axis (dim 2) holds another count raise a ValueError naming both shapes.
    """

    def __init__(self, sequence_process_group: Any = None, *, strategy: str = "lasp2",
                 layout: Union[str, BalancedLayout] = "contiguous", g_gamma: Optional[Tensor] = None,
                 scale: Optional[float] = None, use_qk_l2norm: bool = False, backend: str = "auto") -> None:
        super().__init__(sequence_process_group)
        self.strategy = check_choice("linear strategy", strategy, LINEAR_STRATEGIES)
        if not isinstance(layout, BalancedLayout):
            check_choice("linear layout", layout, ("contiguous", "zigzag"))
        self.layout = layout
        self.g_gamma = g_gamma
        self.scale = scale
        self.use_qk_l2norm = use_qk_l2norm
        self.backend = backend

    def forward(self, query: Tensor, key: Tensor, value: Tensor, batch_dim_idx: int, g: Optional[Tensor] = None,
                initial_state: Optional[Tensor] = None, output_final_state: bool = False, *,
                beta: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None):
        """Causal linear attention; output in the input's layout (and the final state if asked)."""
        import seqpar

        name = type(self).__name__
        q, k, v = (_to_bshd(t, batch_dim_idx) for t in (query, key, value))
        if self.g_gamma is not None and self.g_gamma.dim() == 1:  # g_gamma [h] gives the head count
            n = self.g_gamma.shape[0]
            check_head_axis(name, _LAYOUTS[batch_dim_idx], query, key, value, num_heads=n, num_kv_heads=n)
        _check_gate_shape(name, "g", g, query, batch_dim_idx, per_key_ok=True)
        _check_gate_shape(name, "beta", beta, query, batch_dim_idx, per_key_ok=False)
        if cu_seqlens is not None and q.dim() == 4 and q.shape[0] != 1:
            raise ValueError(f"{name}: cu_seqlens gives the documents of ONE packed row, but the query "
                             f"{_LAYOUTS[batch_dim_idx]} (batch_dim_idx={batch_dim_idx}) has batch size "
                             f"{q.shape[0]} (shape {tuple(query.shape)}); pack the batch into one row")
        if batch_dim_idx == 1:
            g, beta = (None if t is None else t.transpose(0, 1) for t in (g, beta))
        g_gamma = None
        if self.g_gamma is not None:
            if self.g_gamma.device != q.device:  # moved once: a plain attribute does not follow .to(device)
                self.g_gamma = self.g_gamma.to(q.device)
            g_gamma = self.g_gamma.to(compute_dtype(q.dtype))
        o, state = seqpar.linear_attention(q, k, v, strategy=self.strategy, layout=self.layout, group=self.group,
                                           g=g, g_gamma=g_gamma, beta=beta, use_qk_l2norm=self.use_qk_l2norm,
                                           cu_seqlens=cu_seqlens, scale=self.scale, initial_state=initial_state,
                                           output_final_state=output_final_state, backend=self.backend)
        o = o if batch_dim_idx == 0 else o.transpose(0, 1)
        return (o, state) if output_final_state else o


def _check_gate_shape(where: str, name: str, gate: Optional[Tensor], query: Tensor, batch_dim_idx: int,
                      per_key_ok: bool) -> None:
    """A ValueError naming both shapes unless ``gate`` is ``query``'s [b, s, h] (or, with
    ``per_key_ok``, [b, s, h, dk]) in the layout of ``batch_dim_idx``."""
    if gate is None:
        return
    if not isinstance(gate, Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor or None, got {type(gate).__name__}")
    lead = tuple(query.shape[:3])
    allowed = [lead] + ([lead + tuple(query.shape[3:])] if per_key_ok else [])
    if tuple(gate.shape) not in allowed:
        axes = _LAYOUTS[batch_dim_idx][:-4] + "]"
        kinds = f"{axes} or {_LAYOUTS[batch_dim_idx].replace('d]', 'dk]')}" if per_key_ok else axes
        raise ValueError(f"{where}: {name} must be {kinds} like the query {_LAYOUTS[batch_dim_idx]} "
                         f"(batch_dim_idx={batch_dim_idx}), i.e. {' or '.join(str(a) for a in allowed)}; got "
                         f"{tuple(gate.shape)} for query {tuple(query.shape)}")
