"""Masks across ranks: packed documents (``cu_seqlens``), sliding windows, softcap and attention
sinks, in every strategy x layout x world size 1-4, forward and backward, against the dense fp64
oracle of tests/mask_reference.py (an explicit [T, T] mask built token by token).

Documents are chosen so that every awkward case occurs: 1-token documents, a boundary exactly on
a rank boundary (contiguous layout), a document that spans three ranks (world size >= 3). The
loss is sum(w_o * o) + sum(w_lse * lse), so the gradient through lse is tested too; the sink
gradient is each rank's part, summed over ranks here as a gradient all-reduce does.

Tolerances: fp64 atol = rtol = 1e-10; fp32 atol = rtol = 1e-4; bf16 atol = rtol = 6e-2 (the oracle
runs in fp64 on the same bf16-rounded inputs, so only the outputs' bf16 rounding remains).
"""
from __future__ import annotations

import zlib

import pytest
import torch

from mask_reference import global_mask, masked_attention

import seqpar
from seqpar.layout import LAYOUTS, balanced_layout, shard_tensor, unshard_tensor

FP64_TOL = dict(atol=1e-10, rtol=1e-10)
FP32_TOL = dict(atol=1e-4, rtol=1e-4)
BF16_TOL = dict(atol=6e-2, rtol=6e-2)  # bf16 inputs (rounded once), fp32 compute, vs the fp64 oracle on them
HEAD_DIM = 16
RESULT_NAMES = ("o", "lse", "dq", "dk", "dv", "dsinks")

# (name, documents?, window, softcap, sinks?, causal)
MASK_KINDS = [
    ("documents", True, None, None, False, True),
    ("window", False, 5, None, False, True),
    ("long-window", False, "2L", None, False, True),
    ("documents+window", True, 4, None, False, True),
    ("softcap", False, None, 2.0, False, True),
    ("sinks", False, None, None, True, True),
    ("all", True, 7, 3.0, True, True),
    ("documents-noncausal", True, None, None, True, False),
]


def _local_len(world_size: int) -> int:
    return 10 if world_size == 3 else 12


def _documents(world_size: int) -> list[int]:
    """Boundaries with 1-token documents (0-1, 1-2), one on the first rank boundary (contiguous),
    and one document from L + 3 to T - 1 (spans three ranks when P >= 4, or P = 3 with L = 10)."""
    local = _local_len(world_size)
    total = local * world_size
    cuts = {1, 2, local, local + 3, total - 1} if world_size > 1 else {1, 2, 5, 9}
    return [0] + sorted(c for c in cuts if 0 < c < total) + [total]


def _heads(strategy: str, world_size: int, gqa: bool) -> tuple[int, int]:
    if strategy == "ulysses" and world_size == 3:
        return (6, 2) if gqa else (6, 6)
    return (4, 2) if gqa else (4, 4)


