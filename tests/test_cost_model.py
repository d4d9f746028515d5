"""The cost model's work counts are exact: they must equal a brute-force count of the mask (causal,
sliding window, packed documents) over global positions, for every layout and world size; the
closed-form pair count must equal a dense count; a window must shorten the ring; and
benchmarks/masks.py must run."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seqpar.cost_model import (Machine, Shape, _pairs_per_step, block_tasks_per_rank, linear_estimate,
                               softmax_estimate, visible_pairs)
from seqpar.layout import global_positions
from seqpar.masks import AttentionMask

from mask_reference import band_mask, global_mask

ROOT = Path(__file__).resolve().parent.parent


def _dense_band(q_len: int, k_len: int, hi: int | None, lo: int | None) -> int:
    """Visible pairs of the band, counted on the dense mask of the test oracle."""
    return int(band_mask(q_len, k_len, hi, lo).sum())


@pytest.mark.parametrize("q_len,k_len,offset", [(5, 7, None), (6, 6, 0), (6, 6, -1), (4, 9, 3), (9, 4, -5), (3, 3, -7)])
def test_visible_pairs_matches_mask(q_len, k_len, offset):
    assert visible_pairs(q_len, k_len, offset) == _dense_band(q_len, k_len, offset, None)


def test_visible_pairs_closed_form_matches_dense_bands():
    """Every band lo <= j - i <= hi (either side open) of every small block: square, wide, tall,
    empty, negative and positive offsets, bands past either edge, empty bands (lo > hi)."""
    offsets = [None] + list(range(-9, 10))
    for q_len in range(0, 7):
        for k_len in range(0, 7):
            for hi in offsets:
                for lo in offsets:
                    assert visible_pairs(q_len, k_len, hi, lo) == _dense_band(q_len, k_len, hi, lo), (q_len, k_len, hi, lo)


def test_visible_pairs_large_blocks_are_instant():
    n, w = 1 << 17, 4096
    start = time.perf_counter()
    assert visible_pairs(n, n, 0) == n * (n + 1) // 2
    assert visible_pairs(n, n, None) == n * n
    # causal window w: row i sees min(i + 1, w) keys
    assert visible_pairs(n, n, 0, 1 - w) == w * (w + 1) // 2 + (n - w) * w
    assert visible_pairs(n, n, -n) == 0 and visible_pairs(n, n, 5, 6) == 0
    assert visible_pairs(n, 3 * n, n, n) == n  # a single diagonal
    assert time.perf_counter() - start < 0.05


def _dense_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """Which keys each query sees, straight from global positions (the test oracle's mask, no block plan)."""
    return global_mask(q_pos, k_pos, causal=mask.causal, window=mask.window, cu_seqlens=mask.documents)


def _masks(global_len: int) -> list[AttentionMask]:
    """Plain, windowed, documented (fixed and random boundaries) and both, causal and not."""
    rng = random.Random(global_len)
    fixed = (0, 1, global_len // 3, global_len // 3 + 2, global_len - 1, global_len)
    drawn = tuple(sorted({0, global_len, *rng.sample(range(1, global_len), min(5, global_len - 1))}))
    masks = [AttentionMask(True), AttentionMask(False)]
    for window in (1, 2, 5, global_len // 2 + 1, global_len + 3):
        masks.append(AttentionMask(True, window))
    for docs in (fixed, drawn):
        masks += [AttentionMask(True, None, docs), AttentionMask(False, None, docs),
                  AttentionMask(True, 3, docs), AttentionMask(True, 7, docs)]
    return masks


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_pairs_per_rank_match_brute_force(layout, world_size):
    local_len = 6
    pairs = _pairs_per_step(layout, world_size, local_len, mask=True)
    for r in range(world_size):
        q_pos = global_positions(layout, r, world_size, local_len)
        for step in range(world_size):
            k_pos = global_positions(layout, (r - step) % world_size, world_size, local_len)
            assert pairs[step][r] == int((k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)).sum())


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_pairs_per_step_under_masks_match_dense_mask(layout, world_size):
    """Documents, windows, both, non-causal documents: the per-step pairs of every rank equal the
    dense mask over global positions."""
    local_len = 10
    global_len = local_len * world_size
    positions = [global_positions(layout, r, world_size, local_len) for r in range(world_size)]
    for mask in _masks(global_len):
        pairs = _pairs_per_step(layout, world_size, local_len, mask)
        for r in range(world_size):
            for step in range(world_size):
                expect = int(_dense_mask(positions[r], positions[(r - step) % world_size], mask).sum())
                assert pairs[step][r] == expect, (mask, r, step)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_ulysses_and_usp_work_match_dense_mask(layout):
    """Ulysses: every rank does 1/P of all visible pairs; USP: a ring row of U ranks does its
    queries' pairs against every key, split over U ranks."""
    P, local_len = 4, 10
    shape = Shape(seq_len=P * local_len, heads=4, kv_heads=4, head_dim=8)
    flop_per_pair = 4 * shape.heads * shape.head_dim
    all_pos = torch.arange(shape.seq_len)
    for mask in _masks(shape.seq_len):
        total = int(_dense_mask(all_pos, all_pos, mask).sum())
        ulysses = softmax_estimate("ulysses", layout, P, shape, Machine(), mask=mask)
        assert ulysses.max_rank_tflop * 1e12 == pytest.approx(total * flop_per_pair / P)
        assert ulysses.imbalance == pytest.approx(1.0) and ulysses.ring_steps == 1
        usp = softmax_estimate("usp", layout, P, shape, Machine(), mask=mask, ulysses_size=2)
        rows = [torch.cat([global_positions(layout, 2 * i + u, P, local_len) for u in range(2)]) for i in range(2)]
        per_row = [int(_dense_mask(q, all_pos, mask).sum()) for q in rows]
        assert usp.max_rank_tflop * 1e12 == pytest.approx(max(per_row) * flop_per_pair / 2)
        assert usp.mean_rank_tflop * 1e12 == pytest.approx(total * flop_per_pair / P)


def test_window_ring_sends_fewer_bytes():
    """T_local = 128K, window 4K, P = 8: a contiguous ring visits 2 blocks (1 hop, carrying the
    4095 keys the next rank sees) instead of 8; zigzag and striped still need every rank's keys; the all-gather sends only the keys a rank's
    window reaches (4095 of 131072) to the ranks that see them."""
    shape, machine = Shape(seq_len=1 << 20), Machine()
    kv_local = 2 * (1 << 17) * shape.kv_heads * shape.head_dim * shape.element_bytes
    causal = softmax_estimate("ring", "contiguous", 8, shape, machine)
    window = softmax_estimate("ring", "contiguous", 8, shape, machine, mask=AttentionMask(True, 4096))
    assert causal.bytes_sent_per_rank == 7 * kv_local and causal.ring_steps == 8
    # one hop of the last 4095 keys of a block: O(window), not O(T_local)
    assert window.bytes_sent_per_rank == pytest.approx(kv_local * 4095 / (1 << 17))
    assert window.ring_steps == 2 and window.serial_steps == 1
    assert window.fwd_ms < causal.fwd_ms / 50 and window.imbalance < 1.01
    for layout in ("zigzag", "striped"):  # every rank's keys are needed: all 8 blocks travel
        est = softmax_estimate("ring", layout, 8, shape, machine, mask=AttentionMask(True, 4096))
        assert est.ring_steps == 8 and kv_local < est.bytes_sent_per_rank <= 7 * kv_local
    # zero-redundant all-gather: a contiguous rank sends only its last 4095 keys, to the next rank;
    # a zigzag rank the last 4095 keys of each of its two chunks, each to one rank
    gather = softmax_estimate("allgather", "contiguous", 8, shape, machine, mask=AttentionMask(True, 4096))
    assert gather.bytes_sent_per_rank == kv_local * 4095 // (1 << 17)
    assert gather.max_rank_tflop == pytest.approx(window.max_rank_tflop)
    assert gather.fwd_ms < window.fwd_ms * 1.01  # the gather hides behind the compute
    gather = softmax_estimate("allgather", "zigzag", 8, shape, machine, mask=AttentionMask(True, 4096))
    assert gather.bytes_sent_per_rank == 2 * kv_local * 4095 // (1 << 17)
    gather = softmax_estimate("allgather", "contiguous", 8, shape, machine)  # no window: the collective
    assert gather.bytes_sent_per_rank == 7 * kv_local
    # the work: every query sees min(position + 1, 4096) keys
    pairs = sum(min(i + 1, 4096) for i in range(4096)) + ((1 << 20) - 4096) * 4096
    assert window.mean_rank_tflop * 1e12 == pytest.approx(pairs * 4 * shape.heads * shape.head_dim / 8)


def test_causal_argument_and_mask_agree():
    shape, machine = Shape(seq_len=4096, heads=8, kv_heads=2, head_dim=64), Machine()
    plain = softmax_estimate("ring", "zigzag", 4, shape, machine)
    assert plain == softmax_estimate("ring", "zigzag", 4, shape, machine, causal=True)
    assert plain == softmax_estimate("ring", "zigzag", 4, shape, machine, mask=AttentionMask(True))
    assert plain == softmax_estimate("ring", "zigzag", 4, shape, machine, mask=True)
    full = softmax_estimate("ring", "zigzag", 4, shape, machine, causal=False)
    assert full == softmax_estimate("ring", "zigzag", 4, shape, machine, mask=False)
    assert full.max_rank_tflop == pytest.approx(2 * plain.max_rank_tflop, rel=1e-3)
    with pytest.raises(ValueError, match="contradicts"):
        softmax_estimate("ring", "zigzag", 4, shape, machine, causal=False, mask=AttentionMask(True))
    with pytest.raises(ValueError, match="sequence length"):
        softmax_estimate("ring", "zigzag", 4, shape, machine, mask=AttentionMask(True, None, (0, 10, 100)))


def test_million_tokens_with_documents_is_fast():
    """1M tokens, P = 8, 500 documents (fresh boundaries: nothing cached), window or not: each
    estimate takes well under 2 s."""
    T = 1 << 20
    rng = random.Random(1234)
    docs = tuple([0] + sorted(rng.sample(range(1, T), 499)) + [T])
    shape, machine = Shape(seq_len=T), Machine()
    for mask in (AttentionMask(True, None, docs), AttentionMask(True, 8192, docs)):
        for layout in ("contiguous", "zigzag", "striped"):
            for strategy in ("ring", "allgather", "ulysses"):
                start = time.perf_counter()
                est = softmax_estimate(strategy, layout, 8, shape, machine, mask=mask)
                assert time.perf_counter() - start < 2.0, (mask.describe(), layout, strategy)
                assert est.mean_rank_tflop > 0
    # kernel calls: a striped rank runs one task per document per K/V block
    assert max(block_tasks_per_rank("ring", "striped", 8, T, AttentionMask(True, None, docs))) >= 500


def test_balanced_layouts_and_volumes():
    shape, machine = Shape(seq_len=4096, heads=8, kv_heads=2, head_dim=64), Machine()
    ring = softmax_estimate("ring", "contiguous", 4, shape, machine)
    zigzag = softmax_estimate("ring", "zigzag", 4, shape, machine)
    assert ring.imbalance > 1.5 and zigzag.imbalance == pytest.approx(1.0)
    lasp2 = linear_estimate("lasp2", 8, shape, machine)
    lasp1 = linear_estimate("lasp1", 8, shape, machine)
    state = 8 * 64 * 64 * 4
    assert lasp2.bytes_sent_per_rank == 7 * state and lasp1.bytes_sent_per_rank == state
    with pytest.raises(ValueError, match="not divisible"):
        softmax_estimate("ring", "zigzag", 3, Shape(seq_len=100), machine)


def test_step_bytes_per_rank():
    """Bytes one rank sends per step: softmax K/V bytes grow with the length, linear states do
    not; the values follow the per-layer estimates (ring: K/V forward; backward K/V again plus
    dK/dV in fp32 on one more hop) and FSDP2's two parameter all-gathers and one fp32 gradient
    reduce-scatter over all dp x sp ranks."""
    from seqpar.config import ModelConfig, SequenceParallelConfig
    from seqpar.cost_model import step_bytes_per_rank

    model = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, pattern="LS")
    sp = SequenceParallelConfig(sp_size=4, layout="zigzag", softmax_strategy="ring", linear_strategy="lasp2")
    short = step_bytes_per_rank(model, sp, 1024, 1, 2, num_params=1000, dp_size=2)
    long = step_bytes_per_rank(model, sp, 4096, 1, 2, num_params=1000, dp_size=2)
    kv = 2 * 1 * (1024 // 4) * 2 * 16 * 2  # K and V of the local block: B T/P Hkv D, 2 bytes
    state = 1 * 4 * 16 * 16 * 4
    assert short.attention_forward == 3 * kv + 2 * 3 * state  # ring: P-1 hops; lasp2: 2 zigzag chunks x (P-1)
    assert short.attention_backward == 3 * kv + 2 * kv * 4 + 2 * 3 * state
    assert short.fsdp == pytest.approx(7 / 8 * 1000 * (2 * 4 + 4))  # FSDP2 over 8 ranks: 2 gathers + 1 reduce-scatter
    assert long.attention_forward - 6 * state == 4 * (short.attention_forward - 6 * state)
    assert step_bytes_per_rank(model, SequenceParallelConfig(), 1024, 1, 2, num_params=1000).total == 0


def test_masks_benchmark_quick(tmp_path):
    out = tmp_path / "masks"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "masks.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| mask | layout | strategy |" in proc.stdout and "Imbalance" in proc.stdout
    md = out.with_suffix(".md").read_text()
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in md.splitlines() if ln.startswith("| ")]
    detail = [r for r in rows if len(r) == 10 and r[1] in ("contiguous", "zigzag", "striped", "balanced")]
    assert len(detail) == 4 * 4 * 3  # masks x layouts x strategies
    assert {r[0] for r in detail} >= {"causal", "window 4K"}
    steps = {(r[0], r[1]): r[8] for r in detail if r[2] == "ring"}
    assert steps["causal", "contiguous"] == "8" and steps["window 4K", "contiguous"] == "2"
    imbalance = {(r[0], r[1], r[2]): float(r[6]) for r in detail}
    documents = next(r[0] for r in detail if r[0].endswith("documents"))
    assert imbalance[documents, "balanced", "ring"] <= 1.05 < imbalance[documents, "contiguous", "ring"]
    import json

    data = json.loads(out.with_suffix(".json").read_text())
    assert len(data["rows"]) == len(detail) and data["meta"]["machine"]["name"]


def test_step_bytes_follow_the_model_window():
    """The dry run's bytes per step use the softmax layers' window: a window far shorter than a
    rank's shard sends a fraction of the causal bytes."""
    from seqpar.config import ModelConfig, SequenceParallelConfig
    from seqpar.cost_model import step_bytes_per_rank

    sp = SequenceParallelConfig(sp_size=4, layout="contiguous", softmax_strategy="ring", linear_strategy="lasp2")
    full = step_bytes_per_rank(ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, pattern="S"), sp, 4096, 1, 2,
                               num_params=0)
    windowed = step_bytes_per_rank(ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, pattern="S", window=65),
                                   sp, 4096, 1, 2, num_params=0)
    assert 0 < windowed.attention_forward < full.attention_forward / 10


def test_lasp2_bytes_include_the_transitions_that_travel():
    """LASP-2 gathers a state per piece plus its transition when that depends on the tokens: the
    estimate follows docs/linear.md's table (B*H*(Dk*Dv + a)*4 per piece, a = 0, 1, Dk or Dk^2)."""
    shape = Shape(batch=1, seq_len=8192, heads=16, kv_heads=16, head_dim=128, element_bytes=2)
    P, B, H, Dk, Dv = 8, 1, 16, 128, 64
    for transition, extra in (("none", 0), ("scalar", 1), ("gla", Dk), ("delta", Dk * Dk)):
        est = linear_estimate("lasp2", P, shape, Machine(), chunks_per_rank=2, transition=transition, value_dim=Dv)
        assert est.bytes_sent_per_rank == 2 * (P - 1) * B * H * (Dk * Dv + extra) * 4, transition
