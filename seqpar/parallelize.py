"""Turn an existing model into a sequence-parallel one, torchtitan style: plain functions.

- :func:`parallelize_model` sets the ``context_parallel`` field of every attention module (and
  of the model, for RoPE positions) so that the layers run :func:`seqpar.attention` /
  :func:`seqpar.linear_attention` over the sequence-parallel group, with one strategy per kind
  of layer and one token layout for the whole model. It is explicit and opt-in; nothing is
  patched, and :func:`unparallelize_model` switches back.
- :func:`shard_batch` cuts the global batch into this rank's tokens, labels and positions.
- :func:`build_mesh` / :func:`apply_fsdp`: the ("dp", "sp") DeviceMesh and FSDP2 over its
  flattened ranks (what the trainer uses): gradients are reduce-scattered and SUMMED during
  backward, so each rank's loss must be its share of the global mean (below).
- :func:`sequence_parallel_loss` divides the sum of the local token losses by the global token
  count. :func:`token_loss_sum` divided by a count the data knows is the same share without a
  collective. For loops that keep replicated parameters instead of FSDP2,
  :func:`sync_gradients` sums the partial gradients in flat buckets (the loss to log can ride on
  it: ``sync_gradients(..., extra=...)``), so that the update equals the one of the unsharded
  model on the whole global batch.

Why a SUM over the sequence-parallel group: every rank holds the same (replicated) parameters
and computes ``loss_r = sum of its tokens' losses / N`` where N counts the tokens of the whole
global batch. The objective is ``L = sum_r loss_r``. Backward on rank r gives the gradient of
L with respect to the parameter *uses* on rank r (the attention collectives carry the
cross-rank terms back), so the full gradient is the sum over every rank of the world: an
all-reduce SUM over ``sp``, then over ``dp``. (With per-replica means instead, that last step
is the usual AVG over ``dp``; the two agree when replicas count the same number of tokens.)
Gradient clipping after the reduction (FSDP2's or :func:`sync_gradients`') sees the true global
norm on every rank.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from seqpar.comm.groups import (SequenceParallelGroups, UspGroups, build_usp_groups, group_rank_and_size,
                                 sp_group_of)
from seqpar.config import SequenceParallelConfig, check_compatible
from seqpar.layout import check_global_length, global_positions
from seqpar.model import ContextParallel


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if getattr(m, "kind", None) in ("softmax", "linear")
            and hasattr(m, "context_parallel")]


def parallelize_model(model: nn.Module, config: SequenceParallelConfig, group: Any, *,
                      validate: bool | str | None = "cached") -> nn.Module:
    """Switch ``model``'s attention layers to sequence parallelism over ``group`` (in place).

    ``group`` is the sequence-parallel ProcessGroup of this rank, or :class:`UspGroups` when
    ``config.softmax_strategy == "usp"``. Returns the model. Raises ValueError when the model's
    layers, the strategies and the layout do not fit together, or the group size is not
    ``config.sp_size``. ``validate`` is given to every attention call (see ``seqpar.attention``):
    "cached" (default) checks that the ranks agree on the first call of each signature,
    "always" (True) on every call, "off" (False) never.
    """
    model_config = getattr(model, "config", None)
    if model_config is not None:
        check_compatible(model_config, config)
    _, size = group_rank_and_size(group) if group is not None else (0, 1)
    if size != config.sp_size:
        raise ValueError(f"the group has {size} ranks but config.sp_size is {config.sp_size}")
    modules = _attention_modules(model)
    if not modules:
        raise ValueError("the model has no attention module with a 'context_parallel' field")
    has_softmax = any(m.kind == "softmax" for m in modules)
    if config.softmax_strategy == "usp" and has_softmax:
        if not isinstance(group, UspGroups):
            raise ValueError("softmax_strategy 'usp' needs a UspGroups (see seqpar.comm.build_usp_groups)")
        if group.ulysses_size != config.ulysses_size:
            raise ValueError(f"the UspGroups have ulysses_size {group.ulysses_size}, config says {config.ulysses_size}")
    if config.layout == "striped" and any(m.kind == "linear" for m in modules):
        raise ValueError("layout 'striped' cannot be used with linear-attention layers")
    sp_group = sp_group_of(group)
    for m in modules:
        if m.kind == "softmax":
            m.context_parallel = ContextParallel(group, config.layout, config.softmax_strategy, config.backend,
                                                 validate)
        else:
            m.context_parallel = ContextParallel(sp_group, config.layout, config.linear_strategy, config.backend,
                                                 validate)
    if hasattr(model, "context_parallel"):
        model.context_parallel = ContextParallel(sp_group, config.layout, "positions", config.backend)
    return model


def unparallelize_model(model: nn.Module) -> nn.Module:
    """Undo :func:`parallelize_model`: every layer mixes its tokens on one device again."""
    for m in _attention_modules(model):
        m.context_parallel = None
    if hasattr(model, "context_parallel"):
        model.context_parallel = None
    return model


def make_groups(config: SequenceParallelConfig, timeout_s: float | None = None,
                device_type: str = "cpu") -> tuple[SequenceParallelGroups, Any]:
    """Data-parallel x sequence-parallel groups of the world as a ("dp", "sp") DeviceMesh
    (:func:`seqpar.comm.make_device_mesh`), and the group to give :func:`parallelize_model` (the
    sp group, or its :class:`UspGroups` for ``usp``). Every group gets ``timeout_s`` (default
    ``seqpar.comm.groups.DEFAULT_TIMEOUT_S``).

    Collective over the whole world: every rank calls it with the same config.
    """
    from seqpar.comm.groups import make_device_mesh

    groups = make_device_mesh(config.sp_size, device_type, timeout_s)
    attn_group: Any = groups.sp
    if config.softmax_strategy == "usp" and dist.is_initialized():
        mine = None
        for d in range(groups.dp_size):  # build_usp_groups is collective over the world
            ranks = list(range(d * config.sp_size, (d + 1) * config.sp_size))
            usp = build_usp_groups(ranks, config.ulysses_size, timeout_s=timeout_s)  # every rank makes the same new_group calls
            if d == groups.dp_rank:
                mine = usp
        attn_group = mine
    return groups, attn_group


class ShardedBatch(NamedTuple):
    """This rank's share of a batch: tokens and labels [B, T_local], global positions [T_local]."""

    tokens: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor


