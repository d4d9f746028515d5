"""Sequence-parallel linear attention (seqpar.linear_attention) on the shared gloo pool.

The parent draws fresh float64 inputs for the whole sequence and differentiates the
token-by-token recurrence (kernels.linear_reference) on the unsharded sequence; the workers
shard, run a strategy, backward, and return their local results. Checked: o, the final state
(on every rank), dq, dk, dv, dg, and d(initial_state) summed over ranks. The loss is a
random-weighted sum of o plus, on every rank r, a random-weighted final-state term with its own
weights W_r: the oracle uses sum_r W_r, which checks that the final state's gradient is summed
over ranks (not scaled by P). Tolerance 1e-9 (float64).

Sizes: B=2, H=2, Dk=3, Dv=4, 10 tokens per rank (zigzag: two chunks of 5) with chunk_size 4, so
neither the local length nor the chunks are multiples of the kernel's chunk size.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from distributed_pool import run_case_interpreted
from seqpar.kernels.linear_reference import linear_attention_recurrent_reference
from seqpar.layout import shard_tensor, unshard_tensor
from seqpar.linear import STRATEGIES, CommStats, linear_attention

B, H, DK, DV, T_LOCAL, CHUNK = 2, 2, 3, 4, 10, 4
LAYOUTS = ("contiguous", "zigzag")
GATES = ("none", "g_gamma", "g")
TOL = dict(rtol=1e-9, atol=1e-9)


def _draw(gate: str, world_size: int, with_h0: bool, seed: int, t_local: int = T_LOCAL, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)
    T = t_local * world_size
    x = dict(q=rnd(B, T, H, DK), k=rnd(B, T, H, DK), v=rnd(B, T, H, DV),
             g=torch.nn.functional.logsigmoid(rnd(B, T, H) + 1.5) if gate == "g" else None,
             g_gamma=-0.3 * torch.rand(H, generator=gen, dtype=torch.float64).to(dtype) if gate == "g_gamma" else None,
             h0=rnd(B, H, DK, DV) if with_h0 else None,
             w_o=rnd(B, T, H, DV), w_f=[rnd(B, H, DK, DV) for _ in range(world_size)])
    return x


def _oracle(x):
    leaves = {n: x[n].clone().requires_grad_() for n in ("q", "k", "v", "g", "h0") if x[n] is not None}
    o, S = linear_attention_recurrent_reference(leaves["q"], leaves["k"], leaves["v"], g=leaves.get("g"),
                                                g_gamma=x["g_gamma"], initial_state=leaves.get("h0"),
                                                output_final_state=True)
    loss = (o * x["w_o"]).sum() + (S * sum(x["w_f"])).sum()
    names = list(leaves)
    grads = dict(zip(names, torch.autograd.grad(loss, [leaves[n] for n in names])))
    return o.detach(), S.detach(), grads


def case_linear(ctx, strategy: str, configs: list):
    """Run every config on this rank; return the local results."""
    r, P = ctx.rank, ctx.world_size
    results = []
    for cfg in configs:
        x, layout = cfg["x"], cfg["layout"]
        loc = lambda t: shard_tensor(t, layout, r, P).clone().requires_grad_()
        q, k, v = loc(x["q"]), loc(x["k"]), loc(x["v"])
        g = loc(x["g"]) if x["g"] is not None else None
        h0 = x["h0"].clone().requires_grad_() if x["h0"] is not None else None
        o, S = linear_attention(q, k, v, strategy=strategy, layout=layout, group=ctx.group, g=g,
                                g_gamma=x["g_gamma"], initial_state=h0, output_final_state=True, chunk_size=CHUNK)
        loss = (o * shard_tensor(x["w_o"], layout, r, P)).sum() + (S * x["w_f"][r]).sum()
        loss.backward()
        results.append(dict(o=o.detach(), S=S.detach(), dq=q.grad, dk=k.grad, dv=v.grad,
                            dg=None if g is None else g.grad, dh0=None if h0 is None else h0.grad))
    return results


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_linear_attention_matches_recurrence(pool, strategy, world_size):
    configs = []
    for i, (layout, gate, with_h0) in enumerate(itertools.product(LAYOUTS, GATES, (False, True))):
        seed = 1000 * world_size + 10 * i + STRATEGIES.index(strategy)
        configs.append(dict(layout=layout, gate=gate, with_h0=with_h0, x=_draw(gate, world_size, with_h0, seed)))
    per_rank = pool.run(case_linear, world_size, strategy=strategy, configs=configs)
    for i, cfg in enumerate(configs):
        tag = f"{strategy} P={world_size} {cfg['layout']} gate={cfg['gate']} h0={cfg['with_h0']}"
        got = [per_rank[r][i] for r in range(world_size)]
        o_ref, S_ref, grads = _oracle(cfg["x"])
        full = lambda name: unshard_tensor([g_[name] for g_ in got], cfg["layout"])
        torch.testing.assert_close(full("o"), o_ref, **TOL, msg=lambda m: f"{tag} o: {m}")
        for r in range(world_size):
            torch.testing.assert_close(got[r]["S"], S_ref, **TOL, msg=lambda m: f"{tag} final state rank {r}: {m}")
        for name in ("q", "k", "v") + (("g",) if cfg["gate"] == "g" else ()):
            torch.testing.assert_close(full("d" + name), grads[name], **TOL, msg=lambda m: f"{tag} d{name}: {m}")
        if cfg["with_h0"]:
            share_sum = sum(got[r]["dh0"] for r in range(world_size))
            torch.testing.assert_close(share_sum, grads["h0"], **TOL, msg=lambda m: f"{tag} sum of dh0: {m}")


def case_no_final_state(ctx, strategy: str, x: dict):
    r, P = ctx.rank, ctx.world_size
    q, k, v = (shard_tensor(x[n], "contiguous", r, P).clone().requires_grad_() for n in ("q", "k", "v"))
    o, S = linear_attention(q, k, v, strategy=strategy, group=ctx.group, g=shard_tensor(x["g"], "contiguous", r, P),
                            chunk_size=CHUNK)
    assert S is None
    (o * shard_tensor(x["w_o"], "contiguous", r, P)).sum().backward()
    return o.detach(), q.grad


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_without_final_state(pool, strategy):
    x = _draw("g", 3, False, seed=77)
    got = pool.run(case_no_final_state, 3, strategy=strategy, x=x)
    qq = x["q"].clone().requires_grad_()
    o_ref, _ = linear_attention_recurrent_reference(qq, x["k"], x["v"], g=x["g"])
    (o_ref * x["w_o"]).sum().backward()
    torch.testing.assert_close(unshard_tensor([g_[0] for g_ in got], "contiguous"), o_ref.detach(), **TOL)
    torch.testing.assert_close(unshard_tensor([g_[1] for g_ in got], "contiguous"), qq.grad, **TOL)


# ---------------------------------------------------------------------------------------------
# Bytes per pass.


def case_bytes(ctx, strategy: str, layout: str, gate: str, t_local: int):
    r, P = ctx.rank, ctx.world_size
    x = _draw(gate, P, True, seed=5, t_local=t_local, dtype=torch.float32)
    loc = lambda t: shard_tensor(t, layout, r, P).clone().requires_grad_()
    q, k, v = loc(x["q"]), loc(x["k"]), loc(x["v"])
    g = loc(x["g"]) if x["g"] is not None else None
    stats = CommStats()
    o, S = linear_attention(q, k, v, strategy=strategy, layout=layout, group=ctx.group, g=g, g_gamma=x["g_gamma"],
                            initial_state=x["h0"].requires_grad_(), output_final_state=True, chunk_size=CHUNK,
                            comm_stats=stats)
    (o.sum() + S.sum()).backward()
    return dict(fwd=stats.bytes_sent("forward"), bwd=stats.bytes_sent("backward"),
                fwd_ops=stats.ops("forward"), bwd_ops=stats.ops("backward"))


def _expected_bytes(strategy: str, layout: str, gate: str, rank: int, P: int) -> tuple[int, int]:
    """Payload bytes this rank puts on the wire per pass (fp32), with the final state an output.

    state = B*H*Dk*Dv*4 bytes, gate = B*H*4 bytes (a piece's log decay, only with data-dependent g).
    lasp2: fwd = n_pieces * (state + gate) in one all-gather; bwd = state (the all-reduce of the
    final-state gradients) + n_pieces * state (every local dM, one all-gather).
    lasp1: fwd = hops_out * state + state [the all-reduce that gives everyone the final state];
    bwd = state [the all-reduce of final-state gradients] + hops_back * state. Transitions never travel.
    """
    state, gate_b = B * H * DK * DV * 4, (B * H * 4 if gate == "g" else 0)
    n = 2 if layout == "zigzag" else 1
    if strategy == "lasp2":
        return n * (state + gate_b), (n + 1) * state
    if layout == "contiguous":
        hops_fwd, hops_bwd = int(rank < P - 1), int(rank > 0)
    else:  # up the ranks and back down; rank P-1 keeps the state between its two chunks
        hops_fwd = hops_bwd = 1 if rank in (0, P - 1) else 2
    return hops_fwd * state + state, hops_bwd * state + state


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_bytes_per_pass_do_not_grow_with_length(pool, strategy):
    P = 4
    for layout, gate in itertools.product(LAYOUTS, GATES):
        short = pool.run(case_bytes, P, strategy=strategy, layout=layout, gate=gate, t_local=8)
        long = pool.run(case_bytes, P, strategy=strategy, layout=layout, gate=gate, t_local=32)
        for r in range(P):
            tag = f"{strategy} {layout} gate={gate} rank {r}"
            assert short[r] == long[r], f"{tag}: bytes grow with T: {short[r]} vs {long[r]}"
            fwd, bwd = _expected_bytes(strategy, layout, gate, r, P)
            assert (short[r]["fwd"], short[r]["bwd"]) == (fwd, bwd), f"{tag}: got {short[r]}, expected {(fwd, bwd)}"
            if strategy == "lasp2":
                assert short[r]["fwd_ops"] == ["all_gather"], tag
                assert short[r]["bwd_ops"] == ["all_reduce", "all_gather"], tag


def case_schedule(ctx, strategy: str):
    r, P = ctx.rank, ctx.world_size
    x = _draw("g", P, False, seed=8)
    q, k, v = (shard_tensor(x[n], "contiguous", r, P).requires_grad_() for n in ("q", "k", "v"))
    stats = CommStats()
    o, _ = linear_attention(q, k, v, strategy=strategy, group=ctx.group, g=shard_tensor(x["g"], "contiguous", r, P),
                            chunk_size=CHUNK, comm_stats=stats)
    o.sum().backward()
    return stats.timeline("forward"), stats.timeline("backward")


@pytest.mark.parametrize("strategy,expected_fwd,expected_bwd", [
    # forward: nothing is left to overlap the gather (the kernel's first stage feeds it);
    # backward: the chunk states are recomputed while the gather is in flight
    ("lasp2", ["local", "all_gather", "wait", "finish"], ["local", "all_gather", "states", "wait", "finish"]),
    # the hop goes out before the kernel's second stage
    ("lasp1", ["local", "recv", "send", "finish"], ["local", "recv", "send", "finish"]),
    # everything waits for the neighbour
    ("lasp1_serial", ["recv", "kernel", "send"], ["recv", "kernel", "send"]),
])
def test_schedule_overlap(pool, strategy, expected_fwd, expected_bwd):
    """On the middle rank of 3, both passes follow the documented schedule."""
    fwd, bwd = pool.run(case_schedule, 3, strategy=strategy)[1]
    assert fwd == expected_fwd and bwd == expected_bwd, (fwd, bwd)


# ---------------------------------------------------------------------------------------------
# Bad inputs.


def case_bad_inputs(ctx):
    t = lambda *s, dtype=torch.float32: torch.randn(*s, dtype=dtype)
    q, k, v = t(1, 6, 2, 3), t(1, 6, 2, 3), t(1, 6, 2, 4)
    grp = ctx.group

    def bad(match, *args, **kw):
        with pytest.raises(ValueError, match=match):
            linear_attention(*args, group=grp, **kw)

    bad(r"q and k must have the same shape", q, t(1, 6, 2, 5), v)
    bad(r"v must be \[B, T, H, Dv\] = \[1, 6, 2, Dv\]", q, k, t(1, 5, 2, 4))
    bad(r"g must be \[B, T, H\] = \[1, 6, 2\].*got \(1, 12, 2\)", q, k, v, g=t(1, 12, 2))
    bad(r"g_gamma must be \[H\] = \[2\]; got \(3,\)", q, k, v, g_gamma=t(3))
    bad(r"initial_state must be \[B, H, Dk, Dv\] = \[1, 2, 3, 4\]", q, k, v, initial_state=t(1, 2, 4, 3))
    bad("not both", q, k, v, g=t(1, 6, 2), g_gamma=t(2))
    bad(r"unknown linear-attention strategy 'ring'", q, k, v, strategy="ring")
    bad("striped", q, k, v, layout="striped")
    bad("unknown layout 'diagonal'", q, k, v, layout="diagonal")
    bad("share one dtype", q, k.double(), v)
    bad("zigzag layout needs an even local length.*7", t(1, 7, 2, 3), t(1, 7, 2, 3), t(1, 7, 2, 4), layout="zigzag")
    bad("chunk_size must be positive", q, k, v, chunk_size=0)
    bad("unknown kernel backend", q, k, v, backend="fast")
    return True


def test_bad_inputs(pool):
    assert all(pool.run(case_bad_inputs, 2))


# ---------------------------------------------------------------------------------------------
# Low-precision inputs: fp32 states whatever the input dtype.


def case_low_precision(ctx, strategy: str, layout: str, x: dict, dtype: torch.dtype):
    r, P = ctx.rank, ctx.world_size
    loc = lambda t, dt: shard_tensor(t, layout, r, P).to(dt).clone().requires_grad_()
    q, k, v = (loc(x[n], dtype) for n in ("q", "k", "v"))
    g = loc(x["g"], torch.float32)
    h0 = x["h0"].float().requires_grad_()
    o, S = linear_attention(q, k, v, strategy=strategy, layout=layout, group=ctx.group, g=g, initial_state=h0,
                            output_final_state=True, chunk_size=CHUNK)
    assert o.dtype == dtype and S.dtype == torch.float32
    loss = (o.float() * shard_tensor(x["w_o"], layout, r, P).float()).sum() + (S * x["w_f"][r].float()).sum()
    loss.backward()
    assert q.grad.dtype == dtype and g.grad.dtype == torch.float32 and h0.grad.dtype == torch.float32
    return dict(o=o.detach().double(), S=S.detach().double(), dq=q.grad.double(), dg=g.grad.double(),
                dh0=h0.grad.double())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("strategy,layout", [("lasp2", "zigzag"), ("lasp1", "contiguous")])
def test_low_precision_inputs(pool, strategy, layout, dtype, tol):
    x = _draw("g", 2, True, seed=99)
    got = pool.run(case_low_precision, 2, strategy=strategy, layout=layout, x=x, dtype=dtype)
    o_ref, S_ref, grads = _oracle(x)
    scale = lambda t: dict(rtol=tol, atol=tol * float(t.abs().max()))
    full = lambda name: unshard_tensor([g_[name] for g_ in got], layout)
    torch.testing.assert_close(full("o"), o_ref, **scale(o_ref))
    torch.testing.assert_close(got[1]["S"], S_ref, **scale(S_ref))
    torch.testing.assert_close(full("dq"), grads["q"], **scale(grads["q"]))
    torch.testing.assert_close(full("dg"), grads["g"], **scale(grads["g"]))
    torch.testing.assert_close(got[0]["dh0"] + got[1]["dh0"], grads["h0"], **scale(grads["h0"]))


# ---------------------------------------------------------------------------------------------
# The Triton backend under the strategies (Triton's CPU interpreter, in a fresh process: it must
# see TRITON_INTERPRET=1 before triton is imported).

TRITON_CASES = [("lasp2", "zigzag", "g"), ("lasp1", "contiguous", "g_gamma"), ("lasp1_serial", "zigzag", "none")]


def case_triton_backend(ctx) -> dict[str, float]:
    """One rank: fp32, backend='triton', each strategy on one layout and gate; asserts 1e-4 relative."""
    rank, world_size = ctx.rank, ctx.world_size
    errors = {}
    for i, (strategy, layout, gate) in enumerate(TRITON_CASES):
        gen = torch.Generator().manual_seed(i)
        T, d = 20 * world_size, 16
        rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
        q, k, v, w_o, h0, w_f = rnd(1, T, 2, d), rnd(1, T, 2, d), rnd(1, T, 2, d), rnd(1, T, 2, d), rnd(1, 2, d, d), rnd(1, 2, d, d)
        g = torch.nn.functional.logsigmoid(rnd(1, T, 2) + 2) if gate == "g" else None
        g_gamma = -0.2 * torch.rand(2, generator=gen, dtype=torch.float64) if gate == "g_gamma" else None
        ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o_ref, S_ref = linear_attention_recurrent_reference(*ref_leaves, g=g, g_gamma=g_gamma, initial_state=h0,
                                                            output_final_state=True)
        ((o_ref * w_o).sum() + world_size * (S_ref * w_f).sum()).backward()
        loc = lambda t: shard_tensor(t, layout, rank, world_size).float().requires_grad_()
        leaves = [loc(t) for t in (q, k, v)]
        o, S = linear_attention(*leaves, strategy=strategy, layout=layout, g=None if g is None else loc(g).detach(),
                                g_gamma=None if g_gamma is None else g_gamma.float(), initial_state=h0.float(),
                                output_final_state=True, chunk_size=16, backend="triton")
        ((o.double() * shard_tensor(w_o, layout, rank, world_size)).sum() + (S.double() * w_f).sum()).backward()
        want = [shard_tensor(t, layout, rank, world_size) for t in [o_ref.detach()] + [l.grad for l in ref_leaves]]
        got = [o] + [l.grad for l in leaves]
        rel = max(((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want))
        errors[strategy] = max(rel, ((S.double() - S_ref.detach()).abs().max() / S_ref.abs().max()).item())
    assert all(e < 1e-4 for e in errors.values()), errors
    return errors


def test_triton_backend_under_the_strategies_interpreted():
    """backend='triton' (kernels/linear_triton.py, interpreted, fp32) under every strategy gives
    the fp64 recurrence's o, final state and dq, dk, dv to 1e-4 relative, on 2 ranks."""
    pytest.importorskip("triton")
    pytest.importorskip("numpy")
    run_case_interpreted("test_linear_attention", "case_triton_backend", world_size=2)


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_linear_attention_on_a_balanced_layout(pool, strategy, world_size):
    """The document-aware layout (several chunks per rank, in an order chosen for the softmax
    work) is just another token order for linear attention: the same results as the recurrence."""
    from seqpar.layout import balanced_layout

    total = T_LOCAL * world_size
    layout = balanced_layout([0, 1, 7, total - 3, total], world_size, chunks_per_rank=5)
    configs = [dict(layout=layout, gate=gate, with_h0=gate == "g", x=_draw(gate, world_size, gate == "g", 77 + i))
               for i, gate in enumerate(GATES)]
    per_rank = pool.run(case_linear, world_size, strategy=strategy, configs=configs)
    for i, cfg in enumerate(configs):
        got = [per_rank[r][i] for r in range(world_size)]
        o_ref, S_ref, grads = _oracle(cfg["x"])
        full = lambda name: unshard_tensor([g_[name] for g_ in got], layout)
        torch.testing.assert_close(full("o"), o_ref, **TOL)
        torch.testing.assert_close(got[0]["S"], S_ref, **TOL)
        for name in ("q", "k", "v") + (("g",) if cfg["gate"] == "g" else ()):
            torch.testing.assert_close(full("d" + name), grads[name], **TOL, msg=lambda m: f"{cfg['gate']} d{name}: {m}")
