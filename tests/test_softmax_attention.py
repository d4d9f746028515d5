"""seqpar.attention (every strategy x layout x causal/non-causal x MHA/GQA x world size 1-4)
against the single-device fp64 reference, forward and backward, on the shared gloo pool.

The parent draws full fp64 inputs, computes the reference o, lse and the gradients of a random
weighted loss sum(w_o * o) + sum(w_lse * lse) (so the gradient through lse is tested too);
workers shard with the layout, run the strategy with backward and return their local o, lse,
dq, dk, dv; the parent unshards and compares all five.

Tolerances: fp64 inputs atol = rtol = 1e-10 (observed errors ~5e-15); fp32 inputs against the
fp64 reference atol = rtol = 1e-4 on o / lse / grads; bf16 inputs atol = rtol = 3e-2 on o / lse.
Head dim 24 (odd, not a power of two), local lengths 6 (10 at world size 3), batch 2.
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch

from distributed_pool import run_case_interpreted

import seqpar
from seqpar.comm import UspGroups
from seqpar.kernels import attention_reference, merge_partials_
from seqpar.layout import LAYOUTS, BlockTask, shard_tensor, unshard_tensor
from seqpar.masks import AttentionMask
from seqpar.softmax import build_plan

FP64_TOL = dict(atol=1e-10, rtol=1e-10)
FP32_TOL = dict(atol=1e-4, rtol=1e-4)
BF16_TOL = dict(atol=3e-2, rtol=3e-2)
HEAD_DIM = 24
BATCH = 2
RESULT_NAMES = ("o", "lse", "dq", "dk", "dv")


def _local_len(world_size: int) -> int:
    return 10 if world_size == 3 else 6


def _heads(strategy: str, world_size: int, gqa: bool) -> tuple[int, int]:
    """(Hq, Hkv): 4 / 4 (MHA) or 4 / 2 (GQA); Ulysses at world size 3 uses 6 / 6 and 6 / 2 (the
    latter exercises the KV-head fallback, as does 4 / 2 at world size 4)."""
    if strategy == "ulysses" and world_size == 3:
        return (6, 2) if gqa else (6, 6)
    return (4, 2) if gqa else (4, 4)


def _make_case(world_size: int, num_q_heads: int, num_kv_heads: int, causal: bool, dtype: torch.dtype,
               seed: int, lse_loss: bool = True) -> dict:
    """Full inputs, loss weights and the fp64 reference results of one case. ``lse_loss=False``:
    the loss ignores the returned lse (w_lse None), so the backward gets no lse gradient and the
    driver hands the forward's o to the fused backward instead of reconstructing one."""
    gen = torch.Generator().manual_seed(seed)
    length = world_size * _local_len(world_size)

    def draw(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, k, v = draw(BATCH, length, num_q_heads, HEAD_DIM), draw(BATCH, length, num_kv_heads, HEAD_DIM), \
        draw(BATCH, length, num_kv_heads, HEAD_DIM)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    w_o, w_lse = draw(BATCH, length, num_q_heads, HEAD_DIM), draw(BATCH, num_q_heads, length)
    w_lse = w_lse if lse_loss else None
    ref_inputs = [x.detach().to(torch.float64).requires_grad_() for x in (q, k, v)]
    o, lse = attention_reference(*ref_inputs, causal=causal)
    ((o * w_o).sum() + ((lse * w_lse).sum() if lse_loss else 0)).backward()
    expected = [o.detach(), lse.detach()] + [x.grad for x in ref_inputs]
    return dict(inputs=(q, k, v), weights=(w_o, w_lse), causal=causal, expected=expected)


def case_attention(ctx, strategy: str, layout: str, usp: tuple[int, int] | None, cases: list[dict],
                   default_group: bool = False):
    """Run every case of the batch on this rank; return [(o, lse, dq, dk, dv)] local results.
    ``default_group``: pass group=None (the default group: all ranks of the pool)."""
    rank, world_size = ctx.rank, ctx.world_size
    group = ctx.usp_groups[usp] if usp is not None else (None if default_group else ctx.group)
    results = []
    for case in cases:
        q, k, v = (shard_tensor(x, layout, rank, world_size).requires_grad_() for x in case["inputs"])
        w_o, w_lse = case["weights"]
        o, lse = seqpar.attention(q, k, v, strategy=strategy, layout=layout, group=group, causal=case["causal"],
                                  return_lse=True)
        assert o.dtype == q.dtype and o.shape == q.shape
        assert lse.shape == (q.shape[0], q.shape[2], q.shape[1])
        loss = (o.double() * shard_tensor(w_o, layout, rank, world_size)).sum()
        if w_lse is not None:
            loss = loss + (lse.double() * shard_tensor(w_lse, layout, rank, world_size, dim=2)).sum()
        loss.backward()
        results.append((o.detach(), lse.detach(), q.grad, k.grad, v.grad))
    return results


def _check(pool, strategy: str, layout: str, world_size: int, usp, cases: list[dict], tols: list[dict],
           default_group: bool = False) -> None:
    per_rank = pool.run(case_attention, world_size, strategy=strategy, layout=layout, usp=usp,
                        cases=[{key: c[key] for key in ("inputs", "weights", "causal")} for c in cases],
                        default_group=default_group)
    for index, case in enumerate(cases):
        for i, name in enumerate(RESULT_NAMES):
            if tols[i] is None:
                continue
            got = unshard_tensor([r[index][i] for r in per_rank], layout, dim=2 if name == "lse" else 1)
            torch.testing.assert_close(got.double(), case["expected"][i], **tols[i],
                                       msg=lambda m: f"{strategy}/{layout}/P={world_size}/usp={usp} case {index} "
                                                     f"(causal={case['causal']}) {name}: {m}")


CONFIGS = [("ring", w, None) for w in (1, 2, 3, 4)] + [("allgather", w, None) for w in (1, 2, 3, 4)] \
    + [("ulysses", w, None) for w in (1, 2, 3, 4)] \
    + [("usp", 4, (2, 2)), ("usp", 2, (2, 1)), ("usp", 2, (1, 2)), ("usp", 4, (4, 1)), ("usp", 4, (1, 4))]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("strategy,world_size,usp", CONFIGS,
                         ids=[f"{s}-P{w}" + (f"-u{u[0]}r{u[1]}" if u else "") for s, w, u in CONFIGS])
def test_matches_reference_fp64(pool, strategy, layout, world_size, usp):
    seed = zlib.crc32(f"{strategy}/{layout}/{world_size}/{usp}".encode()) % 10_000
    # with and without a loss on lse: the two ways the fused backward gets its delta
    cases = [_make_case(world_size, *_heads(strategy, world_size, gqa), causal, torch.float64, seed + 10 * i,
                        lse_loss=lse_loss)
             for i, (causal, gqa, lse_loss) in enumerate([(True, False, True), (True, True, True), (False, False, True),
                                                          (False, True, True), (True, True, False),
                                                          (False, False, False)])]
    _check(pool, strategy, layout, world_size, usp, cases, [FP64_TOL] * 5)


@pytest.mark.parametrize("strategy,layout,world_size,usp", [
    ("ring", "zigzag", 4, None), ("allgather", "striped", 3, None), ("ulysses", "contiguous", 2, None),
    ("usp", "zigzag", 4, (2, 2))])
def test_matches_reference_fp32(pool, strategy, layout, world_size, usp):
    cases = [_make_case(world_size, 4, 2, True, torch.float32, 7),
             _make_case(world_size, 4, 2, True, torch.float32, 8, lse_loss=False)]
    _check(pool, strategy, layout, world_size, usp, cases, [FP32_TOL] * 5)


def case_lse_only(ctx, strategy: str, inputs, w_lse):
    """A loss on lse alone: o receives no gradient (None in backward) on every rank."""
    q, k, v = (shard_tensor(x, "zigzag", ctx.rank, ctx.world_size).requires_grad_() for x in inputs)
    _, lse = seqpar.attention(q, k, v, strategy=strategy, layout="zigzag", group=ctx.group, return_lse=True)
    (lse * shard_tensor(w_lse, "zigzag", ctx.rank, ctx.world_size, dim=2)).sum().backward()
    return q.grad, k.grad, v.grad


@pytest.mark.parametrize("strategy", ["ring", "ulysses"])
def test_gradient_through_lse_only(pool, strategy):
    gen = torch.Generator().manual_seed(17)
    inputs = [torch.randn(BATCH, 12, h, HEAD_DIM, generator=gen, dtype=torch.float64) for h in (4, 2, 2)]
    w_lse = torch.randn(BATCH, 4, 12, generator=gen, dtype=torch.float64)
    ref = [x.clone().requires_grad_() for x in inputs]
    (attention_reference(*ref, causal=True)[1] * w_lse).sum().backward()
    per_rank = pool.run(case_lse_only, 2, strategy=strategy, inputs=inputs, w_lse=w_lse)
    expected = [ref[0].grad, ref[1].grad, torch.zeros_like(inputs[2])]  # lse does not depend on v
    for i in range(3):
        torch.testing.assert_close(unshard_tensor([r[i] for r in per_rank], "zigzag"), expected[i], **FP64_TOL)


@pytest.mark.parametrize("strategy", ["ring", "allgather", "ulysses"])
def test_default_group(pool, strategy):
    """group=None means the default process group (the pool's 4 ranks)."""
    cases = [_make_case(4, 4, 4, True, torch.float64, 13)]
    _check(pool, strategy, "zigzag", 4, None, cases, [FP64_TOL] * 5, default_group=True)


def test_bf16_forward_close(pool):
    cases = [_make_case(4, 4, 2, True, torch.bfloat16, 11)]
    _check(pool, "ring", "striped", 4, None, cases, [BF16_TOL, BF16_TOL, None, None, None])


def test_single_process_without_distributed():
    case = _make_case(1, 4, 2, True, torch.float64, 3)
    q, k, v = (x.clone().requires_grad_() for x in case["inputs"])
    w_o, w_lse = case["weights"]
    for strategy in ("ring", "allgather", "ulysses"):
        for x in (q, k, v):
            x.grad = None
        o, lse = seqpar.attention(q, k, v, strategy=strategy, return_lse=True)
        ((o * w_o).sum() + (lse * w_lse).sum()).backward()
        for got, expected in zip([o, lse, q.grad, k.grad, v.grad], case["expected"]):
            torch.testing.assert_close(got, expected, **FP64_TOL)


def test_return_lse_false_and_default_scale():
    case = _make_case(1, 4, 4, False, torch.float64, 5)
    q, k, v = case["inputs"]
    o = seqpar.attention(q, k, v, strategy="ring", causal=False)
    torch.testing.assert_close(o, case["expected"][0], **FP64_TOL)
    o_scaled = seqpar.attention(q, k, v, strategy="ring", causal=False, scale=0.5 * HEAD_DIM ** -0.5)
    torch.testing.assert_close(o_scaled, attention_reference(q, k, v, causal=False, scale=0.5 * HEAD_DIM ** -0.5)[0],
                               **FP64_TOL)


# --- merge of partial results with rows that saw no key ------------------------------------------


def test_merge_partials_with_empty_rows():
    gen = torch.Generator().manual_seed(0)
    B, T, H, D = 1, 4, 2, 3
    o_a, o_b = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64), torch.randn(B, T, H, D, generator=gen,
                                                                                         dtype=torch.float64)
    lse_a, lse_b = torch.randn(B, H, T, generator=gen, dtype=torch.float64), torch.randn(B, H, T, generator=gen,
                                                                                         dtype=torch.float64)
    inf = float("-inf")
    lse_a[:, :, 0] = inf  # only b saw keys
    lse_b[:, :, 1] = inf  # only a saw keys
    lse_a[:, :, 2] = inf  # nobody saw keys
    lse_b[:, :, 2] = inf
    o_a[:, 0], o_b[:, 1], o_a[:, 2], o_b[:, 2] = 0, 0, 0, 0  # a row with lse = -inf carries o = 0
    o_acc, lse_acc = o_a.clone(), lse_a.clone()
    merge_partials_(o_acc, lse_acc, o_b, lse_b)
    assert torch.isfinite(o_acc).all()
    expected_lse = torch.logaddexp(lse_a, lse_b)
    torch.testing.assert_close(lse_acc, expected_lse)
    w_a = torch.exp(lse_a - expected_lse).transpose(1, 2).unsqueeze(-1)
    w_b = torch.exp(lse_b - expected_lse).transpose(1, 2).unsqueeze(-1)
    rows = [0, 1, 3]
    torch.testing.assert_close(o_acc[:, rows], (w_a * o_a + w_b * o_b)[:, rows])
    torch.testing.assert_close(o_acc[:, 0], o_b[:, 0])
    torch.testing.assert_close(o_acc[:, 1], o_a[:, 1])
    assert torch.equal(o_acc[:, 2], torch.zeros_like(o_acc[:, 2])) and torch.isinf(lse_acc[:, :, 2]).all()


