"""The built-in sources that need no download: ``stdlib`` (:class:`ByteCorpus`) and ``synthetic``
(:class:`SyntheticCopy`)."""
from __future__ import annotations

import os
import sysconfig
import zlib

import torch

from seqpar.data.common import Batch, batch_generator, dp_slice


def stdlib_source_files() -> list[str]:
    """The standard library's ``*.py`` files (site-packages excluded), sorted."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        files.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(files)


class ByteCorpus:
    """Byte-level corpus of the standard library's Python source, split by file.

    A file goes to the held-out split when a hash of its relative path falls in the first
    ``val_fraction`` of the hash range; files are read in hash order until ``max_bytes``.
    """

    vocab_size = 256

    def __init__(self, max_bytes: int = 4_000_000, val_fraction: float = 0.05):
        root = sysconfig.get_paths()["stdlib"]
        files = stdlib_source_files()
        if not files:
            raise RuntimeError(f"no *.py files found under the standard library at {root}")
        keyed = sorted((zlib.crc32(os.path.relpath(f, root).encode()), f) for f in files)
        train, val = bytearray(), bytearray()
        cut = int(val_fraction * 2 ** 32)
        budget = {"train": max_bytes * (1 - val_fraction), "val": max_bytes * val_fraction}
        for key, path in keyed:
            split, buf = ("val", val) if key < cut else ("train", train)
            if len(buf) >= budget[split]:
                if len(train) >= budget["train"] and len(val) >= budget["val"]:
                    break
                continue
            with open(path, "rb") as fh:
                buf.extend(fh.read() + b"\n\n")
        self.train = torch.frombuffer(train, dtype=torch.uint8).clone()
        self.val = torch.frombuffer(val, dtype=torch.uint8).clone()

    def _windows(self, data: torch.Tensor, gen: torch.Generator, n: int, seq_len: int) -> torch.Tensor:
        if data.numel() <= seq_len + 1:
            raise ValueError(f"corpus split of {data.numel()} bytes is too short for seq_len {seq_len}")
        starts = torch.randint(0, data.numel() - seq_len - 1, (n,), generator=gen)
        idx = starts[:, None] + torch.arange(seq_len + 1)
        return data[idx].long()

    def batch(self, step: int, batch_size: int, seq_len: int, *, seed: int = 0, dp_rank: int = 0,
              dp_size: int = 1, split: str = "train") -> Batch:
        """This data-parallel rank's share of the global batch of ``step``."""
        data = self.train if split == "train" else self.val
        gen = batch_generator(seed, step, 0 if split == "train" else 1)
        seqs = dp_slice(self._windows(data, gen, batch_size, seq_len), dp_rank, dp_size)
        return Batch(seqs[:, :-1].contiguous(), seqs[:, 1:].contiguous(), batch_size * seq_len)  # every byte counts


class SyntheticCopy:
    """Random sequences whose second half repeats the first: [x, x] of length ``seq_len + 1``.

    Only the second half's labels count (the first half's are ``ignore_index``), so a model that
    attends across the whole sequence drives the loss to zero, and one that does not stays at
    log(vocab_size).
    """

    def __init__(self, vocab_size: int = 256, ignore_index: int = -100):
        self.vocab_size = vocab_size
        self.ignore_index = ignore_index

    def batch(self, step: int, batch_size: int, seq_len: int, *, seed: int = 0, dp_rank: int = 0,
              dp_size: int = 1, split: str = "train") -> Batch:
        """This data-parallel rank's share of the global batch of ``step``."""
        gen = batch_generator(seed, step, 2 if split == "train" else 3)
        half = (seq_len + 2) // 2
        first = torch.randint(0, self.vocab_size, (batch_size, half), generator=gen)
        seqs = dp_slice(torch.cat([first, first], dim=1)[:, :seq_len + 1], dp_rank, dp_size)
        labels = seqs[:, 1:].clone()
        labels[:, :half - 1] = self.ignore_index
        return Batch(seqs[:, :-1].contiguous(), labels, batch_size * (seq_len - min(half - 1, seq_len)))
