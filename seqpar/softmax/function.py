"""The autograd Function shared by every softmax strategy, and the plan that parameterises it.

Every strategy is one :class:`ParallelPlan`: an optional Ulysses head exchange (all-to-all
[B, T/U, H, D] -> [B, T, H/U, D] over a group of U ranks) followed by the driver over a K/V source
(a ring of R ranks, or an all-gather). ring / allgather are U = 1; ulysses is R = 1; usp is both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from seqpar.comm import all_to_all, exclusive_use
from seqpar.kernels import compute_dtype
from seqpar.kernels.softmax import output_delta
from seqpar.layout import Segment
from seqpar.masks import AttentionMask
from seqpar.softmax.driver import attention_backward, attention_forward
from seqpar.softmax.sources import GatheredKV, KVSource, RingKV


@dataclass(frozen=True)
class ParallelPlan:
    """Everything the Function needs besides q, k, v (built and validated by ``seqpar.attention``).

    ``q_segments``: global positions of the tokens this rank holds after the head exchange.
    ``segments_of_source[i]``: the same for rank i of ``kv_group``. ``kv_repeat`` > 1 only for the
    Ulysses fallback when the KV heads do not divide over the Ulysses group. ``token_order``: the
    local token indices that put the head-sharded tokens (rank-major after the all-to-all) into the
    order of ``q_segments`` (sorted by global position), ``token_inverse`` its inverse; both None
    when the rank-major order is kept.
    """

    mask: AttentionMask
    scale: float
    backend: str
    ulysses_group: dist.ProcessGroup | None
    ulysses_size: int
    kv_repeat: int
    kv_transport: str  # "ring" or "allgather"
    kv_group: dist.ProcessGroup | None
    kv_rank: int
    kv_size: int
    q_segments: Sequence[Segment]
    segments_of_source: Sequence[Sequence[Segment]]
    kv_head_groups: int
    token_order: torch.Tensor | None = None
    token_inverse: torch.Tensor | None = None
    softcap: float | None = None
    ring_steps: int | None = None  # K/V blocks the ring visits (None: all); fewer with a window
    q_heads: slice | None = None  # the query heads this rank computes after the head exchange
    # all-gather: ranges[r][s] = local key range [a, b) of rank s that rank r sees (None: none)
    kv_key_ranges: tuple[tuple[tuple[int, int] | None, ...], ...] | None = None
    # ring: per source rank, the local key range [a, b) the ring carries (None: whole blocks)
    ring_key_ranges: tuple[tuple[int, int], ...] | None = None

    @property
    def causal(self) -> bool:
        return self.mask.causal

    def comm_groups(self) -> tuple:
        """The groups this plan communicates on (None: the default group)."""
        return ((self.ulysses_group,) if self.ulysses_size > 1 else ()) + ((self.kv_group,) if self.kv_size > 1 else ())

    def kv_source(self, k: torch.Tensor, v: torch.Tensor) -> KVSource:
        if self.kv_transport == "allgather":
            return GatheredKV(k, v, self.kv_group, self.kv_rank, self.kv_size, self.segments_of_source,
                              self.kv_head_groups, self.kv_key_ranges)
        return RingKV(k, v, self.kv_group, self.kv_rank, self.kv_size, self.segments_of_source, self.ring_steps,
                      self.ring_key_ranges)

    # --- Ulysses head exchange (identity when ulysses_size == 1) ---------------------------------

    def _exchange(self, tensors: Sequence[torch.Tensor], scatter_dim: int, gather_dim: int) -> list[torch.Tensor]:
        if self.ulysses_size == 1:
            return list(tensors)
        handles = [all_to_all(t, self.ulysses_group, scatter_dim=scatter_dim, gather_dim=gather_dim)
                   for t in tensors]
        return [h.wait() for h in handles]

    @staticmethod
    def _reorder(x: torch.Tensor, index: torch.Tensor | None, dim: int) -> torch.Tensor:
        return x if index is None else x.index_select(dim, index)

    def to_head_shards(self, *xs: torch.Tensor) -> list[torch.Tensor]:
        """[B, T, H, D] token shards -> [B, U*T, H/U, D] head shards, tokens in ``q_segments`` order."""
        return [self._reorder(x, self.token_order, 1) for x in self._exchange(xs, scatter_dim=2, gather_dim=1)]

    def to_token_shards(self, *xs: torch.Tensor) -> list[torch.Tensor]:
        """Inverse of :meth:`to_head_shards`."""
        return self._exchange([self._reorder(x, self.token_inverse, 1) for x in xs], scatter_dim=1, gather_dim=2)

    def lse_to_token_shards(self, lse: torch.Tensor) -> torch.Tensor:
        """[B, H/U, U*T] (``q_segments`` order) -> [B, H, T]."""
        return self._exchange([self._reorder(lse, self.token_inverse, 2)], scatter_dim=2, gather_dim=1)[0]

    def lse_to_head_shards(self, lse: torch.Tensor) -> torch.Tensor:
        """[B, H, T] -> [B, H/U, U*T] (``q_segments`` order)."""
        return self._reorder(self._exchange([lse], scatter_dim=1, gather_dim=2)[0], self.token_order, 2)

    def expand_kv(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.kv_repeat == 1 else x.repeat_interleave(self.kv_repeat, dim=2)

    def reduce_kv_grad(self, grad: torch.Tensor) -> torch.Tensor:
        if self.kv_repeat == 1:
            return grad
        b, t, h, d = grad.shape
        return grad.view(b, t, h // self.kv_repeat, self.kv_repeat, d).sum(dim=3)


def _apply_sinks(o: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Add one term exp(sink_h) to every row's softmax denominator: lse' = logaddexp(lse, sink),
    o' = o * exp(lse - lse'). o [B, T, H, D], lse [B, H, T], sinks [H] (compute dtype)."""
    with_sink = torch.logaddexp(lse, sinks.view(1, -1, 1))
    return o * torch.exp(lse - with_sink).transpose(1, 2).unsqueeze(-1), with_sink


