"""Gated delta rule / KDA chunked runs (kernels.delta_reference.DeltaChunkedRun, WY form, explicit
backward) against autograd through the float64 token-by-token recurrence.

Gates: "none" (delta rule), "head" (g [B, T, H], Gated DeltaNet), "kda" (g [B, T, H, Dk]).
Tolerances: float64 1e-9 (relative to the largest entry of the reference), float32 inputs 5e-5,
bfloat16 inputs (the oracle is run on the same bf16-rounded values) 5e-5, strong gates 1e-9 (fp64)."""
from __future__ import annotations

import pytest
import torch

from seqpar.kernels.delta_reference import (
    DeltaChunkedRun,
    KdaChunkedRun,
    gated_delta_recurrent_reference,
    l2norm,
)
from seqpar.kernels.linear import chunk_linear_attention_backward, chunk_linear_attention_forward
from seqpar.kernels.linear_transitions import MatrixTransition

GATES = ["none", "head", "kda"]


def make_inputs(gate: str, B=2, T=63, H=3, Dk=16, Dv=24, dtype=torch.float64, seed=0, normalise=True,
                gate_strength=1.0):
    """(q, k, v, beta, g, h0) in ``dtype``; q, k L2-normalised unless ``normalise`` is False
    (then the run normalises them: use_qk_l2norm)."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    q, k, v = rnd(B, T, H, Dk), rnd(B, T, H, Dk), rnd(B, T, H, Dv)
    if normalise:
        q, k = l2norm(q), l2norm(k)
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64) * 0.9 + 0.1
    g = None
    if gate == "head":
        g = torch.nn.functional.logsigmoid(rnd(B, T, H) + 2) * gate_strength
    elif gate == "kda":
        g = torch.nn.functional.logsigmoid(rnd(B, T, H, Dk) + 2) * gate_strength
    h0 = rnd(B, H, Dk, Dv)
    cast = lambda t: None if t is None else t.to(dtype)
    return cast(q), cast(k), cast(v), cast(beta), cast(g), cast(h0)


def cotangents(q, v, seed=7):
    gen = torch.Generator().manual_seed(seed)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    return (torch.randn(B, T, H, Dv, generator=gen, dtype=torch.float64),
            torch.randn(B, H, Dk, Dv, generator=gen, dtype=torch.float64))


def oracle(q, k, v, beta, g, h0, do, dht, use_qk_l2norm=False):
    """(o, S_final, {"q", "k", "v", "beta", "g"?, "initial_state"}) by autograd through the
    float64 recurrence (on the given values, upcast)."""
    names = ["q", "k", "v", "beta"] + (["g"] if g is not None else []) + ["initial_state"]
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, beta) + ((g,) if g is not None else ()) + (h0,)]
    lv = dict(zip(names, leaves))
    o, S = gated_delta_recurrent_reference(lv["q"], lv["k"], lv["v"], lv["beta"], g=lv.get("g"),
                                           initial_state=lv["initial_state"], output_final_state=True,
                                           use_qk_l2norm=use_qk_l2norm)
    grads = torch.autograd.grad((o * do).sum() + (S * dht).sum(), leaves)
    return o.detach(), S.detach(), dict(zip(names, grads))


def assert_rel(got: torch.Tensor, want: torch.Tensor, tol: float, name: str = "") -> None:
    """max |got - want| <= tol * max(1, max |want|)."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: not finite"
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    bound = tol * max(1.0, want.abs().max().item() if want.numel() else 0.0)
    assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e}"


def run_all_stages(run: DeltaChunkedRun, h0, do, dht):
    states = run.states(h0)
    o = run.outputs(states)
    grads = run.state_grads(do, dht)
    d = run.input_grads(do, states, grads, dht)
    d["initial_state"] = grads.initial
    return o, states.final, d


# ---------------------------------------------------------------------------------------------
# The chunked run against the oracle.


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("use_qk_l2norm", [False, True])
@pytest.mark.parametrize("T,chunk_size", [(1, 16), (7, 16), (63, 16), (64, 64), (100, 16), (100, 64)])
def test_chunked_run_vs_recurrent(gate, use_qk_l2norm, T, chunk_size):
    q, k, v, beta, g, h0 = make_inputs(gate, T=T, seed=T + chunk_size, normalise=not use_qk_l2norm)
    do, dht = cotangents(q, v)
    o_ref, S_ref, want = oracle(q, k, v, beta, g, h0, do, dht, use_qk_l2norm)
    run = DeltaChunkedRun(q, k, v, beta=beta, g=g, chunk_size=chunk_size, use_qk_l2norm=use_qk_l2norm)
    o, S, got = run_all_stages(run, h0, do, dht)
    assert o.dtype == S.dtype == torch.float64
    assert_rel(o, o_ref, 1e-9, "o")
    assert_rel(S, S_ref, 1e-9, "final state")
    assert set(got) == set(want)
    for name in want:
        assert_rel(got[name], want[name], 1e-9, f"d{name}")


