"""Token-file data (seqpar.data): the prepare command, memory-mapped token files, the seeded row
order, document packing (cu_seqlens, ignored labels, positions), resume at another dp size, and
the errors of bad inputs.

References are plain: the source texts, the flat stream read back with numpy, and for the loss
an fp64 HybridLM run on each document alone (tolerance 1e-9 on a sum of about 100 token losses).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import seqpar.data
from seqpar.data import SyntheticCopy, TokenDataset, make_dataset
from seqpar.data.__main__ import main as data_main
from seqpar.data.prepare import prepare
from seqpar.data.tokens import permute

IGNORE = -100
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# helpers


def _texts(rng: np.random.Generator, n: int) -> list[str]:
    """Documents of varied length with non-ASCII characters, spaces, tabs and line breaks."""
    words = ["the", "cat", "sat", "on", "mat", "héllo", "wörld", "naïve", "日本", "🙂", "x\ty", "end.\n"]
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 30)))) for _ in range(n)]


def _write_jsonl(path: Path, texts: list[str], key: str = "text") -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for t in texts:
            fh.write(json.dumps({key: t, "id": len(t)}) + "\n")


def _split_docs(ids: np.ndarray, eos: int) -> list[list[int]]:
    """The documents of a flat stream (each ends with eos; a trailing fragment is dropped)."""
    docs, cur = [], []
    for i in ids.tolist():
        if i == eos:
            docs.append(cur)
            cur = []
        else:
            cur.append(i)
    return docs


def _interleaves(source: list[str], a: list[str], b: list[str]) -> bool:
    """Whether ``source`` is an interleaving of ``a`` and ``b`` that keeps each one's order."""
    i = j = 0
    for doc in source:
        if i < len(a) and a[i] == doc:
            i += 1
        elif j < len(b) and b[j] == doc:
            j += 1
        else:
            return False
    return i == len(a) and j == len(b)


def _raw_stream(path: Path, doc_lengths: list[int], dtype: str = "uint32", eos: int = 0) -> np.ndarray:
    """A raw token file whose non-eos ids are unique (token at stream position p is p + 1), each
    document followed by ``eos``; returns the stream."""
    parts, pos = [], 0
    for n in doc_lengths:
        parts.append(np.arange(pos + 1, pos + n + 1))
        parts.append(np.array([eos]))
        pos += n + 1
    stream = np.concatenate(parts).astype(dtype)
    stream.tofile(path)
    return stream