def make_case(kind: tuple, world_size: int, heads: tuple[int, int], dtype: torch.dtype, seed: int,
              batch: int = 1) -> dict:
    """Full inputs, mask arguments, loss weights and the oracle's results of one case."""
    name, with_documents, window, softcap, with_sinks, causal = kind
    gen = torch.Generator().manual_seed(seed)
    length = world_size * _local_len(world_size)
    if window == "2L":
        window = 2 * _local_len(world_size) + 1
    hq, hkv = heads

    def draw(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, k, v = draw(batch, length, hq, HEAD_DIM), draw(batch, length, hkv, HEAD_DIM), draw(batch, length, hkv, HEAD_DIM)
    if softcap is not None:
        q = q * 3  # scores well into the tanh's curve
    q, k, v = (x.to(dtype).double() for x in (q, k, v))  # the oracle sees the inputs as rounded
    sinks = draw(hq) if with_sinks else None
    cu_seqlens = torch.tensor(_documents(world_size)) if with_documents else None
    w_o, w_lse = draw(batch, length, hq, HEAD_DIM), draw(batch, hq, length)
    ref = [x.clone().requires_grad_() for x in (q, k, v)] + ([sinks.clone().requires_grad_()] if with_sinks else [])
    positions = torch.arange(length)
    mask = global_mask(positions, positions, causal=causal, window=window, cu_seqlens=cu_seqlens)
    o, lse = masked_attention(*ref[:3], mask, scale=HEAD_DIM ** -0.5, softcap=softcap,
                              sinks=ref[3] if with_sinks else None)
    ((o * w_o).sum() + (lse.masked_fill(torch.isinf(lse), 0) * w_lse).sum()).backward()
    expected = [o.detach(), lse.detach()] + [x.grad for x in ref]
    args = dict(causal=causal, window=window, softcap=softcap, cu_seqlens=cu_seqlens)
    return dict(name=name, inputs=tuple(x.to(dtype) for x in (q, k, v)), sinks=sinks, args=args,
                weights=(w_o, w_lse), expected=expected)


def case_masked(ctx, strategy: str, layout: str, usp, cases: list[dict], backend: str = "auto"):
    """Every case on this rank: local (o, lse, dq, dk, dv[, dsinks])."""
    rank, world_size = ctx.rank, ctx.world_size
    group = ctx.usp_groups[usp] if usp is not None else ctx.group
    results = []
    for case in cases:
        q, k, v = (shard_tensor(x, layout, rank, world_size).requires_grad_() for x in case["inputs"])
        sinks = None if case["sinks"] is None else case["sinks"].clone().requires_grad_()
        o, lse = seqpar.attention(q, k, v, strategy=strategy, layout=layout, group=group, return_lse=True,
                                  sinks=sinks, backend=backend, **case["args"])
        w_o, w_lse = (shard_tensor(w, layout, rank, world_size, dim=d) for w, d in zip(case["weights"], (1, 2)))
        loss = (o.double() * w_o).sum() + (lse.double().masked_fill(torch.isinf(lse), 0) * w_lse).sum()
        loss.backward()
        out = [o.detach(), lse.detach(), q.grad, k.grad, v.grad]
        if sinks is not None:
            out.append(sinks.grad)
        results.append(out)
    return results


def check(pool, strategy: str, layout: str, world_size: int, usp, cases: list[dict], tol: dict,
          backend: str = "auto") -> None:
    sent = [{key: c[key] for key in ("inputs", "sinks", "args", "weights")} for c in cases]
    per_rank = pool.run(case_masked, world_size, strategy=strategy, layout=layout, usp=usp, cases=sent,
                        backend=backend)
    for index, case in enumerate(cases):
        for i, expected in enumerate(case["expected"]):
            name = RESULT_NAMES[i]
            parts = [r[index][i] for r in per_rank]
            if name == "dsinks":
                got = torch.stack(parts).sum(0)  # each rank's part, summed as a gradient all-reduce does
            else:
                got = unshard_tensor(parts, layout, dim=2 if name == "lse" else 1)
            torch.testing.assert_close(got.double(), expected, **tol,
                                       msg=lambda m: f"{strategy}/{layout!r}/P={world_size}/usp={usp} "
                                                     f"{case['name']} {name}: {m}")


CONFIGS = [("ring", w, None) for w in (1, 2, 3, 4)] + [("allgather", w, None) for w in (2, 3, 4)] \
    + [("ulysses", w, None) for w in (2, 3, 4)] + [("usp", 4, (2, 2)), ("usp", 4, (1, 4))]


def balanced(world_size: int):
    """The document-aware layout of the test documents (several chunks per rank, not 2)."""
    return balanced_layout(_documents(world_size), world_size, chunks_per_rank=5 if world_size == 3 else 3)


@pytest.mark.parametrize("layout", LAYOUTS + ("balanced",))
@pytest.mark.parametrize("strategy,world_size,usp", CONFIGS,
                         ids=[f"{s}-P{w}" + (f"-u{u[0]}r{u[1]}" if u else "") for s, w, u in CONFIGS])
def test_every_mask_matches_dense_reference(pool, strategy, layout, world_size, usp):
    seed = zlib.crc32(f"{strategy}/{layout}/{world_size}/{usp}".encode()) % 10_000
    layout = balanced(world_size) if layout == "balanced" else layout
    cases = [make_case(kind, world_size, _heads(strategy, world_size, gqa=i % 2 == 0), torch.float64, seed + i)
             for i, kind in enumerate(MASK_KINDS)]
    check(pool, strategy, layout, world_size, usp, cases, FP64_TOL)


@pytest.mark.parametrize("strategy,layout,world_size", [("ring", "contiguous", 4), ("allgather", "zigzag", 3),
                                                        ("ulysses", "striped", 2)])
def test_reference_backend_and_fp32(pool, strategy, layout, world_size):
    """The plain-torch kernels (backend="torch") in fp64, and the default backend in fp32 and bf16."""
    seed = zlib.crc32(f"fp32/{strategy}/{layout}".encode()) % 10_000
    cases = [make_case(kind, world_size, _heads(strategy, world_size, gqa=True), torch.float64, seed + i)
             for i, kind in enumerate(MASK_KINDS[3:7])]
    check(pool, strategy, layout, world_size, None, cases, FP64_TOL, backend="torch")
    cases = [make_case(kind, world_size, _heads(strategy, world_size, gqa=True), torch.float32, seed + i)
             for i, kind in enumerate(MASK_KINDS[3:7])]
    check(pool, strategy, layout, world_size, None, cases, FP32_TOL)
    cases = [make_case(kind, world_size, _heads(strategy, world_size, gqa=True), torch.bfloat16, seed + i)
             for i, kind in enumerate(MASK_KINDS[3:7])]
    check(pool, strategy, layout, world_size, None, cases, BF16_TOL)


def test_packed_documents_equal_separate_runs():
    """One packed row of documents gives, per document, exactly the attention of that document
    run alone (outputs and gradients), on one process."""
    gen = torch.Generator().manual_seed(3)
    lengths = [1, 37, 5, 90, 2, 1]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    total = int(cu[-1])
    q, k, v = (torch.randn(1, total, h, HEAD_DIM, generator=gen, dtype=torch.float64, requires_grad=True)
               for h in (4, 2, 2))
    w = torch.randn(1, total, 4, HEAD_DIM, generator=gen, dtype=torch.float64)
    o = seqpar.attention(q, k, v, strategy="ring", cu_seqlens=cu, window=30)
    (o * w).sum().backward()
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        parts = [x.detach()[:, a:b].clone().requires_grad_() for x in (q, k, v)]
        o_doc = seqpar.attention(*parts, strategy="ring", window=30)
        (o_doc * w[:, a:b]).sum().backward()
        torch.testing.assert_close(o[:, a:b], o_doc, **FP64_TOL)
        for whole, part in zip((q, k, v), parts):
            torch.testing.assert_close(whole.grad[:, a:b], part.grad, **FP64_TOL)


def case_ring_steps(ctx, window: int, layout: str):
    from seqpar.softmax import build_plan

    q = torch.zeros(1, 8, 2, 4)
    plan = build_plan(q, q, q, strategy="ring", layout=layout, group=ctx.group, causal=True, scale=None,
                      backend="torch", window=window)
    return plan.ring_steps


@pytest.mark.parametrize("window,layout,expected", [(1, "contiguous", 1), (8, "contiguous", 2),
                                                    (9, "contiguous", 2), (17, "contiguous", 3),
                                                    (30, "contiguous", 4), (3, "zigzag", 4)])
def test_ring_stops_after_the_blocks_a_window_can_see(pool, window, layout, expected):
    """Contiguous shards of 8 tokens: a window w needs 1 + ceil((w - 1) / 8) blocks (at most 4);
    zigzag's late chunk needs the next rank's, which a one-way ring reaches last."""
    assert pool.run(case_ring_steps, 4, window=window, layout=layout) == [expected] * 4


# --- bad input -----------------------------------------------------------------------------------

BAD_ARGUMENTS = [
    (dict(cu_seqlens=torch.tensor([1, 5, 16])), ValueError, "must start at 0, got 1"),
    (dict(cu_seqlens=torch.tensor([0, 5, 15])), ValueError, "must end at the global sequence length 16"),
    (dict(cu_seqlens=torch.tensor([0, 9, 5, 16])), ValueError, "must not decrease: cu_seqlens[1] = 9 > cu_seqlens[2] = 5"),
    (dict(cu_seqlens=torch.tensor([[0, 16]])), ValueError, "must be 1-D"),
    (dict(cu_seqlens=torch.tensor([0.0, 16.0])), ValueError, "integer tensor"),
    (dict(cu_seqlens=torch.tensor([0, 16], device="meta")), ValueError, "cu_seqlens is on meta but q is on cpu"),
    (dict(window=0), ValueError, "window must be >= 1 (query i sees keys i - window < j <= i), got 0"),
    (dict(window=2.5), TypeError, "window must be an int"),
    (dict(window=4, causal=False), ValueError, "needs causal=True"),
    (dict(softcap=0.0), ValueError, "softcap must be a finite number > 0"),
    (dict(softcap=float("nan")), ValueError, "softcap must be a finite number > 0"),
    (dict(sinks=torch.zeros(3)), ValueError, "sinks must have shape [Hq] = [4]"),
    (dict(sinks=torch.zeros(4, dtype=torch.long)), ValueError, "sinks must be floating point"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_ARGUMENTS, ids=[str(i) for i in range(len(BAD_ARGUMENTS))])
def test_bad_mask_arguments_name_the_problem(kwargs, error, message):
    q = torch.randn(1, 16, 4, 8)
    k = torch.randn(1, 16, 2, 8)
    with pytest.raises(error) as info:
        seqpar.attention(q, k, k, strategy="ring", **kwargs)
    assert message in str(info.value)


def test_documents_need_one_packed_row():
    q = torch.randn(2, 16, 4, 8)
    with pytest.raises(ValueError, match="ONE packed row; got batch size 2"):
        seqpar.attention(q, q, q, strategy="ring", cu_seqlens=torch.tensor([0, 3, 16]))


def case_disagreeing_documents(ctx):
    q = torch.randn(1, 8, 2, 4)
    bounds = [0, 5, 16] if ctx.rank == 0 else [0, 6, 16]
    try:
        seqpar.attention(q, q, q, strategy="ring", group=ctx.group, cu_seqlens=torch.tensor(bounds), validate=True)
    except ValueError as e:
        return str(e)
    return None


def test_ranks_with_different_documents_fail_together(pool):
    messages = pool.run(case_disagreeing_documents, 2)
    assert all(m is not None and "documents" in m for m in messages), messages


# --- the Triton block kernels (CPU interpreter) under the strategies, with masks -------------------


def case_triton_masks(ctx) -> dict[str, float]:
    """One rank of the interpreter check: fp32, backend='triton', the mask kinds that reach the
    kernels as bands and softcap, under ring / allgather / ulysses."""
    rank, world_size = ctx.rank, ctx.world_size
    errors = {}
    kinds = [MASK_KINDS[3], MASK_KINDS[6]]  # documents + window; everything together
    for strategy, layout in [("ring", "contiguous"), ("allgather", "zigzag"), ("ulysses", "striped")]:
        for kind in kinds:
            case = make_case(kind, world_size, (4, 2), torch.float32, 31)
            (out,) = case_masked(ctx, strategy, layout, None, [case], backend="triton")
            expected = [shard_tensor(e, layout, rank, world_size, dim=2 if i == 1 else 1)
                        for i, e in enumerate(case["expected"][:5])]
            errors[f"{strategy}/{kind[0]}"] = max((got.double() - e).abs().max().item()
                                                  for got, e in zip(out[:5], expected))
    assert all(e < FP32_TOL["atol"] for e in errors.values()), errors
    return errors


def test_triton_masks_under_the_strategies_interpreted():
    """Bands (windows, documents) and softcap through the Triton kernels, 2 ranks, fp32."""
    pytest.importorskip("triton")
    pytest.importorskip("numpy")
    from distributed_pool import run_case_interpreted

    run_case_interpreted("test_masks", "case_triton_masks", world_size=2)


def case_ring_key_ranges(ctx, window: int, layout: str):
    from seqpar.softmax import build_plan

    q = torch.zeros(1, 12, 2, 4)
    plan = build_plan(q, q, q, strategy="ring", layout=layout, group=ctx.group, causal=True, scale=None,
                      backend="torch", window=window)
    return plan.ring_steps, plan.ring_key_ranges


def test_ring_carries_only_the_keys_a_window_sees(pool):
    """Contiguous shards of 12 tokens, window 5: the next rank sees only the last 4 keys of a block,
    so the ring carries those (O(window) bytes, not the block); the last rank's block is seen by
    nobody else and travels as one key. Exactness with these ranges: the tests above."""
    per_rank = pool.run(case_ring_key_ranges, 4, window=5, layout="contiguous")
    assert per_rank == [(2, ((8, 12), (8, 12), (8, 12), (0, 1)))] * 4
    steps, ranges = pool.run(case_ring_key_ranges, 4, window=30, layout="contiguous")[0]
    # every key of a block is seen somewhere on its way, except the last rank's (seen by nobody)
    assert steps == 4 and ranges == ((0, 12), (0, 12), (0, 12), (0, 1))
