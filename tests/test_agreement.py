"""Ranks that disagree get one clear ValueError by default, and two threads cannot run calls on one
group at the same time (issue 13, items 7 and 8).

Agreement (``validate="cached"``, the default): the first call of a signature on a group
exchanges a digest; every rank then raises the same ValueError naming each differing field and
every rank's value; later calls with an agreed signature exchange nothing. Before: no check
without ``validate=True`` -- a silently wrong answer on one rank (layout, causal, scale, g_gamma,
initial_state), an abort inside gloo, or a hang.

Threads: a second thread entering a call on a group another thread is inside raises a
GroupInUseError (a RuntimeError) naming the group and both threads. Before: silently wrong
results.

Each case starts with ``clear_agreement_cache`` on every rank, since the pool's groups (and so
their caches) are shared by every test of the session.
"""
from __future__ import annotations

import os
import re
import threading
import time

import pytest
import torch

import seqpar
from seqpar import comm


def _t(*shape, dtype=torch.float64, seed=None):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randn(*shape, dtype=dtype, generator=gen)


def _reset(ctx) -> None:
    comm.clear_agreement_cache(ctx.group)


def _same_message(messages: list[str]) -> bool:
    """The ValueErrors of all ranks are identical but for 'this is rank r of P'."""
    stripped = {re.sub(r"\(this is rank \d+ of \d+\) ", "", m) for m in messages}
    return len(stripped) == 1


# --- seqpar.attention: the ranks disagree, default mode ---------------------------------------

def _softmax_args(ctx, kind: str) -> dict:
    other = ctx.rank == 1
    T = 6 if other and kind == "length" else 4
    Hkv = 1 if other and kind == "kv_heads" else 2
    D = 16 if other and kind == "head_dim" else 8
    dtype = torch.float32 if other and kind == "dtype" else torch.float64
    q, k, v = _t(1, T, 2, D, dtype=dtype), _t(1, T, Hkv, D, dtype=dtype), _t(1, T, Hkv, D, dtype=dtype)
    kw = dict(strategy="allgather" if other and kind == "strategy" else "ring",
              layout="zigzag" if other and kind == "layout" else "contiguous",
              causal=not (other and kind == "causal"), group=ctx.group)
    if kind == "scale" and other:
        kw["scale"] = 0.5
    if kind == "usp_sizes":
        kw.update(strategy="usp", group=ctx.usp_groups[(1, 2) if other else (2, 1)])
    return dict(q=q, k=k, v=v, **kw)


SOFTMAX_DISAGREEMENTS = {
    "length": r"disagree on q: rank 0 \(1, 4, 2, 8\), rank 1 \(1, 6, 2, 8\); k: ",
    "kv_heads": r"disagree on k: rank 0 \(1, 4, 2, 8\), rank 1 \(1, 4, 1, 8\); v: ",
    "head_dim": r"disagree on q: rank 0 \(1, 4, 2, 8\), rank 1 \(1, 4, 2, 16\).*scale: rank 0 0.35355",
    "dtype": r"disagree on dtype: rank 0 'torch.float64', rank 1 'torch.float32'$",
    "strategy": r"disagree on strategy: rank 0 'ring', rank 1 'allgather'$",
    "layout": r"disagree on layout: rank 0 'contiguous', rank 1 'zigzag'$",
    "causal": r"disagree on causal: rank 0 True, rank 1 False$",
    "scale": r"disagree on scale: rank 0 0.35355339\d*, rank 1 0.5$",
    "usp_sizes": r"disagree on ulysses_size: rank 0 2, rank 1 1; ring_size: rank 0 1, rank 1 2$",
}


@pytest.mark.parametrize("validate", [None, True], ids=["default", "always"])
@pytest.mark.parametrize("kind", list(SOFTMAX_DISAGREEMENTS))
def test_softmax_disagreement_is_a_clear_error(pool, kind, validate):
    messages = pool.run(case_disagreement, 2, api="softmax", kind=kind, validate=validate)
    mode = "cached" if validate is None else "always"
    assert messages[0].startswith(f"seqpar.attention(validate={mode!r}): the ranks of the group (this is rank 0 of 2)")
    assert "(this is rank 1 of 2)" in messages[1] and _same_message(messages)


