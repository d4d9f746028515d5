"""DeepSpeed integration: seqpar attention on DeepSpeed's sequence-parallel group.

DeepSpeed-Ulysses is ``deepspeed.sequence.layer.DistributedAttention(local_attn, sp_group)``,
called as ``attn(query, key, value, batch_dim_idx)`` on this rank's contiguous slice of the
sequence, ``[b, s/p, h, d]`` (``batch_dim_idx=0``) or ``[s/p, b, h, d]`` (``batch_dim_idx=1``).
:class:`SeqparDistributedAttention` takes the same call and runs a seqpar softmax strategy
(ulysses, ring, allgather; zigzag / striped layouts for load-balanced causal rings) on the same
group; :class:`SeqparDistributedLinearAttention` runs linear attention (LASP-2 / LASP).

The group is the one DeepSpeed trains with: pass a ``ProcessGroup``, the ``mpu`` given to
``deepspeed.initialize(..., mpu=mpu)`` or the engine (anything with
``get_sequence_parallel_group()``); it is looked up at the first forward, so a model can be
built before ``deepspeed.initialize``. :class:`SequenceParallelMPU` builds such an mpu (the
same groups and methods as ``deepspeed.runtime.sequence_parallel.parallel_state_sp``, held by an
object instead of module globals): ZeRO then partitions and reduces over the sequence-data
parallel group and divides gradients by the pure data-parallel size, so each rank's loss must be
its share of the global mean (sum of local token losses / global token count).
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from seqpar.comm.groups import group_timeout
from seqpar.integrations._common import LINEAR_STRATEGIES, SOFTMAX_STRATEGIES, check_choice
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
    with data sharded by ``seqpar.shard``.
    """

    def __init__(self, local_attention: Optional[torch.nn.Module] = None, sequence_process_group: Any = None,
                 scatter_idx: int = 2, gather_idx: int = 0, sp_stream: Any = None, num_kv_heads: Optional[int] = None,
                 *, strategy: str = "ulysses", layout: str = "contiguous", causal: bool = True,
                 scale: Optional[float] = None, backend: str = "auto") -> None:
        super().__init__(sequence_process_group)
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

    def forward(self, query: Tensor, key: Tensor, value: Tensor, batch_dim_idx: int, rotary_pos_emb: Any = None,
                *args: Any, **kwargs: Any) -> Tensor:
        """Attention of this rank's queries over the whole sequence; same shape and layout as ``query``."""
        import seqpar

        if rotary_pos_emb is not None:
            raise NotImplementedError("apply RoPE before the call, with the global positions of the local tokens "
                                      "(seqpar.local_positions)")
        if args or kwargs:
            raise TypeError(f"unexpected extra arguments for seqpar attention: {len(args)} positional, {sorted(kwargs)}")
        q, k, v = (_to_bshd(t, batch_dim_idx) for t in (query, key, value))
        if self.num_kv_heads is not None:
            check_head_axis(type(self).__name__, _LAYOUTS[batch_dim_idx], query, key, value, num_heads=None,
                            num_kv_heads=self.num_kv_heads)
        o = seqpar.attention(q, k, v, strategy=self.strategy, layout=self.layout, group=self.group,
                             causal=self.causal, scale=self.scale, backend=self.backend)
        return o if batch_dim_idx == 0 else o.transpose(0, 1)


class SeqparDistributedLinearAttention(_GroupResolver):
    """Causal linear attention (``lasp2`` or ``lasp1``) of this rank's tokens over DeepSpeed's
    sequence-parallel group, with DistributedAttention's call shape.

    ``attn(query, key, value, batch_dim_idx, g=None)``: q/k/v as for
    :class:`SeqparDistributedAttention` (feature maps already applied by the model), optional
    per-token log-decay ``g`` ``[b, s/p, h]`` (or ``[s/p, b, h]``) and the module's per-head
    constant log-decay ``g_gamma`` ``[h]``. Layouts: contiguous or zigzag. With
    ``output_final_state`` returns ``(o, final_state [b, h, dk, dv])``.

    ``g_gamma`` is kept as given (a plain attribute, not a buffer, so that the engine's
    ``module.bfloat16()`` / ``half()`` cannot round it) and used in the compute dtype of each
    call: fp32, or fp64 for fp64 inputs. Give it in fp64 (``retnet_decay(h, dtype=torch.float64)``)
    for fp64 accuracy. When ``g_gamma`` is given its length is the head count: q / k / v whose
    head axis (dim 2) holds another count raise a ValueError naming both shapes.
    """

    def __init__(self, sequence_process_group: Any = None, *, strategy: str = "lasp2", layout: str = "contiguous",
                 g_gamma: Optional[Tensor] = None, scale: Optional[float] = None, backend: str = "auto") -> None:
        super().__init__(sequence_process_group)
        self.strategy = check_choice("linear strategy", strategy, LINEAR_STRATEGIES)
        self.layout = check_choice("linear layout", layout, ("contiguous", "zigzag"))
        self.g_gamma = g_gamma
        self.scale = scale
        self.backend = backend

    def forward(self, query: Tensor, key: Tensor, value: Tensor, batch_dim_idx: int, g: Optional[Tensor] = None,
                initial_state: Optional[Tensor] = None, output_final_state: bool = False):
        """Causal linear attention; output in the input's layout (and the final state if asked)."""
        import seqpar

        q, k, v = (_to_bshd(t, batch_dim_idx) for t in (query, key, value))
        if self.g_gamma is not None and self.g_gamma.dim() == 1:  # g_gamma [h] gives the head count
            n = self.g_gamma.shape[0]
            check_head_axis(type(self).__name__, _LAYOUTS[batch_dim_idx], query, key, value, num_heads=n,
                            num_kv_heads=n)
        if g is not None and batch_dim_idx == 1:
            g = g.transpose(0, 1)
        g_gamma = None
        if self.g_gamma is not None:
            if self.g_gamma.device != q.device:  # moved once: a plain attribute does not follow .to(device)
                self.g_gamma = self.g_gamma.to(q.device)
            g_gamma = self.g_gamma.to(compute_dtype(q.dtype))
        o, state = seqpar.linear_attention(q, k, v, strategy=self.strategy, layout=self.layout, group=self.group,
                                           g=g, g_gamma=g_gamma, scale=self.scale, initial_state=initial_state,
                                           output_final_state=output_final_state, backend=self.backend)
        o = o if batch_dim_idx == 0 else o.transpose(0, 1)
        return (o, state) if output_final_state else o
