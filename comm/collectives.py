"""Collectives with explicit groups and wait handles (ring exchange, all-gather, reduce-scatter,
all-to-all, point-to-point). Communication is issued when the function is called; the result is
read with ``handle.wait()``."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist

from seqpar.comm.groups import group_rank_and_size

# Newer torch names the dim-0 concatenating collectives *_single (the *_tensor names warn); older
# releases only have *_tensor.
_all_gather_dim0 = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_dim0 = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class CommHandle:
    """A pending collective. ``wait()`` blocks until it is done and returns its result."""

    def __init__(self, works: Sequence[dist.Work] = (), finish: Callable[[], object] | None = None):
        self._works = list(works)
        self._finish = finish
        self._done = False
        self._result: object = None

    def wait(self):
        if not self._done:
            for work in self._works:
                work.wait()
            self._result = self._finish() if self._finish is not None else None
            self._done = True
        return self._result


def _global_rank(group: dist.ProcessGroup | None, group_rank: int) -> int:
    """Global rank of ``group_rank`` in ``group`` (None: the default group, where they coincide)."""
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def _needs_host_staging(group: dist.ProcessGroup | None, tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and dist.get_backend(group) == "gloo"


def _staged(tensor: torch.Tensor, stage: bool) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous() if stage else tensor.contiguous()


def ring_exchange(tensors: Sequence[torch.Tensor], group: dist.ProcessGroup | None, *,
                  shift: int = 1) -> CommHandle:
    """Send ``tensors`` to rank (r + shift) % P and receive the same shapes from (r - shift) % P.

    All sends and receives of one exchange go out in one ``batch_isend_irecv`` (even ranks post
    their sends first, odd ranks their receives, so blocking backends cannot deadlock). The
    inputs must not be modified until the handle is waited on; fresh receive buffers are
    allocated, so the caller can double-buffer by simply keeping both lists.
    ``wait()`` returns the received list.
    """
    rank, world_size = group_rank_and_size(group)
    tensors = list(tensors)
    if world_size == 1:
        return CommHandle(finish=lambda: [t.clone() for t in tensors])
    dst = _global_rank(group, (rank + shift) % world_size)
    src = _global_rank(group, (rank - shift) % world_size)
    stage = any(_needs_host_staging(group, t) for t in tensors)
    send_bufs = [_staged(t, stage) for t in tensors]
    recv_bufs = [torch.empty_like(t) for t in send_bufs]
    sends = [dist.P2POp(dist.isend, t, dst, group) for t in send_bufs]
    recvs = [dist.P2POp(dist.irecv, t, src, group) for t in recv_bufs]
    ops = sends + recvs if rank % 2 == 0 else recvs + sends
    works = dist.batch_isend_irecv(ops)

    def finish():
        send_bufs.clear()  # keep the send buffers alive until completion
        if stage:
            return [r.to(t.device, non_blocking=True) for r, t in zip(recv_bufs, tensors)]
        return recv_bufs

    return CommHandle(works, finish)


def send_recv(send: torch.Tensor | None, dst: int | None, recv_like: torch.Tensor | None,
              src: int | None, group: dist.ProcessGroup | None) -> CommHandle:
    """Point-to-point: optionally send ``send`` to group rank ``dst`` and optionally receive a
    tensor shaped like ``recv_like`` from group rank ``src``. ``wait()`` returns the received
    tensor (or None)."""
    ops = []
    stage = any(t is not None and _needs_host_staging(group, t) for t in (send, recv_like))
    keep = []
    if send is not None:
        buf = _staged(send, stage)
        keep.append(buf)
        ops.append(dist.P2POp(dist.isend, buf, _global_rank(group, dst), group))
    recv_buf = None
    if recv_like is not None:
        recv_buf = torch.empty_like(_staged(recv_like, stage))
        ops.append(dist.P2POp(dist.irecv, recv_buf, _global_rank(group, src), group))
    works = dist.batch_isend_irecv(ops) if ops else []

    def finish():
        keep.clear()
        if recv_buf is None:
            return None
        return recv_buf.to(recv_like.device) if stage else recv_buf

    return CommHandle(works, finish)


def all_gather(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> CommHandle:
    """Gather ``tensor`` from every rank; ``wait()`` returns a tensor [P, *tensor.shape]."""
    _, world_size = group_rank_and_size(group)
    if world_size == 1:
        return CommHandle(finish=lambda: tensor.unsqueeze(0))
    stage = _needs_host_staging(group, tensor)
    send = _staged(tensor, stage)
    out = torch.empty((world_size * send.shape[0],) + tuple(send.shape[1:]) if send.dim() else (world_size,),
                      dtype=send.dtype, device=send.device)
    work = _all_gather_dim0(out, send, group=group, async_op=True)

    def finish():
        gathered = out.view((world_size,) + tuple(tensor.shape))
        return gathered.to(tensor.device) if stage else gathered

    return CommHandle([work], finish)


def reduce_scatter(stacked: torch.Tensor, group: dist.ProcessGroup | None) -> CommHandle:
    """Sum ``stacked`` ([P, *shape], slice p meant for rank p) over ranks; ``wait()`` returns this
    rank's summed slice [*shape]."""
    _, world_size = group_rank_and_size(group)
    if stacked.shape[0] != world_size:
        raise ValueError(f"reduce_scatter expects a leading dim equal to the group size {world_size}, "
                         f"got shape {tuple(stacked.shape)}")
    if world_size == 1:
        return CommHandle(finish=lambda: stacked[0])
    stage = _needs_host_staging(group, stacked)
    send = _staged(stacked, stage).view((-1,) + tuple(stacked.shape[2:])) if stacked.dim() > 1 else _staged(stacked, stage)
    out = torch.empty(tuple(stacked.shape[1:]), dtype=send.dtype, device=send.device)
    work = _reduce_scatter_dim0(out.view((-1,) + tuple(stacked.shape[2:])) if stacked.dim() > 1 else out,
                                      send, group=group, async_op=True)

    def finish():
        return out.to(stacked.device) if stage else out

    return CommHandle([work], finish)