def build_mesh(dp: int, sp: int, device_type: str, timeout_s: float | None = None) -> Any:
    """The ("dp", "sp") DeviceMesh of the whole world (dp x sp must be the world size). Collective.
    The trainer uses :func:`seqpar.comm.make_device_mesh`, which also gives the groups and the
    1-D mesh FSDP2 shards over."""
    from seqpar.comm.groups import make_device_mesh

    world = dist.get_world_size() if dist.is_initialized() else 1
    if dp * sp != world:
        raise ValueError(f"dp {dp} x sp {sp} = {dp * sp} ranks, but the world has {world}")
    return make_device_mesh(sp, device_type, timeout_s).mesh


def fsdp_mesh(mesh: Any) -> Any:
    """The 1-D mesh FSDP2 shards over: ``mesh`` itself when 1-D, else its ("dp", "sp") axes
    flattened into one ("dp_sp"), as torchtitan does for context parallelism."""
    if mesh.ndim == 1:
        return mesh
    names = tuple(mesh.mesh_dim_names or ())
    if names != ("dp", "sp"):
        raise ValueError(f"expected a 1-D mesh or one with axes ('dp', 'sp'), got axes {names}")
    return mesh["dp", "sp"]._flatten("dp_sp")


#: A decoder layer with fewer parameters than this is not an FSDP2 unit of its own (its
#: parameters travel with the root's): below ~16M parameters per-layer gathers cost more in
#: collective latency than they save in memory (the tiny model on 2 gloo ranks: 0.10 s a step
#: with per-layer units against 0.06 s with one unit).
MIN_UNIT_PARAMS = 1 << 24


def apply_fsdp(model: nn.Module, mesh: Any, *, mixed_precision: bool = False,
               reshard_after_forward: bool = True, min_unit_params: int = MIN_UNIT_PARAMS) -> nn.Module:
    """Shard ``model``'s parameters, gradients and optimiser state with FSDP2 (``fully_shard``)
    over every rank of ``mesh`` (1-D, or ("dp", "sp") flattened: sequence-parallel ranks hold
    different tokens of the same sequences, so they are data-parallel for the parameters).

    Each decoder layer (``model.layers``) of at least ``min_unit_params`` parameters is one FSDP
    unit (gathered just before it runs, freed after unless ``reshard_after_forward`` is False);
    the rest (embedding, norm, head, and small layers) are the root's unit, gathered in forward
    and kept until backward is done.
    Gradients are reduce-scattered during backward, SUMMED (divide factor 1): the trainer's loss
    on each rank is already its share of the global mean (see the module docstring).
    ``mixed_precision``: bf16 parameters in forward / backward, fp32 gradient reduction and fp32
    master weights (for fp32 models on GPU). Returns the model (now an FSDPModule)."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    shard_over = fsdp_mesh(mesh)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
        else MixedPrecisionPolicy()
    layers = [layer for layer in getattr(model, "layers", ())
              if sum(p.numel() for p in layer.parameters()) >= min_unit_params]
    for i, layer in enumerate(layers):
        # the last layer's parameters are needed again at once by backward: keep them gathered
        fully_shard(layer, mesh=shard_over, mp_policy=policy,
                    reshard_after_forward=reshard_after_forward and i < len(layers) - 1)
    # the root's unit (embedding, head, norm, small layers) is needed again at once by backward: kept
    # gathered from forward to backward (torch's own choice for a root left on auto), so that
    # backward starts without an all-gather
    fully_shard(model, mesh=shard_over, mp_policy=policy, reshard_after_forward=False)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
    return model


def shard_batch(tokens: torch.Tensor, labels: torch.Tensor, layout: str, group: Any) -> ShardedBatch:
    """Cut the full ``tokens`` / ``labels`` [B, T] (the same on every rank of ``group``) into
    this rank's tokens for ``layout``, without communication. ``group`` None means one rank."""
    for name, t in (("tokens", tokens), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tokens.shape != labels.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)} and labels {tuple(labels.shape)} differ in shape")
    if tokens.dim() != 2:
        raise ValueError(f"tokens and labels must be [B, T], got {tokens.dim()} dims with shape {tuple(tokens.shape)}")
    rank, world = group_rank_and_size(group) if group is not None else (0, 1)
    local_len = check_global_length(layout, tokens.shape[1], world)
    positions = global_positions(layout, rank, world, local_len, device=tokens.device)
    return ShardedBatch(tokens.index_select(1, positions), labels.index_select(1, positions), positions)


