"""Zero-redundant gathers of the "allgather" strategy: with a sliding window or packed documents
(``ParallelPlan.kv_key_ranges``: the local key range of each rank's K/V that each rank's queries
see), ``GatheredKV`` moves to each rank only the key range of each block it reads and sends each
dK/dV partial (over that range) straight back to its source, instead of all-gathering K/V and
reduce-scattering dK/dV.

- exactness: windows, documents and both, world sizes 2-4, contiguous, zigzag and the
  document-aware balanced layout, fp64, o / lse / dq / dk / dv against the dense oracle
  (tests/test_masks.py's helpers); every case takes the point-to-point path and each
  parametrization has received ranges shorter than a block;
- the bytes: contiguous shards of 12 tokens, window 5, P = 4: a rank receives only the last 4 keys
  of its predecessor (4/12 of a block, not 3 blocks), forward and backward (plus the matching
  dK/dV partial), counted by the source (``GatheredKV.bytes_sent`` / ``bytes_received``), with the
  same results as the all-gather path;
- any matrix: key ranges wider than the mask needs (keys and blocks that arrive and contribute
  nothing, asymmetric peer sets, overlapping partials coming home) give the same results, and
  never hang; a matrix of whole blocks takes the collective; a malformed matrix is refused.
"""
from __future__ import annotations

import dataclasses
import zlib

import pytest
import torch

from test_masks import FP64_TOL, MASK_KINDS, _heads, balanced, check, make_case

from seqpar.layout import shard_tensor
from seqpar.softmax import build_plan
from seqpar.softmax.driver import attention_backward, attention_forward
from seqpar.softmax.sources import GatheredKV

KINDS = [kind for kind in MASK_KINDS if kind[0] in ("window", "documents", "documents+window", "all")]


def case_ranges(ctx, layout, args: dict, length: int, kv_heads: int):
    """This rank's ``kv_key_ranges`` for the case's mask, and whether its source is sparse."""
    q = torch.zeros(1, length // ctx.world_size, kv_heads, 4)
    plan = build_plan(q, q, q, strategy="allgather", layout=layout, group=ctx.group, scale=None, backend="torch",
                      **args)
    return plan.kv_key_ranges, plan.kv_source(q, q).sparse


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "balanced"])
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_sparse_gathers_match_dense_reference(pool, world_size, layout):
    seed = zlib.crc32(f"sparse/{layout}/{world_size}".encode()) % 10_000
    layout = balanced(world_size) if layout == "balanced" else layout
    cases = [make_case(kind, world_size, _heads("allgather", world_size, gqa=i % 2 == 0), torch.float64, seed + i)
             for i, kind in enumerate(KINDS)]
    check(pool, "allgather", layout, world_size, None, cases, FP64_TOL)
    # every case takes the point-to-point path, and some receive less than a whole block
    partial = []
    for case in cases:
        q, k, _ = case["inputs"]
        got = pool.run(case_ranges, world_size, layout=layout, args=case["args"], length=q.shape[1],
                       kv_heads=k.shape[2])
        ranges = got[0][0]
        assert all(r == got[0] for r in got), "the ranges differ between ranks"
        assert got[0][1], f"{case['name']}: not sparse"
        local = q.shape[1] // world_size
        assert all(ranges[r][r] == (0, local) for r in range(world_size))
        if any(x is not None and x != (0, local) for row in ranges for x in row):
            partial.append(case["name"])
    assert partial, "no case received a key range shorter than a block"


# --- the bytes -----------------------------------------------------------------------------------

LOCAL_LEN, WINDOW, HEADS, KV_HEADS, HEAD_DIM = 12, 5, 4, 2, 16