def all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> CommHandle:
    """Sum ``tensor`` over ranks (out of place); ``wait()`` returns the sum."""
    _, world_size = group_rank_and_size(group)
    if world_size == 1:
        return CommHandle(finish=lambda: tensor.clone())
    stage = _needs_host_staging(group, tensor)
    buf = tensor.detach().to("cpu").contiguous() if stage else tensor.detach().clone().contiguous()
    work = dist.all_reduce(buf, group=group, async_op=True)
    return CommHandle([work], lambda: buf.to(tensor.device) if stage else buf)


def all_to_all(tensor: torch.Tensor, group: dist.ProcessGroup | None, *, scatter_dim: int,
               gather_dim: int) -> CommHandle:
    """Split ``tensor`` into P chunks along ``scatter_dim``, send chunk p to rank p, and
    concatenate what arrives along ``gather_dim`` (in rank order). ``wait()`` returns it."""
    _, world_size = group_rank_and_size(group)
    if tensor.shape[scatter_dim] % world_size != 0:
        raise ValueError(f"all_to_all: dim {scatter_dim} of shape {tuple(tensor.shape)} is not divisible "
                         f"by the group size {world_size}")
    if world_size == 1:
        return CommHandle(finish=lambda: tensor)
    stage = _needs_host_staging(group, tensor)
    chunks = torch.stack(tensor.chunk(world_size, dim=scatter_dim))  # [P, ...]
    send = _staged(chunks, stage)
    out = torch.empty_like(send)
    work = dist.all_to_all_single(out, send, group=group, async_op=True)

    def finish():
        received = out.to(tensor.device) if stage else out
        return torch.cat(received.unbind(0), dim=gather_dim)

    return CommHandle([work], finish)
