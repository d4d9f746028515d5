"""Collectives of seqpar.comm on real gloo processes, against what each rank should receive."""
from __future__ import annotations

import pytest
import torch

from seqpar.comm import all_gather, all_to_all, reduce_scatter, ring_exchange, send_recv


def _rank_tensor(rank: int, shape=(3, 5)) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def case_collectives(ctx):
    r, P, g = ctx.rank, ctx.world_size, ctx.group
    x = _rank_tensor(r)
    # ring exchange in both directions, two tensors at once
    fwd = ring_exchange([x, 2 * x], g).wait()
    bwd = ring_exchange([x], g, shift=-1).wait()
    assert torch.equal(fwd[0], _rank_tensor((r - 1) % P)) and torch.equal(fwd[1], 2 * _rank_tensor((r - 1) % P))
    assert torch.equal(bwd[0], _rank_tensor((r + 1) % P))
    # all-gather
    gathered = all_gather(x, g).wait()
    assert gathered.shape == (P, 3, 5)
    for p in range(P):
        assert torch.equal(gathered[p], _rank_tensor(p))
    # reduce-scatter: slice p of every rank's input goes to rank p, summed
    stacked = torch.stack([_rank_tensor(r * 10 + p) for p in range(P)])
    mine = reduce_scatter(stacked, g).wait()
    expect = sum(_rank_tensor(q * 10 + r) for q in range(P))
    torch.testing.assert_close(mine, expect)
    # all-to-all: [B, T/P, H, D] -> [B, T, H/P, D]
    a = torch.arange(2 * 3 * (2 * P) * 4, dtype=torch.float32).reshape(2, 3, 2 * P, 4) + 1000 * r
    out = all_to_all(a, g, scatter_dim=2, gather_dim=1).wait()
    assert out.shape == (2, 3 * P, 2, 4)
    for p in range(P):
        src = torch.arange(2 * 3 * (2 * P) * 4, dtype=torch.float32).reshape(2, 3, 2 * P, 4) + 1000 * p
        assert torch.equal(out[:, 3 * p:3 * (p + 1)], src[:, :, 2 * r:2 * r + 2])
    # point-to-point chain 0 -> 1 -> ... (LASP-style)
    if P > 1:
        got = send_recv(None, None, x, r - 1, g).wait() if r > 0 else None
        if r > 0:
            assert torch.equal(got, _rank_tensor(r - 1))
        if r < P - 1:
            send_recv(x, r + 1, None, None, g).wait()
    return True


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_collectives(pool, world_size):
    assert all(pool.run(case_collectives, world_size))


def case_bad_reduce_scatter(ctx):
    with pytest.raises(ValueError, match="group size"):
        reduce_scatter(torch.zeros(ctx.world_size + 1, 2), ctx.group)
    with pytest.raises(ValueError, match="not divisible by the group size"):
        all_to_all(torch.zeros(2, ctx.world_size + 1), ctx.group, scatter_dim=1, gather_dim=0)
    return True


def test_bad_collective_inputs(pool):
    assert all(pool.run(case_bad_reduce_scatter, 3))
