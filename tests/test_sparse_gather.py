"""Zero-redundant gathers of the "allgather" strategy: with a mask that leaves some rank without a
query that sees some other rank's keys (``ParallelPlan.kv_sources_needed``), ``GatheredKV`` moves
each K/V block only to the ranks that read it and sends each dK/dV partial straight back to its
source, instead of all-gathering K/V and reduce-scattering dK/dV.

- exactness: windows, documents and both, world sizes 2-4, contiguous and zigzag, fp64, o / lse /
  dq / dk / dv against the dense oracle (tests/test_masks.py's helpers);
- the bytes: contiguous shards of 12 tokens, window 5, P = 4: a rank receives only its
  predecessor's K/V (1 block instead of 3), forward and backward, counted by the source
  (``GatheredKV.bytes_sent`` / ``bytes_received``), with the same results as the all-gather path;
- any matrix: a needs matrix with more True entries than the mask needs (blocks that arrive and
  contribute nothing, asymmetric peer sets) gives the same results, and never hangs.
"""
from __future__ import annotations

import dataclasses
import zlib

import pytest
import torch

from test_masks import FP64_TOL, MASK_KINDS, _heads, check, make_case

from seqpar.layout import shard_tensor
from seqpar.softmax import build_plan
from seqpar.softmax.driver import attention_backward, attention_forward
from seqpar.softmax.sources import GatheredKV

KINDS = [kind for kind in MASK_KINDS if kind[0] in ("window", "documents", "documents+window", "all")]


def case_needs(ctx, layout: str, args: dict, length: int):
    """This rank's ``kv_sources_needed`` for the case's mask."""
    q = torch.zeros(1, length // ctx.world_size, 2, 4)
    plan = build_plan(q, q, q, strategy="allgather", layout=layout, group=ctx.group, scale=None, backend="torch",
                      **args)
    return plan.kv_sources_needed


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_sparse_gathers_match_dense_reference(pool, world_size, layout):
    seed = zlib.crc32(f"sparse/{layout}/{world_size}".encode()) % 10_000
    cases = [make_case(kind, world_size, _heads("allgather", world_size, gqa=i % 2 == 0), torch.float64, seed + i)
             for i, kind in enumerate(KINDS)]
    check(pool, "allgather", layout, world_size, None, cases, FP64_TOL)
    # the cases do take the point-to-point path (all but zigzag at P = 2, where each rank's two
    # chunks border the other rank's on both sides); contiguous P = 2 with documents moves nothing
    sparse = []
    for case in cases:
        needs = pool.run(case_needs, world_size, layout=layout, args=case["args"], length=case["inputs"][0].shape[1])
        assert all(n == needs[0] for n in needs), "the matrix differs between ranks"
        if needs[0] is not None:
            sparse.append(case["name"])
    assert sparse == ([] if layout == "zigzag" and world_size == 2 else [kind[0] for kind in KINDS])


# --- the bytes -----------------------------------------------------------------------------------

LOCAL_LEN, WINDOW, HEADS, KV_HEADS, HEAD_DIM = 12, 5, 4, 2, 16


def _step(ctx, plan, q, k, v, w_o, needs_override=False, needs=None):
    """Forward + backward through the driver on fresh sources of ``plan`` (as the autograd Function
    does); returns (o, lse, dq, dk, dv) and the two sources' byte counts."""
    if needs_override:
        plan = dataclasses.replace(plan, kv_sources_needed=needs)
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
    dense, dense_bytes = _step(ctx, plan, q, k, v, w_o, needs_override=True, needs=None)
    for a, b in zip(sparse, dense):
        torch.testing.assert_close(a, b, **FP64_TOL)
    return plan.kv_sources_needed, sparse_bytes, dense_bytes


def test_window_receives_only_the_predecessor(pool):
    """Contiguous, window 5, 12 tokens per rank, P = 4: rank r's queries see keys of rank r - 1 at
    most, so each rank receives one K/V block (not 3) and sends its own to rank r + 1 only; in
    backward it re-fetches that block, returns its dK/dV partial to r - 1 and gets r + 1's."""
    P = 4
    results = pool.run(case_window_bytes, P)
    needs = results[0][0]
    assert needs == tuple(tuple(s in (r, r - 1) for s in range(P)) for r in range(P))
    block = 2 * LOCAL_LEN * KV_HEADS * HEAD_DIM * 8  # K and V, fp64 (dK/dV too: compute dtype fp64)
    for r, (_, got, dense) in enumerate(results):
        before, after = {s: block for s in range(P) if s != r}, {s: block for s in (r - 1,) if s >= 0}
        to_next, to_prev = {s: block for s in (r + 1,) if s < P}, {s: block for s in (r - 1,) if s >= 0}
        assert got["sparse"] == (True, True) and dense["sparse"] == (False, False)
        # forward: K/V from r - 1 only (before: from every other rank)
        assert dense["fwd_received"] == before and dense["fwd_sent"] == before
        assert got["fwd_received"] == after and got["fwd_sent"] == to_next
        # backward: K/V again from r - 1 and the partial of this rank's block from r + 1; K/V to
        # r + 1 and the partial of r - 1's block back to r - 1
        assert dense["bwd_received"] == {s: 2 * block for s in range(P) if s != r}
        assert got["bwd_received"] == {s: sum(d.get(s, 0) for d in (to_prev, to_next)) for s in to_prev | to_next}
        assert got["bwd_sent"] == got["bwd_received"]
    total = {name: sum(sum(res[i][name].values()) for res in results) for i, name in
             ((1, "fwd_received"), (1, "bwd_received"))}
    assert total == {"fwd_received": 3 * block, "bwd_received": 6 * block}  # before: 12 and 24 blocks


# --- any matrix ----------------------------------------------------------------------------------


def case_superset_matrix(ctx, needs):
    """The window case with a needs matrix that asks for more blocks than the mask needs."""
    q, k, v, w_o = _inputs(ctx, LOCAL_LEN * ctx.world_size)
    plan = build_plan(q, k, v, strategy="allgather", layout="contiguous", group=ctx.group, causal=True, scale=None,
                      backend="auto", window=WINDOW)
    sparse, counts = _step(ctx, plan, q, k, v, w_o, needs_override=True, needs=needs)
    dense, _ = _step(ctx, plan, q, k, v, w_o, needs_override=True, needs=None)
    for a, b in zip(sparse, dense):
        torch.testing.assert_close(a, b, **FP64_TOL)
    return sorted(counts["fwd_received"])


def test_any_needs_matrix_is_exact_and_never_hangs(pool):
    """Extra True entries (rank 0 reads rank 3, rank 2 reads rank 0 and 3, rank 3 reads nothing
    more): those blocks arrive, give no kernel call, and their zero dK/dV partials go home."""
    P = 4
    band = [[s in (r, r - 1) for s in range(P)] for r in range(P)]
    band[0][3] = band[2][0] = band[2][3] = True
    needs = tuple(tuple(row) for row in band)
    received = pool.run(case_superset_matrix, P, needs=needs)
    assert received == [[3], [0], [0, 1, 3], [2]]


def test_bad_matrix_is_refused():
    k = torch.zeros(1, 4, 2, 8)
    segments = [[], []]
    with pytest.raises(ValueError, match="needs must be a 2 x 2 matrix with a True diagonal"):
        GatheredKV(k, k, None, 0, 2, segments, 2, needs=((True, False), (False, False)))
    with pytest.raises(ValueError, match="needs must be a 2 x 2 matrix"):
        GatheredKV(k, k, None, 0, 2, segments, 2, needs=((True,),))