def test_striped_first_row_sees_no_key_in_strictly_causal_block():
    """Striped, P = 2: rank 0 against rank 1's keys is strictly causal, so its first query sees no
    key in that block; the merged result must still be exact and finite (checked end to end in
    test_matches_reference_fp64); here the block itself gives (0, -inf) without NaN."""
    from seqpar.kernels import attention_block_forward

    q = torch.randn(1, 3, 2, 4, dtype=torch.float64)
    k = torch.randn(1, 3, 2, 4, dtype=torch.float64)
    o, lse = attention_block_forward(q, k, k, scale=0.5, diagonal_offset=-1)
    assert torch.equal(o[:, 0], torch.zeros_like(o[:, 0])) and torch.isinf(lse[:, :, 0]).all()
    assert torch.isfinite(o).all()


# --- bad input --------------------------------------------------------------------------------------


def _qkv(B=1, T=4, Hq=4, Hkv=2, D=8, dtype=torch.float64):
    return torch.zeros(B, T, Hq, D, dtype=dtype), torch.zeros(B, T, Hkv, D, dtype=dtype), \
        torch.zeros(B, T, Hkv, D, dtype=dtype)


@pytest.mark.parametrize("mutate,kwargs,match", [
    (lambda q, k, v: (q[0], k, v), {}, r"q must have 4 dims .* got 3 dims"),
    (lambda q, k, v: (q, k[None], v), {}, r"k must have 4 dims .* got 5 dims"),
    (lambda q, k, v: (q, k, v[:, :, :1]), {}, r"k and v must have the same shape"),
    (lambda q, k, v: (q.repeat(2, 1, 1, 1), k, v), {}, r"batch size mismatch: q has 2, k/v have 1"),
    (lambda q, k, v: (q[:, :3], k, v), {}, r"local sequence length mismatch: q has 3 tokens, k/v have 4"),
    (lambda q, k, v: (q[..., :6], k, v), {}, r"head dim mismatch: q has 6, k/v have 8"),
    (lambda q, k, v: (q[:, :, :3], k, v), {}, r"query heads 3 are not a multiple of the KV heads 2"),
    (lambda q, k, v: (q.float(), k, v), {}, r"dtype mismatch: q torch.float32, k torch.float64"),
    (lambda q, k, v: (q, k.to("meta"), v.to("meta")), {}, r"device mismatch: q on cpu, k on meta"),
    (lambda q, k, v: (q.long(), k.long(), v.long()), {}, r"q must be floating point"),
    (lambda q, k, v: (q, k, v), {"strategy": "tree"}, r"unknown strategy 'tree'"),
    (lambda q, k, v: (q, k, v), {"layout": "spiral"}, r"unknown layout 'spiral'"),
    (lambda q, k, v: (q, k, v), {"backend": "cuda-magic"}, r"unknown kernel backend 'cuda-magic'"),
    (lambda q, k, v: (q, k, v), {"strategy": "usp"}, r"'usp' needs group=seqpar.comm.UspGroups"),
])
def test_bad_inputs_raise(mutate, kwargs, match):
    q, k, v = mutate(*_qkv())
    options = dict(strategy="ring")
    options.update(kwargs)
    with pytest.raises(ValueError, match=match):
        seqpar.attention(q, k, v, **options)


