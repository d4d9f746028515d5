"""Token files: flat little-endian ``uint16`` / ``uint32`` token ids (nanoGPT's ``train.bin`` /
``val.bin``, Megatron-style flat streams), memory-mapped, never read whole.

A file ``X.bin`` may have a JSON sidecar ``X.bin.json`` (written by ``python -m seqpar.data
prepare``) giving its dtype, end-of-document id, vocabulary size, tokenizer and counts; a raw file
without one needs the dtype and the end-of-document id from the caller.

:class:`TokenDataset` serves the GLOBAL batch of a step as a pure function of (seed, step, data):
the stream is cut into rows of ``seq_len + 1`` tokens at a stride of ``seq_len`` (row i holds
tokens ``[i * seq_len, (i + 1) * seq_len]``, so every token is an input once and a label once per
epoch), the rows are visited in a seeded pseudo-random order per epoch (a keyed Feistel
permutation of the row indices, computed per index: nothing of size of the stream is built) and
global row k of the run (``k = step * batch_size + j``) is row ``perm_epoch(k mod n_rows)`` of
epoch ``k // n_rows``. A data-parallel rank takes its slice of the global batch, so the data
position saved in a checkpoint is the number of batches consumed and any data- or
sequence-parallel size sees the same global batch.

Packing (``packing=True``): a row holds consecutive documents of the stream; a document cut by
the row's end continues at the start of the stream's next row, as a new segment (positions
restart there). The labels that would cross into another document (the label of every
end-of-document input: the next document's first token) are ``ignore_index``; nothing else is.
A rank's R rows come back as one row [1, R * seq_len] with ``cu_seqlens`` = every row start and
every position after an end-of-document token, and the end (:class:`seqpar.data.Batch`).
"""
from __future__ import annotations

import bisect
import glob
import json
import os
from typing import Any, Sequence

import numpy as np
import torch

from seqpar.data.common import IGNORE_INDEX, Batch, check_dp

FORMAT_NAME = "seqpar-tokens"
FORMAT_VERSION = 1
METADATA_SUFFIX = ".json"  # X.bin -> X.bin.json
DTYPES: dict[str, type] = {"uint16": np.uint16, "uint32": np.uint32}
BYTE_EOS_ID = 256  # the byte-level fallback: ids 0-255 are the bytes, 256 ends a document
BYTE_VOCAB_SIZE = 257
SPLITS = ("train", "val")
_SCAN_CHUNK = 1 << 20  # tokens read at once when looking for a document boundary


def metadata_path(path: str) -> str:
    """The JSON sidecar of a token file: ``X.bin`` -> ``X.bin.json``."""
    return os.fspath(path) + METADATA_SUFFIX


def _dtype_name(dtype: Any) -> str:
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise ValueError(f"token dtype {dtype!r} is not supported; expected one of {sorted(DTYPES)}")
    return name


def read_metadata(path: str) -> dict[str, Any] | None:
    """The checked sidecar of the token file ``path`` (None when it has none)."""
    meta_path = metadata_path(path)
    if not os.path.exists(meta_path):
        return None
    try:
        with open(meta_path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the metadata {meta_path} of token file {path}: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{meta_path} is not {FORMAT_NAME} metadata (its 'format' is "
                         f"{meta.get('format') if isinstance(meta, dict) else type(meta).__name__!r}, expected "
                         f"{FORMAT_NAME!r}); move it away to read {path} as a raw file")
    version = meta.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{meta_path} has format version {version!r}; this seqpar reads versions <= "
                         f"{FORMAT_VERSION} (upgrade seqpar)")
    missing = [k for k in ("dtype", "eos_id", "vocab_size", "tokens") if k not in meta]
    if missing:
        raise ValueError(f"{meta_path} lacks the field(s) {missing}")
    meta["dtype"] = _dtype_name(meta["dtype"])
    for key in ("eos_id", "vocab_size", "tokens"):
        if not isinstance(meta[key], int) or isinstance(meta[key], bool) or meta[key] < 0:
            raise ValueError(f"{meta_path}: {key} must be an int >= 0, got {meta[key]!r}")
    return meta


