"""Triton gated delta rule (:class:`TritonDeltaChunkedRun`) against autograd through the float64
token-by-token recurrence (``gated_delta_recurrent_reference``), stage by stage.

Without CUDA the kernels run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before anything imports triton; if the kernel module was decorated without it, the in-process
cases skip and ``test_interpreter_subprocess`` reruns this file in a fresh process with it set).
``test_kernels_compile_for_sm90`` compiles every kernel ahead of time for an H100 (no GPU needed).

Tolerances: max abs error <= tol * max(1, max |reference|) per tensor; fp32 inputs 2e-4, fp16 2e-2,
bf16 6e-2 (the oracle runs on the same rounded inputs in float64).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from seqpar.kernels import delta_triton  # noqa: E402
from aot_compile import check_compiles, compile_sm90  # noqa: E402
from seqpar.kernels.delta_reference import gated_delta_recurrent_reference  # noqa: E402
from seqpar.kernels.delta_triton import TritonDeltaChunkedRun  # noqa: E402


def _kernels_interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return all(isinstance(f, InterpretedFunction) for f in (delta_triton._delta_fwd_h, triton.language.cdiv))


IN_PROCESS = CUDA or (os.environ.get("TRITON_INTERPRET") == "1" and _kernels_interpreted())
DEVICE = "cuda" if CUDA else "cpu"
needs_kernels = pytest.mark.skipif(not IN_PROCESS, reason="kernel module imported without TRITON_INTERPRET; "
                                   "covered by test_interpreter_subprocess")
TOL = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def test_interpreter_subprocess():
    """Rerun this file in a fresh process with TRITON_INTERPRET=1 when the in-process run can't."""
    if IN_PROCESS:
        pytest.skip("cases ran in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k",
                          "not compile_for_sm90", __file__], env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]