def case_bad_group_inputs(ctx):
    """Errors that depend on the group; every rank raises before any collective (no hang)."""
    world_size = ctx.world_size
    q, k, v = _qkv(T=5)
    with pytest.raises(ValueError, match=r"zigzag layout needs an even local length .* local length 5 "
                                         r"with world_size=4"):
        seqpar.attention(q, k, v, strategy="ring", layout="zigzag", group=ctx.group)
    q, k, v = _qkv(Hq=6, Hkv=2)
    with pytest.raises(ValueError, match=r"6 query heads are not divisible by the Ulysses group size 4"):
        seqpar.attention(q, k, v, strategy="ulysses", group=ctx.group)
    groups = ctx.usp_groups[(2, 2)]
    with pytest.raises(ValueError, match=r"strategy 'usp': 6 query heads are not divisible by the Ulysses group size 4"):
        seqpar.attention(*_qkv(Hq=6, Hkv=3), strategy="usp", group=ctx.usp_groups[(4, 1)])
    lying = UspGroups(groups.sp, groups.ulysses, groups.ring, ulysses_size=2, ring_size=1)
    with pytest.raises(ValueError, match=r"ulysses_size 2 x ring_size 1 = 2 != sequence-parallel size 4"):
        seqpar.attention(*_qkv(), strategy="usp", group=lying)
    swapped = UspGroups(groups.sp, groups.ring, groups.ulysses, ulysses_size=1, ring_size=4)
    with pytest.raises(ValueError, match=r"group sizes ulysses 2 / ring 2 differ from ulysses_size 1 / ring_size 4"):
        seqpar.attention(*_qkv(), strategy="usp", group=swapped)
    if ctx.rank >= 2:  # ranks outside the group of the first two ranks (no collective involved)
        with pytest.raises(ValueError, match=r"not a member of the sequence-parallel group"):
            seqpar.attention(*_qkv(), strategy="ring", group=ctx.usp_groups[(2, 1)].sp)
    return world_size


