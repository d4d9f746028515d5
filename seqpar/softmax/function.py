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

from seqpar.comm import all_to_all_many, exclusive_use
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
    # Ulysses: heads exchanged in this many groups, each overlapping the compute of another (1: all
    # at once; > 1 only without a ring / all-gather axis and with kv_repeat 1)
    head_groups: int = 1

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
    #
    # With ``head_groups`` G > 1 the heads of every rank are exchanged in G groups (group g: heads
    # g * H/(U G) .. of each rank's H/U), so that the transfer of group g+1 runs while group g is
    # computed, and group g's results travel back while group g+1 is: only the first group's
    # inputs and the last group's results wait on the network. A [B, T, H, D] tensor's group g is
    # the view x.unflatten(2, (U, G, -1))[:, :, :, g] = [B, T, U, H/(U G), D] (rank-major heads).

    def _heads(self, x: torch.Tensor, dim: int, g: int) -> torch.Tensor:
        """Group ``g`` of the heads on axis ``dim``, split per rank: [..., U, H/(U G), ...] (a view)."""
        return x.unflatten(dim, (self.ulysses_size, self.head_groups, -1)).select(dim + 1, g)

    def group_heads(self, g: int) -> slice:
        """The query heads (global indices) of head group ``g`` on this rank."""
        size = (self.q_heads.stop - self.q_heads.start) // self.head_groups
        return slice(self.q_heads.start + g * size, self.q_heads.start + (g + 1) * size)

    # Each exchange below is one all-to-all per dtype (``all_to_all_many``): q, k, v travel
    # together, o with its lse, dO with its lse gradient, and dq, dk, dv together.

    def send_to_head_shards(self, xs: Sequence[torch.Tensor], g: int, lse: torch.Tensor | None = None):
        """Issue the exchange of head group ``g`` of [B, T, H, D] token shards, and optionally of an
        lse (or its gradient) [B, H, T] with them (see :meth:`head_shards`)."""
        if self.ulysses_size == 1:
            return list(xs) + ([] if lse is None else [lse])
        tensors = [self._heads(x, 2, g) for x in xs]
        scatter, gather = [2] * len(xs), [1] * len(xs)
        if lse is not None:
            tensors.append(self._heads(lse, 1, g))
            scatter.append(1)
            gather.append(3)
        return all_to_all_many(tensors, self.ulysses_group, scatter_dims=scatter, gather_dims=gather)

    def head_shards(self, sent, with_lse: bool = False) -> list[torch.Tensor]:
        """[B, U*T, H/(U G), D] head shards of what :meth:`send_to_head_shards` sent (and, with
        ``with_lse``, the lse [B, H/(U G), U*T] last), tokens in ``q_segments`` order."""
        if self.ulysses_size == 1:
            return sent
        parts = sent.wait()
        tokens = parts[:-1] if with_lse else parts
        out = [self._reorder(x.flatten(2, 3), self.token_order, 1) for x in tokens]
        if with_lse:
            out.append(self._reorder(parts[-1].squeeze(1), self.token_order, 2))
        return out

    def send_to_token_shards(self, xs: Sequence[torch.Tensor], lse: torch.Tensor | None = None):
        """Issue the way back of one head group's [B, U*T, H/(U G), D] results (and optionally its
        lse [B, H/(U G), U*T]); :meth:`token_shards` puts them in place."""
        if self.ulysses_size == 1:
            return list(xs) + ([] if lse is None else [lse])
        tensors = [self._reorder(x, self.token_inverse, 1).unsqueeze(2) for x in xs]
        scatter, gather = [1] * len(xs), [2] * len(xs)
        if lse is not None:
            tensors.append(self._reorder(lse, self.token_inverse, 2).unsqueeze(1))
            scatter.append(3)
            gather.append(1)
        return all_to_all_many(tensors, self.ulysses_group, scatter_dims=scatter, gather_dims=gather)

    def token_shards(self, sent_per_group: Sequence, shapes: Sequence[torch.Size], with_lse: bool = False
                     ) -> list[torch.Tensor]:
        """Token shards [B, T, H, D] (and lse [B, H, T] last, with ``with_lse``) from every head
        group's :meth:`send_to_token_shards`, in group order; ``shapes``: the full shapes."""
        if self.ulysses_size == 1:
            return list(sent_per_group[0])
        head_dims = [2] * (len(shapes) - with_lse) + [1] * with_lse  # lse: [B, H, T]
        if self.head_groups == 1:  # [B, T, U, H/U, D] / [B, U, H/U, T]: no copy where the layout allows
            return [x.flatten(dim, dim + 1) for x, dim in zip(sent_per_group[0].wait(), head_dims)]
        outs = None
        for g, sent in enumerate(sent_per_group):
            parts = sent.wait()
            if outs is None:
                outs = [torch.empty(shape, dtype=p.dtype, device=p.device) for shape, p in zip(shapes, parts)]
            for out, part, dim in zip(outs, parts, head_dims):
                self._heads(out, dim, g).copy_(part)
        return outs

    @staticmethod
    def _reorder(x: torch.Tensor, index: torch.Tensor | None, dim: int) -> torch.Tensor:
        return x if index is None else x.index_select(dim, index)

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
        k, v = plan.expand_kv(k), plan.expand_kv(v)
        o_shape, lse_shape = q.shape[:3] + v.shape[3:], (q.shape[0], q.shape[2], q.shape[1])
        sent = plan.send_to_head_shards((q, k, v), 0)
        saved, back = [], []
        for g in range(plan.head_groups):  # one group without Ulysses head groups
            q_h, k_h, v_h = plan.head_shards(sent)
            if g + 1 < plan.head_groups:
                sent = plan.send_to_head_shards((q, k, v), g + 1)  # overlaps this group's compute
            o_h, lse_h = attention_forward(q_h, plan.kv_source(k_h, v_h), plan.q_segments, mask=plan.mask,
                                           scale=plan.scale, backend=plan.backend, softcap=plan.softcap)
            sinks_h = None
            if sinks is not None:
                sinks_h = sinks.detach()[plan.group_heads(g)].to(lse_h.dtype)
                o_h, lse_h = _apply_sinks(o_h, lse_h, sinks_h)
            o_h = o_h.to(q.dtype)
            saved += [q_h, k_h, v_h, o_h, lse_h, sinks_h]
            back.append(plan.send_to_token_shards([o_h], lse_h))
        ctx.save_for_backward(*saved)
        ctx.plan = plan
        ctx.shapes = (q.shape, k.shape, v.shape, lse_shape)
        ctx.sinks_meta = None if sinks is None else (sinks.shape, sinks.dtype)
        o, lse = plan.token_shards(back, [o_shape, lse_shape], with_lse=True)
        return o, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, do: torch.Tensor | None, dlse: torch.Tensor | None):
        with exclusive_use(*ctx.plan.comm_groups(), what="seqpar.attention (backward)"):
            return SoftmaxContextParallel._backward(ctx, do, dlse)

    @staticmethod
    def _backward(ctx, do: torch.Tensor | None, dlse: torch.Tensor | None):
        plan: ParallelPlan = ctx.plan
        saved = ctx.saved_tensors
        per_group = [saved[6 * g:6 * g + 6] for g in range(plan.head_groups)]
        q_shape, k_shape, v_shape, lse_shape = ctx.shapes
        in_dtype = saved[0].dtype
        dtype = compute_dtype(in_dtype)
        device = saved[0].device
        # no early return when both grads are None: every rank must join the collectives below
        if dlse is None and ctx.lse_returned and plan.ulysses_size > 1:
            # the lse gradient crosses ranks under Ulysses: a rank whose loss ignores lse joins
            # that exchange with zeros, or the ranks' collectives would pair up wrongly
            dlse = torch.zeros(lse_shape, dtype=dtype, device=device)
        do = None if do is None else do.to(saved[3].dtype)
        dlse = None if dlse is None else dlse.to(dtype)

        def send(g: int):  # dO and the lse gradient of head group g, in one exchange
            if do is None and dlse is None:
                return None
            return plan.send_to_head_shards([] if do is None else [do], g, lse=dlse)

        dsinks = None
        if ctx.sinks_meta is not None:
            dsinks = torch.zeros(ctx.sinks_meta[0], dtype=dtype, device=device)
        sent, back = send(0), []
        for g, (q_h, k_h, v_h, o_h, lse_h, sinks_h) in enumerate(per_group):
            parts = [] if sent is None else plan.head_shards(sent, with_lse=dlse is not None)
            do_h = torch.zeros_like(o_h) if do is None else parts[0]
            dlse_h = None if dlse is None else parts[-1]
            if g + 1 < plan.head_groups:
                sent = send(g + 1)  # overlaps this group's compute
            if dlse_h is None and sinks_h is None:
                # delta = rowsum(o * do): the driver takes o itself (the fused backward computes delta
                # from it; other kernels get it computed once)
                delta, out = None, o_h
            else:
                # d lse / d s = p, which folds into dS = P * (dP - delta) as delta - dlse
                delta = output_delta(o_h, do_h)
                if dlse_h is not None:
                    delta = delta - dlse_h
                delta = delta.contiguous()
                out = o_h if dlse_h is None else None  # o still has rowsum(o * do) = delta
            if sinks_h is not None:
                # the sink is a key with value 0: d sink_h = -sum over rows of p_sink * delta
                dsinks[plan.group_heads(g)] = -(torch.exp(sinks_h.view(1, -1, 1) - lse_h) * delta).sum(dim=(0, 2))
            dq_h, dk_h, dv_h = attention_backward(do_h, q_h, lse_h, delta, plan.kv_source(k_h, v_h),
                                                  plan.q_segments, mask=plan.mask, scale=plan.scale,
                                                  backend=plan.backend, out=out, softcap=plan.softcap)
            if plan.kv_repeat == 1:  # communicate the final grads in the input dtype
                dq_h, dk_h, dv_h = dq_h.to(in_dtype), dk_h.to(in_dtype), dv_h.to(in_dtype)
            back.append(plan.send_to_token_shards([dq_h, dk_h, dv_h]))
        dq, dk, dv = plan.token_shards(back, [q_shape, k_shape, v_shape])
        dk, dv = plan.reduce_kv_grad(dk), plan.reduce_kv_grad(dv)
        if dsinks is not None:
            dsinks = dsinks.to(ctx.sinks_meta[1])
        return dq.to(in_dtype), dk.to(in_dtype), dv.to(in_dtype), dsinks, None, None
