"""Collectives with explicit groups and wait handles (ring exchange, all-gather, reduce-scatter,
all-to-all, point-to-point, many-peer point-to-point exchange). Communication is issued when the
function is called; the result is read with ``handle.wait()``.

One thread at a time per group: :class:`exclusive_use` marks groups as in use by the calling
thread for the length of a multi-collective call (a caller such as ``seqpar.attention`` holds it
over its whole forward, or backward). The collectives below refuse to start on a group another
thread holds, and a second thread entering :class:`exclusive_use` on it raises
:class:`GroupInUseError`: the collectives of two concurrent calls would pair up across ranks in
whatever order each rank's threads reach them -- silently wrong results or a hang.
"""
from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from seqpar.comm.groups import UspGroups, group_rank_and_size


# ---------------------------------------------------------------------------------------------
# One thread at a time per group.


class GroupInUseError(RuntimeError):
    """A thread started a collective call on a group that another thread is in the middle of."""


class _Use:
    __slots__ = ("size", "owner", "thread", "what", "depth")

    def __init__(self, size: int) -> None:
        self.size = size      # group size (groups of one rank never communicate: not guarded)
        self.owner = 0        # threading.get_ident() of the holder
        self.thread = ""      # its name
        self.what = ""        # what it is doing
        self.depth = 0        # re-entries of the holder


_USES: "weakref.WeakKeyDictionary[Any, _Use]" = weakref.WeakKeyDictionary()  # keyed by the ProcessGroup
_USE_LOCK = threading.Lock()
_held = 0  # groups held right now by any thread (fast path of the collectives' check)


def _describe(pg: Any) -> str:
    try:
        ranks = dist.get_process_group_ranks(pg)
    except Exception:
        ranks = "?"
    return f"process group {getattr(pg, 'group_name', '?')!r} (global ranks {ranks})"


def _in_use_error(pg: Any, use: _Use, what: str) -> GroupInUseError:
    me = threading.current_thread()
    return GroupInUseError(
        f"{what}: {_describe(pg)} is in use by thread {use.thread!r} (id {use.owner}) inside {use.what}; "
        f"this thread {me.name!r} (id {me.ident}) cannot start collectives on it at the same time. Calls on "
        f"one group must not overlap: their collectives would pair up across ranks in whatever order each "
        f"rank's threads reach them (silently wrong results or a hang). Serialise the calls, or give each "
        f"thread its own group (dist.new_group with the same ranks).")


_ProcessGroup = dist.ProcessGroup


def _process_groups(groups: Sequence[Any]) -> list:
    if len(groups) == 1 and type(groups[0]) is _ProcessGroup:  # the common case
        return [groups[0]]
    out: list = []
    for g in groups:
        parts = (g.sp, g.ulysses, g.ring) if isinstance(g, UspGroups) else (g,)
        for pg in parts:
            pg = dist.group.WORLD if pg is None else pg
            if isinstance(pg, _ProcessGroup) and not any(pg is seen for seen in out):
                out.append(pg)
    return out


class exclusive_use:
    """``with exclusive_use(*groups, what="..."):`` -- mark ``groups`` (ProcessGroups, None for
    the default group, or a UspGroups for its three groups) as used by this thread until the block
    ends. Raises :class:`GroupInUseError`, naming the group and both threads, if another thread is
    inside such a block on one of them. The same thread may re-enter (nested calls); a thread may
    hold a group after another released it (autograd may run backward in another thread than
    forward, but not at the same time). Groups of one rank (no communication) and processes
    without torch.distributed are not tracked."""

    __slots__ = ("_groups", "_what", "_uses")

    def __init__(self, *groups: Any, what: str) -> None:
        self._groups = groups
        self._what = what
        self._uses: list = []

    def __enter__(self) -> "exclusive_use":
        global _held
        if not (dist.is_available() and dist.is_initialized()):
            return self
        me = threading.get_ident()
        with _USE_LOCK:
            uses = []
            for pg in _process_groups(self._groups):
                use = _USES.get(pg)
                if use is None:
                    use = _USES[pg] = _Use(dist.get_world_size(pg))
                if use.size <= 1:
                    continue
                if use.depth and use.owner != me:
                    raise _in_use_error(pg, use, self._what)
                uses.append(use)
            for use in uses:
                if use.depth == 0:
                    use.owner, use.thread, use.what = me, threading.current_thread().name, self._what
                use.depth += 1
            _held += len(uses)
        self._uses = uses
        return self

    def __exit__(self, *exc: object) -> None:
        global _held
        if not self._uses:
            return
        with _USE_LOCK:
            for use in self._uses:
                use.depth -= 1
                if use.depth == 0:
                    use.owner, use.thread, use.what = 0, "", ""
            _held -= len(self._uses)
        self._uses = []


