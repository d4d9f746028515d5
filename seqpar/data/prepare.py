"""``python -m seqpar.data prepare``: tokenize text / JSONL files into token files.

Inputs: ``.txt`` / ``.md`` / ``.rst`` files (one document each, or one per blank-line-separated paragraph with
``split_on_blank_lines``), ``.jsonl`` files (one document per line, the string field
``text_key``), and directories of them (searched recursively, sorted by path). Each document is
tokenized with a local Hugging Face ``tokenizer.json`` (:class:`tokenizers.Tokenizer`, no special
tokens added) or, without one, bytes (ids 0-255 are the UTF-8 bytes, 256 the end of a document,
vocabulary 257), followed by the end-of-document id. A hash of (seed, document text) sends a
document to the held-out split with probability ``val_fraction``, so equal documents land in the
same split. Output: ``OUT/train.bin`` and ``OUT/val.bin`` (flat little-endian uint16 when the
vocabulary fits, else uint32) with their sidecars ``train.bin.json`` / ``val.bin.json``.
Documents are read, tokenized and written in chunks: the corpus is never held in memory (one
document is, while it is tokenized).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from seqpar.data.tokens import (BYTE_EOS_ID, BYTE_VOCAB_SIZE, DTYPES, FORMAT_NAME, FORMAT_VERSION,
                                metadata_path)

TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl",)
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[EOS]", "<|eos|>")
_CHUNK_CHARS = 1 << 22  # characters tokenized at once
_CHUNK_DOCS = 4096


def find_inputs(inputs: Sequence[str]) -> list[str]:
    """The ``.txt`` / ``.jsonl`` files of ``inputs`` (files as given, directories searched
    recursively and sorted); errors name a missing path, an unsupported file or an empty directory."""
    if not inputs:
        raise ValueError("no input files given")
    suffixes = TEXT_SUFFIXES + JSONL_SUFFIXES
    found: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            here = sorted(os.path.join(d, f) for d, _, names in os.walk(item) for f in names if f.endswith(suffixes))
            if not here:
                raise ValueError(f"input directory {item} has no {' / '.join(suffixes)} files")
            found.extend(here)
        elif os.path.isfile(item):
            if not item.endswith(suffixes):
                raise ValueError(f"input {item}: unsupported file type; expected {' or '.join(suffixes)} "
                                 "(or a directory of them)")
            found.append(item)
        else:
            raise FileNotFoundError(f"input {item} does not exist")
    return found


def _paragraphs(fh: Any) -> Iterator[str]:
    """Blank-line-separated paragraphs of a text file, each without its final line break."""
    lines: list[str] = []
    for line in fh:
        if line.strip():
            lines.append(line)
        elif lines:
            yield "".join(lines).rstrip("\r\n")
            lines = []
    if lines:
        yield "".join(lines).rstrip("\r\n")


def iter_documents(path: str, *, text_key: str = "text", split_on_blank_lines: bool = False) -> Iterator[str]:
    """The documents of one input file, in order (the text exactly as stored: no newline translation)."""
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            if path.endswith(TEXT_SUFFIXES):
                if split_on_blank_lines:
                    yield from _paragraphs(fh)
                else:
                    yield fh.read()
                return
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{line_no}: expected a JSON object with a {text_key!r} field, got "
                                     f"{type(record).__name__}")
                if text_key not in record:
                    raise ValueError(f"{path}:{line_no}: no field {text_key!r} (fields: {sorted(record)[:10]}); "
                                     "choose one with --text-key")
                text = record[text_key]
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{line_no}: field {text_key!r} is a {type(text).__name__}, not a string")
                yield text
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start} of a read block)") from None


class ByteTokenizer:
    """The byte-level fallback: UTF-8 bytes 0-255, end of document 256, vocabulary 257."""

    eos_id = BYTE_EOS_ID
    vocab_size = BYTE_VOCAB_SIZE
    description: dict[str, Any] = {"kind": "bytes"}

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if i != BYTE_EOS_ID).decode("utf-8")


class FileTokenizer:
    """A local Hugging Face ``tokenizer.json`` (:class:`tokenizers.Tokenizer`). The end-of-document
    id is that of ``eos_token``, or of the first of :data:`EOS_CANDIDATES` in the vocabulary."""

    def __init__(self, path: str, eos_token: str | None = None) -> None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file {path} does not exist (expected a tokenizer.json)")
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover - tokenizers comes with transformers
            raise ImportError("a tokenizer file needs the `tokenizers` package: pip install tokenizers") from e
        try:
            self.tokenizer = Tokenizer.from_file(path)
        except Exception as e:  # the Rust side raises its own exception type
            raise ValueError(f"cannot load tokenizer {path}: {e}") from e
        tried = (eos_token,) if eos_token is not None else EOS_CANDIDATES
        ids = [(t, self.tokenizer.token_to_id(t)) for t in tried]
        hit = next(((t, i) for t, i in ids if i is not None), None)
        if hit is None:
            raise ValueError(f"tokenizer {path} has no end-of-document token: tried {list(tried)}; pass the one it "
                             "uses with --eos-token")
        self.eos_token, self.eos_id = hit
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(self.tokenizer.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
        with open(path, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
        self.description = {"kind": "tokenizers", "file": os.path.abspath(path), "sha256": digest,
                            "eos_token": self.eos_token}

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64) for e in self.tokenizer.encode_batch(list(texts),
                                                                                      add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def choose_dtype(vocab_size: int, dtype: str = "auto") -> str:
    """uint16 when every id fits (vocab_size <= 65536), else uint32; or the forced ``dtype``."""
    if dtype == "auto":
        return "uint16" if vocab_size <= 2 ** 16 else "uint32"
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto, uint16 or uint32")
    if vocab_size - 1 > np.iinfo(dtype).max:
        raise ValueError(f"a vocabulary of {vocab_size} ids does not fit in {dtype} (max id {np.iinfo(dtype).max})")
    return dtype


def goes_to_val(text: str, seed: int, val_fraction: float) -> bool:
    """Whether a document is held out: blake2b(seed, text) / 2^64 < val_fraction."""
    if val_fraction <= 0:
        return False
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=int(seed).to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little") < val_fraction * 2.0 ** 64


@dataclass
class PrepareSummary:
    """What :func:`prepare` wrote."""

    documents: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    tokens: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    skipped_empty: int = 0
    files: list[str] = field(default_factory=list)
    dtype: str = ""
    vocab_size: int = 0
    eos_id: int = 0
    tokenizer: str = ""

    def line(self) -> str:
        """The one-line summary the command prints."""
        d, t = self.documents, self.tokens
        skipped = f", {self.skipped_empty:,} empty skipped" if self.skipped_empty else ""
        return (f"prepared {d['train'] + d['val']:,} documents ({d['train']:,} train, {d['val']:,} val{skipped}), "
                f"{t['train'] + t['val']:,} tokens ({t['train']:,} train, {t['val']:,} val); {self.dtype}, vocab "
                f"{self.vocab_size:,}, eos {self.eos_id}, tokenizer {self.tokenizer} -> " + ", ".join(self.files))


def prepare(inputs: Sequence[str], out: str, *, tokenizer: str | None = None, eos_token: str | None = None,
            val_fraction: float = 0.05, text_key: str = "text", seed: int = 0, split_on_blank_lines: bool = False,
            dtype: str = "auto", overwrite: bool = False) -> PrepareSummary:
    """Tokenize ``inputs`` into ``out/train.bin`` and ``out/val.bin`` (the latter only when a
    document is held out) with their JSON sidecars; see the module docstring. Existing outputs
    are an error unless ``overwrite`` (which also removes a stale ``val.bin`` this run does not write)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if tokenizer is None and eos_token is not None:
        raise ValueError(f"--eos-token {eos_token!r} needs --tokenizer (the byte-level fallback ends documents with "
                         f"id {BYTE_EOS_ID})")
    paths = find_inputs(inputs)
    enc: ByteTokenizer | FileTokenizer = ByteTokenizer() if tokenizer is None else FileTokenizer(tokenizer, eos_token)
    dtype = choose_dtype(enc.vocab_size, dtype)
    np_dtype = np.dtype(dtype).newbyteorder("<")
    os.makedirs(out, exist_ok=True)
    targets = {s: os.path.join(out, f"{s}.bin") for s in ("train", "val")}
    existing = [p for t in targets.values() for p in (t, metadata_path(t)) if os.path.exists(p)]
    if existing and not overwrite:
        raise ValueError(f"{out} already holds {existing}; pass --overwrite to replace them")
    summary = PrepareSummary(dtype=dtype, vocab_size=enc.vocab_size, eos_id=enc.eos_id,
                             tokenizer=enc.description["kind"] if tokenizer is None else tokenizer)
    eos = np.array([enc.eos_id], dtype=np_dtype)
    partial = {s: t + ".partial" for s, t in targets.items()}
    handles = {s: open(p, "wb") for s, p in partial.items()}
    try:
        pending: list[str] = []

        def flush() -> None:
            for text, ids in zip(pending, enc.encode_batch(pending)):
                split = "val" if goes_to_val(text, seed, val_fraction) else "train"
                np.concatenate([ids.astype(np_dtype), eos]).tofile(handles[split])
                summary.documents[split] += 1
                summary.tokens[split] += ids.size + 1
            pending.clear()

        chars = 0
        for path in paths:
            for text in iter_documents(path, text_key=text_key, split_on_blank_lines=split_on_blank_lines):
                if not text:
                    summary.skipped_empty += 1
                    continue
                pending.append(text)
                chars += len(text)
                if chars >= _CHUNK_CHARS or len(pending) >= _CHUNK_DOCS:
                    flush()
                    chars = 0
        flush()
    except BaseException:
        for s, fh in handles.items():
            fh.close()
            os.remove(partial[s])
        raise
    for fh in handles.values():
        fh.close()
    if summary.documents["train"] == 0:
        for p in partial.values():
            os.remove(p)
        raise ValueError(f"no training documents in {list(inputs)} ({summary.documents['val']} held out, "
                         f"{summary.skipped_empty} empty): nothing written")
    for split, target in targets.items():
        if summary.documents[split] == 0:
            os.remove(partial[split])
            for stale in (target, metadata_path(target)):
                if os.path.exists(stale):
                    os.remove(stale)
            continue
        meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "split": split, "dtype": dtype,
                "eos_id": enc.eos_id, "vocab_size": enc.vocab_size, "tokens": summary.tokens[split],
                "documents": summary.documents[split], "tokenizer": enc.description, "val_fraction": val_fraction,
                "seed": seed, "inputs": [os.path.abspath(p) for p in inputs]}
        with open(metadata_path(target) + ".partial", "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=1)
            fh.write("\n")
        os.replace(partial[split], target)
        os.replace(metadata_path(target) + ".partial", metadata_path(target))
        summary.files.append(target)
    return summary