def test_explicit_scale_no_initial_state_no_dht_and_wrappers():
    """scale given, no initial state, no final-state gradient; the dispatcher's forward / backward
    (kernels.linear, backend 'torch': KdaChunkedRun's stages)."""
    q, k, v, beta, g, _ = make_inputs("kda", T=40, seed=3)
    do, _ = cotangents(q, v)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, beta, g)]
    o_ref, _ = gated_delta_recurrent_reference(*leaves[:4], g=leaves[4], scale=0.3)
    want = torch.autograd.grad((o_ref * do).sum(), leaves)
    o, S = chunk_linear_attention_forward(q, k, v, beta=beta, g=g, scale=0.3, chunk_size=16, backend="torch")
    assert S is None
    assert_rel(o, o_ref.detach(), 1e-9, "o")
    got, dh0 = chunk_linear_attention_backward(do, q, k, v, beta=beta, g=g, scale=0.3, chunk_size=16,
                                               backend="torch")
    assert set(got) == {"q", "k", "v", "beta", "g"} and dh0 is None
    for name, w in zip(["q", "k", "v", "beta", "g"], want):
        assert_rel(got[name], w, 1e-9, f"d{name}")


# ---------------------------------------------------------------------------------------------
# Stage identities, the transition, state gradients independent of the initial state.


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("T,chunk_size", [(63, 16), (7, 16), (100, 64)])
def test_shifted_stages_equal_the_run_with_state(gate, T, chunk_size):
    """with_initial_state(states(None), h0) / with_final_grad(state_grads(do), dht) give the same
    outputs, final state and input gradients as states(h0) / state_grads(do, dht)."""
    q, k, v, beta, g, h0 = make_inputs(gate, T=T, seed=11 + T)
    do, dht = cotangents(q, v, seed=2)
    run = DeltaChunkedRun(q, k, v, beta=beta, g=g, chunk_size=chunk_size)
    direct_states, direct_grads = run.states(h0), run.state_grads(do, dht)
    states = run.with_initial_state(run.states(), h0)
    grads = run.with_final_grad(run.state_grads(do), dht)
    tol = 1e-11
    assert_rel(states.starts, direct_states.starts, tol, "starts")
    assert_rel(states.final, direct_states.final, tol, "final")
    assert_rel(run.outputs(states), run.outputs(direct_states), tol, "o")
    assert_rel(grads.ends, direct_grads.ends, tol, "ends")
    assert_rel(grads.initial, direct_grads.initial, tol, "initial")
    shifted = run.input_grads(do, states, grads, dht)
    direct = run.input_grads(do, direct_states, direct_grads, dht)
    for name in direct:
        assert_rel(shifted[name], direct[name], tol, f"d{name}")


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("T,chunk_size", [(1, 16), (63, 16), (100, 32)])
def test_transition_identity_and_transpose(gate, T, chunk_size):
    """states(S).final == A S + states(None).final, and <A S, D> == <S, A^T D>; A^T also carries the
    final-state gradient to the initial state: state_grads(0, dht).initial == A^T dht."""
    q, k, v, beta, g, h0 = make_inputs(gate, T=T, seed=5 + T)
    run = DeltaChunkedRun(q, k, v, beta=beta, g=g, chunk_size=chunk_size)
    A = run.transition()
    assert isinstance(A, MatrixTransition) and A.matrix.shape == (2, 3, 16, 16)
    assert_rel(run.states(h0).final, A.apply(h0) + run.states().final, 1e-10, "transition")
    _, D = cotangents(q, v, seed=9)
    assert abs((A.apply(h0) * D).sum().item() - (h0 * A.apply_transpose(D)).sum().item()) <= 1e-9 * D.numel()
    zero_do = torch.zeros(q.shape[:3] + (v.shape[-1],), dtype=torch.float64)
    assert_rel(run.state_grads(zero_do, D).initial, A.apply_transpose(D), 1e-10, "A^T")
    # the matrix from the per-token recurrence: the final state of S_in = I (with v = 0)
    oracle_matrix = gated_delta_recurrent_reference(
        q, k, torch.zeros(2, T, 3, 16, dtype=torch.float64), beta, g=g,
        initial_state=torch.eye(16, dtype=torch.float64).expand(2, 3, 16, 16), output_final_state=True)[1]
    assert_rel(A.matrix, oracle_matrix, 1e-10, "transition matrix")


