"""Bad input gets a clear error naming the problem and the numbers, never a hang or a silent wrong
answer: single-rank inputs of every public entry point, and (with ``validate=True``) ranks that
disagree with each other."""
from __future__ import annotations

import pytest
import torch

import seqpar
from seqpar.comm import (all_to_all, build_usp_groups, check_same_on_all_ranks, make_data_sequence_groups,
                         reduce_scatter)
from seqpar.config import ModelConfig, SequenceParallelConfig
from seqpar.kernels import attention_block_forward, chunk_linear_attention, chunk_linear_attention_forward
from seqpar.parallelize import shard_batch


def _t(*shape, dtype=torch.float64, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def _qkv(B=1, T=4, H=2, D=8, dtype=torch.float64):
    return _t(B, T, H, D, dtype=dtype), _t(B, T, H, D, dtype=dtype), _t(B, T, H, D, dtype=dtype)


# --- seqpar.attention (one process) ------------------------------------------------------------

def _att(*args, **kw):
    kw.setdefault("strategy", "ring")
    return seqpar.attention(*args, **kw)


ATTENTION_CASES = [
    # (name, call, exception, match)
    ("non-tensor q", lambda q, k, v: _att([1.0], k, v), TypeError, r"q must be a torch.Tensor, got list"),
    ("3-D q", lambda q, k, v: _att(q[0], k, v), ValueError, r"q must have 4 dims .* got 3 dims with shape \(4, 2, 8\)"),
    ("zero length", lambda q, k, v: _att(q[:, :0], k[:, :0], v[:, :0]), ValueError, r"local sequence length is 0"),
    ("zero heads", lambda q, k, v: _att(q[:, :, :0], k[:, :, :0], v[:, :, :0]), ValueError,
     r"q has an empty head or head-dim axis: shape \(1, 4, 0, 8\)"),
    ("zero head dim", lambda q, k, v: _att(q[..., :0], k[..., :0], v[..., :0]), ValueError,
     r"q has an empty head or head-dim axis: shape \(1, 4, 2, 0\)"),
    ("integer dtype", lambda q, k, v: _att(q.long(), k.long(), v.long()), ValueError,
     r"q must be floating point, got dtype torch.int64"),
    ("meta / cpu mix", lambda q, k, v: _att(q, k.to("meta"), v), ValueError, r"device mismatch: q on cpu, k on meta"),
    ("scale 0", lambda q, k, v: _att(q, k, v, scale=0.0), ValueError, r"scale must be a finite number > 0 .* got 0.0"),
    ("scale < 0", lambda q, k, v: _att(q, k, v, scale=-0.5), ValueError, r"scale must be a finite number > 0 .* got -0.5"),
    ("scale NaN", lambda q, k, v: _att(q, k, v, scale=float("nan")), ValueError, r"finite number > 0 .* got nan"),
    ("scale str", lambda q, k, v: _att(q, k, v, scale="0.1"), TypeError, r"scale must be a float or None, got str"),
    ("causal str", lambda q, k, v: _att(q, k, v, causal="False"), TypeError, r"causal must be a bool, got str 'False'"),
    ("unknown backend", lambda q, k, v: _att(q, k, v, backend="cuda"), ValueError, r"unknown kernel backend 'cuda'"),
]


@pytest.mark.parametrize("name,call,exc,match", ATTENTION_CASES, ids=[c[0] for c in ATTENTION_CASES])
def test_attention_bad_input(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call(*_qkv())


def test_attention_valid_edge_inputs_still_work():
    """Non-contiguous inputs and validate=True on one process are accepted unchanged."""
    q, k, v = (_t(1, 8, 2, 8)[:, ::2] for _ in range(3))
    assert not q.is_contiguous()
    ref = seqpar.attention(q.contiguous(), k.contiguous(), v.contiguous(), strategy="ring")
    torch.testing.assert_close(seqpar.attention(q, k, v, strategy="ring", validate=True), ref)


# --- seqpar.linear_attention (one process) -----------------------------------------------------

def _lin(*args, **kw):
    return seqpar.linear_attention(*args, **kw)


LINEAR_CASES = [
    ("non-tensor q", lambda q, k, v: _lin([1.0], k, v), TypeError, r"q must be a torch.Tensor, got list"),
    ("non-tensor g", lambda q, k, v: _lin(q, k, v, g=[0.0]), TypeError, r"g must be a torch.Tensor or None, got list"),
    ("3-D q", lambda q, k, v: _lin(q[0], k[0], v[0]), ValueError, r"must be \[B, T, H, D\]; got shapes \(4, 2, 8\)"),
    ("zero length", lambda q, k, v: _lin(q[:, :0], k[:, :0], v[:, :0]), ValueError, r"local length must be at least 1, got 0"),
    ("zero heads", lambda q, k, v: _lin(q[:, :, :0], k[:, :, :0], v[:, :, :0]), ValueError,
     r"q has an empty head or feature axis: shape \(1, 4, 0, 8\)"),
    ("integer dtype", lambda q, k, v: _lin(q.long(), k.long(), v.long()), ValueError, r"floating point; got torch.int64"),
    ("meta / cpu mix", lambda q, k, v: _lin(q, k.to("meta"), v), ValueError, r"k is on meta but q is on cpu"),
    ("scale 0", lambda q, k, v: _lin(q, k, v, scale=0.0), ValueError, r"scale must be a finite number > 0 .* got 0.0"),
    ("scale NaN", lambda q, k, v: _lin(q, k, v, scale=float("nan")), ValueError, r"got nan"),
    ("g_gamma shape", lambda q, k, v: _lin(q, k, v, g_gamma=_t(3)), ValueError, r"g_gamma must be \[H\] = \[2\]; got \(3,\)"),
    ("g_gamma dtype", lambda q, k, v: _lin(q, k, v, g_gamma=torch.zeros(2, dtype=torch.long)), ValueError,
     r"g_gamma must be floating point; got torch.int64"),
    ("integer g", lambda q, k, v: _lin(q, k, v, g=torch.zeros(1, 4, 2, dtype=torch.long)), ValueError,
     r"g must be floating point; got torch.int64"),
    ("initial_state dtype", lambda q, k, v: _lin(q, k, v, initial_state=torch.zeros(1, 2, 8, 8, dtype=torch.int32)),
     ValueError, r"initial_state must be floating point; got torch.int32"),
    ("chunk_size float", lambda q, k, v: _lin(q, k, v, chunk_size=2.5), TypeError, r"chunk_size must be an int, got float 2.5"),
    ("chunk_size 0", lambda q, k, v: _lin(q, k, v, chunk_size=0), ValueError, r"chunk_size must be positive, got 0"),
    ("output_final_state str", lambda q, k, v: _lin(q, k, v, output_final_state="no"), TypeError,
     r"output_final_state must be a bool, got str 'no'"),
    ("positive g (validate)", lambda q, k, v: _lin(q, k, v, g=torch.full((1, 4, 2), 0.5, dtype=torch.float64), validate=True),
     ValueError, r"g has positive log gates \(max 0.5, 8 values > 0\)"),
    ("NaN g (validate)", lambda q, k, v: _lin(q, k, v, g=torch.full((1, 4, 2), float("nan"), dtype=torch.float64),
                                              validate=True), ValueError, r"g has 8 non-finite values"),
    ("positive g_gamma (validate)", lambda q, k, v: _lin(q, k, v, g_gamma=torch.tensor([0.1, -0.1], dtype=torch.float64),
                                                          validate=True), ValueError, r"g_gamma has positive log gates"),
]


@pytest.mark.parametrize("name,call,exc,match", LINEAR_CASES, ids=[c[0] for c in LINEAR_CASES])
def test_linear_attention_bad_input(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call(*_qkv())


def test_linear_attention_mixed_float_dtypes_still_work():
    """g_gamma / initial_state in another float dtype than q are cast, as before."""
    q, k, v = _qkv()
    o, final = seqpar.linear_attention(q, k, v, g_gamma=-torch.rand(2), initial_state=torch.zeros(1, 2, 8, 8),
                                       output_final_state=True, validate=True)
    assert o.dtype == torch.float64 and final.dtype == torch.float64


# --- layouts, batches, configs, kernels, comm (one process) ------------------------------------

OTHER_CASES = [
    ("shard non-tensor", lambda: seqpar.shard([1, 2]), TypeError, r"x must be a torch.Tensor, got list"),
    ("shard dim", lambda: seqpar.shard(_t(1, 4, 2, 8), dim=5), ValueError,
     r"token dim 5 is out of range for x of shape \(1, 4, 2, 8\) \(4 dims\)"),
    ("shard layout", lambda: seqpar.shard(_t(1, 4), layout="zz"), ValueError, r"unknown layout 'zz'"),
    ("unshard non-tensor", lambda: seqpar.unshard([1, 2]), TypeError, r"x_local must be a torch.Tensor, got list"),
    ("unshard dim", lambda: seqpar.unshard(_t(1, 4), dim=-3), ValueError, r"token dim -3 is out of range"),
    ("local_positions < 1", lambda: seqpar.local_positions(-3), ValueError, r"local_len must be >= 1, got -3"),
    ("local_positions float", lambda: seqpar.local_positions(2.5), TypeError, r"local_len must be an int, got float 2.5"),
    ("local_positions zigzag odd", lambda: seqpar.global_positions("zigzag", 0, 2, 3), ValueError,
     r"zigzag layout needs an even local length .* local length 3 with world_size=2"),
    ("shard_batch 1-D", lambda: shard_batch(torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long),
                                             "contiguous", None), ValueError, r"must be \[B, T\], got 1 dims with shape \(8,\)"),
    ("shard_batch shapes", lambda: shard_batch(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 6, dtype=torch.long),
                                                "contiguous", None), ValueError, r"tokens \(2, 8\) and labels \(2, 6\) differ"),
    ("shard_batch non-tensor", lambda: shard_batch([1], [1], "contiguous", None), TypeError, r"tokens must be a torch.Tensor"),
    ("SequenceParallelConfig str", lambda: SequenceParallelConfig(sp_size="2"), TypeError, r"sp_size must be an int, got str '2'"),
    ("SequenceParallelConfig 0", lambda: SequenceParallelConfig(sp_size=0), ValueError, r"sp_size must be >= 1, got 0"),
    ("SequenceParallelConfig ulysses", lambda: SequenceParallelConfig(sp_size=4, ulysses_size=3, softmax_strategy="usp"),
     ValueError, r"ulysses_size 3 does not divide sp_size 4"),
    ("ModelConfig heads", lambda: ModelConfig(dim=10, n_heads=3), ValueError, r"dim 10 is not divisible by n_heads 3"),
    ("parallelize sp_size", lambda: seqpar.parallelize_model(torch.nn.Linear(2, 2), SequenceParallelConfig(sp_size=2), None),
     ValueError, r"the group has 1 ranks but config.sp_size is 2"),
    ("softmax kernel backend", lambda: attention_block_forward(*_qkv(), scale=1.0, backend="x"), ValueError,
     r"unknown kernel backend 'x'"),
    ("linear kernel backend", lambda: chunk_linear_attention_forward(*_qkv(), backend="x"), ValueError,
     r"unknown kernel backend 'x'"),
    ("linear kernel 3-D", lambda: chunk_linear_attention(_t(4, 2, 8), _t(4, 2, 8), _t(4, 2, 8)), ValueError,
     r"must be \[B, T, H, D\]; got shapes \(4, 2, 8\)"),
    ("make_data_sequence_groups", lambda: make_data_sequence_groups(3), ValueError,
     r"sequence-parallel size 3 does not divide the world size 1"),
    ("build_usp_groups", lambda: build_usp_groups([0, 1, 2, 3], 3), ValueError,
     r"ulysses size 3 does not divide the sequence-parallel size 4"),
    ("reduce_scatter leading dim", lambda: reduce_scatter(_t(3, 4), None), ValueError,
     r"leading dim equal to the group size 1, got shape \(3, 4\)"),
]


@pytest.mark.parametrize("name,call,exc,match", OTHER_CASES, ids=[c[0] for c in OTHER_CASES])
def test_other_bad_input(name, call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --- groups (ranks that disagree: tests/test_agreement.py, default and validate=True)

def case_validated_matches_unvalidated(ctx) -> bool:
    """validate=True changes nothing for consistent inputs."""
    torch.manual_seed(7)
    q, k, v = _qkv(T=4, H=4)
    g = -torch.rand(1, 4, 4, dtype=torch.float64)
    o1 = seqpar.attention(q, k, v, strategy="ulysses", layout="zigzag", group=ctx.group)
    o2 = seqpar.attention(q, k, v, strategy="ulysses", layout="zigzag", group=ctx.group, validate=True)
    l1 = seqpar.linear_attention(q, k, v, g=g, group=ctx.group, output_final_state=True)
    l2 = seqpar.linear_attention(q, k, v, g=g, group=ctx.group, output_final_state=True, validate=True)
    return torch.equal(o1, o2) and torch.equal(l1[0], l2[0]) and torch.equal(l1[1], l2[1])


def test_validate_keeps_valid_results(pool):
    assert pool.run(case_validated_matches_unvalidated, 2) == [True, True]


def case_not_a_member(ctx) -> bool:
    """A process outside ``group`` gets a ValueError naming its rank and the group's ranks."""
    group = ctx.usp_groups[(2, 1)].sp  # ranks 0 and 1
    if ctx.rank < 2:
        return True
    msg = rf"this process \(global rank {ctx.rank} of 4\) is not a member of the sequence-parallel group it was given"
    q, k, v = _qkv()
    for call in (lambda: seqpar.linear_attention(q, k, v, group=group), lambda: seqpar.shard(q, group=group),
                 lambda: seqpar.unshard(q, group=group), lambda: seqpar.local_positions(4, group=group),
                 lambda: seqpar.attention(q, k, v, strategy="ring", group=group)):
        with pytest.raises(ValueError, match=msg):
            call()
    return True


def test_not_a_member(pool):
    """Before: 'negative dimension -256' (linear) and 'rank -1 is outside a group of size -1' (shard)."""
    assert pool.run(case_not_a_member, 4) == [True] * 4


def case_check_helper(ctx) -> str:
    with pytest.raises(ValueError) as err:
        check_same_on_all_ranks({"n": ctx.rank}, ctx.group, what="helper")
    check_same_on_all_ranks({"n": 1, "x": 0.5}, ctx.group, what="helper")  # agreeing: no error
    return str(err.value)


def test_check_same_on_all_ranks(pool):
    msgs = pool.run(case_check_helper, 3)
    assert all("helper: the ranks of the group" in m and "n: rank 0 0, rank 1 1, rank 2 2" in m for m in msgs)


def case_all_to_all_indivisible(ctx) -> str:
    """The comm helper checks divisibility on every rank before any collective (no hang)."""
    with pytest.raises(ValueError, match=r"all_to_all: dim 1 of shape \(1, 3, 2, 8\) is not divisible by the group size 2"):
        all_to_all(_t(1, 3, 2, 8), ctx.group, scatter_dim=1, gather_dim=2)
    return "ok"


def test_all_to_all_indivisible(pool):
    assert pool.run(case_all_to_all_indivisible, 2) == ["ok", "ok"]


def case_model_validate(ctx, mismatch: bool) -> object:
    """A parallelized model with validate=True: same logits as without; a rank that shards its
    batch with another layout gets a clear error instead of a wrong loss."""
    from seqpar.config import ModelConfig, SequenceParallelConfig
    from seqpar.model import HybridLM

    torch.manual_seed(0)
    model = HybridLM(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, pattern="LS",
                                 gate_rank=8, feature_map="elu1", tie_embeddings=False)).double()
    tokens = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(3))
    layout = "contiguous" if (mismatch and ctx.rank == 1) else "zigzag"
    cfg = SequenceParallelConfig(sp_size=ctx.world_size, layout=layout)
    sb = shard_batch(tokens, tokens, cfg.layout, ctx.group)
    if mismatch:
        seqpar.parallelize_model(model, cfg, ctx.group, validate=True)
        with pytest.raises(ValueError, match=r"disagree on layout: rank 0 'zigzag', rank 1 'contiguous'"):
            model(sb.tokens, sb.positions)
        return True
    plain = seqpar.parallelize_model(model, cfg, ctx.group)(sb.tokens, sb.positions)
    checked = seqpar.parallelize_model(model, cfg, ctx.group, validate=True)(sb.tokens, sb.positions)
    return torch.equal(plain, checked)


@pytest.mark.parametrize("mismatch", [False, True])
def test_parallelize_model_validate(pool, mismatch):
    assert pool.run(case_model_validate, 2, mismatch=mismatch) == [True, True]


def test_world_size_without_a_process_group_is_an_error(monkeypatch):
    """Under torchrun (WORLD_SIZE > 1) but before init_process_group, every public call refuses
    instead of silently treating this rank's tokens as the whole sequence."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    q, k, v = _qkv(T=4)
    calls = {
        "attention": lambda: seqpar.attention(q, k, v, strategy="ring"),
        "linear_attention": lambda: seqpar.linear_attention(q, k, v, strategy="lasp2"),
        "shard": lambda: seqpar.shard(q, layout="zigzag"),
        "local_positions": lambda: seqpar.local_positions(4, layout="contiguous"),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match=r"WORLD_SIZE=2 in the environment.*init_process_group"):
            call()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert seqpar.attention(q, k, v, strategy="ring").shape == q.shape
