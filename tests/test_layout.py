"""seqpar.layout: index maps (shard / unshard / global positions / permutation), segments and the
causal block plan that every softmax strategy builds its work from."""
from __future__ import annotations

import math

import pytest
import torch

from seqpar.layout import (
    LAYOUTS,
    Segment,
    check_global_length,
    chunks_per_rank,
    concat_segments,
    global_positions,
    permutation,
    plan_blocks,
    segments,
    shard_tensor,
    sort_row,
    unshard_tensor,
)

WORLD_SIZES = (1, 2, 3, 4)
LOCAL_LENGTHS = (6, 10)


def _expected_positions(layout: str, rank: int, world_size: int, local_len: int) -> list[int]:
    """Positions straight from the definitions in docs/softmax.md ("Layouts")."""
    length = world_size * local_len
    if layout == "contiguous" or world_size == 1:
        return list(range(rank * local_len, (rank + 1) * local_len))
    if layout == "striped":
        return [t for t in range(length) if t % world_size == rank]
    chunk = length // (2 * world_size)
    first, second = rank, 2 * world_size - 1 - rank
    return list(range(first * chunk, (first + 1) * chunk)) + list(range(second * chunk, (second + 1) * chunk))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("local_len", LOCAL_LENGTHS)
def test_positions_shard_unshard_round_trip(layout, world_size, local_len):
    length = world_size * local_len
    x = torch.randn(2, length, 3, 5, dtype=torch.float64)
    shards = []
    for rank in range(world_size):
        expected = _expected_positions(layout, rank, world_size, local_len)
        assert global_positions(layout, rank, world_size, local_len).tolist() == expected
        assert torch.cat([s.positions() for s in segments(layout, rank, world_size, local_len)]).tolist() == expected
        shard = shard_tensor(x, layout, rank, world_size)
        assert torch.equal(shard, x[:, expected])
        shards.append(shard)
    assert torch.equal(unshard_tensor(shards, layout), x)
    perm = permutation(layout, world_size, length)
    assert sorted(perm.tolist()) == list(range(length))
    assert torch.equal(x[:, perm], torch.cat(shards, dim=1))
    # another dim (the lse layout [B, H, T])
    lse = torch.randn(2, 3, length)
    assert torch.equal(unshard_tensor([shard_tensor(lse, layout, r, world_size, dim=2) for r in range(world_size)],
                                      layout, dim=2), lse)


def _mask_from_plan(tasks, q_len: int, k_len: int) -> torch.Tensor:
    """How many planned blocks cover each (query, key) pair."""
    cover = torch.zeros(q_len, k_len, dtype=torch.long)
    for t in tasks:
        i = torch.arange(t.q_len).unsqueeze(1)
        j = torch.arange(t.k_len).unsqueeze(0)
        visible = torch.ones(t.q_len, t.k_len, dtype=torch.bool) if t.diagonal_offset is None \
            else j <= i + t.diagonal_offset
        assert visible.any(), f"planned a fully masked block {t}"
        cover[t.q_start:t.q_start + t.q_len, t.k_start:t.k_start + t.k_len] += visible.long()
    return cover


def _row_segments(layout, first_rank, count, world_size, local_len):
    return concat_segments([segments(layout, first_rank + i, world_size, local_len) for i in range(count)])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("causal", [True, False])
def test_plan_blocks_reproduces_the_mask_of_global_positions(layout, world_size, causal):
    """For every query rank and every key source rank the planned blocks cover exactly the pairs
    the causal mask in global positions allows, each once (and every pair when non-causal)."""
    local_len = 6
    for q_rank in range(world_size):
        q_segs = segments(layout, q_rank, world_size, local_len)
        q_pos = global_positions(layout, q_rank, world_size, local_len)
        for k_rank in range(world_size):
            k_segs = segments(layout, k_rank, world_size, local_len)
            k_pos = global_positions(layout, k_rank, world_size, local_len)
            cover = _mask_from_plan(plan_blocks(q_segs, k_segs, causal), local_len, local_len)
            expected = (k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)) if causal else torch.ones(local_len, local_len,
                                                                                           dtype=torch.bool)
            assert torch.equal(cover, expected.long()), (layout, world_size, q_rank, k_rank)


def _positions(segs) -> torch.Tensor:
    return torch.cat([s.positions() for s in segs])