def _bpe_tokenizer(path: Path, corpus: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.save(str(path))


def _global_rows(ds: TokenDataset, step: int, batch_size: int, seq_len: int, dp_size: int, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor, set[int] | None, int]:
    """The global batch of ``step`` assembled from every dp rank's slice: tokens, labels [B, L],
    the document boundaries over the B * L positions, and each rank's label_count (all equal)."""
    toks, labs, bounds, counts = [], [], set(), set()
    per = batch_size // dp_size
    for r in range(dp_size):
        b = ds.batch(step, batch_size, seq_len, seed=seed, dp_rank=r, dp_size=dp_size)
        counts.add(b.label_count)
        toks.append(b.tokens.reshape(per, seq_len))
        labs.append(b.labels.reshape(per, seq_len))
        if b.cu_seqlens is not None:
            assert b.tokens.shape == (1, per * seq_len)
            bounds.update(r * per * seq_len + c for c in b.cu_seqlens)
        else:
            assert b.tokens.shape == (per, seq_len)
            bounds = None
    assert len(counts) == 1
    return torch.cat(toks), torch.cat(labs), bounds, counts.pop()


def test_names_of_the_former_module_stay_importable():
    for name in ("Batch", "ByteCorpus", "SyntheticCopy", "make_dataset", "stdlib_source_files"):
        assert hasattr(seqpar.data, name), name
    assert seqpar.data.Batch(torch.zeros(1, 2), torch.zeros(1, 2)).cu_seqlens is None


# ------------------------------------------------------------------------------------------------
# prepare -> memmap -> batches


def test_prepare_bytes_round_trip_and_batches(tmp_path):
    rng = np.random.default_rng(1)
    texts = _texts(rng, 60)
    _write_jsonl(tmp_path / "a.jsonl", texts[:40])
    (tmp_path / "sub").mkdir()
    _write_jsonl(tmp_path / "sub" / "b.jsonl", texts[40:])
    s = prepare([str(tmp_path / "a.jsonl"), str(tmp_path / "sub")], str(tmp_path / "out"), val_fraction=0.25)
    meta = json.loads((tmp_path / "out" / "train.bin.json").read_text())
    assert (meta["format"], meta["version"], meta["dtype"], meta["eos_id"], meta["vocab_size"]) == \
        ("seqpar-tokens", 1, "uint16", 256, 257)
    assert s.documents["train"] + s.documents["val"] == 60 and s.documents["val"] > 0
    assert meta["documents"] == s.documents["train"] and meta["tokens"] == s.tokens["train"]
    assert "60 documents" in s.line() and "train.bin" in s.line()

    ds = TokenDataset(str(tmp_path / "out"))
    decoded = {}
    for split in ("train", "val"):
        arr = ds.split(split).arrays[0]
        assert isinstance(arr, np.memmap) and arr.dtype == np.uint16 and arr[-1] == 256
        decoded[split] = [bytes(d).decode("utf-8") for d in _split_docs(np.asarray(arr), 256)]
    assert _interleaves(texts, decoded["train"], decoded["val"])
    assert len(ds.train) == (tmp_path / "out" / "train.bin").stat().st_size // 2

    # one epoch of batches, rows put back at their stream positions, decodes to the train documents
    L, B = 24, 3
    n_rows = ds.rows_per_epoch(L)
    rebuilt = np.full(n_rows * L, -1)
    for step in range(-(-n_rows // B)):
        b = ds.batch(step, B, L)
        for row, t in zip(ds.row_indices(step, B, L), b.tokens.numpy()):
            rebuilt[row * L:(row + 1) * L] = t
    assert np.array_equal(rebuilt, np.asarray(ds.train.arrays[0][:n_rows * L]))
    got = [bytes(d).decode("utf-8") for d in _split_docs(rebuilt, 256)]
    assert len(got) >= 10 and got == decoded["train"][:len(got)]


def test_prepare_tokenizer_file_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    texts = _texts(rng, 40)
    _bpe_tokenizer(tmp_path / "tokenizer.json", texts)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    _write_jsonl(tmp_path / "docs.jsonl", texts, key="body")
    s = prepare([str(tmp_path / "docs.jsonl")], str(tmp_path / "out"), tokenizer=str(tmp_path / "tokenizer.json"),
                text_key="body", val_fraction=0.0)
    eos = tok.token_to_id("<|endoftext|>")
    assert (s.eos_id, s.vocab_size, s.dtype) == (eos, tok.get_vocab_size(), "uint16")
    assert not (tmp_path / "out" / "val.bin").exists()
    ds = TokenDataset(str(tmp_path / "out" / "train.bin"), val_fraction=0.0)
    docs = _split_docs(np.asarray(ds.train.arrays[0]), eos)
    assert [tok.decode(d) for d in docs] == texts
    assert ds.vocab_size == tok.get_vocab_size() and ds.eos_id == eos
    b = ds.batch(0, 2, 16)
    assert b.tokens.dtype == torch.int64 and int(b.tokens.max()) < ds.vocab_size


def test_prepare_uint32_word_level_and_forced_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["alpha", "beta", "gamma", "delta"]
    vocab = {f"filler{i}": i for i in range(70_000)}  # real words get ids above 65535
    vocab.update({w: 70_000 + i for i, w in enumerate(words)})
    vocab.update({"[UNK]": 70_010, "</s>": 70_011})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "wl.json"))
    rng = np.random.default_rng(3)
    texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 12)))) for _ in range(30)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "all.txt").write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    s = prepare([str(tmp_path / "in")], str(tmp_path / "out"), tokenizer=str(tmp_path / "wl.json"),
                split_on_blank_lines=True, val_fraction=0.0)
    assert (s.dtype, s.eos_id, s.vocab_size, s.documents["train"]) == ("uint32", 70_011, 70_012, 30)
    ds = TokenDataset(str(tmp_path / "out"), val_fraction=0.0)
    arr = ds.train.arrays[0]
    assert isinstance(arr, np.memmap) and arr.dtype == np.uint32 and int(arr.max()) > 65_535
    assert [tok.decode(d) for d in _split_docs(np.asarray(arr), 70_011)] == texts
    b = ds.batch(0, 2, 8)
    assert int(b.tokens.max()) > 65_535

    # the byte-level fallback forced to uint32
    s = prepare([str(tmp_path / "in" / "all.txt")], str(tmp_path / "out32"), dtype="uint32", val_fraction=0.0,
                split_on_blank_lines=True)
    arr = TokenDataset(str(tmp_path / "out32"), val_fraction=0.0).train.arrays[0]
    assert s.dtype == "uint32" and arr.dtype == np.uint32
    assert [bytes(d).decode() for d in _split_docs(np.asarray(arr), 256)] == texts