@pytest.mark.parametrize("gate", GATES)
def test_state_grads_do_not_depend_on_the_initial_state(gate):
    """The state-gradient stage reads no state: it is the same whichever initial state the run's
    forward used, and the oracle's d(initial_state) is the same at two initial states (the map is
    affine in the state)."""
    q, k, v, beta, g, h0 = make_inputs(gate, T=50, seed=17)
    do, dht = cotangents(q, v, seed=4)
    results = []
    for initial in (None, h0, -3.0 * h0):
        run = DeltaChunkedRun(q, k, v, beta=beta, g=g, chunk_size=16)
        run.outputs(run.states(initial))
        results.append(run.state_grads(do, dht))
    for other in results[1:]:
        assert torch.equal(other.ends, results[0].ends) and torch.equal(other.initial, results[0].initial)
    dh0_a = oracle(q, k, v, beta, g, h0, do, dht)[2]["initial_state"]
    dh0_b = oracle(q, k, v, beta, g, -3.0 * h0, do, dht)[2]["initial_state"]
    assert_rel(dh0_a, dh0_b, 1e-10, "oracle dh0")
    assert_rel(results[0].initial, dh0_a, 1e-9, "dh0")


# ---------------------------------------------------------------------------------------------
# Low precision inputs, strong gates.


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_qk_l2norm", [False, True])
def test_low_precision_inputs(gate, dtype, use_qk_l2norm):
    """float32 / bfloat16 inputs compute in float32 and return float32; against the float64 oracle
    on the same (rounded) values."""
    q, k, v, beta, g, h0 = make_inputs(gate, T=100, seed=23, dtype=dtype, normalise=not use_qk_l2norm)
    do, dht = cotangents(q, v, seed=6)
    o_ref, S_ref, want = oracle(q, k, v, beta, g, h0, do, dht, use_qk_l2norm)
    run = DeltaChunkedRun(q, k, v, beta=beta, g=g, chunk_size=32, use_qk_l2norm=use_qk_l2norm)
    o, S, got = run_all_stages(run, h0, do.to(dtype), dht.to(dtype))
    assert o.dtype == S.dtype == got["q"].dtype == torch.float32
    # do, dht rounded to dtype: compare the gradients against the oracle with the same cotangents
    if dtype == torch.bfloat16:
        _, _, want = oracle(q, k, v, beta, g, h0, do.to(dtype).double(), dht.to(dtype).double(), use_qk_l2norm)
    tol = 5e-5
    assert_rel(o, o_ref, tol, "o")
    assert_rel(S, S_ref, tol, "final state")
    for name in want:
        assert_rel(got[name], want[name], tol, f"d{name}")


@pytest.mark.parametrize("gate", ["head", "kda"])
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_strong_gates_over_a_long_run(gate, chunk_size):
    """g ~ -5 per token over T = 500: every chunk's decay is far below e^-60 (exact, unfactorised
    intra-chunk decays); float64 is exact against the oracle, float32 finite, free of denormals and
    close."""
    B, T, H, Dk, Dv = 1, 500, 2, 8, 12
    q, k, v, beta, _, h0 = make_inputs("none", B=B, T=T, H=H, Dk=Dk, Dv=Dv, seed=31)
    gen = torch.Generator().manual_seed(8)
    shape = (B, T, H) if gate == "head" else (B, T, H, Dk)
    g = -5.0 + torch.randn(*shape, generator=gen, dtype=torch.float64).clamp(-2, 2)
    do, dht = cotangents(q, v, seed=1)
    o_ref, S_ref, want = oracle(q, k, v, beta, g, h0, do, dht)
    o, S, got = run_all_stages(DeltaChunkedRun(q, k, v, beta=beta, g=g, chunk_size=chunk_size), h0, do, dht)
    assert_rel(o, o_ref, 1e-9, "o")
    assert_rel(S, S_ref, 1e-9, "final state")
    for name in want:
        assert_rel(got[name], want[name], 1e-9, f"d{name}")
    run32 = DeltaChunkedRun(q.float(), k.float(), v.float(), beta=beta.float(), g=g.float(), chunk_size=chunk_size)
    o32, S32, got32 = run_all_stages(run32, h0.float(), do.float(), dht.float())
    tiny = torch.finfo(torch.float32).tiny
    for name, x in dict(o=o32, S=S32, **got32).items():
        assert int(((x != 0) & (x.abs() < tiny)).sum()) == 0, f"{name} has denormals"
    assert_rel(o32, o_ref, 5e-5, "o fp32")
    for name in want:
        assert_rel(got32[name], want[name], 5e-5, f"d{name} fp32")