def _all_reduce_sum(t: torch.Tensor, groups: SequenceParallelGroups | None, timer: Any = None) -> torch.Tensor:
    """Sum ``t`` over every rank of the dp x sp world, in place (one collective when the
    groups span the default group, else over sp then dp). ``timer`` (a
    :class:`seqpar.model.PhaseTimer`) adds the time to its "comm" phase."""
    if groups is None or (groups.sp_size == 1 and groups.dp_size == 1):
        return t
    if timer is not None and timer.enabled:
        with timer.phase("comm"):
            return _all_reduce_sum(t, groups)
    if groups.sp_size > 1 and groups.dp_size > 1 and dist.get_world_size() == groups.sp_size * groups.dp_size:
        dist.all_reduce(t)
        return t
    if groups.sp_size > 1:
        dist.all_reduce(t, group=groups.sp)
    if groups.dp_size > 1:
        dist.all_reduce(t, group=groups.dp)
    return t


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Sum of the cross-entropy losses of this rank's tokens (fp32 for half-precision logits);
    no communication. Divided by the token count of the whole global batch it is the share of
    :func:`sequence_parallel_loss`."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return nn.functional.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=ignore_index,
                                       reduction="sum")


def sequence_parallel_loss(logits: torch.Tensor, labels: torch.Tensor, groups: SequenceParallelGroups | None,
                           ignore_index: int = -100, *, timer: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's share of the loss, the global mean loss for logging).

    The share is sum(local token losses) / (tokens of the whole global batch), so that summing
    gradients over every rank (:func:`sync_gradients`) gives the gradient of the global mean.
    The second value is detached and all-reduced: the same number on every rank. ``timer``: see
    :func:`sync_gradients`.
    """
    local_sum = token_loss_sum(logits, labels, ignore_index)
    count = (labels != ignore_index).sum().to(torch.float64)
    stats = _all_reduce_sum(torch.stack([local_sum.detach().to(torch.float64), count]), groups, timer)
    total = stats[1].clamp_min(1.0)
    share = local_sum / total.to(local_sum.dtype)
    return share, (stats[0] / total).detach()


def sync_gradients(params: Any, groups: SequenceParallelGroups | None, bucket_bytes: int = 64 << 20, *,
                   extra: torch.Tensor | None = None, timer: Any = None) -> torch.Tensor | None:
    """Sum the gradients of replicated ``params`` over sp then dp (see the module docstring),
    in flat buckets. Parameters without a gradient are given zeros, so every rank takes part in
    the same collectives.

    ``extra``: a few more numbers to sum over the same ranks (the trainer's loss sum), a 1-D
    tensor. They travel in the last bucket of the gradients in fp64 (or else fp32) -- no
    collective of their own -- or alone when there is no such bucket; returned summed, in
    ``extra``'s dtype (None without ``extra``). ``timer`` (a :class:`seqpar.model.PhaseTimer`)
    adds the time of the collectives to its "comm" phase."""
    if groups is None or (groups.sp_size == 1 and groups.dp_size == 1):
        return extra
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    carrier = next((dt for dt in (torch.float64, torch.float32) if dt in by_dtype), None)
    if extra is not None and carrier is not None:
        by_dtype[carrier].append(extra.to(carrier, copy=True))  # reduced with the carrier's last bucket
    bucket: list[torch.Tensor] = []
    size = 0

    def flush() -> None:
        nonlocal bucket, size
        if not bucket:
            return
        flat = _all_reduce_sum(_flatten_dense_tensors(bucket), groups, timer)
        for g, new in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            g.copy_(new)
        bucket, size = [], 0

    for grads in by_dtype.values():
        for g in grads:
            bucket.append(g)
            size += g.numel() * g.element_size()
            if size >= bucket_bytes:
                flush()
        flush()
    if extra is None:
        return None
    if carrier is None:
        return _all_reduce_sum(extra.clone(), groups, timer)
    return by_dtype[carrier][-1].to(extra.dtype)
