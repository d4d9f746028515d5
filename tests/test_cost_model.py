"""The cost model's work counts are exact: they must equal a brute-force count of the causal
mask over global positions, for every layout and world size."""
from __future__ import annotations

import pytest
import torch

from seqpar.cost_model import Machine, Shape, _pairs_per_step, linear_estimate, softmax_estimate, visible_pairs
from seqpar.layout import global_positions


@pytest.mark.parametrize("q_len,k_len,offset", [(5, 7, None), (6, 6, 0), (6, 6, -1), (4, 9, 3), (9, 4, -5), (3, 3, -7)])
def test_visible_pairs_matches_mask(q_len, k_len, offset):
    i = torch.arange(q_len).unsqueeze(1)
    j = torch.arange(k_len).unsqueeze(0)
    expect = q_len * k_len if offset is None else int((j <= i + offset).sum())
    assert visible_pairs(q_len, k_len, offset) == expect


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_pairs_per_rank_match_brute_force(layout, world_size):
    local_len = 6
    pairs = _pairs_per_step(layout, world_size, local_len, causal=True)
    for r in range(world_size):
        q_pos = global_positions(layout, r, world_size, local_len)
        for step in range(world_size):
            k_pos = global_positions(layout, (r - step) % world_size, world_size, local_len)
            assert pairs[step][r] == int((k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)).sum())


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
    dK/dV in fp32 on one more hop) and a ring all-reduce of fp32 gradients."""
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
    assert short.gradient_all_reduce == pytest.approx(2 * 3 / 4 * 4000 + 2 * 1 / 2 * 4000)
    assert long.attention_forward - 6 * state == 4 * (short.attention_forward - 6 * state)
    assert step_bytes_per_rank(model, SequenceParallelConfig(), 1024, 1, 2, num_params=1000).total == 0
