"""Chunked linear-attention kernels (reference forward / explicit backward, dispatcher, and the
single-device autograd wrapper) against the token-by-token float64 recurrence differentiated by
autograd. Tolerances: 1e-9 in float64, 2e-4 relative in float32."""
from __future__ import annotations

import pytest
import torch

from seqpar.kernels.linear import (
    chunk_linear_attention,
    chunk_linear_attention_backward,
    chunk_linear_attention_forward,
)
from seqpar.kernels.linear_reference import (
    chunk_linear_attention_backward_reference,
    chunk_linear_attention_forward_reference,
    linear_attention_recurrent_reference,
)

F64 = dict(rtol=1e-9, atol=1e-9)


def make_inputs(gate: str, B=2, T=63, H=2, Dk=5, Dv=3, dtype=torch.float64, seed=0, gate_strength=1.0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    q, k, v = rnd(B, T, H, Dk), rnd(B, T, H, Dk), rnd(B, T, H, Dv)
    g = torch.nn.functional.logsigmoid(rnd(B, T, H) + 2) * gate_strength if gate == "g" else None
    g_gamma = -torch.rand(H, generator=gen, dtype=torch.float64) * gate_strength if gate == "g_gamma" else None
    h0 = rnd(B, H, Dk, Dv)
    cast = lambda t: None if t is None else t.to(dtype)
    return cast(q), cast(k), cast(v), cast(g), cast(g_gamma), cast(h0)


def oracle(q, k, v, g, g_gamma, h0, do, dht):
    """(o, S, dq, dk, dv, dg, dh0) by autograd through the float64 recurrence."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (q, k, v, g, h0)]
    qq, kk, vv, gg, hh = leaves
    o, S = linear_attention_recurrent_reference(qq, kk, vv, g=gg, g_gamma=None if g_gamma is None else g_gamma.double(),
                                                initial_state=hh, output_final_state=True)
    loss = (o * do.double()).sum() + (S * dht.double()).sum()
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    it = iter(grads)
    dq, dk, dv = next(it), next(it), next(it)
    dg = next(it) if gg is not None else None
    dh0 = next(it)
    return o.detach(), S.detach(), dq, dk, dv, dg, dh0


@pytest.mark.parametrize("gate", ["none", "g_gamma", "g"])
@pytest.mark.parametrize("T,chunk_size", [(63, 16), (100, 32), (7, 64), (64, 64), (1, 4)])
def test_chunk_reference_vs_recurrent(gate, T, chunk_size):
    q, k, v, g, g_gamma, h0 = make_inputs(gate, T=T, seed=T + chunk_size)
    gen = torch.Generator().manual_seed(7)
    do = torch.randn(q.shape[:3] + (v.shape[-1],), generator=gen, dtype=torch.float64)
    dht = torch.randn(h0.shape, generator=gen, dtype=torch.float64)
    o_ref, S_ref, *grads_ref = oracle(q, k, v, g, g_gamma, h0, do, dht)
    o, S = chunk_linear_attention_forward_reference(q, k, v, g=g, g_gamma=g_gamma, initial_state=h0,
                                                    output_final_state=True, chunk_size=chunk_size)
    torch.testing.assert_close(o, o_ref, **F64)
    torch.testing.assert_close(S, S_ref, **F64)
    dq, dk, dv, dg, dh0 = chunk_linear_attention_backward_reference(do, q, k, v, g=g, g_gamma=g_gamma, initial_state=h0,
                                                                    dht=dht, chunk_size=chunk_size)
    for name, got, want in zip(["dq", "dk", "dv", "dg", "dh0"], [dq, dk, dv, dg, dh0], grads_ref):
        if want is None:
            assert got is None, name
        else:
            torch.testing.assert_close(got, want, **F64, msg=lambda m: f"{name}: {m}")


def test_no_initial_state_no_dht():
    q, k, v, g, _, _ = make_inputs("g", T=20)
    o, S = chunk_linear_attention_forward_reference(q, k, v, g=g, chunk_size=8)
    assert S is None
    o_ref, _ = linear_attention_recurrent_reference(q, k, v, g=g)
    torch.testing.assert_close(o, o_ref, **F64)
    do = torch.randn_like(o)
    dq, dk, dv, dg, dh0 = chunk_linear_attention_backward_reference(do, q, k, v, g=g, chunk_size=8)
    assert dh0 is None and dg is not None
    qq, kk, vv, gg = (t.clone().requires_grad_() for t in (q, k, v, g))
    o2, _ = linear_attention_recurrent_reference(qq, kk, vv, g=gg)
    want = torch.autograd.grad((o2 * do).sum(), [qq, kk, vv, gg])
    for got, w in zip([dq, dk, dv, dg], want):
        torch.testing.assert_close(got, w, **F64)


def test_strong_decay_is_finite():
    """Gates near -30 per token: exp of cumulative sums would underflow/overflow if computed
    absolutely; the relative formulation stays finite and exact."""
    q, k, v, g, _, h0 = make_inputs("g", T=40, gate_strength=30.0)
    g = g - 30.0
    o, S = chunk_linear_attention_forward_reference(q, k, v, g=g, initial_state=h0, output_final_state=True, chunk_size=40)
    o_ref, S_ref = linear_attention_recurrent_reference(q, k, v, g=g, initial_state=h0, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    torch.testing.assert_close(o, o_ref, **F64)
    dq, dk, dv, dg, dh0 = chunk_linear_attention_backward_reference(torch.ones_like(o), q, k, v, g=g, initial_state=h0,
                                                                    dht=torch.ones_like(S), chunk_size=40)
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv, dg, dh0))


@pytest.mark.parametrize("gate", ["none", "g_gamma", "g"])
def test_autograd_wrapper(gate):
    q, k, v, g, g_gamma, h0 = make_inputs(gate, T=37, seed=3)
    gen = torch.Generator().manual_seed(11)
    do = torch.randn(q.shape[:3] + (v.shape[-1],), generator=gen, dtype=torch.float64)
    dht = torch.randn(h0.shape, generator=gen, dtype=torch.float64)
    o_ref, S_ref, *grads_ref = oracle(q, k, v, g, g_gamma, h0, do, dht)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (q, k, v, g, h0)]
    qq, kk, vv, gg, hh = leaves
    o, S = chunk_linear_attention(qq, kk, vv, g=gg, g_gamma=g_gamma, initial_state=hh, output_final_state=True,
                                  chunk_size=16, backend="torch")
    torch.testing.assert_close(o, o_ref, **F64)
    torch.testing.assert_close(S, S_ref, **F64)
    ((o * do).sum() + (S * dht).sum()).backward()
    for name, leaf, want in zip(["dq", "dk", "dv", "dg", "dh0"], leaves, grads_ref):
        if want is not None:
            torch.testing.assert_close(leaf.grad, want, **F64, msg=lambda m: f"{name}: {m}")


def test_autograd_wrapper_float32_and_no_final_state():
    q, k, v, g, _, h0 = make_inputs("g", T=30, dtype=torch.float32, seed=5)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, g)]
    o, S = chunk_linear_attention(*leaves[:3], g=leaves[3], initial_state=h0)
    assert S is None and o.dtype == torch.float32
    o.square().sum().backward()
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v, g)]
    o_ref, _ = linear_attention_recurrent_reference(*ref_leaves[:3], g=ref_leaves[3], initial_state=h0.double())
    o_ref.square().sum().backward()
    torch.testing.assert_close(o.double(), o_ref.detach(), rtol=2e-4, atol=2e-4)
    for a, b in zip(leaves, ref_leaves):
        assert a.grad.dtype == torch.float32
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=2e-4, atol=2e-3)


def test_dispatcher_torch_backend_matches_reference():
    q, k, v, _, g_gamma, h0 = make_inputs("g_gamma", T=20)
    o1, s1 = chunk_linear_attention_forward(q, k, v, g_gamma=g_gamma, initial_state=h0, output_final_state=True,
                                            chunk_size=8, backend="auto")
    o2, s2 = chunk_linear_attention_forward_reference(q, k, v, g_gamma=g_gamma, initial_state=h0,
                                                      output_final_state=True, chunk_size=8)
    assert torch.equal(o1, o2) and torch.equal(s1, s2)
    g1 = chunk_linear_attention_backward(torch.ones_like(o1), q, k, v, g_gamma=g_gamma, initial_state=h0,
                                         chunk_size=8, backend="torch")
    assert set(g1[0]) == {"q", "k", "v"}  # no gradient for g_gamma
    with pytest.raises(ValueError, match="unknown kernel backend"):
        chunk_linear_attention_forward(q, k, v, backend="cuda-magic")


def test_wrapper_validation():
    q, k, v, g, g_gamma, h0 = make_inputs("g", T=10)
    with pytest.raises(ValueError, match=r"q and k must have the same shape"):
        chunk_linear_attention(q, k[..., :3], v)
    with pytest.raises(ValueError, match=r"v must be \[B, T, H, Dv\]"):
        chunk_linear_attention(q, k, v[:, :9])
    with pytest.raises(ValueError, match=r"g must be \[B, T, H\] = \[2, 10, 2\]"):
        chunk_linear_attention(q, k, v, g=g[:, :9])
    with pytest.raises(ValueError, match="not both"):
        chunk_linear_attention(q, k, v, g=g, g_gamma=torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"initial_state must be \[B, H, Dk, Dv\] = \[2, 2, 5, 3\]"):
        chunk_linear_attention(q, k, v, initial_state=h0[..., :2])
    with pytest.raises(ValueError, match="share one dtype"):
        chunk_linear_attention(q, k.float(), v)


# ---------------------------------------------------------------------------------------------
# The stages the strategies call (kernels.linear.chunked_run).


@pytest.mark.parametrize("gate", ["none", "g_gamma", "g"])
@pytest.mark.parametrize("T,chunk_size", [(63, 16), (100, 32), (1, 8)])
def test_shifted_stages_equal_the_kernel_with_state(gate, T, chunk_size):
    """Stages run from a zero state / zero final-state gradient, then shifted by
    with_initial_state / with_final_grad, equal the kernel run with initial_state and dht."""
    from seqpar.kernels.linear import chunked_run

    q, k, v, g, g_gamma, h0 = make_inputs(gate, T=T, seed=T)
    gen = torch.Generator().manual_seed(3)
    do = torch.randn(q.shape[:3] + (v.shape[-1],), generator=gen, dtype=torch.float64)
    dht = torch.randn(h0.shape, generator=gen, dtype=torch.float64)
    run = chunked_run(q, k, v, g=g, g_gamma=g_gamma, chunk_size=chunk_size, backend="torch")
    states = run.with_initial_state(run.states(), h0)
    o = run.outputs(states)
    grads = run.with_final_grad(run.state_grads(do), dht)
    d = run.input_grads(do, states, grads, dht)
    dq, dk, dv, dg = d["q"], d["k"], d["v"], d.get("g")
    o_ref, S_ref = chunk_linear_attention_forward_reference(q, k, v, g=g, g_gamma=g_gamma, initial_state=h0,
                                                            output_final_state=True, chunk_size=chunk_size)
    want = chunk_linear_attention_backward_reference(do, q, k, v, g=g, g_gamma=g_gamma, initial_state=h0, dht=dht,
                                                     chunk_size=chunk_size)
    tol = dict(rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(o, o_ref, **tol)
    torch.testing.assert_close(states.final, S_ref, **tol)
    for name, got, w in zip(["dq", "dk", "dv", "dg", "dh0"], [dq, dk, dv, dg, grads.initial], want):
        if w is None:
            assert got is None, name
        else:
            torch.testing.assert_close(got, w, **tol, msg=lambda m: f"{name}: {m}")


def test_world_size_one_is_the_kernel():
    """seqpar.linear_attention on one rank does exactly the single-device kernel's work: its
    output and gradients are bitwise those of chunk_linear_attention."""
    import seqpar

    q, k, v, g, _, _ = make_inputs("g", B=1, T=200, H=2, Dk=8, Dv=8, dtype=torch.float32, seed=9)
    do = torch.randn(q.shape[:3] + (v.shape[-1],))
    results = []
    for fn in (lambda *a, **kw: seqpar.linear_attention(*a, **kw), chunk_linear_attention):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, g)]
        o, _ = fn(*leaves[:3], g=leaves[3], chunk_size=32)
        (o * do).sum().backward()
        results.append([o.detach()] + [t.grad for t in leaves])
    for name, a, b in zip(["o", "dq", "dk", "dv", "dg"], *results):
        assert torch.equal(a, b), f"{name}: max diff {(a - b).abs().max().item()}"


def test_long_run_with_strong_gates_has_no_denormals():
    """Gates are cumulated per chunk and underflowing decays are flushed: over a long run with
    logsigmoid gates no output or gradient is denormal (denormal arithmetic is ~100x slower on
    CPUs), and the results match the recurrence."""
    B, T, H, D = 1, 1024, 2, 16
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, T, H, D, generator=gen) for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, generator=gen)) * 3
    do = torch.randn(B, T, H, D, generator=gen)
    o, _ = chunk_linear_attention_forward_reference(q, k, v, g=g)
    dq, dk, dv, dg, _ = chunk_linear_attention_backward_reference(do, q, k, v, g=g)
    tiny = torch.finfo(torch.float32).tiny
    for name, x in dict(o=o, dq=dq, dk=dk, dv=dv, dg=dg).items():
        assert int(((x != 0) & (x.abs() < tiny)).sum()) == 0, f"{name} has denormals"
    o64, _ = linear_attention_recurrent_reference(q.double(), k.double(), v.double(), g=g.double())
    torch.testing.assert_close(o.double(), o64, rtol=1e-4, atol=1e-4)


def test_chunks_with_weak_and_strong_gates():
    """Chunks whose decay stays above e^-120 use factorised intra-chunk decays, the others the
    exact exp(b_i - b_j); a run mixing both (and a no-decay chunk) matches the recurrence."""
    q, k, v, g, _, h0 = make_inputs("g", T=100, seed=21)
    g = g.clone()
    g[:, 32:48] = -20.0  # one chunk of 16 far below e^-120
    g[:, 48:64] = 0.0    # one chunk without decay
    gen = torch.Generator().manual_seed(5)
    do = torch.randn(q.shape[:3] + (v.shape[-1],), generator=gen, dtype=torch.float64)
    dht = torch.randn(h0.shape, generator=gen, dtype=torch.float64)
    o_ref, S_ref, *grads_ref = oracle(q, k, v, g, None, h0, do, dht)
    o, S = chunk_linear_attention_forward_reference(q, k, v, g=g, initial_state=h0, output_final_state=True,
                                                    chunk_size=16)
    torch.testing.assert_close(o, o_ref, **F64)
    torch.testing.assert_close(S, S_ref, **F64)
    got = chunk_linear_attention_backward_reference(do, q, k, v, g=g, initial_state=h0, dht=dht, chunk_size=16)
    for name, a, w in zip(["dq", "dk", "dv", "dg", "dh0"], got, grads_ref):
        torch.testing.assert_close(a, w, **F64, msg=lambda m: f"{name}: {m}")
