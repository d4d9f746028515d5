"""Collectives of seqpar.comm on real gloo processes, against what each rank should receive."""
from __future__ import annotations

import pytest
import torch

from seqpar.comm import all_gather, all_to_all, all_to_all_many, exchange, reduce_scatter, ring_exchange, send_recv


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


def case_all_to_all_many(ctx):
    """Several tensors (two dtypes, different scatter / gather axes, a strided view) in one
    all_to_all_many: each result is chunk r of every rank's tensor, concatenated in rank order
    (the other ranks' inputs rebuilt here from their seeds)."""
    r, P, g = ctx.rank, ctx.world_size, ctx.group

    def inputs(rank):
        gen = torch.Generator().manual_seed(7 + rank)
        return [torch.randn(2, 3, 2 * P, 4, generator=gen),                          # heads scattered
                torch.randn(2, 2 * P, 3, generator=gen, dtype=torch.float64),        # heads of [B, H, T]
                torch.randn(2, 4, 5 * P, generator=gen).transpose(1, 2),             # strided, tokens scattered
                torch.randn(2, 3, 2 * P, 4, generator=gen)]
    scatter, gather = [2, 1, 1, 2], [1, 2, 2, 1]
    got = all_to_all_many(inputs(r), g, scatter_dims=scatter, gather_dims=gather).wait()
    assert len(got) == 4
    for i, (s_, d) in enumerate(zip(scatter, gather)):
        want = torch.cat([inputs(p)[i].chunk(P, dim=s_)[r] for p in range(P)], dim=d)
        assert got[i].dtype == want.dtype and got[i].shape == want.shape and torch.equal(got[i], want), i
    q, k = inputs(r)[0], inputs(r)[3]
    if P > 1:
        with pytest.raises(ValueError, match=r"not divisible by the group size \d+ \(tensor 1 of 2\)"):
            all_to_all_many([q, torch.zeros(2, P + 1)], g, scatter_dims=[2, 1], gather_dims=[1, 0])
    with pytest.raises(ValueError, match="2 tensors but 1 scatter dims"):
        all_to_all_many([q, k], g, scatter_dims=[2], gather_dims=[1, 1])
    return True


def case_ring_exchange_packed(ctx):
    """ring_exchange sends the tensors of one dtype as one message and returns views of one
    buffer; passing those on sends that buffer itself (no copy); values, shapes and dtypes are
    those of the neighbours, two hops on and with smaller receive shapes."""
    from seqpar.comm.collectives import _packed

    r, P, g = ctx.rank, ctx.world_size, ctx.group

    def mine(rank):
        gen = torch.Generator().manual_seed(50 + rank)
        return [torch.randn(2, 3, generator=gen, dtype=torch.float64),
                torch.randn(4, 1, generator=gen, dtype=torch.float32),
                torch.randn(3, 2, generator=gen, dtype=torch.float64).t()]  # strided
    hop1 = ring_exchange(mine(r), g).wait()
    for got, want in zip(hop1, mine((r - 1) % P)):
        assert got.dtype == want.dtype and torch.equal(got, want)
    if P > 1:  # the fp64 pair arrived as consecutive views of one buffer: forwarded without a copy
        assert _packed(hop1, [0, 2]).data_ptr() == hop1[0].data_ptr()
    hop2 = ring_exchange(hop1, g).wait()
    for got, want in zip(hop2, mine((r - 2) % P)):
        assert torch.equal(got, want)
    part = ring_exchange([mine(r)[0][:1], mine(r)[1]], g, recv_shapes=[(1, 3), (4, 1)]).wait()
    assert torch.equal(part[0], mine((r - 1) % P)[0][:1]) and torch.equal(part[1], mine((r - 1) % P)[1])
    return True


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ring_exchange_packed(pool, world_size):
    assert all(pool.run(case_ring_exchange_packed, world_size))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_all_to_all_many(pool, world_size):
    assert all(pool.run(case_all_to_all_many, world_size))


def case_bad_reduce_scatter(ctx):
    with pytest.raises(ValueError, match="group size"):
        reduce_scatter(torch.zeros(ctx.world_size + 1, 2), ctx.group)
    with pytest.raises(ValueError, match="not divisible by the group size"):
        all_to_all(torch.zeros(2, ctx.world_size + 1), ctx.group, scatter_dim=1, gather_dim=0)
    return True


def test_bad_collective_inputs(pool):
    assert all(pool.run(case_bad_reduce_scatter, 3))


def _message(src: int, dst: int, index: int) -> torch.Tensor:
    """What rank src sends rank dst as the index-th tensor (shapes and dtypes differ per index)."""
    g = torch.Generator().manual_seed(1000 * src + 10 * dst + index)
    return torch.randn(2 + index, 3, generator=g, dtype=torch.float64 if index == 0 else torch.float32)


# who sends to whom: every rank to every other; a one-way band (rank r to r + 1 and r + 2: rank 0
# receives nothing, the last rank sends nothing); only rank 0 sends (to everyone); nobody
PATTERNS = {
    "all": lambda src, dst, P: src != dst,
    "band": lambda src, dst, P: 0 < dst - src <= 2,
    "from-0": lambda src, dst, P: src == 0 and dst != 0,
    "none": lambda src, dst, P: False,
}


def case_exchange(ctx, pattern: str):
    r, P, g = ctx.rank, ctx.world_size, ctx.group
    talks = PATTERNS[pattern]
    sends = {d: [_message(r, d, 0), _message(r, d, 1)] for d in range(P) if talks(r, d, P)}
    likes = {s: [_message(s, r, 0), _message(s, r, 1)] for s in range(P) if talks(s, r, P)}
    got = exchange(sends, {s: [torch.empty_like(t) for t in ts] for s, ts in likes.items()}, g).wait()
    assert sorted(got) == sorted(likes)
    for s, expected in likes.items():
        assert len(got[s]) == 2
        for a, b in zip(got[s], expected):
            assert a.dtype == b.dtype and torch.equal(a, b)
    # one tensor (a non-contiguous view) to several peers, twice in flight at once
    x = _rank_tensor(r, (4, 6))[:, ::2]
    peers = [d for d in range(P) if d != r]
    first = exchange({d: [x] for d in peers}, {s: [x] for s in peers}, g)
    second = exchange({d: [2 * x] for d in peers}, {s: [x] for s in peers}, g)
    for s, (a,) in first.wait().items():
        assert torch.equal(a, _rank_tensor(s, (4, 6))[:, ::2])
    for s, (a,) in second.wait().items():
        assert torch.equal(a, 2 * _rank_tensor(s, (4, 6))[:, ::2])
    with pytest.raises(ValueError, match="expected another rank of the group"):
        exchange({r: [x]}, {}, g)
    with pytest.raises(ValueError, match="expected another rank of the group"):
        exchange({}, {P: [x]}, g)
    return True


@pytest.mark.parametrize("world_size,pattern", [(w, p) for w in (1, 2, 3, 4) for p in PATTERNS if w > 1 or p == "none"])
def test_exchange_with_some_peers(pool, world_size, pattern):
    """exchange sends each listed peer its tensors and receives from each listed peer, whatever
    the pattern (ranks that send or receive nothing included), in one batch per call."""
    assert all(pool.run(case_exchange, world_size, pattern=pattern))
