"""Training data: built-in sources that need no download, and token files.

- :class:`ByteCorpus` (``stdlib``): byte-level text assembled from the Python standard library's
  own source files (``sysconfig.get_paths()["stdlib"]``, ``*.py``, site-packages excluded), split
  by file into train and held-out parts.
- :class:`SyntheticCopy` (``synthetic``): a synthetic long-sequence task (random bytes, then the
  same bytes again), whose second half is only predictable by attending across the whole
  sequence, for length tests.
- :class:`TokenDataset` (a path): flat uint16 / uint32 token files (nanoGPT's ``train.bin`` /
  ``val.bin``), memory-mapped, with optional document packing (``Batch.cu_seqlens``). Write them
  with ``python -m seqpar.data prepare INPUT... --out DIR`` (:mod:`seqpar.data.prepare`).

All serve the GLOBAL batch of a step as a pure function of (seed, step, data): a data-parallel
rank takes its slice, every rank of a sequence-parallel group receives the same full sequences and
shards them (:func:`seqpar.parallelize.shard_batch`). The data position saved in a checkpoint
is therefore just the number of batches consumed, and a run resumes on the same batches with
any data- or sequence-parallel size. Each batch also carries the number of scored labels of the
GLOBAL batch (``Batch.label_count``), so that the trainer normalises the loss without a collective.
"""
from __future__ import annotations

import os

from seqpar.data.builtin import ByteCorpus, SyntheticCopy, stdlib_source_files
from seqpar.data.common import IGNORE_INDEX, Batch
from seqpar.data.common import batch_generator as _batch_generator, dp_slice as _dp_slice  # noqa: F401 (old names)
from seqpar.data.tokens import TokenDataset, TokenFile, TokenStream, read_metadata

BUILTIN_DATASETS = ("stdlib", "synthetic")

__all__ = ["Batch", "ByteCorpus", "SyntheticCopy", "TokenDataset", "TokenFile", "TokenStream", "IGNORE_INDEX",
           "BUILTIN_DATASETS", "make_dataset", "read_metadata", "stdlib_source_files"]


def make_dataset(name: str, *, max_bytes: int = 4_000_000, val_fraction: float = 0.05,
                 vocab_size: int | None = 256, packing: bool = False, data_dtype: str | None = None,
                 eos_id: int | None = None) -> ByteCorpus | SyntheticCopy | TokenDataset:
    """``stdlib`` -> :class:`ByteCorpus`, ``synthetic`` -> :class:`SyntheticCopy`, any other name
    -> :class:`TokenDataset` of that file or directory (a directory named ``stdlib`` needs ``./stdlib``).

    ``vocab_size`` is the model's: synthetic draws ids below min(vocab_size, 256); a token
    file's vocabulary must fit in it (a raw file without metadata takes it as its vocabulary).
    ``packing``, ``data_dtype`` (uint16 / uint32) and ``eos_id`` apply to token files only (the
    latter two for raw files without metadata, or checked against it).
    """
    if name in BUILTIN_DATASETS:
        given = [f"{k}={v!r}" for k, v in (("packing", packing), ("data_dtype", data_dtype), ("eos_id", eos_id))
                 if v not in (None, False)]
        if given:
            raise ValueError(f"{', '.join(given)} apply to token files, not to the built-in dataset {name!r}")
        if name == "stdlib":
            return ByteCorpus(max_bytes=max_bytes, val_fraction=val_fraction)
        return SyntheticCopy(vocab_size=min(256 if vocab_size is None else vocab_size, 256))
    if not os.path.exists(name):
        raise ValueError(f"unknown dataset {name!r}: not one of {BUILTIN_DATASETS}, and no file or directory "
                         f"{os.path.abspath(name)} exists (expected a token file, or a directory of train*.bin / "
                         "val*.bin files written by `python -m seqpar.data prepare`)")
    return TokenDataset(name, packing=packing, dtype=data_dtype, eos_id=eos_id, vocab_size=vocab_size,
                        val_fraction=val_fraction)