def case_backends_may_differ(ctx) -> bool:
    """The block kernel is a local choice: ranks with different backends agree (and compute the same)."""
    _reset(ctx)
    q, k, v = (_t(1, 4, 2, 8, seed=10 * ctx.rank + i) for i in range(3))
    o = seqpar.attention(q, k, v, strategy="ring", group=ctx.group, backend="torch" if ctx.rank else "sdpa")
    ref = seqpar.attention(q, k, v, strategy="ring", group=ctx.group, backend="torch")
    torch.testing.assert_close(o, ref, atol=1e-12, rtol=1e-12)
    return comm.agreement_stats(ctx.group)["signatures"] == 1


def test_backend_is_not_compared(pool):
    assert pool.run(case_backends_may_differ, 2) == [True, True]


def case_lse_used_on_one_rank(ctx, strategy: str) -> bool:
    """Under Ulysses the lse gradient crosses ranks: a loss that uses lse on rank 0 only must give
    the gradients of the same loss with lse weighted by 0 on rank 1 (before: rank 1 skipped the
    lse exchange, so the ranks' collectives paired up wrongly)."""
    _reset(ctx)
    q, k, v = (_t(1, 4, 2, 8, seed=10 * ctx.rank + i).requires_grad_() for i in range(3))
    group = ctx.usp_groups[(2, 1)] if strategy == "usp" else ctx.group
    grads = []
    for weight_on_rank1 in (None, 0.0):
        o, lse = seqpar.attention(q, k, v, strategy=strategy, group=group, return_lse=True)
        loss = o.square().sum()
        if ctx.rank == 0:
            loss = loss + lse.sum()
        elif weight_on_rank1 is not None:
            loss = loss + weight_on_rank1 * lse.sum()
        grads.append(torch.autograd.grad(loss, (q, k, v)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    return True


@pytest.mark.parametrize("strategy", ["ulysses", "usp"])
def test_lse_gradient_on_some_ranks_only(pool, strategy):
    assert pool.run(case_lse_used_on_one_rank, 2, strategy=strategy) == [True, True]


# --- seqpar.linear_attention: the ranks disagree, default mode ----------------------------------

def _linear_args(ctx, kind: str) -> dict:
    other = ctx.rank == 1
    T = 6 if other and kind in ("length", "g_shape") else 4
    dtype = torch.float32 if other and kind == "dtype" else torch.float64
    q, k, v = _t(1, T, 2, 8, dtype=dtype), _t(1, T, 2, 8, dtype=dtype), _t(1, T, 2, 8, dtype=dtype)
    kw: dict = dict(strategy="lasp1" if other and kind == "strategy" else "lasp2",
                    layout="zigzag" if other and kind == "layout" else "contiguous",
                    output_final_state=not (other and kind == "final_state"), group=ctx.group)
    if kind == "g" and not other or kind == "g_shape":
        kw["g"] = -torch.rand(1, T, 2, dtype=torch.float64)
    if kind == "g_gamma_presence" and not other:
        kw["g_gamma"] = torch.full((2,), -0.5, dtype=torch.float64)
    if kind == "g_gamma":
        kw["g_gamma"] = torch.full((2,), -0.25 if other else -0.5, dtype=torch.float64)
    if kind == "initial_state_presence" and not other:
        kw["initial_state"] = torch.zeros(1, 2, 8, 8, dtype=torch.float64)
    if kind == "initial_state":
        kw["initial_state"] = torch.full((1, 2, 8, 8), 1.0 if other else 0.0, dtype=torch.float64)
    if kind == "scale" and other:
        kw["scale"] = 0.25
    if kind == "g_per_key":
        kw["g"] = -torch.rand((1, T, 2, 8) if other else (1, T, 2), dtype=torch.float64)
    if kind == "beta" and not other or kind == "l2norm":
        kw["beta"] = torch.full((1, T, 2), 0.5, dtype=torch.float64)
    if kind == "l2norm" and other:
        kw["use_qk_l2norm"] = True
    if kind == "documents":
        kw["cu_seqlens"] = torch.tensor([0, 3, 8] if other else [0, 5, 8])
    return dict(q=q, k=k, v=v, **kw)


LINEAR_DISAGREEMENTS = {
    "length": r"disagree on q: rank 0 \(1, 4, 2, 8\), rank 1 \(1, 6, 2, 8\); k: ",
    "g": r"disagree on g: rank 0 \(1, 4, 2\), rank 1 None$",
    "g_shape": r"disagree on q: .*; g: rank 0 \(1, 4, 2\), rank 1 \(1, 6, 2\)$",
    "g_gamma_presence": r"disagree on g_gamma: rank 0 \(-0.5, -0.5\), rank 1 None$",
    "g_gamma": r"disagree on g_gamma: rank 0 \(-0.5, -0.5\), rank 1 \(-0.25, -0.25\)$",
    "initial_state_presence": r"disagree on initial_state: rank 0 \(\(1, 2, 8, 8\), 0.0, 0.0\), rank 1 None$",
    "initial_state": r"disagree on initial_state: rank 0 \(\(1, 2, 8, 8\), 0.0, 0.0\), "
                     r"rank 1 \(\(1, 2, 8, 8\), 128.0, 128.0\)$",
    "strategy": r"disagree on strategy: rank 0 'lasp2', rank 1 'lasp1'$",
    "layout": r"disagree on layout: rank 0 'contiguous', rank 1 'zigzag'$",
    "dtype": r"disagree on dtype: rank 0 'torch.float64', rank 1 'torch.float32'$",
    "final_state": r"disagree on output_final_state: rank 0 True, rank 1 False$",
    "scale": r"disagree on scale: rank 0 0.35355339\d*, rank 1 0.25$",
    "g_per_key": r"disagree on g: rank 0 \(1, 4, 2\), rank 1 \(1, 4, 2, 8\)$",
    "beta": r"disagree on beta: rank 0 \(1, 4, 2\), rank 1 None$",
    "l2norm": r"disagree on use_qk_l2norm: rank 0 'False', rank 1 'True'$",
    "documents": r"disagree on documents: rank 0 '[0-9a-f]{16}', rank 1 '[0-9a-f]{16}'$",
}


def case_disagreement(ctx, api: str, kind: str, validate: object) -> str:
    """Rank 1 differs from rank 0 in ``kind``; ``validate`` None: the default mode (not passed)."""
    _reset(ctx)
    args, table, call = ((_softmax_args, SOFTMAX_DISAGREEMENTS, seqpar.attention) if api == "softmax"
                         else (_linear_args, LINEAR_DISAGREEMENTS, seqpar.linear_attention))
    a = args(ctx, kind)
    if validate is not None:
        a["validate"] = validate
    with pytest.raises(ValueError, match=table[kind]) as err:
        call(a.pop("q"), a.pop("k"), a.pop("v"), **a)
    assert comm.agreement_stats(ctx.group)["signatures"] == 0  # nothing agreed, nothing cached
    return str(err.value)


@pytest.mark.parametrize("validate", [None, True], ids=["default", "always"])
@pytest.mark.parametrize("kind", list(LINEAR_DISAGREEMENTS))
def test_linear_disagreement_is_a_clear_error(pool, kind, validate):
    messages = pool.run(case_disagreement, 2, api="linear", kind=kind, validate=validate)
    mode = "cached" if validate is None else "always"
    assert messages[0].startswith(f"seqpar.linear_attention(validate={mode!r}): the ranks of the group "
                                  "(this is rank 0 of 2)")
    assert _same_message(messages)


def case_one_rank_bad_input(ctx, validate: object) -> str:
    """One rank's local check fails: the other ranks say so instead of waiting."""
    _reset(ctx)
    q, k, v = (_t(1, 5 if ctx.rank == 1 else 4, 2, 8) for _ in range(3))
    extra = {} if validate is None else {"validate": validate}
    with pytest.raises(ValueError) as err:
        seqpar.attention(q, k, v, strategy="ring", layout="zigzag", group=ctx.group, **extra)
    return str(err.value)


@pytest.mark.parametrize("world, validate", [(2, None), (3, True)], ids=["default-2-ranks", "always-3-ranks"])
def test_one_rank_bad_input_is_named_on_every_rank(pool, world, validate):
    msgs = pool.run(case_one_rank_bad_input, world, validate=validate)
    assert "local length 5" in msgs[1]
    mode = "cached" if validate is None else "always"
    for m in msgs[:1] + msgs[2:]:
        assert re.search(rf"seqpar.attention\(validate='{mode}'\): other ranks of the group rejected their inputs "
                         r"\(rank 1: ValueError: zigzag .* local length 5", m), m


# --- the cache --------------------------------------------------------------------------------

def _count_exchanges(monkeypatch_like: list) -> dict:
    """Wrap the two collectives of the agreement check with counters (undone by the caller)."""
    import torch.distributed as dist
    from seqpar.comm import consistency

    counts = dict(digest=0, objects=0)
    digest, objects = consistency._exchange_digests, dist.all_gather_object

    def counted_digest(*a, **kw):
        counts["digest"] += 1
        return digest(*a, **kw)

    def counted_objects(*a, **kw):
        counts["objects"] += 1
        return objects(*a, **kw)

    consistency._exchange_digests, dist.all_gather_object = counted_digest, counted_objects
    monkeypatch_like.append(lambda: (setattr(consistency, "_exchange_digests", digest),
                                     setattr(dist, "all_gather_object", objects)))
    return counts


def _softmax_step(ctx, validate="cached", layout="contiguous", seed=0):
    q, k, v = (_t(1, 4, 2, 8, seed=seed + 10 * ctx.rank + i).requires_grad_() for i in range(3))
    o = seqpar.attention(q, k, v, strategy="ring", layout=layout, group=ctx.group, validate=validate)
    o.square().sum().backward()
    return o.detach(), q.grad


def _linear_step(ctx, validate="cached", seed=0):
    q, k, v = (_t(1, 4, 2, 8, seed=seed + 10 * ctx.rank + i).requires_grad_() for i in range(3))
    h0 = _t(1, 2, 8, 8, seed=99)  # alike on every rank
    o, final = seqpar.linear_attention(q, k, v, group=ctx.group, g_gamma=torch.full((2,), -0.1, dtype=torch.float64),
                                       initial_state=h0, output_final_state=True, validate=validate)
    (o.square().sum() + final.sum()).backward()
    return o.detach(), q.grad


def case_cached_path_does_not_exchange(ctx) -> dict:
    _reset(ctx)
    before = comm.agreement_stats(ctx.group)
    undo: list = []
    counts = _count_exchanges(undo)
    try:
        first = [_softmax_step(ctx), _linear_step(ctx)]
        after_first = dict(counts)
        again = [_softmax_step(ctx), _linear_step(ctx), _softmax_step(ctx), _linear_step(ctx)]
        after_again = dict(counts)
    finally:
        undo[0]()
    plain = [_softmax_step(ctx, validate="off"), _linear_step(ctx, validate="off")]
    for (o, dq), (o2, dq2) in zip(first + again[:2], plain + plain):
        assert torch.equal(o, o2) and torch.equal(dq, dq2)
    stats = comm.agreement_stats(ctx.group)
    return dict(after_first=after_first, after_again=after_again,
                stats={name: stats[name] - (0 if name == "signatures" else before[name]) for name in stats})


def test_cached_path_does_not_exchange_again(pool):
    for r in pool.run(case_cached_path_does_not_exchange, 2):
        assert r["after_first"] == dict(digest=2, objects=0)  # one digest per signature, digests equal
        assert r["after_again"] == dict(digest=2, objects=0)  # later calls: nothing
        assert r["stats"] == dict(signatures=2, exchanges=2, detailed=0)


def case_changed_signature(ctx) -> list[int]:
    _reset(ctx)
    seen = []
    for layout in ("contiguous", "zigzag", "contiguous", "zigzag", "striped"):
        _softmax_step(ctx, layout=layout)
        seen.append(comm.agreement_stats(ctx.group)["exchanges"])
    return seen


def test_changed_signature_is_checked_again(pool):
    assert pool.run(case_changed_signature, 2) == [[1, 2, 2, 2, 3]] * 2


def case_modes(ctx) -> dict:
    _reset(ctx)
    out = {}
    for mode in ("off", False, "always", True):
        before = comm.agreement_stats(ctx.group)["exchanges"]
        for _ in range(2):
            _softmax_step(ctx, validate=mode)
            _linear_step(ctx, validate=mode)
        out[repr(mode)] = comm.agreement_stats(ctx.group)["exchanges"] - before
    out["signatures"] = comm.agreement_stats(ctx.group)["signatures"]
    return out


def test_opt_out_does_no_exchange_and_always_checks_every_call(pool):
    for r in pool.run(case_modes, 2):
        assert r == {"'off'": 0, "False": 0, "'always'": 4, "True": 4, "signatures": 0}


def case_validate_on_one_rank(ctx) -> tuple[str, bool]:
    """validate=True on rank 0 only, the default on rank 1: a clear error, not a hang; then the
    same group keeps working."""
    _reset(ctx)
    with pytest.raises(ValueError, match=r"disagree on validate: rank 0 'always', rank 1 'cached'$") as err:
        _softmax_step(ctx, validate=True if ctx.rank == 0 else None)
    _softmax_step(ctx, validate="cached" if ctx.rank == 0 else None)  # the same mode, spelled two ways
    return str(err.value), comm.agreement_stats(ctx.group)["signatures"] == 1


def test_validate_on_one_rank_only_is_a_clear_error(pool):
    results = pool.run(case_validate_on_one_rank, 2)
    assert all(ok for _, ok in results)  # each rank names its own mode first, then the same differences
    assert results[0][0].startswith("seqpar.attention(validate='always'): the ranks of the group")
    assert results[1][0].startswith("seqpar.attention(validate='cached'): the ranks of the group")
    assert len({m.split(" disagree on ")[1] for m, _ in results}) == 1


def test_validate_argument_is_checked():
    q = _t(1, 4, 2, 8)
    with pytest.raises(ValueError, match=r"validate must be one of \('cached', 'always', 'off'\).*got 'first'"):
        seqpar.attention(q, q, q, strategy="ring", validate="first")
    with pytest.raises(TypeError, match=r"validate must be a bool, None or one of .* got int 1"):
        seqpar.linear_attention(q, q, q, validate=1)
    from seqpar.model import ContextParallel

    assert ContextParallel(None).validate == "cached"
    assert ContextParallel(None, validate=True).validate == "always"
    assert ContextParallel(None, validate=False).validate == "off"
    with pytest.raises(ValueError, match="got 'sometimes'"):
        ContextParallel(None, validate="sometimes")
    for mode in (None, "cached", "always", "off", True, False):  # one process: every mode works
        torch.testing.assert_close(seqpar.attention(q, q, q, strategy="ring", validate=mode),
                                   seqpar.attention(q, q, q, strategy="ring"))


def case_model_default_check(ctx) -> bool:
    """parallelize_model without validate: a rank that shards with another layout gets a clear
    error from the first layer instead of a wrong loss."""
    from seqpar.config import ModelConfig, SequenceParallelConfig
    from seqpar.model import HybridLM
    from seqpar.parallelize import shard_batch

    _reset(ctx)
    torch.manual_seed(0)
    model = HybridLM(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, pattern="LS",
                                 gate_rank=8, feature_map="elu1", tie_embeddings=False)).double()
    tokens = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(3))
    cfg = SequenceParallelConfig(sp_size=2, layout="contiguous" if ctx.rank == 1 else "zigzag")
    sb = shard_batch(tokens, tokens, cfg.layout, ctx.group)
    seqpar.parallelize_model(model, cfg, ctx.group)
    assert all(m.context_parallel.validate == "cached" for m in model.attention_modules())
    with pytest.raises(ValueError, match=r"disagree on layout: rank 0 'zigzag', rank 1 'contiguous'"):
        model(sb.tokens, sb.positions)
    return True


