"""What every dataset of :mod:`seqpar.data` shares: the :class:`Batch` it returns, the
data-parallel slice of a global batch, and the per-step random generator of the built-in sources."""
from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # the label that does not count (torch's cross_entropy default)


@dataclass
class Batch:
    """Inputs and next-token labels (int64) of one data-parallel rank.

    Plain rows: ``tokens`` / ``labels`` are [R, T] (R: this rank's rows of the global batch) and
    ``cu_seqlens`` is None. Packed documents: the R rows come back concatenated as ONE row
    [1, R * T] and ``cu_seqlens`` holds its document boundaries ``(0, ..., R * T)`` (a tuple of
    ints, every row start included; the ``cu_seqlens`` of :meth:`seqpar.model.HybridLM.forward`).
    ``label_count`` is the number of labels that count (not ``ignore_index``) in the whole GLOBAL
    batch, every replica's share included (None when unknown: the trainer then all-reduces the count).
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    label_count: int | None = None
    cu_seqlens: tuple[int, ...] | None = None


def batch_generator(seed: int, step: int, salt: int) -> torch.Generator:
    """The torch generator of (seed, step) for a source and split (``salt``)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + salt) % (2 ** 63 - 1))


def check_dp(batch_size: int, dp_rank: int, dp_size: int) -> int:
    """Rows per data-parallel rank; a ValueError when the global batch does not split evenly."""
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"data-parallel rank {dp_rank} is not in [0, {dp_size}) (dp_size {dp_size})")
    if batch_size % dp_size != 0:
        raise ValueError(f"global batch size {batch_size} is not divisible by the data-parallel size {dp_size}")
    return batch_size // dp_size


def dp_slice(x: torch.Tensor, dp_rank: int, dp_size: int) -> torch.Tensor:
    """Rows ``dp_rank * R : (dp_rank + 1) * R`` of the global batch ``x`` (R = rows / dp_size)."""
    per = check_dp(x.shape[0], dp_rank, dp_size)
    return x[dp_rank * per:(dp_rank + 1) * per]