def test_bad_group_inputs(pool):
    assert pool.run(case_bad_group_inputs, 4) == [4] * 4
    # the pool still works after every rank raised
    cases = [_make_case(4, 4, 2, True, torch.float64, 1)]
    _check(pool, "ring", "contiguous", 4, None, cases, [FP64_TOL] * 5)


def case_ulysses_plan(ctx, num_q_heads: int, num_kv_heads: int, field: str):
    """``field`` of this rank's Ulysses plan (kv_repeat, head_groups)."""
    q, k, v = _qkv(Hq=num_q_heads, Hkv=num_kv_heads)
    plan = build_plan(q, k, v, strategy="ulysses", layout="contiguous", group=ctx.group, causal=True, scale=None,
                      backend="auto")
    return getattr(plan, field)


@pytest.mark.parametrize("world_size,num_q_heads,num_kv_heads,repeat", [
    (4, 4, 4, 1), (4, 8, 4, 1), (2, 4, 2, 1), (4, 4, 2, 2), (4, 8, 1, 4), (3, 6, 2, 3)])
def test_ulysses_repeats_kv_heads_only_when_needed(pool, world_size, num_q_heads, num_kv_heads, repeat):
    assert repeat == math.lcm(num_kv_heads, world_size) // num_kv_heads
    assert pool.run(case_ulysses_plan, world_size, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                    field="kv_repeat") == [repeat] * world_size