def test_parallelized_model_checks_by_default(pool):
    assert pool.run(case_model_default_check, 2) == [True, True]


# --- two threads on one group -----------------------------------------------------------------

def case_concurrent_calls(ctx, signal: str) -> bool:
    """Rank 0: thread 'caller-A' is inside seqpar.attention, waiting for rank 1 in a collective,
    when the main thread starts another call on the same group: that second call raises. Only
    then does rank 1 join, and A's call completes with the right result."""
    _reset(ctx)
    q, k, v = (_t(1, 4, 2, 8, seed=10 * ctx.rank + i) for i in range(3))
    expected = seqpar.attention(q, k, v, strategy="ring", group=ctx.group, validate="off")
    if ctx.rank == 1:
        deadline = time.monotonic() + 60
        while not os.path.exists(signal):
            assert time.monotonic() < deadline, "rank 0 never signalled"
            time.sleep(0.01)
        got = seqpar.attention(q, k, v, strategy="ring", group=ctx.group)
        return torch.equal(got, expected)
    result: dict = {}

    def call():
        result["o"] = seqpar.attention(q, k, v, strategy="ring", group=ctx.group)

    a = threading.Thread(target=call, name="caller-A")
    a.start()
    try:
        deadline = time.monotonic() + 60
        while comm.group_user(ctx.group) is None:  # A is inside its call (in the agreement exchange)
            assert time.monotonic() < deadline, "thread A never entered its call"
            time.sleep(0.01)
        assert comm.group_user(ctx.group) == ("caller-A", "seqpar.attention")
        with pytest.raises(comm.GroupInUseError, match=r"seqpar.attention: process group .* \(global ranks \[0, 1\]\) "
                                                       r"is in use by thread 'caller-A' .* inside seqpar.attention; "
                                                       r"this thread 'MainThread'"):
            seqpar.attention(q, k, v, strategy="ring", group=ctx.group)
    finally:
        open(signal, "w").close()
        a.join(60)
    assert not a.is_alive()
    return torch.equal(result["o"], expected) and comm.group_user(ctx.group) is None


