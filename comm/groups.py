"""Process groups for sequence parallelism: start-up from torchrun's environment, data-parallel
x sequence-parallel groups, and the 2-D (Ulysses x ring) groups of USP."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


def sp_group_of(group: Any) -> Any:
    """The flat sequence-parallel ProcessGroup of ``group``: its ``sp`` field for
    :class:`UspGroups` / :class:`SequenceParallelGroups`, else ``group`` itself. (An isinstance
    test, not ``getattr(group, "sp", group)``: torch.compile refuses a getattr that misses on a
    ProcessGroup.)"""
    return group.sp if isinstance(group, (UspGroups, SequenceParallelGroups)) else group


def group_rank_and_size(group) -> tuple[int, int]:
    """(rank, size) of this process in ``group``; (0, 1) without torch.distributed.

    ``group`` may be a ProcessGroup, None (the default group), or an object with an ``sp``
    attribute (such as :class:`UspGroups`), whose ``sp`` group is used.
    """
    group = sp_group_of(group)
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise RuntimeError("a process group was given but torch.distributed is not initialised")
        launched = os.environ.get("WORLD_SIZE", "1")
        if launched.isdigit() and int(launched) > 1:
            # under torchrun without a process group every rank would silently compute alone
            raise RuntimeError(
                f"WORLD_SIZE={launched} in the environment (torchrun started {launched} processes) but "
                f"torch.distributed is not initialised, so this rank would treat its tokens as the whole "
                f"sequence: call torch.distributed.init_process_group() (or seqpar.comm.init_distributed()) "
                f"first, or unset WORLD_SIZE to compute on one process")
        return 0, 1
    rank = dist.get_rank(group)
    if rank < 0:
        # new_group hands non-members a placeholder object, so the group's ranks are unknown here
        raise ValueError(f"this process (global rank {dist.get_rank()} of {dist.get_world_size()}) is not a "
                         f"member of the sequence-parallel group it was given (its rank in it is {rank}); "
                         f"call seqpar only on the ranks of the group")
    return rank, dist.get_world_size(group)


#: Seconds a collective may wait on any group seqpar creates before it fails (torch's own
#: default for new groups is 30 minutes, whatever the world group was given).
DEFAULT_TIMEOUT_S = 600.0


def group_timeout(timeout_s: float | None = None) -> datetime.timedelta:
    """``timeout_s`` (None: :data:`DEFAULT_TIMEOUT_S`) as the timedelta ``new_group`` takes."""
    seconds = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ValueError(f"timeout_s must be a number of seconds > 0, got {timeout_s!r}")
    return datetime.timedelta(seconds=float(seconds))


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> tuple[int, int]:
    """Initialise torch.distributed from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR...).

    ``backend`` defaults to nccl when CUDA is available and gloo otherwise. Without a torchrun
    environment it initialises a single-process group. ``timeout_s`` (default
    :data:`DEFAULT_TIMEOUT_S`) bounds every collective of the world group; pass the same value
    to :func:`make_data_sequence_groups` / :func:`build_usp_groups`. Returns (rank, world_size).
    """
    timeout = group_timeout(timeout_s)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


@dataclass(frozen=True)
class SequenceParallelGroups:
    """This rank's groups in a data-parallel x sequence-parallel layout of the world.

    Global rank = dp_rank * sp_size + sp_rank: the ranks of one sequence-parallel group are
    consecutive (on one node when sp_size divides the GPUs per node).
    """

    dp: dist.ProcessGroup | None
    sp: dist.ProcessGroup | None
    dp_size: int
    sp_size: int
    dp_rank: int
    sp_rank: int
    #: The ("dp", "sp") DeviceMesh of these groups (None on one process, for hand-made groups, and
    #: for a sub-job of the world with one real axis; see :func:`make_device_mesh`).
    mesh: Any = None
    #: A 1-D DeviceMesh ("dp_sp",) over every rank of the job: what FSDP2 shards over.
    shard_mesh: Any = None


def make_data_sequence_groups(sp_size: int, timeout_s: float | None = None) -> SequenceParallelGroups:
    """Split the world into world_size / sp_size data-parallel replicas of ``sp_size`` ranks.

    Every group gets ``timeout_s`` (default :data:`DEFAULT_TIMEOUT_S`): a rank that stops makes
    the others' next collective on it fail within that time instead of waiting 30 minutes.
    Collective: every rank must call it, with the same ``sp_size``.
    """
    timeout = group_timeout(timeout_s)
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if sp_size < 1 or world_size % sp_size != 0:
        raise ValueError(f"sequence-parallel size {sp_size} does not divide the world size {world_size}")
    dp_size = world_size // sp_size
    if not dist.is_initialized():
        return SequenceParallelGroups(None, None, 1, 1, 0, 0)
    sp_group = dp_group = None
    for d in range(dp_size):
        ranks = list(range(d * sp_size, (d + 1) * sp_size))
        g = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            sp_group = g
    for s in range(sp_size):
        ranks = list(range(s, world_size, sp_size))
        g = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            dp_group = g
    return SequenceParallelGroups(dp_group, sp_group, dp_size, sp_size, rank // sp_size, rank % sp_size)


def _backend_options(backend: str, timeout: datetime.timedelta) -> Any:
    """Backend options carrying ``timeout`` for init_device_mesh's ``backend_override``, or None
    when the backend has no options class here (the fake backend)."""
    cls = {"gloo": getattr(dist, "ProcessGroupGloo", None), "nccl": getattr(dist, "ProcessGroupNCCL", None)}.get(backend)
    if cls is None:
        return None
    options = cls._Options() if backend == "gloo" else cls.Options()
    options._timeout = timeout
    return options


def make_device_mesh(sp_size: int, device_type: str, timeout_s: float | None = None,
                     group: dist.ProcessGroup | None = None) -> SequenceParallelGroups:
    """The data-parallel x sequence-parallel groups of a job as a DeviceMesh with named axes
    ("dp", "sp"), plus the 1-D mesh ("dp_sp",) over all its ranks that FSDP2 shards over.

    ``group`` (default: the whole world) holds the job's ranks; global rank order inside it is
    dp_rank * sp_size + sp_rank, as :func:`make_data_sequence_groups`. Every group gets
    ``timeout_s`` (default :data:`DEFAULT_TIMEOUT_S`). Collective over ``group`` (over the world
    when ``group`` is None). Without torch.distributed: one rank, no mesh.
    """
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    timeout = group_timeout(timeout_s)
    if not dist.is_initialized():
        if sp_size != 1:
            raise ValueError(f"sequence-parallel size {sp_size} needs torch.distributed to be initialised")
        return SequenceParallelGroups(None, None, 1, 1, 0, 0)
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    if sp_size < 1 or len(ranks) % sp_size != 0:
        raise ValueError(f"sequence-parallel size {sp_size} does not divide the job's {len(ranks)} ranks")
    rank = dist.get_rank()
    if rank not in ranks:
        raise ValueError(f"rank {rank} is not a member of the job's group {ranks}")
    dp_size = len(ranks) // sp_size
    index = ranks.index(rank)
    dp_rank, sp_rank = divmod(index, sp_size)
    backend = dist.get_backend(group)
    job = group if group is not None else dist.group.WORLD
    if len(ranks) == dist.get_world_size():
        options = _backend_options(backend, timeout)
        override = {"dp": (backend, options), "sp": (backend, options)} if options is not None else None
        mesh = init_device_mesh(device_type, (dp_size, sp_size), mesh_dim_names=("dp", "sp"),
                                backend_override=override)
        dp_group, sp_group = mesh["dp"].get_group(), mesh["sp"].get_group()
    elif dp_size == 1 or sp_size == 1:
        # a sub-job of the world (a test pool's first ranks) with one real axis: that axis is the
        # job's group and the other has one rank and needs no group. No new group is made, so
        # ranks outside the job never have to take part. (No 2-D mesh then: FSDP2 only needs
        # shard_mesh.)
        mesh = None
        sp_group, dp_group = (group, None) if dp_size == 1 else (None, group)
    else:  # a 2-D sub-job: only its members create its groups (named by their ranks)
        sp_group = dist.new_group(ranks[dp_rank * sp_size:(dp_rank + 1) * sp_size], timeout=timeout,
                                  use_local_synchronization=True)
        dp_group = dist.new_group(ranks[sp_rank::sp_size], timeout=timeout, use_local_synchronization=True)
        mesh = DeviceMesh.from_group([dp_group, sp_group], device_type,
                                     mesh=torch.tensor(ranks).view(dp_size, sp_size), mesh_dim_names=("dp", "sp"))
    shard_mesh = DeviceMesh.from_group(job, device_type, mesh_dim_names=("dp_sp",))
    return SequenceParallelGroups(dp_group, sp_group, dp_size, sp_size, dp_rank, sp_rank, mesh, shard_mesh)


@dataclass(frozen=True)
class UspGroups:
    """The 2-D groups of USP: ``sp`` (all ranks of the sequence), its ``ulysses`` rows and
    ``ring`` columns. Rank in ``sp`` = ring_rank * ulysses_size + ulysses_rank."""

    sp: dist.ProcessGroup
    ulysses: dist.ProcessGroup
    ring: dist.ProcessGroup
    ulysses_size: int
    ring_size: int


def build_usp_groups(sp_ranks: list[int], ulysses_size: int, sp_group: dist.ProcessGroup | None = None,
                     timeout_s: float | None = None) -> UspGroups:
    """Build the Ulysses x ring groups over the global ranks ``sp_ranks`` (in sp order), each
    with ``timeout_s`` (default :data:`DEFAULT_TIMEOUT_S`).

    Collective over the whole world (``new_group`` is): every rank calls it with the same args.
    """
    timeout = group_timeout(timeout_s)
    size = len(sp_ranks)
    if ulysses_size < 1 or size % ulysses_size != 0:
        raise ValueError(f"ulysses size {ulysses_size} does not divide the sequence-parallel size {size}")
    ring_size = size // ulysses_size
    me = dist.get_rank()
    if sp_group is None:
        sp_group = dist.new_group(sp_ranks, timeout=timeout)
    ulysses = ring = None
    for i in range(ring_size):
        ranks = [sp_ranks[i * ulysses_size + u] for u in range(ulysses_size)]
        g = dist.new_group(ranks, timeout=timeout)
        if me in ranks:
            ulysses = g
    for u in range(ulysses_size):
        ranks = [sp_ranks[i * ulysses_size + u] for i in range(ring_size)]
        g = dist.new_group(ranks, timeout=timeout)
        if me in ranks:
            ring = g
    return UspGroups(sp_group, ulysses, ring, ulysses_size, ring_size)