def _close(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    assert got.shape == ref.shape, (name, tuple(got.shape), tuple(ref.shape))
    assert torch.isfinite(got).all(), f"{name}: not finite"
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    err = (got - ref).abs().max().item() if got.numel() else 0.0
    assert err <= tol * scale, f"{name}: max abs err {err:.3e} > {tol * scale:.3e}"


def _inputs(B, T, H, Dk, Dv, dtype, *, gate: bool, seed: int = 0, gate_scale: float = 1.0, normalize: bool = True):
    """q, k, v (strided slices of one tensor), beta, g, h0, dht, do; keys L2-normalised (as a model feeds them)."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, H, 2 * Dk + Dv, generator=gen, dtype=torch.float64)
    q, k, v = qkv.split([Dk, Dk, Dv], dim=-1)
    if normalize:
        k = k / k.norm(dim=-1, keepdim=True)  # a view of a fresh tensor: write it back into the packed one
        qkv[..., Dk:2 * Dk] = k
        k = qkv[..., Dk:2 * Dk]
    q, k, v = (x.to(DEVICE, dtype) for x in qkv.split([Dk, Dk, Dv], dim=-1))
    beta = torch.sigmoid(torch.randn(B, T, H, generator=gen, dtype=torch.float64)).to(DEVICE, dtype)
    g = None
    if gate:
        g = (torch.nn.functional.logsigmoid(torch.randn(B, T, H, generator=gen, dtype=torch.float64) + 2.0)
             * gate_scale).to(DEVICE, dtype)
    h0 = torch.randn(B, H, Dk, Dv, generator=gen, dtype=torch.float64).to(DEVICE, torch.float32)
    dht = torch.randn(B, H, Dk, Dv, generator=gen, dtype=torch.float64).to(DEVICE, torch.float32)
    do = torch.randn(B, T, H, Dv, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    return q, k, v, beta, g, h0, dht, do


def _oracle(q, k, v, beta, g, h0, dht, do, use_qk_l2norm=False):
    """(o, final, {name: grad}) by autograd through the fp64 recurrence on the same (rounded) inputs."""
    names = ["q", "k", "v", "beta"] + (["g"] if g is not None else []) + ["initial_state"]
    leaves = {n: t.detach().double().cpu().requires_grad_()
              for n, t in zip(names, [q, k, v, beta] + ([g] if g is not None else []) + [h0])}
    o, final = gated_delta_recurrent_reference(leaves["q"], leaves["k"], leaves["v"], leaves["beta"], g=leaves.get("g"),
                                               initial_state=leaves["initial_state"], output_final_state=True,
                                               use_qk_l2norm=use_qk_l2norm)
    loss = (o * do.double().cpu()).sum() + (final * dht.double().cpu()).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return o.detach(), final.detach(), dict(zip(names, grads))


def _run_all(run: TritonDeltaChunkedRun, h0, dht, do):
    states = run.states(h0)
    o = run.outputs(states)
    grads = run.state_grads(do, dht)
    return o, states, grads, run.input_grads(do, states, grads, dht)


def _check_against_oracle(q, k, v, beta, g, h0, dht, do, tol, chunk_size, use_qk_l2norm=False):
    run = TritonDeltaChunkedRun(q, k, v, beta=beta, g=g, chunk_size=chunk_size, use_qk_l2norm=use_qk_l2norm)
    o, states, grads, ig = _run_all(run, h0, dht, do)
    ro, rfinal, rgrads = _oracle(q, k, v, beta, g, h0, dht, do, use_qk_l2norm)
    assert o.dtype == torch.float32 and states.final.dtype == torch.float32
    _close("o", o, ro, tol)
    _close("final_state", states.final, rfinal, tol)
    _close("d initial_state", grads.initial, rgrads.pop("initial_state"), tol)
    assert set(ig) == set(rgrads), (set(ig), set(rgrads))
    for name, ref in rgrads.items():
        assert ig[name].dtype == torch.float32 and ig[name].shape == ref.shape, name
        _close("d" + name, ig[name], ref, tol)


# (B, T, H, Dk, Dv, chunk_size): tails, one and several chunks, padded head dims, Dk != Dv
CASES = [
    (1, 1, 2, 16, 24, 16),
    (1, 7, 2, 16, 24, 16),
    (1, 63, 2, 16, 24, 16),
    (1, 64, 2, 16, 24, 32),
    (1, 100, 2, 20, 24, 32),
    (2, 45, 3, 16, 24, 16),
    (1, 40, 1, 64, 40, 16),
]


@needs_kernels
@pytest.mark.parametrize("gate", [False, True], ids=["no_gate", "g"])
@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_forward_backward_fp32(case, gate):
    B, T, H, Dk, Dv, L = case
    inputs = _inputs(B, T, H, Dk, Dv, torch.float32, gate=gate, seed=T * 7 + Dk + gate)
    _check_against_oracle(*inputs, tol=TOL[torch.float32], chunk_size=L)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_forward_backward_low_precision(dtype):
    inputs = _inputs(1, 50, 2, 32, 24, dtype, gate=True, seed=5)
    _check_against_oracle(*inputs, tol=TOL[dtype], chunk_size=16)


@needs_kernels
def test_qk_l2norm():
    inputs = _inputs(1, 40, 2, 16, 24, torch.float32, gate=True, seed=3, normalize=False)
    _check_against_oracle(*inputs, tol=TOL[torch.float32], chunk_size=16, use_qk_l2norm=True)


@needs_kernels
def test_strong_gates_long_run():
    """g around -5 per token over T = 500: chunk-local gates keep every exponential <= 1, nothing overflows."""
    inputs = _inputs(1, 500, 1, 16, 16, torch.float32, gate=True, seed=11, gate_scale=40.0)
    assert inputs[4].mean() < -4.0
    _check_against_oracle(*inputs, tol=TOL[torch.float32], chunk_size=64)


@needs_kernels
@pytest.mark.parametrize("gate", [False, True], ids=["no_gate", "g"])
def test_stage_identities(gate):
    q, k, v, beta, g, h0, dht, do = _inputs(1, 63, 2, 16, 24, torch.float32, gate=gate, seed=21)
    run = TritonDeltaChunkedRun(q, k, v, beta=beta, g=g, chunk_size=16)
    direct = run.states(h0)
    shifted = run.with_initial_state(run.states(None), h0)
    _close("final (shifted)", shifted.final, direct.final, 1e-5)
    _close("o (shifted)", run.outputs(shifted), run.outputs(direct), 1e-5)
    with_dht = run.state_grads(do, dht)
    later = run.with_final_grad(run.state_grads(do), dht)
    _close("d initial_state (shifted)", later.initial, with_dht.initial, 1e-5)
    want = run.input_grads(do, direct, with_dht, dht)
    got = run.input_grads(do, direct, later, dht)
    assert set(got) == set(want) == {"q", "k", "v", "beta"} | ({"g"} if gate else set())
    for name in want:
        _close("d" + name + " (shifted)", got[name], want[name], 1e-5)


@needs_kernels
@pytest.mark.parametrize("gate", [False, True], ids=["no_gate", "g"])
def test_transition(gate):
    q, k, v, beta, g, h0, dht, _ = _inputs(2, 37, 2, 16, 24, torch.float32, gate=gate, seed=31)
    run = TritonDeltaChunkedRun(q, k, v, beta=beta, g=g, chunk_size=16)
    A = run.transition()
    assert A.matrix.shape == (2, 2, 16, 16)
    # states(S).final = A S + states(0).final
    _close("A S + U", A.apply(h0) + run.states(None).final, run.states(h0).final, 1e-5)
    # <A S, D> = <S, A^T D>
    lhs = (A.apply(h0).double() * dht.double()).sum()
    rhs = (h0.double() * A.apply_transpose(dht).double()).sum()
    assert abs(lhs - rhs).item() <= 1e-5 * max(1.0, abs(lhs).item())
    # the product of the per-token maps exp(g_t) (I - beta_t k_t k_t^T), in float64
    M = torch.eye(16, dtype=torch.float64).expand(2, 2, 16, 16)
    for t in range(q.shape[1]):
        kt, bt = k[:, t].double().cpu(), beta[:, t].double().cpu()[..., None, None]
        step = torch.eye(16, dtype=torch.float64) - bt * kt[..., :, None] * kt[..., None, :]
        if g is not None:
            step = step * g[:, t].double().cpu().exp()[..., None, None]
        M = step @ M
    _close("transition", A.matrix, M, 1e-5)


@needs_kernels
def test_float64_runs_the_torch_class():
    q, k, v, beta, g, h0, dht, do = _inputs(1, 20, 2, 8, 6, torch.float64, gate=True, seed=41)
    h0, dht = h0.double(), dht.double()
    run = TritonDeltaChunkedRun(q, k, v, beta=beta, g=g, chunk_size=8)
    assert run.cd == torch.float64
    o, states, grads, ig = _run_all(run, h0, dht, do)
    ro, rfinal, rgrads = _oracle(q, k, v, beta, g, h0, dht, do)
    _close("o", o, ro, 1e-10)
    _close("final_state", states.final, rfinal, 1e-10)
    for name in ("q", "k", "v", "beta", "g"):
        _close("d" + name, ig[name], rgrads[name], 1e-10)
    _close("transition", run.transition().apply(h0) + run.states(None).final, states.final, 1e-10)


@needs_kernels
def test_bad_inputs():
    q, k, v, beta, g, _, _, _ = _inputs(1, 10, 2, 16, 24, torch.float32, gate=True)
    with pytest.raises(ValueError, match="backend='torch'"):
        TritonDeltaChunkedRun(q, k, v, beta=beta, g=torch.zeros(1, 10, 2, 16, device=DEVICE))
    with pytest.raises(ValueError, match="beta"):
        TritonDeltaChunkedRun(q, k, v, beta=beta[:, :5])
    with pytest.raises(ValueError, match="head dims"):
        big = torch.zeros(1, 4, 1, 160, device=DEVICE)
        TritonDeltaChunkedRun(big, big, big, beta=torch.ones(1, 4, 1, device=DEVICE))
    with pytest.raises(ValueError, match="dtypes"):
        TritonDeltaChunkedRun(q, k.half(), v, beta=beta)
    run = TritonDeltaChunkedRun(q, k, v, beta=beta, g=g)
    with pytest.raises(ValueError, match="initial_state"):
        run.states(torch.zeros(1, 2, 16, 16, device=DEVICE))
    with pytest.raises(ValueError, match="do must be"):
        run.state_grads(torch.zeros(1, 10, 2, 16, device=DEVICE))


# --------------------------------------------------------------------------------------------
# ahead-of-time compilation for an H100 (sm_90), no GPU needed: catches what the interpreter
# cannot (dtype rules of tl.dot, layouts, register/shared-memory limits of the NVIDIA backend)
# --------------------------------------------------------------------------------------------

def _compile_main() -> None:
    """Compile every delta-rule kernel for sm_90 with Triton's bundled ptxas, bf16 and fp32 inputs,
    Dk = Dv = 128 and 64, with the tiles the host code picks on a GPU (run in a process where the
    kernels were decorated for the JIT, not the interpreter)."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = []
    for dt, D in (("bf16", 128), ("fp32", 128), ("bf16", 64), ("fp32", 64)):
        for name in delta_triton._raw:
            jobs.append((name, dt, D, True))
    with ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        for done in pool.map(_compile_one, jobs):
            print(done, flush=True)
    print("compiled all kernels for sm_90")


def _compile_one(job: tuple[str, str, int, bool]) -> str:
    name, dt, D, use_g = job
    torch_dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dt]
    meta = delta_triton._meta(torch.empty(0, dtype=torch_dt), D, D, delta_triton.DEFAULT_CHUNK)
    meta["USE_G"] = use_g
    operand = dt if meta["LOWP"] else "fp32"
    ptrs = {"Q": dt, "K": dt, "V": dt, "DO": dt, "W": operand, "U": operand, "E": operand, "DE": operand}
    fn = delta_triton._raw[name]
    flags = {"fwd_h": {"USE_H0": True, "STORE_HT": True, "BV": 32}, "bwd_dh": {"USE_DHT": True, "BV": 32}}
    consts = {**meta, **flags.get(name, {})}
    warps = 4 if name in delta_triton._STATE_KERNELS else 8
    compile_sm90(fn, {"_": "fp32", **ptrs}, consts, warps, 2)
    return f"{name} {dt} D={D} USE_G={use_g}"


def test_kernels_compile_for_sm90():
    """Every kernel compiles for an H100 (ahead of time, in a subprocess: no GPU needed)."""
    check_compiles("test_delta_triton", "_compile_main", "compiled all kernels", timeout_s=900)