def test_two_threads_on_one_group_raise(pool, tmp_path):
    assert pool.run(case_concurrent_calls, 2, signal=str(tmp_path / "go")) == [True, True]


def case_holder_blocks_everything(ctx) -> bool:
    """While another thread holds the group (deterministic: it waits on an event), every collective
    path raises on this thread: both forwards, both backwards, and a bare seqpar.comm collective."""
    _reset(ctx)
    q, k, v = (_t(1, 4, 2, 8, seed=10 * ctx.rank + i).requires_grad_() for i in range(3))
    o_soft = seqpar.attention(q, k, v, strategy="ring", group=ctx.group)
    o_lin, _ = seqpar.linear_attention(q, k, v, group=ctx.group)
    entered, release = threading.Event(), threading.Event()

    def hold():
        with comm.exclusive_use(ctx.group, what="the test's holder"):
            entered.set()
            release.wait(60)

    holder = threading.Thread(target=hold, name="holder")
    holder.start()
    try:
        assert entered.wait(60)
        busy = r"is in use by thread 'holder' .* inside the test's holder; this thread 'MainThread'"
        for call in (lambda: seqpar.attention(q, k, v, strategy="allgather", group=ctx.group),
                     lambda: seqpar.linear_attention(q, k, v, group=ctx.group, validate="off"),
                     lambda: o_soft.sum().backward(retain_graph=True),
                     lambda: o_lin.sum().backward(retain_graph=True),
                     lambda: comm.all_gather(q.detach(), ctx.group)):
            with pytest.raises(RuntimeError, match=busy):
                call()
    finally:
        release.set()
        holder.join(60)
    o_soft.sum().backward()  # the group is free again
    o_lin.sum().backward()
    return q.grad is not None and comm.group_user(ctx.group) is None