class TokenFile:
    """One memory-mapped token file and what is known of it.

    ``array`` is an ``np.memmap`` (a zero-length ndarray for an empty file: those cannot be
    mapped); ``dtype`` / ``eos_id`` come from the sidecar or the caller (they must agree when
    both are given); ``vocab_size`` from the sidecar (None for a raw file).
    """

    def __init__(self, path: str, *, dtype: str | None = None, eos_id: int | None = None) -> None:
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"token file {self.path} does not exist")
        meta = read_metadata(self.path)
        self.metadata = meta
        if meta is not None:
            for name, given, stored in (("dtype", None if dtype is None else _dtype_name(dtype), meta["dtype"]),
                                        ("eos_id", eos_id, meta["eos_id"])):
                if given is not None and given != stored:
                    raise ValueError(f"{name} {given!r} was given for {self.path}, but its metadata "
                                     f"{metadata_path(self.path)} says {stored!r}; drop the option or fix the file")
            dtype, eos_id = meta["dtype"], meta["eos_id"]
            self.vocab_size: int | None = meta["vocab_size"]
        else:
            missing = [flag for flag, v in (("the token dtype (uint16 or uint32; --data-dtype)", dtype),
                                            ("the end-of-document token id (--eos-id)", eos_id)) if v is None]
            if missing:
                raise ValueError(f"token file {self.path} has no metadata {metadata_path(self.path)}: pass "
                                 + " and ".join(missing) + " (or write it with `python -m seqpar.data prepare`)")
            self.vocab_size = None
        self.dtype = _dtype_name(dtype)
        if not isinstance(eos_id, int) or isinstance(eos_id, bool) or eos_id < 0:
            raise ValueError(f"eos_id must be an int >= 0, got {eos_id!r}")
        self.eos_id = eos_id
        itemsize = np.dtype(self.dtype).itemsize
        size = os.path.getsize(self.path)
        if size % itemsize != 0:
            raise ValueError(f"token file {self.path} has {size} bytes, not a multiple of {itemsize} (the size of "
                             f"{self.dtype}): wrong dtype, or a truncated file")
        self.tokens = size // itemsize
        if meta is not None and meta["tokens"] != self.tokens:
            raise ValueError(f"token file {self.path} holds {self.tokens} {self.dtype} tokens ({size} bytes) but its "
                             f"metadata says {meta['tokens']}: the file changed or was truncated")
        if np.iinfo(self.dtype).max < eos_id:
            raise ValueError(f"eos_id {eos_id} does not fit in {self.dtype} (max {np.iinfo(self.dtype).max})")
        if self.tokens == 0:
            self.array: np.ndarray = np.empty(0, dtype=np.dtype(self.dtype).newbyteorder("<"))
        else:
            self.array = np.memmap(self.path, dtype=np.dtype(self.dtype).newbyteorder("<"), mode="r")


class TokenStream:
    """Tokens ``[lo, hi)`` of the virtual concatenation of several token files, read on demand."""

    def __init__(self, files: Sequence[TokenFile], lo: int = 0, hi: int | None = None) -> None:
        self.files = list(files)
        self._starts = [0]
        for f in self.files:
            self._starts.append(self._starts[-1] + f.tokens)
        total = self._starts[-1]
        self.lo, self.hi = lo, total if hi is None else hi
        if not 0 <= self.lo <= self.hi <= total:
            raise ValueError(f"token range [{self.lo}, {self.hi}) is outside the {total} tokens of the stream")

    @property
    def arrays(self) -> list[np.ndarray]:
        """The files' arrays (``np.memmap``: nothing is loaded)."""
        return [f.array for f in self.files]

    @property
    def paths(self) -> list[str]:
        return [f.path for f in self.files]

    def __len__(self) -> int:
        return self.hi - self.lo

    def sub(self, lo: int, hi: int) -> "TokenStream":
        """Tokens ``[lo, hi)`` of this stream."""
        return TokenStream(self.files, self.lo + lo, self.lo + hi)

    def read(self, start: int, stop: int) -> np.ndarray:
        """A copy of tokens ``[start, stop)`` (in the files' dtype)."""
        if not 0 <= start <= stop <= len(self):
            raise ValueError(f"token range [{start}, {stop}) is outside the {len(self)} tokens of the stream")
        start, stop = start + self.lo, stop + self.lo
        i = bisect.bisect_right(self._starts, start) - 1
        parts = []
        while start < stop:
            base = self._starts[i]
            take = min(stop, base + self.files[i].tokens)
            if take > start:
                parts.append(self.files[i].array[start - base:take - base])
            start, i = max(start, take), i + 1
        if not parts:
            return np.empty(0, dtype=self.files[0].array.dtype if self.files else np.uint16)
        return np.array(parts[0]) if len(parts) == 1 else np.concatenate(parts)

    def locate(self, pos: int) -> tuple[str, int]:
        """(file, token offset in that file) of token ``pos`` of this stream."""
        g = pos + self.lo
        i = bisect.bisect_right(self._starts, g) - 1
        while i < len(self.files) and self.files[i].tokens == 0:
            i += 1
        return self.files[i].path, g - self._starts[i]