@pytest.mark.parametrize("gate", ["head", "kda"])
def test_chunks_with_weak_and_strong_gates(gate):
    """A run mixing factorised chunks (decay above e^-60), unfactorised ones and a no-decay chunk
    (and, for KDA, channels of both kinds in one chunk) matches the recurrence."""
    q, k, v, beta, g, h0 = make_inputs(gate, T=100, seed=41)
    g = g.clone()
    g[:, 32:48] = -20.0
    g[:, 48:64] = 0.0
    if gate == "kda":
        g[:, 64:80, :, :8] = -15.0
    do, dht = cotangents(q, v, seed=12)
    o_ref, S_ref, want = oracle(q, k, v, beta, g, h0, do, dht)
    for chunk_size in (16, 20, 24, 32):
        run = DeltaChunkedRun(q, k, v, beta=beta, g=g, chunk_size=chunk_size)
        assert len(run.gates.factored) == run.NT
        assert not all(run.gates.factored) and any(run.gates.factored)
        o, S, got = run_all_stages(run, h0, do, dht)
        assert_rel(o, o_ref, 1e-9, "o")
        assert_rel(S, S_ref, 1e-9, "final state")
        for name in want:
            assert_rel(got[name], want[name], 1e-9, f"d{name}")


@pytest.mark.parametrize("per_token,path", [(-0.05, "sides"), (-1.5, "diag_sides"), (-5.0, "diag")])
def test_kda_intra_chunk_paths(per_token, path):
    """KDA chunks of 64 whose decay is weak (one factorised product), strong with weak sub-chunks of 16
    (factorised sub-chunks) or strong sub-chunks (exact [s, s, Dk] decays) match the recurrence."""
    q, k, v, beta, _, h0 = make_inputs("none", T=150, seed=43)
    gen = torch.Generator().manual_seed(2)
    g = per_token * 2 * torch.rand(2, 150, 3, 16, generator=gen, dtype=torch.float64)
    g[..., 0] = per_token  # one channel at the typical rate everywhere
    do, dht = cotangents(q, v, seed=13)
    o_ref, S_ref, want = oracle(q, k, v, beta, g, h0, do, dht)
    run = KdaChunkedRun(q, k, v, beta=beta, g=g, chunk_size=64)
    assert getattr(run.gates.block(slice(0, 1)), path) is not None
    o, S, got = run_all_stages(run, h0, do, dht)
    assert_rel(o, o_ref, 1e-9, "o")
    assert_rel(S, S_ref, 1e-9, "final state")
    for name in want:
        assert_rel(got[name], want[name], 1e-9, f"d{name}")


# ---------------------------------------------------------------------------------------------
# Validation.


def test_bad_inputs_name_the_shapes():
    q, k, v, beta, g, _ = make_inputs("kda", T=10, seed=0)
    with pytest.raises(ValueError, match=r"beta must be \[B, T, H\]"):
        DeltaChunkedRun(q, k, v, beta=beta[..., None])
    with pytest.raises(ValueError, match="g must be"):
        DeltaChunkedRun(q, k, v, beta=beta, g=g[..., :3])
    with pytest.raises(ValueError, match="v must be"):
        DeltaChunkedRun(q, k, v[:, :5], beta=beta)
    with pytest.raises(ValueError, match="KDA needs g"):
        KdaChunkedRun(q, k, v, beta=beta, g=g[..., 0])
    with pytest.raises(ValueError, match="chunk_size"):
        DeltaChunkedRun(q, k, v, beta=beta, chunk_size=0)
    with pytest.raises(ValueError, match="do must be"):
        DeltaChunkedRun(q, k, v, beta=beta).state_grads(v[:, :3])