def test_a_held_group_refuses_other_threads(pool):
    assert pool.run(case_holder_blocks_everything, 2) == [True, True]


def case_sequential_threads(ctx) -> bool:
    """Calls from several threads one after another are fine, and backward may run in another
    thread than forward."""
    _reset(ctx)
    q, k, v = (_t(1, 4, 2, 8, seed=10 * ctx.rank + i).requires_grad_() for i in range(3))
    o_ref = seqpar.attention(q, k, v, strategy="ring", group=ctx.group)
    o_ref.square().sum().backward()
    dq_ref = q.grad.clone()
    q.grad = None
    out: dict = {}

    def forward():
        out["o"] = seqpar.attention(q, k, v, strategy="ring", group=ctx.group)
        out["lin"] = seqpar.linear_attention(q, k, v, group=ctx.group)[0]

    def backward():
        (out["o"].square().sum() + 0 * out["lin"].sum()).backward()

    for fn, name in ((forward, "fwd-thread"), (backward, "bwd-thread")):
        t = threading.Thread(target=fn, name=name)
        t.start()
        t.join(60)
    return torch.equal(out["o"], o_ref) and torch.equal(q.grad, dq_ref)


def test_sequential_calls_from_threads_are_fine(pool):
    assert pool.run(case_sequential_threads, 2) == [True, True]