def _document_cut(stream: TokenStream, eos_id: int, val_fraction: float) -> int:
    """Where the held-out last ``val_fraction`` of ``stream`` starts: just after the end-of-document
    token nearest at or after the target (else before it); exactly at the target when the stream
    has no document boundary. Reads only the tokens it scans."""
    n = len(stream)
    if val_fraction <= 0 or n < 2:
        return n
    target = min(n - 1, max(1, n - int(round(val_fraction * n))))
    pos = target - 1
    while pos < n - 1:  # forward: an EOS at p >= target - 1 with p + 1 < n
        chunk = stream.read(pos, min(n - 1, pos + _SCAN_CHUNK))
        hits = np.flatnonzero(chunk == eos_id)
        if hits.size:
            return pos + int(hits[0]) + 1
        pos += chunk.size
    pos = target - 1
    while pos > 0:  # backward
        lo = max(0, pos - _SCAN_CHUNK)
        hits = np.flatnonzero(stream.read(lo, pos) == eos_id)
        if hits.size:
            return lo + int(hits[-1]) + 1
        pos = lo
    return target


def _val_sibling(path: str) -> str | None:
    """The held-out file beside a train file: ``train*.bin`` -> ``val*.bin`` (None for other names)."""
    head, name = os.path.split(path)
    return os.path.join(head, "val" + name[len("train"):]) if name.startswith("train") else None


# ------------------------------------------------------------------------------------------------
# Seeded row order: a keyed pseudo-random permutation of [0, n) per epoch, one index at a time.

_M64 = (1 << 64) - 1