def _held_row(layout, ring_rank, ulysses_size, world_size, local_len):
    """(segments, positions) of a row as a rank holds it: sorted where ``sort_row`` says so."""
    per_rank = [segments(layout, ring_rank * ulysses_size + u, world_size, local_len) for u in range(ulysses_size)]
    concat = concat_segments(per_rank)
    order, sorted_segs = sort_row(per_rank)
    return (concat, _positions(concat)) if sorted_segs is None else (sorted_segs, _positions(concat)[order])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ulysses_size,ring_size", [(2, 1), (4, 1), (2, 2), (1, 4), (3, 1), (2, 3), (4, 2)])
@pytest.mark.parametrize("sort", [False, True])
def test_plan_blocks_over_concatenated_rows(layout, ulysses_size, ring_size, sort):
    """After the Ulysses exchange a rank holds the tokens of its row of ranks (concat_segments, or
    sorted by sort_row); the plan over rows must again reproduce the global causal mask exactly."""
    world_size, local_len = ulysses_size * ring_size, 6
    if sort:
        rows, row_pos = zip(*[_held_row(layout, i, ulysses_size, world_size, local_len) for i in range(ring_size)])
    else:
        rows = [_row_segments(layout, i * ulysses_size, ulysses_size, world_size, local_len) for i in range(ring_size)]
        row_pos = [torch.cat([global_positions(layout, i * ulysses_size + u, world_size, local_len)
                              for u in range(ulysses_size)]) for i in range(ring_size)]
    for q_row in range(ring_size):
        assert torch.equal(_positions(rows[q_row]), row_pos[q_row])
        for k_row in range(ring_size):
            n = ulysses_size * local_len
            cover = _mask_from_plan(plan_blocks(rows[q_row], rows[k_row], True), n, n)
            expected = (row_pos[k_row].unsqueeze(0) <= row_pos[q_row].unsqueeze(1)).long()
            assert torch.equal(cover, expected)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ulysses_size,ring_size", [(1, 1), (1, 4), (2, 1), (3, 1), (4, 1), (8, 1), (2, 2),
                                                    (2, 4), (4, 2), (3, 2)])
@pytest.mark.parametrize("local_len", [2, 6])
def test_sort_row_properties(layout, ulysses_size, ring_size, local_len):
    """sort_row gives a permutation into increasing global position whose segments cover the same
    positions, and only when that means strictly fewer segments (else identity / None)."""
    world_size = ulysses_size * ring_size
    for ring_rank in range(ring_size):
        per_rank = [segments(layout, ring_rank * ulysses_size + u, world_size, local_len)
                    for u in range(ulysses_size)]
        concat = concat_segments(per_rank)
        n = ulysses_size * local_len
        order, sorted_segs = sort_row(per_rank)
        assert sorted(order.tolist()) == list(range(n))
        if sorted_segs is None:
            assert torch.equal(order, torch.arange(n))
            continue
        assert len(sorted_segs) < len(concat)
        held = _positions(concat)[order]
        assert torch.equal(held, _positions(sorted_segs))
        assert torch.equal(held, torch.sort(_positions(concat)).values)
        assert [s.local_start for s in sorted_segs] == [sum(t.length for t in sorted_segs[:i])
                                                        for i in range(len(sorted_segs))]
        assert all(s.stride == 1 for s in sorted_segs)
        assert all(a.global_start + a.length < b.global_start for a, b in zip(sorted_segs, sorted_segs[1:]))