@pytest.mark.parametrize("world_size,num_q_heads,num_kv_heads,groups", [
    (2, 4, 4, 2), (2, 8, 4, 2), (2, 4, 2, 1), (4, 8, 8, 2), (4, 4, 4, 1), (4, 8, 2, 1), (3, 6, 2, 1)])
def test_ulysses_head_groups(pool, world_size, num_q_heads, num_kv_heads, groups):
    """Ulysses exchanges the heads in 2 groups (each overlapping the other's compute) when the KV
    heads of a rank split evenly, else all at once; the grouped GQA exchange matches the fp64
    reference (the MHA one is in test_matches_reference_fp64)."""
    assert pool.run(case_ulysses_plan, world_size, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                    field="head_groups") == [groups] * world_size
    if (world_size, num_q_heads, num_kv_heads) == (2, 8, 4):
        for layout in ("contiguous", "zigzag"):
            cases = [_make_case(2, 8, 4, causal, torch.float64, 30 + i, lse_loss=lse_loss)
                     for i, (causal, lse_loss) in enumerate([(True, True), (False, False)])]
            _check(pool, "ulysses", layout, 2, None, cases, [FP64_TOL] * 5)


def case_block_counts(ctx, strategy: str, layout: str, usp: tuple[int, int] | None):
    """Block tasks this rank plans against each K/V source, and whether it reorders its tokens."""
    from seqpar.layout import plan_blocks

    q, k, v = _qkv(T=4)
    group = ctx.usp_groups[usp] if usp is not None else ctx.group
    plan = build_plan(q, k, v, strategy=strategy, layout=layout, group=group, causal=True, scale=None,
                      backend="auto")
    return [len(plan_blocks(plan.q_segments, segs, True)) for segs in plan.segments_of_source], \
        plan.token_order is not None


@pytest.mark.parametrize("strategy,layout,usp,counts,reordered", [
    # ulysses: the zigzag / striped row is sorted into one contiguous segment -> 1 task per K/V block
    ("ulysses", "zigzag", None, [[1]] * 4, True),
    ("ulysses", "striped", None, [[1]] * 4, True),
    ("ulysses", "contiguous", None, [[1]] * 4, False),
    # usp 2x2 zigzag: row 0 holds chunks 0, 1, 6, 7 (2 segments), row 1 chunks 2..5 (1 segment)
    ("usp", "zigzag", (2, 2), [[3, 1], [3, 1], [1, 1], [1, 1]], True),
])
def test_reordering_plans_few_blocks(pool, strategy, layout, usp, counts, reordered):
    """Sorting the head-sharded tokens by global position (layout.sort_row) leaves few block tasks
    per K/V block (ulysses zigzag at P = 4 planned 19 before: 7 segments of the rank-major order)."""
    results = pool.run(case_block_counts, 4, strategy=strategy, layout=layout, usp=usp)
    assert [r[0] for r in results] == counts
    assert all(r[1] == reordered for r in results)


# --- K/V sources: which block a rank holds at each step ------------------------------------------