def test_cli_prepare_and_info(tmp_path, capsys):
    (tmp_path / "doc.txt").write_text("one\ntwo\n\nthree\n", encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "seqpar.data", "prepare", str(tmp_path / "doc.txt"), "--out",
                          str(tmp_path / "out"), "--split-on-blank-lines", "--val-fraction", "0"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("prepared 2 documents (2 train, 0 val)") and "train.bin" in out.stdout
    arr = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16)
    assert [bytes(d).decode() for d in _split_docs(arr, 256)] == ["one\ntwo", "three"]
    # in process: a second prepare into the same directory is refused, info describes it
    assert data_main(["prepare", str(tmp_path / "doc.txt"), "--out", str(tmp_path / "out")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert data_main(["info", str(tmp_path / "out"), "--val-fraction", "0", "--seq-len", "4"]) == 0
    printed = capsys.readouterr().out
    assert f"train {arr.size} tokens" in printed and "uint16, eos 256, vocab 257" in printed


# ------------------------------------------------------------------------------------------------
# row order, packing, labels


def test_permutation_is_a_bijection():
    for n in (1, 2, 3, 7, 64, 1000, 4097):
        for key in (0, 12345):
            p = permute(np.arange(n), n, key)
            assert np.array_equal(np.sort(p), np.arange(n))
    assert not np.array_equal(permute(np.arange(1000), 1000, 1), permute(np.arange(1000), 1000, 2))


@pytest.mark.parametrize("packing", [False, True])
def test_every_token_once_per_epoch(tmp_path, packing):
    rng = np.random.default_rng(4)
    L, B = 16, 4
    lengths = rng.integers(1, 40, size=40).tolist()
    total = sum(lengths) + len(lengths)
    lengths.append((total // (B * L) + 2) * B * L - total)  # stream of n * B * L + 1 tokens: B divides the rows
    stream = _raw_stream(tmp_path / "raw.bin", lengths)
    ds = TokenDataset(str(tmp_path / "raw.bin"), dtype="uint32", eos_id=0, vocab_size=len(stream) + 1,
                      packing=packing, val_fraction=0.0)
    n_rows = ds.rows_per_epoch(L)
    assert n_rows == (len(stream) - 1) // L and n_rows % B == 0
    steps = n_rows // B
    orders = []
    for epoch in range(2):
        seen = np.concatenate([ds.batch(step, B, L).tokens.reshape(-1).numpy()
                               for step in range(epoch * steps, (epoch + 1) * steps)])
        orders.append(seen)
        # every token of the stream but the last (a label only) is an input exactly once per epoch
        assert np.array_equal(np.sort(seen), np.sort(stream[:-1]))
        assert len(set(seen[seen != 0].tolist())) == int((seen != 0).sum())
    assert not np.array_equal(orders[0], orders[1])  # another order in the next epoch

    if not packing:  # the plain stream shifted by one, nothing ignored, no boundaries
        for step in range(3):
            b = ds.batch(step, B, L)
            assert b.cu_seqlens is None and b.label_count == B * L and b.tokens.shape == (B, L)
            for row, t, lab in zip(ds.row_indices(step, B, L), b.tokens.numpy(), b.labels.numpy()):
                assert np.array_equal(t, stream[row * L:row * L + L])
                assert np.array_equal(lab, stream[row * L + 1:row * L + L + 1])


def test_packing_boundaries_and_ignored_labels(tmp_path):
    rng = np.random.default_rng(5)
    L, B, dp = 32, 4, 2
    # row 0 ends with an eos (its last label is the next document's first token), a document spans rows
    lengths = [L - 1] + rng.integers(1, 50, size=40).tolist() + [3 * L]
    stream = _raw_stream(tmp_path / "raw.bin", lengths)
    ds = TokenDataset(str(tmp_path / "raw.bin"), dtype="uint32", eos_id=0, vocab_size=len(stream) + 1,
                      packing=True, val_fraction=0.0)
    saw_mid_row_boundary = saw_row_end_eos = False
    for step in range(-(-ds.rows_per_epoch(L) // B)):  # every row of an epoch
        rows = ds.row_indices(step, B, L)
        windows = np.stack([stream[r * L:r * L + L + 1] for r in rows]).astype(np.int64)
        eos_in = windows[:, :-1] == 0
        for r in range(dp):
            b = ds.batch(step, B, L, dp_rank=r, dp_size=dp)
            mine = windows[r * 2:(r + 1) * 2]
            ends = eos_in[r * 2:(r + 1) * 2]
            want_bounds = set(range(0, 2 * L + 1, L))
            for i, t in zip(*np.nonzero(ends)):
                want_bounds.add(int(i) * L + int(t) + 1)
            want_labels = np.where(ends, IGNORE, mine[:, 1:])
            assert b.tokens.shape == b.labels.shape == (1, 2 * L)
            assert np.array_equal(b.tokens.numpy().reshape(2, L), mine[:, :-1])
            assert np.array_equal(b.labels.numpy().reshape(2, L), want_labels)
            assert b.cu_seqlens == tuple(sorted(want_bounds)) and all(isinstance(c, int) for c in b.cu_seqlens)
            # the labels ignored are exactly those after an end-of-document input
            ignored = np.flatnonzero(b.labels.numpy()[0] == IGNORE)
            assert np.array_equal(ignored, np.flatnonzero(b.tokens.numpy()[0] == 0))
            assert b.label_count == B * L - int(eos_in.sum())
            saw_mid_row_boundary |= any(c % L for c in b.cu_seqlens)
            saw_row_end_eos |= bool(ends[:, -1].any())
    assert saw_mid_row_boundary and saw_row_end_eos


@pytest.mark.parametrize("packing", [False, True])
def test_global_batch_same_for_any_dp_and_fresh_object(tmp_path, packing):
    rng = np.random.default_rng(6)
    L, B = 16, 8
    stream = _raw_stream(tmp_path / "raw.bin", rng.integers(1, 30, size=30).tolist())
    kwargs = dict(dtype="uint32", eos_id=0, vocab_size=len(stream) + 1, packing=packing, val_fraction=0.0)
    ds = TokenDataset(str(tmp_path / "raw.bin"), **kwargs)
    steps = range(0, 2 * ds.rows_per_epoch(L) // B + 2)  # crosses epoch boundaries
    for step in steps:
        ref = _global_rows(ds, step, B, L, 1, seed=3)
        for dp in (2, 4):
            got = _global_rows(ds, step, B, L, dp, seed=3)
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]) and got[3] == ref[3]
            if packing:  # the same boundaries, plus every rank's row start
                assert got[2] == ref[2]
    # a fresh object (a resumed run) gives the same batch for (seed, step); another seed another one
    fresh = TokenDataset(str(tmp_path / "raw.bin"), **kwargs)
    for step in (0, 5):
        a, b = ds.batch(step, B, L, seed=3), fresh.batch(step, B, L, seed=3)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.labels, b.labels)
        assert a.cu_seqlens == b.cu_seqlens and a.label_count == b.label_count
    assert not torch.equal(ds.batch(0, B, L, seed=3).tokens, ds.batch(0, B, L, seed=4).tokens)


def test_packed_loss_equals_per_document_loss(tmp_path):
    from seqpar.config import ModelConfig
    from seqpar.model import HybridLM

    rng = np.random.default_rng(7)
    texts = [" ".join(rng.choice(["ab", "c", "dé", "f g"], size=int(rng.integers(1, 12)))) for _ in range(30)]
    _write_jsonl(tmp_path / "d.jsonl", texts)
    prepare([str(tmp_path / "d.jsonl")], str(tmp_path / "out"), val_fraction=0.0)
    ds = make_dataset(str(tmp_path / "out"), vocab_size=257, packing=True, val_fraction=0.0)
    b = ds.batch(1, 2, 48)
    docs = list(zip(b.cu_seqlens, b.cu_seqlens[1:]))
    assert len(docs) >= 4 and any(a % 48 for a, _ in docs)  # documents that start mid-row

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=257, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, pattern="LS")
    model = HybridLM(cfg).double().eval()
    with torch.no_grad():
        packed = F.cross_entropy(model(b.tokens, cu_seqlens=b.cu_seqlens)[0], b.labels[0], ignore_index=IGNORE,
                                 reduction="sum")
        alone = sum(F.cross_entropy(model(b.tokens[:, a:e])[0], b.labels[0, a:e], ignore_index=IGNORE, reduction="sum")
                    for a, e in docs)
        unmasked = F.cross_entropy(model(b.tokens)[0], b.labels[0], ignore_index=IGNORE, reduction="sum")
    assert packed.dtype == torch.float64
    assert abs(float(packed - alone)) <= 1e-9, (float(packed), float(alone))
    assert abs(float(unmasked - alone)) > 1e-6  # the boundaries matter: the test can fail
    assert int((b.labels != IGNORE).sum()) == b.label_count  # dp 1: this row is the global batch


# ------------------------------------------------------------------------------------------------
# splits


def test_val_split_cut_at_document_boundary_sibling_and_directory(tmp_path):
    rng = np.random.default_rng(8)
    stream = _raw_stream(tmp_path / "data.bin", rng.integers(1, 30, size=50).tolist(), dtype="uint16")
    ds = TokenDataset(str(tmp_path / "data.bin"), dtype="uint16", eos_id=0, val_fraction=0.2)
    cut = len(ds.train)
    assert cut + len(ds.val) == len(stream) and stream[cut - 1] == 0  # the val split starts a document
    assert abs(len(ds.val) - 0.2 * len(stream)) <= 30
    assert np.array_equal(ds.val.read(0, len(ds.val)), stream[cut:])
    assert isinstance(ds.val.arrays[0], np.memmap)
    assert ds.vocab_size == 2 ** 16  # raw file, no vocab_size given: the dtype's range

    # a train*.bin file with a val*.bin beside it: the latter is the held-out split
    (tmp_path / "data.bin").rename(tmp_path / "train_x.bin")
    val = _raw_stream(tmp_path / "val_x.bin", [5, 6, 7], dtype="uint16")
    ds = TokenDataset(str(tmp_path / "train_x.bin"), dtype="uint16", eos_id=0)
    assert len(ds.train) == len(stream) and np.array_equal(ds.val.read(0, len(val)), val)

    # a directory: train*.bin shards concatenated virtually (rows read across the shard boundary)
    d = tmp_path / "dir"
    d.mkdir()
    a = _raw_stream(d / "train_00.bin", [10, 20], dtype="uint16")
    c = _raw_stream(d / "train_01.bin", [15, 4], dtype="uint16")
    both = np.concatenate([a, c])
    ds = TokenDataset(str(d), dtype="uint16", eos_id=0, vocab_size=100, val_fraction=0.25)
    assert len(ds.train) + len(ds.val) == len(both) and ds.train.read(len(a) - 3, len(a) + 3).tolist() == \
        both[len(a) - 3:len(a) + 3].tolist()
    assert all(isinstance(x, np.memmap) for x in ds.train.arrays)
    _raw_stream(d / "val.bin", [8], dtype="uint16")
    ds = TokenDataset(str(d), dtype="uint16", eos_id=0, vocab_size=100)
    assert len(ds.train) == len(both) and len(ds.val) == 9
    assert ds.state()["train_files"] == [["train_00.bin", len(a)], ["train_01.bin", len(c)]]


# ------------------------------------------------------------------------------------------------
# bad inputs


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="data path .*missing.bin does not exist"):
        TokenDataset(str(tmp_path / "missing.bin"))
    with pytest.raises(ValueError, match=r"unknown dataset 'no_such_data'.*no file or directory"):
        make_dataset("no_such_data")

    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02\x00\x03")
    with pytest.raises(ValueError, match=r"odd.bin has 5 bytes, not a multiple of 2 \(the size of uint16\)"):
        TokenDataset(str(tmp_path / "odd.bin"), dtype="uint16", eos_id=0)

    np.arange(1, 100, dtype=np.uint16).tofile(tmp_path / "raw.bin")
    with pytest.raises(ValueError, match=r"no metadata .*raw.bin.json: pass the token dtype .*--data-dtype.* and the "
                                         r"end-of-document token id \(--eos-id\)"):
        TokenDataset(str(tmp_path / "raw.bin"))
    with pytest.raises(ValueError, match=r"pass the end-of-document token id \(--eos-id\) \("):
        make_dataset(str(tmp_path / "raw.bin"), data_dtype="uint16")

    bad = (np.arange(328) % 41).astype(np.uint16)  # documents of 40 ids 1..40, eos 0
    bad[100] = 300
    bad.tofile(tmp_path / "ids.bin")
    ds = TokenDataset(str(tmp_path / "ids.bin"), dtype="uint16", eos_id=0, vocab_size=257, val_fraction=0.0)
    with pytest.raises(ValueError, match=r"token id 300 at token 100 of .*ids.bin \(train split\) is not below the "
                                         r"vocabulary size 257 \(the model's vocab_size\)"):
        for step in range(ds.rows_per_epoch(16)):
            ds.batch(step, 1, 16)

    with pytest.raises(ValueError, match=r"the train split of .*ids.bin has 328 tokens: too short for one row of "
                                         r"seq_len 400 \(401 tokens"):
        ds.batch(0, 1, 400)
    with pytest.raises(ValueError, match="global batch size 3 is not divisible by the data-parallel size 2"):
        ds.batch(0, 3, 8, dp_size=2)

    (tmp_path / "in.jsonl").write_text('{"text": "a b c"}\n{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"in.jsonl:2: no field 'text' \(fields: \['body'\]\)"):
        prepare([str(tmp_path / "in.jsonl")], str(tmp_path / "p1"))
    assert not (tmp_path / "p1" / "train.bin").exists() and not list((tmp_path / "p1").glob("*.partial"))
    (tmp_path / "in.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"in.csv: unsupported file type; expected .txt or .md or .rst or .jsonl"):
        prepare([str(tmp_path / "in.csv")], str(tmp_path / "p2"))

    (tmp_path / "good.jsonl").write_text('{"body": "x"}\n', encoding="utf-8")
    prepare([str(tmp_path / "good.jsonl")], str(tmp_path / "p3"), text_key="body", val_fraction=0.0)
    with pytest.raises(ValueError, match=r"dtype 'uint32' was given for .*train.bin, but its metadata .* says 'uint16'"):
        TokenDataset(str(tmp_path / "p3"), dtype="uint32")
    with pytest.raises(ValueError, match=r"vocabulary has 257 ids .* model's vocab_size is 256: pass --vocab-size 257"):
        make_dataset(str(tmp_path / "p3"), vocab_size=256)
    with open(tmp_path / "p3" / "train.bin", "ab") as fh:
        fh.write(b"\x00\x00")
    with pytest.raises(ValueError, match=r"holds 3 uint16 tokens \(6 bytes\) but its metadata says 2"):
        TokenDataset(str(tmp_path / "p3"))
    with pytest.raises(ValueError, match=r"directory .* has no train\*.bin files"):
        TokenDataset(str(tmp_path / "p1"))
    with pytest.raises(ValueError, match=r"packing=True apply to token files, not to the built-in dataset 'stdlib'"):
        make_dataset("stdlib", packing=True)
    synthetic = make_dataset("synthetic")
    assert isinstance(synthetic, SyntheticCopy) and synthetic.vocab_size == 256

    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "noeos.json"))
    with pytest.raises(ValueError, match=r"no end-of-document token: tried \['<\|endoftext\|>', '</s>'.*--eos-token"):
        prepare([str(tmp_path / "in.jsonl")], str(tmp_path / "p4"), tokenizer=str(tmp_path / "noeos.json"))
