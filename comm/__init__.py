"""seqpar.comm: process groups and the collectives sequence parallelism needs.

Nothing here knows about attention. Every collective takes its process group explicitly and
returns a :class:`CommHandle`, so that callers issue communication before compute and wait after.
On the gloo backend, CUDA tensors are staged through host memory, so several ranks can share
one GPU in tests. ``check_agreement`` compares named fields of a call across a group (with a
per-group cache of agreed signatures), and ``exclusive_use`` keeps two threads from running
collective calls on one group at the same time.
"""
from seqpar.comm.collectives import (
    CommHandle,
    GroupInUseError,
    all_gather,
    all_reduce,
    all_to_all,
    all_to_all_many,
    exchange,
    reduce_scatter,
    ring_exchange,
    exclusive_use,
    group_user,
    send_recv,
)
from seqpar.comm.consistency import (
    VALIDATE_MODES,
    agreement_stats,
    check_agreement,
    check_same_on_all_ranks,
    check_validate_mode,
    clear_agreement_cache,
)
from seqpar.comm.groups import (
    SequenceParallelGroups,
    UspGroups,
    build_usp_groups,
    group_rank_and_size,
    init_distributed,
    make_data_sequence_groups,
    make_device_mesh,
)

__all__ = [
    "CommHandle",
    "all_gather",
    "all_reduce",
    "all_to_all",
    "all_to_all_many",
    "exchange",
    "reduce_scatter",
    "ring_exchange",
    "send_recv",
    "GroupInUseError",
    "exclusive_use",
    "group_user",
    "VALIDATE_MODES",
    "agreement_stats",
    "check_agreement",
    "check_same_on_all_ranks",
    "check_validate_mode",
    "clear_agreement_cache",
    "SequenceParallelGroups",
    "UspGroups",
    "build_usp_groups",
    "group_rank_and_size",
    "init_distributed",
    "make_data_sequence_groups",
    "make_device_mesh",
]