def _step(ctx, plan, q, k, v, w_o, ranges_override=False, ranges=None):
    """Forward + backward through the driver on fresh sources of ``plan`` (as the autograd Function
    does); returns (o, lse, dq, dk, dv) and the two sources' byte counts."""
    if ranges_override:
        plan = dataclasses.replace(plan, kv_key_ranges=ranges)
    fwd = plan.kv_source(k, v)
    o, lse = attention_forward(q, fwd, plan.q_segments, mask=plan.mask, scale=plan.scale, backend=plan.backend)
    bwd = plan.kv_source(k, v)
    dq, dk, dv = attention_backward(w_o, q, lse, None, bwd, plan.q_segments, mask=plan.mask, scale=plan.scale,
                                    backend=plan.backend, out=o)
    counts = dict(fwd_sent=fwd.bytes_sent, fwd_received=fwd.bytes_received, bwd_sent=bwd.bytes_sent,
                  bwd_received=bwd.bytes_received, sparse=(fwd.sparse, bwd.sparse))
    return [o, lse, dq, dk, dv], counts


def _inputs(ctx, length: int):
    gen = torch.Generator().manual_seed(7)
    q, w_o = (torch.randn(1, length, HEADS, HEAD_DIM, generator=gen, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(1, length, KV_HEADS, HEAD_DIM, generator=gen, dtype=torch.float64) for _ in range(2))
    return [shard_tensor(x, "contiguous", ctx.rank, ctx.world_size) for x in (q, k, v, w_o)]


def case_window_bytes(ctx):
    q, k, v, w_o = _inputs(ctx, LOCAL_LEN * ctx.world_size)
    plan = build_plan(q, k, v, strategy="allgather", layout="contiguous", group=ctx.group, causal=True, scale=None,
                      backend="auto", window=WINDOW)
    sparse, sparse_bytes = _step(ctx, plan, q, k, v, w_o)
    dense, dense_bytes = _step(ctx, plan, q, k, v, w_o, ranges_override=True, ranges=None)
    for a, b in zip(sparse, dense):
        torch.testing.assert_close(a, b, **FP64_TOL)
    return plan.kv_key_ranges, sparse_bytes, dense_bytes


def test_window_receives_only_the_keys_it_sees(pool):
    """Contiguous, window 5, 12 tokens per rank, P = 4: rank r's queries see the last 4 keys of rank
    r - 1 at most, so each rank receives those 4 keys (not 3 blocks, nor 1 block) and sends its own
    last 4 to rank r + 1 only; in backward it re-fetches them, returns their dK/dV partial (4 keys)
    to r - 1 and gets r + 1's partial of its own last 4 keys."""
    P = 4
    results = pool.run(case_window_bytes, P)
    ranges = results[0][0]
    assert ranges == tuple(tuple((0, LOCAL_LEN) if s == r else (LOCAL_LEN - WINDOW + 1, LOCAL_LEN) if s == r - 1
                                 else None for s in range(P)) for r in range(P))
    block = 2 * LOCAL_LEN * KV_HEADS * HEAD_DIM * 8  # K and V, fp64 (dK/dV too: compute dtype fp64)
    keys = block * (WINDOW - 1) // LOCAL_LEN  # the last 4 keys: 4/12 of a block
    for r, (_, got, dense) in enumerate(results):
        before = {s: block for s in range(P) if s != r}
        to_next, to_prev = {s: keys for s in (r + 1,) if s < P}, {s: keys for s in (r - 1,) if s >= 0}
        assert got["sparse"] == (True, True) and dense["sparse"] == (False, False)
        # forward: the last 4 keys of r - 1 only (the all-gather: every other rank's whole block)
        assert dense["fwd_received"] == before and dense["fwd_sent"] == before
        assert got["fwd_received"] == to_prev and got["fwd_sent"] == to_next
        # backward: those keys again from r - 1 and the partial of this rank's last 4 keys from
        # r + 1; its last 4 keys to r + 1 and the partial of r - 1's last 4 keys back to r - 1
        assert dense["bwd_received"] == {s: 2 * block for s in range(P) if s != r}
        assert got["bwd_received"] == {s: sum(d.get(s, 0) for d in (to_prev, to_next)) for s in to_prev | to_next}
        assert got["bwd_sent"] == got["bwd_received"]
    total = {name: sum(sum(res[i][name].values()) for res in results) for i, name in
             ((1, "fwd_received"), (1, "bwd_received"))}
    # 3 x 4 keys = one block forward, two backward (whole blocks to the ranks that need them: 3
    # and 6 blocks; the all-gather: 12 and 24 blocks)
    assert total == {"fwd_received": 3 * keys, "bwd_received": 6 * keys}
    assert total == {"fwd_received": block, "bwd_received": 2 * block}


# --- any matrix ----------------------------------------------------------------------------------


def case_superset_ranges(ctx, ranges):
    """The window case with key ranges that ask for more keys than the mask needs."""
    q, k, v, w_o = _inputs(ctx, LOCAL_LEN * ctx.world_size)
    plan = build_plan(q, k, v, strategy="allgather", layout="contiguous", group=ctx.group, causal=True, scale=None,
                      backend="auto", window=WINDOW)
    sparse, counts = _step(ctx, plan, q, k, v, w_o, ranges_override=True, ranges=ranges)
    dense, _ = _step(ctx, plan, q, k, v, w_o, ranges_override=True, ranges=None)
    for a, b in zip(sparse, dense):
        torch.testing.assert_close(a, b, **FP64_TOL)
    return counts["fwd_received"], counts["bwd_sent"]


def test_any_key_ranges_are_exact_and_never_hang(pool):
    """Wider ranges than the window needs: rank 0 reads all of rank 3 (no query sees it), rank 2
    reads keys 2-6 of rank 0 (none seen) and all of rank 1, rank 3 reads keys 5-11 of rank 2. Those
    keys arrive, give no kernel call or a masked one, and their dK/dV partials go home, where
    partials over different (overlapping) ranges add up into their slices."""
    P, L = 4, LOCAL_LEN
    band = [[(0, L) if s == r else (L - WINDOW + 1, L) if s == r - 1 else None for s in range(P)] for r in range(P)]
    band[0][3], band[2][0], band[2][1], band[3][2] = (0, L), (2, 7), (0, L), (5, L)
    ranges = tuple(tuple(row) for row in band)
    results = pool.run(case_superset_ranges, P, ranges=ranges)
    per_key = 2 * KV_HEADS * HEAD_DIM * 8
    for r, (received, bwd_sent) in enumerate(results):
        expected = {s: (x[1] - x[0]) * per_key for s, x in enumerate(ranges[r]) if s != r and x is not None}
        assert received == expected
        # backward sends K/V to the readers of this rank's block and each partial home
        readers = {p: (ranges[p][r][1] - ranges[p][r][0]) * per_key for p in range(P) if p != r and ranges[p][r]}
        assert bwd_sent == {p: readers.get(p, 0) + expected.get(p, 0) for p in readers | expected}
    assert [sorted(received) for received, _ in results] == [[3], [0], [0, 1], [2]]


def test_whole_blocks_take_the_collective_and_bad_matrices_are_refused():
    k = torch.zeros(1, 4, 2, 8)
    segments = [[], []]
    whole = ((0, 4), (0, 4))
    assert not GatheredKV(k, k, None, 0, 2, segments, 2, key_ranges=(whole, whole)).sparse
    assert GatheredKV(k, k, None, 0, 2, segments, 2, key_ranges=(((0, 4), None), ((1, 4), (0, 4)))).sparse
    for bad in ((((0, 4), None), (None, (0, 3))),  # a diagonal that is not the whole block
                (((0, 4),),),  # not 2 x 2
                (((0, 4), (2, 2)), (None, (0, 4))),  # empty range
                (((0, 4), (3, 5)), (None, (0, 4))),  # past the block
                (((0, 4), (-1, 2)), (None, (0, 4)))):
        with pytest.raises(ValueError, match=r"key_ranges must be a 2 x 2 matrix of local key ranges"):
            GatheredKV(k, k, None, 0, 2, segments, 2, key_ranges=bad)
