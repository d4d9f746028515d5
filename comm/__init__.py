"""seqpar.comm: process groups and the collectives sequence parallelism needs.

Nothing here knows about attention. Every collective takes its process group explicitly and
returns a :class:`CommHandle`, so that callers issue communication before compute and wait after.
On the gloo backend, CUDA tensors are staged through host memory, so several ranks can share
one GPU in tests.
"""
from seqpar.comm.collectives import (
    CommHandle,
    all_gather,
    all_reduce,
    all_to_all,
    reduce_scatter,
    ring_exchange,
    send_recv,
)
from seqpar.comm.consistency import check_same_on_all_ranks
from seqpar.comm.groups import (
    SequenceParallelGroups,
    UspGroups,
    build_usp_groups,
    group_rank_and_size,
    init_distributed,
    make_data_sequence_groups,
)

__all__ = [
    "CommHandle",
    "all_gather",
    "all_reduce",
    "all_to_all",
    "reduce_scatter",
    "ring_exchange",
    "send_recv",
    "check_same_on_all_ranks",
    "SequenceParallelGroups",
    "UspGroups",
    "build_usp_groups",
    "group_rank_and_size",
    "init_distributed",
    "make_data_sequence_groups",
]