@pytest.mark.parametrize("world_size", (2, 3, 4, 8))
def test_sort_row_segment_counts(world_size):
    """Ulysses rows (all ranks) become one contiguous segment for every layout; usp zigzag rows
    become at most 2 (chunks i*U.. and their mirror); usp striped rows (U < P) and ring rows
    (U = 1) are left as they are."""
    local_len = 4
    for layout in LAYOUTS:
        per_rank = [segments(layout, r, world_size, local_len) for r in range(world_size)]
        order, segs = sort_row(per_rank)
        if layout == "contiguous":
            assert segs is None  # already one segment
            assert len(concat_segments(per_rank)) == 1
        else:
            assert segs == [Segment(0, world_size * local_len, 0, 1)]
        for rank in range(world_size):  # ring rows: one rank's shard is already in order
            assert sort_row([segments(layout, rank, world_size, local_len)])[1] is None
    for ulysses_size in (u for u in (2, 4) if u < world_size and world_size % u == 0):
        for ring_rank in range(world_size // ulysses_size):
            ranks = range(ring_rank * ulysses_size, (ring_rank + 1) * ulysses_size)
            zig = sort_row([segments("zigzag", r, world_size, local_len) for r in ranks])[1]
            assert zig is not None and len(zig) <= 2
            assert sort_row([segments("striped", r, world_size, local_len) for r in ranks])[1] is None


def test_concat_segments_merges_contiguous_runs():
    segs = _row_segments("contiguous", 0, 4, 4, 6)
    assert len(segs) == 1 and segs[0].length == 24 and segs[0].global_start == 0
    zig = _row_segments("zigzag", 0, 2, 2, 6)  # ranks 0, 1 of 2: chunks 0, 3, 1, 2 -> [0,3) [9,12) [3,6) [6,9)
    assert [(s.local_start, s.global_start, s.length) for s in zig] == [(0, 0, 3), (3, 9, 3), (6, 3, 6)]


@pytest.mark.parametrize("world_size", (2, 3, 4))
def test_zigzag_and_striped_balance_causal_work(world_size):
    """The point of zigzag and striped: against every other rank's keys a rank does about half a
    block of work (exactly L^2 / 2 for zigzag; L(L+-1)/2 for striped), unlike contiguous (0 or L^2)."""
    local_len = 6
    for q_rank in range(world_size):
        for k_rank in range(world_size):
            if q_rank == k_rank:
                continue
            zig = _mask_from_plan(plan_blocks(segments("zigzag", q_rank, world_size, local_len),
                                              segments("zigzag", k_rank, world_size, local_len), True),
                                  local_len, local_len).sum().item()
            assert zig == local_len * local_len // 2
            zig_tasks = plan_blocks(segments("zigzag", q_rank, world_size, local_len),
                                    segments("zigzag", k_rank, world_size, local_len), True)
            assert all(t.diagonal_offset is None for t in zig_tasks)  # no mask off the diagonal
            striped = _mask_from_plan(plan_blocks(segments("striped", q_rank, world_size, local_len),
                                                  segments("striped", k_rank, world_size, local_len), True),
                                      local_len, local_len).sum().item()
            assert striped == local_len * (local_len + (1 if k_rank < q_rank else -1)) // 2


def test_striped_masks_are_causal_or_strictly_causal():
    for q_rank in range(4):
        for k_rank in range(4):
            (task,) = plan_blocks(segments("striped", q_rank, 4, 6), segments("striped", k_rank, 4, 6), True)
            # strictly causal (keys of later ranks): the first row sees nothing and is left out
            assert (task.q_start, task.q_len, task.k_len, task.diagonal_offset) == (
                (0, 6, 6, 0) if k_rank <= q_rank else (1, 5, 5, 0))


@pytest.mark.parametrize("layout,length,world_size,match", [
    ("contiguous", 10, 3, r"sequence length 10 is not divisible by world_size = 3"),
    ("striped", 7, 2, r"sequence length 7 is not divisible by world_size = 2"),
    ("zigzag", 12, 4, r"sequence length 12 is not divisible by 2 \* world_size = 8"),
])
def test_non_divisible_lengths_raise(layout, length, world_size, match):
    with pytest.raises(ValueError, match=match):
        check_global_length(layout, length, world_size)
    with pytest.raises(ValueError, match=match):
        shard_tensor(torch.zeros(1, length), layout, 0, world_size)


def test_bad_layout_and_rank_raise():
    with pytest.raises(ValueError, match=r"zigzag layout needs an even local length .* 5 with world_size=2"):
        global_positions("zigzag", 0, 2, 5)
    with pytest.raises(ValueError, match=r"rank 3 is outside a group of size 3"):
        global_positions("contiguous", 3, 3, 4)
    with pytest.raises(ValueError, match=r"unknown layout 'spiral'"):
        segments("spiral", 0, 2, 4)


def case_shard_unshard(ctx, layout: str, full: torch.Tensor):
    import seqpar

    local = seqpar.shard(full, layout=layout, group=ctx.group).requires_grad_()
    gathered = seqpar.unshard(local, layout=layout, group=ctx.group)
    (gathered * torch.arange(gathered.shape[1], dtype=gathered.dtype).view(1, -1, 1)).sum().backward()
    return gathered.detach(), local.grad, seqpar.local_positions(local.shape[1], layout=layout, group=ctx.group)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_shard_unshard_over_a_group(pool, layout):
    world_size, full = 4, torch.randn(2, 16, 3)
    results = pool.run(case_shard_unshard, world_size, layout=layout, full=full)
    for rank, (gathered, grad, positions) in enumerate(results):
        assert torch.equal(gathered, full)
        assert torch.equal(positions, global_positions(layout, rank, world_size, 4))
        # the loss weights token t by t, so the gradient of each local token is its global position
        assert torch.equal(grad, positions.to(grad.dtype).view(1, -1, 1).expand_as(grad))


# --- the document-aware balanced layout ---------------------------------------------------------


def _lognormal_documents(total: int, seed: int) -> list[int]:
    """Document boundaries of ``total`` tokens, lengths log-normal (median 2K, a long tail)."""
    gen = torch.Generator().manual_seed(seed)
    bounds = [0]
    while bounds[-1] < total:
        length = int(torch.exp(torch.randn((), generator=gen) * 1.75 + math.log(2048))) + 1
        bounds.append(min(total, bounds[-1] + length))
    return bounds


def test_balanced_layout_round_trip_positions_and_errors():
    from seqpar.layout import balanced_layout

    layout = balanced_layout([0, 5, 6, 30, 48], 4, chunks_per_rank=3)
    assert layout.chunk_len == 4 and chunks_per_rank(layout) == 3
    x = torch.arange(48).view(1, 48, 1)
    shards = [shard_tensor(x, layout, r, 4) for r in range(4)]
    assert torch.equal(unshard_tensor(shards, layout), x)
    for r in range(4):
        assert torch.equal(shards[r].flatten(), global_positions(layout, r, 4, 12))
        chunks = [c * 4 + i for c in layout.assignment[r] for i in range(4)]
        assert shards[r].flatten().tolist() == chunks  # the rank's chunks, in increasing order
    with pytest.raises(ValueError, match=r"built for world size 4 and 48 tokens .* got world size 2"):
        shard_tensor(x, layout, 0, 2)
    with pytest.raises(ValueError, match=r"built for world size 4 and 48 tokens .* sequence length 40"):
        shard_tensor(x[:, :40], layout, 0, 4)
    with pytest.raises(ValueError, match="chunks_per_rank must be an int >= 1 dividing the local length 12"):
        balanced_layout([0, 48], 4, chunks_per_rank=5)
    with pytest.raises(ValueError, match="must not decrease"):
        balanced_layout([0, 9, 5, 48], 4)


@pytest.mark.parametrize("window", [None, 8192])
def test_balanced_layout_evens_masked_work_on_a_million_tokens(window):
    """1M tokens, P = 8, log-normal documents (median 2K, a few over 100K): the busiest rank has at
    most 5% more masked work than the mean (the target), where zigzag does not. Work per rank is
    ``chunk_work`` (checked against dense masks below) summed over the rank's chunks."""
    from seqpar.layout import balanced_layout, chunk_work

    total, P = 1 << 20, 8
    documents = _lognormal_documents(total, seed=5)
    assert max(b - a for a, b in zip(documents, documents[1:])) > 100_000
    layout = balanced_layout(documents, P, window=window)
    work = chunk_work(total, layout.chunk_len, documents, window=window)
    loads = [sum(work[c] for c in chunks) for chunks in layout.assignment]
    assert max(loads) / (sum(loads) / P) <= 1.05
    zigzag_work = chunk_work(total, total // (2 * P), documents, window=window)
    zigzag = [zigzag_work[r] + zigzag_work[2 * P - 1 - r] for r in range(P)]
    assert max(zigzag) / (sum(zigzag) / P) > 1.05


@pytest.mark.parametrize("seed", range(6))
def test_chunk_work_counts_the_dense_mask(seed):
    import random

    from mask_reference import global_mask
    from seqpar.layout import chunk_work

    rng = random.Random(seed)
    total = rng.choice([16, 48, 96])
    documents = [0] + sorted(rng.sample(range(1, total), rng.randint(0, 6))) + [total]
    window = rng.choice([None, 1, 3, 10, 100])
    causal = window is not None or seed % 2 == 0
    chunk = rng.choice([1, 2, 4, 8, 16])
    positions = torch.arange(total)
    per_row = global_mask(positions, positions, causal=causal, window=window, cu_seqlens=documents).sum(1)
    expected = [int(per_row[i:i + chunk].sum()) for i in range(0, total, chunk)]
    assert chunk_work(total, chunk, documents, causal=causal, window=window) == expected