def group_user(group: Any = None) -> tuple[str, str] | None:
    """(thread name, what) of the thread inside :class:`exclusive_use` on ``group``, or None."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    use = _USES.get(dist.group.WORLD if group is None else group)
    return (use.thread, use.what) if use is not None and use.depth else None


def _check_free(group: Any) -> None:
    """Refuse to start a collective on a group another thread holds (see :class:`exclusive_use`)."""
    if not _held:
        return
    pg = dist.group.WORLD if group is None else group
    use = _USES.get(pg)
    if use is not None and use.depth and use.owner != threading.get_ident():
        raise _in_use_error(pg, use, "a seqpar.comm collective")

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
                  shift: int = 1, recv_shapes: Sequence[torch.Size] | None = None) -> CommHandle:
    """Send ``tensors`` to rank (r + shift) % P and receive the same shapes from (r - shift) % P
    (or ``recv_shapes``, one per tensor, same dtypes, when what arrives differs in size).

    Tensors of one dtype and device travel as ONE message: packed into one buffer (no copy when
    they already are consecutive views of one, as the tensors a previous exchange returned are,
    so a ring passing on what it received copies nothing), received into one buffer, returned as
    views of it. Every send and receive of the exchange goes out in one ``batch_isend_irecv``
    (even ranks post their sends first, odd ranks their receives, so blocking backends cannot
    deadlock). The inputs must not be modified until the handle is waited on; fresh receive
    buffers are allocated, so the caller can double-buffer by simply keeping both lists.
    ``wait()`` returns the received list.
    """
    rank, world_size = group_rank_and_size(group)
    tensors = list(tensors)
    if world_size == 1:
        return CommHandle(finish=lambda: [t.clone() for t in tensors])
    if recv_shapes is not None and len(recv_shapes) != len(tensors):
        raise ValueError(f"ring_exchange: {len(recv_shapes)} receive shapes for {len(tensors)} tensors")
    _check_free(group)
    dst = _global_rank(group, (rank + shift) % world_size)
    src = _global_rank(group, (rank - shift) % world_size)
    stage = any(_needs_host_staging(group, t) for t in tensors)
    shapes = [t.shape for t in tensors] if recv_shapes is None else [torch.Size(x) for x in recv_shapes]
    packs = _packs(tensors)
    send_bufs = [_staged(_packed(tensors, members), stage) for members in packs]
    recv_bufs = [torch.empty(sum(shapes[i].numel() for i in members), dtype=send.dtype, device=send.device)
                 for members, send in zip(packs, send_bufs)]
    sends = [dist.P2POp(dist.isend, t, dst, group) for t in send_bufs]
    recvs = [dist.P2POp(dist.irecv, t, src, group) for t in recv_bufs]
    ops = sends + recvs if rank % 2 == 0 else recvs + sends
    works = dist.batch_isend_irecv(ops)

    def finish():
        send_bufs.clear()  # keep the send buffers alive until completion
        out: list = [None] * len(tensors)
        for members, flat in zip(packs, recv_bufs):
            if stage:
                flat = flat.to(tensors[members[0]].device, non_blocking=True)
            offset = 0
            for i in members:
                n = shapes[i].numel()
                out[i] = flat[offset:offset + n].view(shapes[i])
                offset += n
        return out

    return CommHandle(works, finish)


def _packs(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (dtype, device), in order: one message per group."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    return list(groups.values())


def _packed(tensors: Sequence[torch.Tensor], members: Sequence[int]) -> torch.Tensor:
    """The tensors ``members`` as one flat contiguous tensor: a view when they are consecutive
    contiguous pieces of one contiguous buffer (what :func:`ring_exchange` returns), else a copy."""
    parts = [tensors[i] for i in members]
    if len(parts) == 1:
        return parts[0].contiguous().view(-1)
    base = parts[0]._base
    if base is not None and base.dim() == 1 and base.is_contiguous() and \
            sum(t.numel() for t in parts) == base.numel():
        offset = base.storage_offset()
        for t in parts:
            if t._base is not base or not t.is_contiguous() or t.storage_offset() != offset:
                break
            offset += t.numel()
        else:
            return base
    return torch.cat([t.reshape(-1) for t in parts])


def send_recv(send: torch.Tensor | None, dst: int | None, recv_like: torch.Tensor | None,
              src: int | None, group: dist.ProcessGroup | None) -> CommHandle:
    """Point-to-point: optionally send ``send`` to group rank ``dst`` and optionally receive a
    tensor shaped like ``recv_like`` from group rank ``src``. ``wait()`` returns the received
    tensor (or None)."""
    ops = []
    if send is not None or recv_like is not None:
        _check_free(group)
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


def exchange(sends: dict[int, Sequence[torch.Tensor]], recv_like: dict[int, Sequence[torch.Tensor]],
             group: dist.ProcessGroup | None) -> CommHandle:
    """Point-to-point with many peers at once: send ``sends[p]`` (a list of tensors) to group rank
    p, and receive from group rank p tensors shaped like ``recv_like[p]`` (only shape, dtype and
    device are read). A peer may appear in either dict, both or neither; a rank with nothing to
    send or receive calls with empty dicts (no communication). The caller must make both sides
    agree: rank p's ``sends[r]`` is rank r's ``recv_like[p]``, tensor by tensor.

    Every send and receive goes out in one ``batch_isend_irecv``, in one global order of the
    ordered pairs -- messages between ranks a < b sorted by (a, b), a -> b before b -> a, then by
    position in the list -- so the first pending message of the whole group is always the first
    pending message of both its ranks: even backends whose sends and receives block cannot
    deadlock. A tensor sent to several peers (the same object) is staged / made contiguous once.
    The inputs must not be modified until the handle is waited on. ``wait()`` returns
    ``{p: [received tensors]}`` for the peers of ``recv_like``, on the devices of ``recv_like``.
    """
    rank, world_size = group_rank_and_size(group)
    for what, peers in (("sends", sends), ("recv_like", recv_like)):
        for peer in peers:
            if not (isinstance(peer, int) and 0 <= peer < world_size) or peer == rank:
                raise ValueError(f"exchange: {what} names peer {peer!r}; expected another rank of the group "
                                 f"(0..{world_size - 1}, not this rank {rank})")
    if not any(len(ts) for ts in sends.values()) and not any(len(ts) for ts in recv_like.values()):
        return CommHandle(finish=lambda: {peer: [] for peer in recv_like})
    _check_free(group)
    stage = any(_needs_host_staging(group, t) for ts in (*sends.values(), *recv_like.values()) for t in ts)
    staged: dict[int, torch.Tensor] = {}  # id(tensor) -> its send buffer (one per tensor, however many peers)
    keyed = []
    for peer, tensors in sends.items():
        direction = 0 if rank < peer else 1  # 0: from the lower rank of the pair to the higher
        for index, t in enumerate(tensors):
            buf = staged.get(id(t))
            if buf is None:
                buf = staged[id(t)] = _staged(t, stage)
            keyed.append(((min(rank, peer), max(rank, peer), direction, index),
                          dist.P2POp(dist.isend, buf, _global_rank(group, peer), group)))
    received: dict[int, list[torch.Tensor]] = {}
    for peer, likes in recv_like.items():
        direction = 0 if peer < rank else 1
        bufs = received[peer] = [torch.empty(t.shape, dtype=t.dtype, device="cpu" if stage else t.device)
                                 for t in likes]
        for index, buf in enumerate(bufs):
            keyed.append(((min(rank, peer), max(rank, peer), direction, index),
                          dist.P2POp(dist.irecv, buf, _global_rank(group, peer), group)))
    keyed.sort(key=lambda pair: pair[0])
    works = dist.batch_isend_irecv([op for _, op in keyed])

    def finish():
        staged.clear()  # keep the send buffers alive until completion
        if stage:
            return {peer: [b.to(like.device, non_blocking=True) for b, like in zip(bufs, recv_like[peer])]
                    for peer, bufs in received.items()}
        return received

    return CommHandle(works, finish)


def all_gather(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> CommHandle:
    """Gather ``tensor`` from every rank; ``wait()`` returns a tensor [P, *tensor.shape]."""
    _, world_size = group_rank_and_size(group)
    if world_size == 1:
        return CommHandle(finish=lambda: tensor.unsqueeze(0))
    _check_free(group)
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
    _check_free(group)
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
    _check_free(group)
    stage = _needs_host_staging(group, tensor)
    buf = tensor.detach().to("cpu").contiguous() if stage else tensor.detach().clone().contiguous()
    work = dist.all_reduce(buf, group=group, async_op=True)
    return CommHandle([work], lambda: buf.to(tensor.device) if stage else buf)


def all_to_all_many(tensors: Sequence[torch.Tensor], group: dist.ProcessGroup | None, *,
                    scatter_dims: Sequence[int], gather_dims: Sequence[int]) -> CommHandle:
    """:func:`all_to_all` of several tensors in one collective per dtype: tensor i is split into P
    chunks along ``scatter_dims[i]``, chunk p goes to rank p, and what arrives is concatenated
    along ``gather_dims[i]``. ``wait()`` returns the list (views of one received buffer per
    dtype). Each tensor is copied once into the packed buffer, the copy that laying chunk p out
    first needs anyway; a tensor alone in its dtype is copied only when its layout needs it."""
    if not (len(tensors) == len(scatter_dims) == len(gather_dims)):
        raise ValueError(f"all_to_all_many: {len(tensors)} tensors but {len(scatter_dims)} scatter dims and "
                         f"{len(gather_dims)} gather dims")
    _, world_size = group_rank_and_size(group)
    for i, (t, dim) in enumerate(zip(tensors, scatter_dims)):
        if t.shape[dim] % world_size != 0:
            which = f" (tensor {i} of {len(tensors)})" if len(tensors) > 1 else ""
            raise ValueError(f"all_to_all: dim {dim} of shape {tuple(t.shape)} is not divisible by the group "
                             f"size {world_size}{which}")
    if world_size == 1:
        return CommHandle(finish=lambda: list(tensors))
    if len({t.device for t in tensors}) > 1:
        raise ValueError(f"all_to_all_many: tensors on several devices {[str(t.device) for t in tensors]}")
    _check_free(group)
    # [P, ...] chunk views (chunk p first), packed side by side per dtype: [P, sum of chunk sizes]
    chunks = [t.unflatten(dim, (world_size, -1)).movedim(dim, 0) for t, dim in zip(tensors, scatter_dims)]
    works, received_views = [], [None] * len(tensors)
    pending = []
    for members in _packs(tensors):  # one device: one group per dtype
        sizes = [chunks[i][0].numel() for i in members]
        if len(members) == 1:  # a copy only when the layout needs one (not for the token axis of B = 1)
            packed = chunks[members[0]].contiguous().view(world_size, -1)
        else:
            first = tensors[members[0]]
            packed = torch.empty(world_size, sum(sizes), dtype=first.dtype, device=first.device)
            offset = 0
            for i, n in zip(members, sizes):
                packed[:, offset:offset + n].view(chunks[i].shape).copy_(chunks[i])
                offset += n
        stage = _needs_host_staging(group, packed)
        send = _staged(packed, stage)
        out = torch.empty_like(send)
        works.append(dist.all_to_all_single(out, send, group=group, async_op=True))
        pending.append((members, sizes, out, stage, packed.device))

    def finish():
        for members, sizes, out, stage, device in pending:
            received = out.to(device) if stage else out
            offset = 0
            for i, n in zip(members, sizes):
                part = received[:, offset:offset + n].view(chunks[i].shape)
                received_views[i] = part.movedim(0, gather_dims[i]).flatten(gather_dims[i], gather_dims[i] + 1)
                offset += n
        return received_views

    return CommHandle(works, finish)


def all_to_all(tensor: torch.Tensor, group: dist.ProcessGroup | None, *, scatter_dim: int,
               gather_dim: int) -> CommHandle:
    """Split ``tensor`` into P chunks along ``scatter_dim``, send chunk p to rank p, and
    concatenate what arrives along ``gather_dim`` (in rank order). ``wait()`` returns it."""
    many = all_to_all_many([tensor], group, scatter_dims=[scatter_dim], gather_dims=[gather_dim])
    return CommHandle(finish=lambda: many.wait()[0])