class SoftmaxContextParallel(torch.autograd.Function):
    """Exact softmax attention over a sequence-parallel group; returns (o, lse).

    ``sinks`` (optional [Hq]): per-head sink logits, one term exp(sink_h) in every row's
    denominator, added once after every block is merged; its gradient is this rank's part
    (the rows this rank computes), to be summed over the group like any replicated parameter's.
    ``lse_returned``: whether the caller hands lse on (``return_lse``), so that its gradient may
    be non-zero on some ranks and absent (None) on others."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None,
                plan: ParallelPlan, lse_returned: bool = False):
        ctx.set_materialize_grads(False)
        ctx.lse_returned = lse_returned
        # seqpar.attention holds the group (exclusive_use) over the agreement check and this forward
        q_h, k_h, v_h = plan.to_head_shards(q, plan.expand_kv(k), plan.expand_kv(v))
        o_h, lse_h = attention_forward(q_h, plan.kv_source(k_h, v_h), plan.q_segments, mask=plan.mask,
                                       scale=plan.scale, backend=plan.backend, softcap=plan.softcap)
        sinks_h = None
        if sinks is not None:
            sinks_h = sinks.detach()[plan.q_heads].to(lse_h.dtype)
            o_h, lse_h = _apply_sinks(o_h, lse_h, sinks_h)
        o_h = o_h.to(q.dtype)
        ctx.save_for_backward(q_h, k_h, v_h, o_h, lse_h, sinks_h)
        ctx.plan = plan
        ctx.sinks_meta = None if sinks is None else (sinks.shape, sinks.dtype)
        (o,) = plan.to_token_shards(o_h)
        return o, plan.lse_to_token_shards(lse_h)

    @staticmethod
    @once_differentiable
    def backward(ctx, do: torch.Tensor | None, dlse: torch.Tensor | None):
        with exclusive_use(*ctx.plan.comm_groups(), what="seqpar.attention (backward)"):
            return SoftmaxContextParallel._backward(ctx, do, dlse)

    @staticmethod
    def _backward(ctx, do: torch.Tensor | None, dlse: torch.Tensor | None):
        plan: ParallelPlan = ctx.plan
        q_h, k_h, v_h, o_h, lse_h, sinks_h = ctx.saved_tensors
        dtype = compute_dtype(q_h.dtype)
        # no early return when both grads are None: every rank must join the collectives below
        do_h = torch.zeros_like(o_h) if do is None else plan.to_head_shards(do.to(o_h.dtype))[0]
        if dlse is None and ctx.lse_returned and plan.ulysses_size > 1:
            # the lse gradient crosses ranks under Ulysses: a rank whose loss ignores lse joins
            # that exchange with zeros, or the ranks' collectives would pair up wrongly
            dlse = torch.zeros(do_h.shape[0], do_h.shape[2] * plan.ulysses_size, do_h.shape[1] // plan.ulysses_size,
                               dtype=dtype, device=do_h.device)
        if dlse is None and sinks_h is None:
            # delta = rowsum(o * do): the driver takes o itself (the fused backward computes delta
            # from it; other kernels get it computed once)
            delta, out = None, o_h
        else:
            # d lse / d s = p, which folds into dS = P * (dP - delta) as delta - dlse
            delta = output_delta(o_h, do_h)
            if dlse is not None:
                delta = delta - plan.lse_to_head_shards(dlse.to(dtype))
            delta = delta.contiguous()
            out = o_h if dlse is None else None  # o still has rowsum(o * do) = delta
        dsinks = None
        if sinks_h is not None:
            # the sink is a key with value 0: d sink_h = -sum over rows of p_sink * delta
            dsinks_h = -(torch.exp(sinks_h.view(1, -1, 1) - lse_h) * delta).sum(dim=(0, 2))
            shape, sinks_dtype = ctx.sinks_meta
            dsinks = torch.zeros(shape, dtype=dtype, device=dsinks_h.device)
            dsinks[plan.q_heads] = dsinks_h
            dsinks = dsinks.to(sinks_dtype)
        dq_h, dk_h, dv_h = attention_backward(do_h, q_h, lse_h, delta, plan.kv_source(k_h, v_h),
                                              plan.q_segments, mask=plan.mask, scale=plan.scale,
                                              backend=plan.backend, out=out, softcap=plan.softcap)
        out_dtype = q_h.dtype
        if plan.kv_repeat == 1:  # communicate the final grads in the input dtype
            dq_h, dk_h, dv_h = dq_h.to(out_dtype), dk_h.to(out_dtype), dv_h.to(out_dtype)
        dq, dk, dv = plan.to_token_shards(dq_h, dk_h, dv_h)
        dk, dv = plan.reduce_kv_grad(dk), plan.reduce_kv_grad(dv)
        return dq.to(out_dtype), dk.to(out_dtype), dv.to(out_dtype), dsinks, None, None
