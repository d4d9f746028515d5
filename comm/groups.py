"""Process groups for sequence parallelism: start-up from torchrun's environment, data-parallel
x sequence-parallel groups, and the 2-D (Ulysses x ring) groups of USP."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def group_rank_and_size(group) -> tuple[int, int]:
    """(rank, size) of this process in ``group``; (0, 1) without torch.distributed.

    ``group`` may be a ProcessGroup, None (the default group), or an object with an ``sp``
    attribute (such as :class:`UspGroups`), whose ``sp`` group is used.
    """
    group = getattr(group, "sp", group)
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


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> tuple[int, int]:
    """Initialise torch.distributed from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR...).

    ``backend`` defaults to nccl when CUDA is available and gloo otherwise. Without a torchrun
    environment it initialises a single-process group. Returns (rank, world_size).
    """
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
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
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


def make_data_sequence_groups(sp_size: int) -> SequenceParallelGroups:
    """Split the world into world_size / sp_size data-parallel replicas of ``sp_size`` ranks.

    Collective: every rank must call it, with the same ``sp_size``.
    """
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if sp_size < 1 or world_size % sp_size != 0:
        raise ValueError(f"sequence-parallel size {sp_size} does not divide the world size {world_size}")
    dp_size = world_size // sp_size
    if not dist.is_initialized():
        return SequenceParallelGroups(None, None, 1, 1, 0, 0)
    sp_group = dp_group = None
    for d in range(dp_size):
        ranks = list(range(d * sp_size, (d + 1) * sp_size))
        g = dist.new_group(ranks)
        if rank in ranks:
            sp_group = g
    for s in range(sp_size):
        ranks = list(range(s, world_size, sp_size))
        g = dist.new_group(ranks)
        if rank in ranks:
            dp_group = g
    return SequenceParallelGroups(dp_group, sp_group, dp_size, sp_size, rank // sp_size, rank % sp_size)


@dataclass(frozen=True)
class UspGroups:
    """The 2-D groups of USP: ``sp`` (all ranks of the sequence), its ``ulysses`` rows and
    ``ring`` columns. Rank in ``sp`` = ring_rank * ulysses_size + ulysses_rank."""

    sp: dist.ProcessGroup
    ulysses: dist.ProcessGroup
    ring: dist.ProcessGroup
    ulysses_size: int
    ring_size: int


def build_usp_groups(sp_ranks: list[int], ulysses_size: int, sp_group: dist.ProcessGroup | None = None) -> UspGroups:
    """Build the Ulysses x ring groups over the global ranks ``sp_ranks`` (in sp order).

    Collective over the whole world (``new_group`` is): every rank calls it with the same args.
    """
    size = len(sp_ranks)
    if ulysses_size < 1 or size % ulysses_size != 0:
        raise ValueError(f"ulysses size {ulysses_size} does not divide the sequence-parallel size {size}")
    ring_size = size // ulysses_size
    me = dist.get_rank()
    if sp_group is None:
        sp_group = dist.new_group(sp_ranks)
    ulysses = ring = None
    for i in range(ring_size):
        ranks = [sp_ranks[i * ulysses_size + u] for u in range(ulysses_size)]
        g = dist.new_group(ranks)
        if me in ranks:
            ulysses = g
    for u in range(ulysses_size):
        ranks = [sp_ranks[i * ulysses_size + u] for i in range(ring_size)]
        g = dist.new_group(ranks)
        if me in ranks:
            ring = g
    return UspGroups(sp_group, ulysses, ring, ulysses_size, ring_size)