def _mix64_int(x: int) -> int:
    """splitmix64's finaliser on a Python int."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(index: np.ndarray, n: int, key: int, rounds: int = 4) -> np.ndarray:
    """``perm(index)`` for a pseudo-random permutation ``perm`` of ``[0, n)`` chosen by ``key``: a
    balanced Feistel network on the smallest even number of bits that holds n, with cycle walking
    (expected < 4 passes). O(len(index)) time and memory, whatever n."""
    index = np.atleast_1d(np.asarray(index, dtype=np.int64))
    if n < 1 or (index.size and (index.min() < 0 or index.max() >= n)):
        raise ValueError(f"indices must be in [0, {n})")
    if n == 1:
        return np.zeros_like(index)
    bits = max(2, (n - 1).bit_length())
    bits += bits % 2
    half = np.uint64(bits // 2)
    mask = np.uint64((1 << (bits // 2)) - 1)
    round_keys = [np.uint64(_mix64_int((key + r * 0x632BE59BD9B4E019) & _M64)) for r in range(rounds)]

    def encrypt(x: np.ndarray) -> np.ndarray:
        left, right = x >> half, x & mask
        for k in round_keys:
            left, right = right, left ^ (_mix64(right ^ k) & mask)
        return (left << half) | right

    out = encrypt(index.astype(np.uint64))
    bad = out >= np.uint64(n)
    while bad.any():
        out[bad] = encrypt(out[bad])
        bad = out >= np.uint64(n)
    return out.astype(np.int64)


def _epoch_key(seed: int, epoch: int, split: str) -> int:
    return _mix64_int((_mix64_int(seed & _M64) + 0x9E3779B97F4A7C15 * (epoch + 1) + SPLITS.index(split)) & _M64)


# ------------------------------------------------------------------------------------------------


class TokenDataset:
    """Batches of a token file or directory (same interface as :class:`seqpar.data.ByteCorpus`).

    ``path``: a file (held-out split: the ``val*.bin`` file beside a ``train*.bin`` one if there
    is one, else the last ``val_fraction`` of its tokens, cut just after an end-of-document token)
    or a directory (its ``train*.bin`` files, sorted by name, concatenated; its ``val*.bin`` files
    the held-out split, or as for a file when it has none). ``dtype`` / ``eos_id``: needed for
    files without a sidecar, checked against it otherwise. ``vocab_size``: the model's; the data's
    vocabulary (from the sidecars) must fit in it, and for raw files it is the vocabulary (None:
    the dtype's range, ids unchecked). ``packing``: documents in rows with ``cu_seqlens`` (see the
    module docstring). ``vocab_size`` (attribute) is the data's vocabulary.
    """

    def __init__(self, path: str, *, packing: bool = False, dtype: str | None = None, eos_id: int | None = None,
                 vocab_size: int | None = None, val_fraction: float = 0.05, ignore_index: int = IGNORE_INDEX) -> None:
        self.path = os.fspath(path)
        self.packing = bool(packing)
        self.ignore_index = ignore_index
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"data path {self.path} does not exist (expected a token file or a directory "
                                    "of train*.bin / val*.bin files)")
        if os.path.isdir(self.path):
            train_paths = sorted(glob.glob(os.path.join(glob.escape(self.path), "train*.bin")))
            val_paths = sorted(glob.glob(os.path.join(glob.escape(self.path), "val*.bin")))
            if not train_paths:
                found = sorted(os.listdir(self.path))
                raise ValueError(f"data directory {self.path} has no train*.bin files (it holds "
                                 f"{found[:10]}{' ...' if len(found) > 10 else ''}); prepare one with "
                                 "`python -m seqpar.data prepare INPUT... --out DIR`")
        else:
            train_paths = [self.path]
            sibling = _val_sibling(self.path)
            val_paths = [sibling] if sibling is not None and os.path.isfile(sibling) else []
        train_files = [TokenFile(p, dtype=dtype, eos_id=eos_id) for p in train_paths]
        val_files = [TokenFile(p, dtype=dtype, eos_id=eos_id) for p in val_paths]
        first = train_files[0]
        for f in train_files[1:] + val_files:
            for name in ("dtype", "eos_id", "vocab_size"):
                if getattr(f, name) != getattr(first, name):
                    raise ValueError(f"token files disagree on {name}: {first.path} has {getattr(first, name)!r}, "
                                     f"{f.path} has {getattr(f, name)!r}")
        self.dtype, self.eos_id = first.dtype, first.eos_id
        if first.vocab_size is not None:
            if vocab_size is not None and vocab_size < first.vocab_size:
                raise ValueError(f"the data's vocabulary has {first.vocab_size} ids (metadata of {first.path}) but the "
                                 f"model's vocab_size is {vocab_size}: pass --vocab-size {first.vocab_size} or more")
            self.vocab_size = first.vocab_size
            self.vocab_source = f"the metadata of {first.path}"
        elif vocab_size is not None:
            self.vocab_size, self.vocab_source = int(vocab_size), "the model's vocab_size"
        else:
            self.vocab_size = int(np.iinfo(self.dtype).max) + 1
            self.vocab_source = f"the range of {self.dtype}"
        if self.eos_id >= self.vocab_size:
            raise ValueError(f"eos_id {self.eos_id} is not below the vocabulary size {self.vocab_size} "
                             f"({self.vocab_source})")
        stream = TokenStream(train_files)
        if val_files:
            self.train, self.val = stream, TokenStream(val_files)
        else:
            cut = _document_cut(stream, self.eos_id, val_fraction)
            self.train, self.val = stream.sub(0, cut), stream.sub(cut, len(stream))
        self.val_fraction = val_fraction

    def split(self, name: str) -> TokenStream:
        """The stream of split ``"train"`` or ``"val"``."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return self.train if name == "train" else self.val

    def rows_per_epoch(self, seq_len: int, split: str = "train") -> int:
        """Rows of ``seq_len`` inputs (+1 label) in one pass over ``split``: (tokens - 1) // seq_len."""
        stream = self.split(split)
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        n_rows = (len(stream) - 1) // seq_len if len(stream) else 0
        if n_rows < 1:
            where = ", ".join(stream.paths) or self.path
            raise ValueError(f"the {split} split of {where} has {len(stream)} tokens: too short for one row of seq_len "
                             f"{seq_len} ({seq_len + 1} tokens with the last label); use a shorter --seq-len or more data")
        return n_rows

    def row_indices(self, step: int, batch_size: int, seq_len: int, *, seed: int = 0, split: str = "train"
                    ) -> np.ndarray:
        """The stream rows of the global batch of ``step`` (row i = tokens [i * seq_len, (i + 1) * seq_len])."""
        if step < 0 or batch_size < 1:
            raise ValueError(f"need step >= 0 and batch_size >= 1, got step {step}, batch_size {batch_size}")
        n_rows = self.rows_per_epoch(seq_len, split)
        k = step * batch_size + np.arange(batch_size, dtype=np.int64)
        epochs, within = k // n_rows, k % n_rows
        rows = np.empty_like(k)
        for e in np.unique(epochs):
            sel = epochs == e
            rows[sel] = permute(within[sel], n_rows, _epoch_key(seed, int(e), split))
        return rows

    def _check_ids(self, windows: np.ndarray, rows: np.ndarray, stream: TokenStream, seq_len: int, split: str) -> None:
        if windows.size == 0 or int(windows.max()) < self.vocab_size:
            return
        b, t = np.unravel_index(int(np.argmax(windows >= self.vocab_size)), windows.shape)
        path, offset = stream.locate(int(rows[b]) * seq_len + int(t))
        raise ValueError(f"token id {int(windows[b, t])} at token {offset} of {path} ({split} split) is not below the "
                         f"vocabulary size {self.vocab_size} ({self.vocab_source}): wrong dtype, tokenizer or vocab_size")

    def batch(self, step: int, batch_size: int, seq_len: int, *, seed: int = 0, dp_rank: int = 0,
              dp_size: int = 1, split: str = "train") -> Batch:
        """This data-parallel rank's share of the global batch of ``step``: [R, seq_len] rows, or
        with packing one row [1, R * seq_len] and its ``cu_seqlens`` (R = batch_size / dp_size).
        Every rank reads (and checks) the whole global batch, so a bad token id fails on all ranks."""
        per = check_dp(batch_size, dp_rank, dp_size)
        stream = self.split(split)
        rows = self.row_indices(step, batch_size, seq_len, seed=seed, split=split)
        windows = np.stack([stream.read(int(r) * seq_len, int(r) * seq_len + seq_len + 1) for r in rows])
        self._check_ids(windows, rows, stream, seq_len, split)
        mine = windows[dp_rank * per:(dp_rank + 1) * per]
        seqs = torch.from_numpy(mine.astype(np.int64))
        tokens, labels = seqs[:, :-1].contiguous(), seqs[:, 1:].contiguous()
        if not self.packing:
            return Batch(tokens, labels, batch_size * seq_len)
        ends_global = windows[:, :-1] == self.eos_id
        count = batch_size * seq_len - int(ends_global.sum())
        ends = ends_global[dp_rank * per:(dp_rank + 1) * per]
        labels[torch.from_numpy(ends)] = self.ignore_index
        r_idx, t_idx = np.nonzero(ends)
        bounds = set(range(0, per * seq_len + 1, seq_len))
        bounds.update((r_idx * seq_len + t_idx + 1).tolist())
        return Batch(tokens.reshape(1, per * seq_len), labels.reshape(1, per * seq_len), count,
                     tuple(sorted(int(b) for b in bounds)))

    def state(self) -> dict[str, Any]:
        """What identifies the data (for a checkpoint to compare on resume): files and token counts,
        dtype, end-of-document id, vocabulary, packing, and the split sizes."""
        return {"path": os.path.abspath(self.path), "dtype": self.dtype, "eos_id": self.eos_id,
                "vocab_size": self.vocab_size, "packing": self.packing,
                "train_files": [[os.path.basename(f.path), f.tokens] for f in self.train.files],
                "val_files": [[os.path.basename(f.path), f.tokens] for f in self.val.files],
                "train_tokens": len(self.train), "val_tokens": len(self.val)}

    def describe(self) -> str:
        """One line: splits, token counts, dtype, eos id, vocabulary."""
        def files(s: TokenStream) -> str:
            names = [os.path.basename(p) for p in s.paths]
            return ", ".join(names[:3]) + (f" (+{len(names) - 3})" if len(names) > 3 else "")
        same = self.train.files == self.val.files
        val_from = f"last {len(self.val):,} tokens of train" if same else files(self.val)
        return (f"{self.path}: train {len(self.train):,} tokens ({files(self.train)}), val {len(self.val):,} tokens "
                f"({val_from}); {self.dtype}, eos {self.eos_id}, vocab {self.vocab_size} ({self.vocab_source}), "
                f"packing {'on' if self.packing else 'off'}")