def case_source_order(ctx, transport: str):
    """Forward blocks of RingKV / GatheredKV carry the K/V and segments of ranks r, r-1, r-2, ...;
    backward returns, on every rank, the sum over ranks of the dK/dV handed in for its block."""
    from seqpar.layout import segments
    from seqpar.softmax.sources import GatheredKV, RingKV

    rank, world_size = ctx.rank, ctx.world_size
    local_len, num_kv_heads = 4, 3
    segs = [segments("zigzag", r, world_size, local_len) for r in range(world_size)]

    def tagged(r: int) -> torch.Tensor:  # K of rank r: every entry encodes (rank, head)
        return (100.0 * r + torch.arange(num_kv_heads, dtype=torch.float64)).view(1, 1, -1, 1).expand(
            1, local_len, num_kv_heads, 2).contiguous()

    k = tagged(rank)
    if transport == "ring":
        source = RingKV(k, -k, ctx.group, rank, world_size, segs)
    else:
        source = GatheredKV(k, -k, ctx.group, rank, world_size, segs, head_groups=2)
    seen = []
    for block in source.forward_blocks():
        src = int(block.k[0, 0, 0, 0].item() // 100)
        heads = block.kv_heads
        assert torch.equal(block.k, tagged(src)[:, :, heads]) and torch.equal(block.v, -tagged(src)[:, :, heads])
        assert block.segments == segs[src]
        seen.append((src, heads.start, heads.stop))
    blocks = source.backward_blocks()
    block = next(blocks)
    try:
        while True:
            src = int(block.k[0, 0, 0, 0].item() // 100)
            grad = torch.full(block.k.shape, float(10 * rank + src), dtype=torch.float64)
            block = blocks.send((grad, 2 * grad))
    except StopIteration as done:
        dk, dv = done.value
    expected = float(sum(10 * r + rank for r in range(world_size)))
    assert torch.equal(dk, torch.full_like(k, expected)) and torch.equal(dv, torch.full_like(k, 2 * expected))
    return seen


@pytest.mark.parametrize("transport", ["ring", "allgather"])
@pytest.mark.parametrize("world_size", [1, 3, 4])
def test_kv_sources_visit_every_rank_once(pool, transport, world_size):
    for rank, seen in enumerate(pool.run(case_source_order, world_size, transport=transport)):
        order = [(rank - step) % world_size for step in range(world_size)]
        if transport == "ring":
            assert seen == [(src, 0, 3) for src in order]
        else:  # two KV-head groups [0, 1) and [1, 3), each visiting every source
            assert seen == [(src, 0, 1) for src in order] + [(src, 1, 3) for src in order]


# --- the Triton block kernels (CPU interpreter) under the multi-rank driver ------------------------


def case_triton_backend(ctx) -> dict[str, float]:
    """One rank of the interpreter check: fp32, backend='triton', every strategy on one layout each."""
    rank, world_size = ctx.rank, ctx.world_size
    errors = {}
    for strategy, layout in [("ring", "zigzag"), ("allgather", "striped"), ("ulysses", "contiguous")]:
        case = _make_case(world_size, 4, 2, True, torch.float32, 21)
        q, k, v = (shard_tensor(x, layout, rank, world_size).requires_grad_() for x in case["inputs"])
        w_o, w_lse = case["weights"]
        o, lse = seqpar.attention(q, k, v, strategy=strategy, layout=layout, causal=True, return_lse=True,
                                  backend="triton")
        ((o.double() * shard_tensor(w_o, layout, rank, world_size)).sum()
         + (lse.double() * shard_tensor(w_lse, layout, rank, world_size, dim=2)).sum()).backward()
        expected = [shard_tensor(e, layout, rank, world_size, dim=2 if i == 1 else 1)
                    for i, e in enumerate(case["expected"])]
        errors[strategy] = max((got.double() - e).abs().max().item()
                               for got, e in zip([o, lse, q.grad, k.grad, v.grad], expected))
    assert all(e < FP32_TOL["atol"] for e in errors.values()), errors
    return errors


def test_triton_kernels_under_the_driver_interpreted():
    """The Triton backend (strided views, fused accumulate into slices of the running output)
    gives the same results as the reference under ring / allgather / ulysses, 2 ranks, fp32."""
    pytest.importorskip("triton")
    pytest.importorskip("numpy")
    run_case_interpreted("test_softmax_attention", "case_triton_backend", world_size=2)


# --- merged block plans and the driver's accumulators ----------------------------------------------


def _task_pairs(tasks, tq: int, tk: int) -> torch.Tensor:
    """How often each (local query, local key) pair is computed by ``tasks``."""
    covered = torch.zeros(tq, tk, dtype=torch.int64)
    for t in tasks:
        block = torch.ones(t.q_len, t.k_len, dtype=torch.int64)
        if t.diagonal_offset is not None:
            i, j = torch.arange(t.q_len).unsqueeze(1), torch.arange(t.k_len).unsqueeze(0)
            block = (j <= i + t.diagonal_offset).long()
        covered[t.q_start:t.q_start + t.q_len, t.k_start:t.k_start + t.k_len] += block
    return covered


def test_merged_plans_keep_every_pair_once():
    """layout.merge_block_tasks: the same (query, key) pairs as plan_blocks, each once, with no
    merged mask of offset > 0, for every layout / world size / query rank / source rank (and the
    unsorted Ulysses rows); zigzag's causal own block is 1 kernel call (the local causal block)
    instead of 3."""
    from seqpar.layout import concat_segments, merge_block_tasks, plan_blocks, segments

    rows = []
    for layout in LAYOUTS:
        for world_size in (1, 2, 3, 4):
            segs = [segments(layout, r, world_size, 12) for r in range(world_size)]
            rows += [(segs[r], segs[s]) for r in range(world_size) for s in range(world_size)]
        row = concat_segments([segments(layout, u, 4, 4) for u in range(4)])
        rows.append((row, row))
    for q_segs, k_segs in rows:
        for causal in (True, False):
            try:
                planned = plan_blocks(q_segs, k_segs, causal)
            except ValueError:  # causal rows of different strides (unsorted striped Ulysses rows)
                continue
            merged = merge_block_tasks(planned)
            tq, tk = (sum(s.length for s in segs) for segs in (q_segs, k_segs))
            assert torch.equal(_task_pairs(merged, tq, tk), _task_pairs(planned, tq, tk)), (q_segs, k_segs, causal)
            assert _task_pairs(merged, tq, tk).max() <= 1
            assert len(merged) <= len(planned)
            assert all(t in planned or t.diagonal_offset is None or t.diagonal_offset <= 0 for t in merged)
    own = segments("zigzag", 0, 2, 8)
    assert len(plan_blocks(own, own, True)) == 3
    assert merge_block_tasks(plan_blocks(own, own, True)) == [BlockTask(0, 8, 0, 8, 0)]
    assert len(merge_block_tasks(plan_blocks(own, segments("zigzag", 1, 2, 8), True))) == 1


def test_box_merge_keeps_every_pair_once():
    """layout merges two tasks over their bounding box only when one diagonal gives exactly their
    pairs: random task pairs (masked, unmasked, banded) against a brute-force count."""
    from seqpar.layout import _box_joined, _visible_pairs

    gen = torch.Generator().manual_seed(3)

    def draw(n):
        return int(torch.randint(0, n, (1,), generator=gen))

    for _ in range(2000):
        q0, q1 = draw(8), 0
        q1 = q0 + 1 + draw(8)
        k0, k1 = draw(8), 0
        k1 = k0 + 1 + draw(8)
        c = None if draw(4) == 0 else draw(24) - 12
        want = sum(1 for i in range(q0, q1) for j in range(k0, k1) if c is None or j - i <= c)
        assert _visible_pairs(q0, q1, k0, k1, c) == want
    merges = 0
    for _ in range(3000):
        tasks = []
        for _ in range(2):
            m = None if draw(3) == 0 else draw(9) - 6
            w = None if draw(4) else m - 1 - draw(3) if m is not None else -draw(3)
            tasks.append(BlockTask(draw(6), 1 + draw(6), draw(6), 1 + draw(6), m, w))
        joined = _box_joined(*tasks)
        if joined is None:
            continue
        merges += 1
        size = 16
        assert torch.equal(_task_pairs([joined], size, size), _task_pairs(tasks, size, size)), tasks
        assert _task_pairs(tasks, size, size).max() <= 1
        assert joined.window_offset is None and (joined.diagonal_offset is None or joined.diagonal_offset <= 0)
    assert merges >= 10  # random pairs rarely form one box; the zigzag case is checked above


class _LocalBlocks:
    """A K/V source without communication: the blocks of several (k, v, segments) sources, in
    ``head_groups`` KV-head groups (like GatheredKV); backward keeps every source's dK/dV."""

    def __init__(self, sources, head_groups: int):
        from seqpar.softmax.sources import KVBlock

        self.block = KVBlock
        self.sources = sources
        self.k, self.v = sources[0][0], sources[0][1]
        bounds = [self.k.shape[2] * i // head_groups for i in range(head_groups + 1)]
        self.heads = [slice(a, b) for a, b in zip(bounds, bounds[1:])]

    def forward_blocks(self):
        for heads in self.heads:
            for k, v, segs in self.sources:
                yield self.block(k[:, :, heads], v[:, :, heads], segs, heads)

    def backward_blocks(self):
        self.grads = [(torch.empty_like(k), torch.empty_like(v)) for k, v, _ in self.sources]
        for heads in self.heads:
            for (k, v, segs), (dk, dv) in zip(self.sources, self.grads):
                dk[:, :, heads], dv[:, :, heads] = yield self.block(k[:, :, heads], v[:, :, heads], segs, heads)
        return self.grads[0]


@pytest.mark.parametrize("sources", [(0, 1), (1,)])
def test_driver_accumulators_and_one_sync_per_call(monkeypatch, sources):
    """The driver on one process with several blocks (KV-head groups x zigzag sources) of several
    tasks: the first part of a region is written, later ones merged / added, regions no task
    reaches stay empty (with only source 1, the early queries see no key); fp64 against a dense
    reference of the same mask, on sdpa and the reference kernels. The backward synchronises with
    the host once per call with an lse gradient (out rebuilt from delta), never without one."""
    from seqpar.layout import segments
    from seqpar.softmax.driver import attention_backward, attention_forward

    gen = torch.Generator().manual_seed(3)
    batch, length, hq, hkv, d, scale = 2, 12, 6, 3, 8, 0.4
    q, do = (torch.randn(batch, length, hq, d, generator=gen, dtype=torch.float64) for _ in range(2))
    kv = [tuple(torch.randn(batch, length, hkv, d, generator=gen, dtype=torch.float64) for _ in range(2))
          for _ in sources]
    dlse = torch.randn(batch, hq, length, generator=gen, dtype=torch.float64)
    q_segs = segments("zigzag", 0, 2, length)
    k_segs = [segments("zigzag", r, 2, length) for r in sources]
    q_pos = torch.cat([seg.positions() for seg in q_segs])
    k_pos = torch.cat([seg.positions() for segs in k_segs for seg in segs])
    visible = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)

    ref = [q.clone().requires_grad_(), torch.cat([k for k, _ in kv], 1).requires_grad_(),
           torch.cat([v for _, v in kv], 1).requires_grad_()]
    s = torch.einsum("bqhgd,bkhd->bhgqk", ref[0].view(batch, length, hkv, hq // hkv, d), ref[1]) * scale
    s = s.masked_fill(~visible, float("-inf"))
    lse_ref = torch.logsumexp(s, dim=-1)
    finite = torch.where(torch.isinf(lse_ref), 0.0, lse_ref)
    o_ref = torch.einsum("bhgqk,bkhd->bqhgd", torch.exp(s - finite.unsqueeze(-1)), ref[2]).reshape(batch, length, hq, d)
    lse_ref = lse_ref.reshape(batch, hq, length)
    ((o_ref * do).sum() + (finite.reshape(batch, hq, length) * dlse).sum()).backward()

    def source():
        return _LocalBlocks([(k, v, segs) for (k, v), segs in zip(kv, k_segs)], head_groups=2)

    calls = 0
    original = torch.Tensor.__bool__

    def counting(t):
        nonlocal calls
        calls += 1
        return original(t)

    for backend in ("sdpa", "torch"):
        o, lse = attention_forward(q, source(), q_segs, mask=AttentionMask(True), scale=scale, backend=backend)
        torch.testing.assert_close(o, o_ref.detach(), **FP64_TOL)
        torch.testing.assert_close(lse, lse_ref.detach(), **FP64_TOL)
        assert o.is_contiguous() and lse.is_contiguous()
        if sources == (1,):
            assert torch.all(o[:, :6] == 0) and torch.all(torch.isneginf(lse[:, :, :6]))
        delta = (o * do).sum(-1).transpose(1, 2) - dlse
        for with_lse in (True, False):
            src = source()
            calls = 0
            monkeypatch.setattr(torch.Tensor, "__bool__", counting)
            if with_lse:
                dq, _, _ = attention_backward(do, q, lse, delta, src, q_segs, mask=AttentionMask(True), scale=scale,
                                              backend=backend)
            else:
                dq, _, _ = attention_backward(do, q, lse, None, src, q_segs, mask=AttentionMask(True), scale=scale,
                                              backend=backend, out=o)
            monkeypatch.undo()
            assert calls == (1 if with_lse and backend == "sdpa" else 0), (backend, with_lse, calls)
            if with_lse:
                got = [dq, torch.cat([g[0] for g in src.grads], 1), torch.cat([g[1] for g in src.grads], 1)]
                for name, a, x in zip(("dq", "dk", "dv"), got, ref):
                    torch.testing.assert_close(a, x.grad, **FP64_TOL, msg=lambda m: f"{backend} {name}: {m}")
            else:  # against the reference kernels with delta = rowsum(o * do)
                ref_src = source()
                ref_dq, _, _ = attention_backward(do, q, lse, delta + dlse, ref_src, q_segs, mask=AttentionMask(True), scale=scale,
                                                  backend="torch")
                torch.testing.assert_close(dq, ref_dq, **FP64_TOL)
                for a, b in zip(src.grads, ref_src.grads):
                    torch.testing.assert_close(a[0], b[0], **FP64_TOL)
                    torch.testing.assert_close(a[1], b[1], **FP64_TOL)
