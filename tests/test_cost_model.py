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
