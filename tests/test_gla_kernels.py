"""GLA (per-key gates) chunked runs against the token-by-token float64 recurrence differentiated
by autograd: :class:`GlaChunkedRun` (torch) and :class:`TritonGlaChunkedRun` (Triton; on machines
without CUDA under Triton's CPU interpreter, small sizes, fp32), plus an ahead-of-time sm_90
compile of the Triton kernels.

Tolerances (max abs error relative to max(1, the reference's largest magnitude)): float64 1e-9;
float32 inputs 2e-4 (torch) / 5e-4 (Triton); bf16 and fp16 inputs (rounded, then compared with the
oracle on the same rounded values) 1e-3 torch, 2e-2 Triton (tf32 dots).
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

from seqpar.kernels import gla_reference  # noqa: E402
from aot_compile import check_compiles, compile_sm90  # noqa: E402
from seqpar.kernels.gla_reference import GlaChunkedRun, gla_recurrent_reference  # noqa: E402
from seqpar.kernels.linear_transitions import KeyDecay  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
F64 = 1e-9
NAMES = ("o", "final", "q", "k", "v", "g", "h0")


def make_inputs(B=2, T=63, H=3, Dk=16, Dv=24, seed=0, gate_shift=0.0, gate_strength=1.0):
    """fp64 (q, k, v, g, h0, do, dht); g = logsigmoid(x + 2) * strength - shift (<= 0)."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = rnd(B, T, H, Dk), rnd(B, T, H, Dk), rnd(B, T, H, Dv)
    g = torch.nn.functional.logsigmoid(rnd(B, T, H, Dk) + 2) * gate_strength - gate_shift
    return q, k, v, g, rnd(B, H, Dk, Dv), rnd(B, T, H, Dv), rnd(B, H, Dk, Dv)


def oracle(q, k, v, g, h0, do, dht) -> dict[str, torch.Tensor]:
    """o, final state and the gradients of <o, do> + <final, dht> by autograd through the fp64
    recurrence (h0 / dht may be None)."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, g)]
    h = h0.detach().double().requires_grad_() if h0 is not None else None
    o, S = gla_recurrent_reference(*leaves, initial_state=h, output_final_state=True)
    loss = (o * do.double()).sum() + ((S * dht.double()).sum() if dht is not None else 0.0)
    grads = torch.autograd.grad(loss, leaves + ([h] if h is not None else []))
    out = dict(o=o.detach(), final=S.detach(), **dict(zip("qkvg", grads)))
    if h is not None:
        out["h0"] = grads[4]
    return out


def run_all(run, do, h0=None, dht=None) -> dict[str, torch.Tensor]:
    """The four stages in a row: o, final state, the input gradients and dh0."""
    states = run.states(h0)
    o = run.outputs(states)
    grads = run.state_grads(do, dht)
    return dict(o=o, final=states.final, h0=grads.initial, **run.input_grads(do, states, grads, dht))


def assert_close(got: dict, want: dict, tol: float, names=NAMES) -> None:
    for name in names:
        if name not in want:
            continue
        a, b = got[name].double().cpu(), want[name].double().cpu()
        assert a.shape == b.shape, (name, a.shape, b.shape)
        assert torch.isfinite(a).all(), f"{name}: not finite"
        scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
        err = (a - b).abs().max().item() if a.numel() else 0.0
        assert err <= tol * scale, f"{name}: max abs err {err:.3e} > {tol * scale:.3e}"


def cast(dtype, *ts):
    return [t.to(dtype) for t in ts]


# --------------------------------------------------------------------------------------------
# GlaChunkedRun (torch)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("T", [1, 7, 63, 64, 100])
def test_torch_run_matches_recurrence(T, chunk_size):
    q, k, v, g, h0, do, dht = make_inputs(T=T, seed=T + chunk_size)
    got = run_all(GlaChunkedRun(q, k, v, g=g, chunk_size=chunk_size), do, h0, dht)
    assert all(t.dtype == torch.float64 for t in got.values())
    assert_close(got, oracle(q, k, v, g, h0, do, dht), F64)


def test_torch_run_without_initial_state_or_final_grad():
    """No initial state (zero), no final-state gradient, an explicit scale."""
    q, k, v, g, h0, do, _ = make_inputs(T=50, seed=2)
    got = run_all(GlaChunkedRun(q, k, v, g=g, scale=0.3, chunk_size=16), do)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, g)]
    zero = torch.zeros_like(h0).requires_grad_()
    o, S = gla_recurrent_reference(*leaves, scale=0.3, initial_state=zero, output_final_state=True)
    grads = torch.autograd.grad((o * do).sum(), leaves + [zero])
    want = dict(o=o.detach(), final=S.detach(), h0=grads[4], **dict(zip("qkvg", grads)))
    assert_close(got, want, F64)


def _stage_identities(run, h0, do, dht, tol):
    """Shifting stages computed from zero equals computing with h0 / dht; the transition gives the
    final state from the initial one, its transpose dh0 from dht, and is self-adjoint."""
    direct = run_all(run, do, h0, dht)
    states = run.with_initial_state(run.states(), h0)
    grads = run.with_final_grad(run.state_grads(do), dht)
    shifted = dict(o=run.outputs(states), final=states.final, h0=grads.initial,
                   **run.input_grads(do, states, grads, dht))
    assert_close(shifted, direct, tol)
    A = run.transition()
    assert isinstance(A, KeyDecay) and tuple(A.log.shape) == h0.shape[:3]
    assert_close({"final": A.apply(h0) + run.states().final}, {"final": run.states(h0).final}, tol)
    assert_close({"h0": A.apply_transpose(dht) + run.state_grads(do).initial},
                 {"h0": run.state_grads(do, dht).initial}, tol)
    S, D = h0.double(), dht.double()
    lhs = (A.apply(S) * D).sum().item()
    rhs = (S * A.apply_transpose(D)).sum().item()
    assert abs(lhs - rhs) <= tol * max(1.0, abs(lhs)), (lhs, rhs)
    B, H, Dk = A.log.shape
    assert torch.equal(KeyDecay.from_payload(A.payload(), B, H, Dk).log, A.log)


@pytest.mark.parametrize("T,chunk_size", [(1, 16), (63, 16), (100, 64)])
def test_torch_stage_identities(T, chunk_size):
    q, k, v, g, h0, do, dht = make_inputs(T=T, seed=40 + T)
    _stage_identities(GlaChunkedRun(q, k, v, g=g, chunk_size=chunk_size), h0, do, dht, 1e-11)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.bfloat16, 1e-3)])
def test_torch_low_precision_inputs(dtype, tol):
    """fp32 / bf16 inputs (computed in fp32) against the fp64 oracle on the same rounded values."""
    q, k, v, g, h0, do, dht = cast(dtype, *make_inputs(T=100, seed=5))
    got = run_all(GlaChunkedRun(q, k, v, g=g, chunk_size=32), do, h0, dht)
    assert all(t.dtype == torch.float32 for t in got.values())
    assert_close(got, oracle(q, k, v, g, h0, do, dht), tol)


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_torch_strong_gates_long_run(chunk_size):
    """g ~ -5 per token over 500 tokens: chunks of 16 decay by ~e^-80 (factorised), chunks of 64 by
    ~e^-320 (the exact per-channel path, with decays that underflow fp32); both stay finite and
    exact in fp64, and fp32 matches too with no denormal result (underflowing decays are flushed)."""
    q, k, v, g, h0, do, dht = make_inputs(B=1, T=500, H=2, seed=9, gate_shift=5.0)
    run = GlaChunkedRun(q, k, v, g=g, chunk_size=chunk_size)
    assert all(run.factored) == (chunk_size == 16)
    want = oracle(q, k, v, g, h0, do, dht)
    assert_close(run_all(run, do, h0, dht), want, F64)
    run32 = GlaChunkedRun(*cast(torch.float32, q, k, v), g=g.float(), chunk_size=chunk_size)
    assert run32.flush == (chunk_size == 64)  # decays below fp32's smallest normal number occur
    got32 = run_all(run32, do.float(), h0.float(), dht.float())
    assert_close(got32, want, 2e-4)
    tiny = torch.finfo(torch.float32).tiny
    for name, x in got32.items():
        assert int(((x != 0) & (x.abs() < tiny)).sum()) == 0, f"{name} has denormals"


def test_torch_mixed_chunks_and_small_exact_pieces(monkeypatch):
    """A run mixing factorised chunks, a chunk far below e^-120 and a chunk without decay: with one
    chunk per block (factorised and exact blocks in one run), and with one block for all chunks
    (exact) whose temporaries are capped so that it splits heads and chunks into several pieces."""
    q, k, v, g, h0, do, dht = make_inputs(T=100, seed=21)
    g = g.clone()
    g[:, 32:48] = -20.0
    g[:, 48:64] = 0.0
    g[0, 70:80, 1, 3] = -30.0  # one channel of one head: the chunk is exact for everyone
    want = oracle(q, k, v, g, h0, do, dht)
    monkeypatch.setattr(gla_reference, "_MAX_BLOCK_ELEMS", 2 * 3 * 16 * 16)
    run = GlaChunkedRun(q, k, v, g=g, chunk_size=16)
    assert run.factored == [True, True, False, True, False, True, True] and len(run.blocks) == 7
    assert_close(run_all(run, do, h0, dht), want, F64)
    monkeypatch.setattr(gla_reference, "_MAX_BLOCK_ELEMS", 1 << 15)
    monkeypatch.setattr(gla_reference, "_MAX_EXACT_ELEMS", 16 * 16 * 16 * 2)
    run = GlaChunkedRun(q, k, v, g=g, chunk_size=16)
    assert len(run.blocks) == 1
    assert_close(run_all(run, do, h0, dht), want, F64)


def test_input_validation():
    q, k, v, g, h0, do, _ = make_inputs(T=10)
    with pytest.raises(ValueError, match=r"g \[B, T, H, Dk\] = \(2, 10, 3, 16\); got \(2, 10, 3\)"):
        GlaChunkedRun(q, k, v, g=g[..., 0])
    with pytest.raises(ValueError, match=r"expected q, k \[B, T, H, Dk\]"):
        GlaChunkedRun(q, k[:, :9], v, g=g)
    with pytest.raises(ValueError, match=r"do must be \[B, T, H, Dv\] = \(2, 10, 3, 24\)"):
        GlaChunkedRun(q, k, v, g=g).state_grads(do[:, :9])


# --------------------------------------------------------------------------------------------
# TritonGlaChunkedRun (CUDA, or the CPU interpreter)
# --------------------------------------------------------------------------------------------


def _kernels_interpreted() -> bool:
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from seqpar.kernels import gla_triton

    return all(isinstance(f, InterpretedFunction) for f in (gla_triton._gla_fwd_o, gla_triton._gla_state_pass, tl.cdiv))


def _in_process() -> bool:
    if CUDA:
        return True
    try:
        return os.environ.get("TRITON_INTERPRET") == "1" and _kernels_interpreted()
    except ImportError:
        return False


IN_PROCESS = _in_process()
needs_kernels = pytest.mark.skipif(not IN_PROCESS, reason="Triton kernels not importable for the interpreter here; "
                                   "covered by test_triton_interpreter_subprocess")
TRITON_F32 = 5e-4


def triton_run(q, k, v, g, **kw):
    from seqpar.kernels.gla_triton import TritonGlaChunkedRun

    return TritonGlaChunkedRun(q, k, v, g=g, **kw)


def test_triton_interpreter_subprocess():
    """Rerun the Triton cases in a fresh process with TRITON_INTERPRET=1 when this one can't."""
    if IN_PROCESS:
        pytest.skip("Triton cases ran in this process")
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          "-k", "triton and not subprocess and not compile", __file__],
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]


@needs_kernels
@pytest.mark.parametrize("T,chunk_size,B,Dk,Dv", [(1, 16, 2, 16, 24), (7, 64, 2, 16, 24), (63, 16, 2, 16, 24),
                                                  (64, 64, 2, 16, 24), (100, 32, 1, 16, 24), (40, 32, 1, 40, 40)])
def test_triton_run_matches_recurrence(T, chunk_size, B, Dk, Dv):
    """fp32 inputs (a strided q) against the fp64 oracle; chunks of 16 (one sub-chunk), 32 and 64
    (cross-sub-chunk terms, partly empty sub-chunks); Dk = Dv = 40 takes two tiles of each."""
    q, k, v, g, h0, do, dht = make_inputs(B=B, T=T, H=2, Dk=Dk, Dv=Dv, seed=T + chunk_size)
    wide = torch.randn(B, T, 2, Dk + 5, dtype=torch.float32, device=DEVICE)
    wide[..., 2:2 + Dk] = q.float().to(DEVICE)
    q32 = wide[..., 2:2 + Dk]  # not contiguous
    k32, v32, g32, h032, do32, dht32 = (t.float().to(DEVICE) for t in (k, v, g, h0, do, dht))
    got = run_all(triton_run(q32, k32, v32, g32, chunk_size=chunk_size), do32, h032, dht32)
    assert all(t.dtype == torch.float32 for t in got.values())
    assert_close(got, oracle(q, k, v, g, h0, do, dht), TRITON_F32)


@needs_kernels
def test_triton_stage_identities():
    q, k, v, g, h0, do, dht = (t.float().to(DEVICE) for t in make_inputs(B=1, T=20, H=2, seed=31))
    _stage_identities(triton_run(q, k, v, g, chunk_size=16), h0, do, dht, 1e-5)


@needs_kernels
def test_triton_strong_gates():
    """g ~ -5 per token: every exponent in the kernels is <= 0, so nothing overflows; the results
    stay finite and match the fp64 oracle."""
    q, k, v, g, h0, do, dht = make_inputs(B=1, T=160, H=1, seed=12, gate_shift=5.0)
    got = run_all(triton_run(*(t.float().to(DEVICE) for t in (q, k, v, g)), chunk_size=64),
                  do.float().to(DEVICE), h0.float().to(DEVICE), dht.float().to(DEVICE))
    assert_close(got, oracle(q, k, v, g, h0, do, dht), TRITON_F32)


@needs_kernels
def test_triton_float64_runs_the_torch_path():
    q, k, v, g, h0, do, dht = (t.to(DEVICE) for t in make_inputs(T=30, seed=4))
    got = run_all(triton_run(q, k, v, g, chunk_size=16), do, h0, dht)
    want = run_all(GlaChunkedRun(q, k, v, g=g, chunk_size=16), do, h0, dht)
    for name in NAMES:
        assert torch.equal(got[name], want[name]), name


@needs_kernels
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not CUDA, reason="bf16 needs a GPU (the interpreter's bf16 is broken)")), torch.float16])
def test_triton_half_inputs(dtype):
    q, k, v, g, h0, do, dht = cast(dtype, *make_inputs(B=1, T=40, H=2, seed=8))
    got = run_all(triton_run(*(t.to(DEVICE) for t in (q, k, v, g)), chunk_size=32),
                  do.to(DEVICE), h0.to(DEVICE), dht.to(DEVICE))
    assert_close(got, oracle(q, k, v, g, h0, do, dht), 2e-2)


@needs_kernels
def test_triton_input_validation():
    q, k, v, g, h0, _, _ = (t.float().to(DEVICE) for t in make_inputs(T=10))
    with pytest.raises(ValueError, match=r"g \[B, T, H, Dk\] = \(2, 10, 3, 16\); got \(2, 10, 3\)"):
        triton_run(q, k, v, g[..., 0])
    with pytest.raises(ValueError, match="unsupported dtypes"):
        triton_run(q.int(), k.int(), v.int(), g)
    with pytest.raises(ValueError, match=r"initial_state must be \[B, H, Dk, Dv\] = \(2, 3, 16, 24\)"):
        triton_run(q, k, v, g).states(h0[..., :5])


# --------------------------------------------------------------------------------------------
# ahead-of-time compilation for an H100 (sm_90), no GPU needed
# --------------------------------------------------------------------------------------------


def _compile_main() -> None:
    """Compile every GLA kernel for sm_90 with Triton's bundled ptxas (in a process where the
    kernels were decorated for the JIT, not the interpreter)."""
    import triton

    from seqpar.kernels import gla_triton as gt

    def build(fn, ptrs: dict, consts: dict, num_warps: int, num_stages: int) -> None:
        compile_sm90(fn, ptrs, consts, num_warps, num_stages)

    # (input dtype, Dk, Dv): 16-bit inputs with tf32 dots and full tiles; fp32 (IEEE dots) with
    # head dims that are no tile multiple
    for dt, Dk, Dv in (("bf16", 128, 128), ("fp32", 24, 40)):
        prec = "ieee" if dt == "fp32" else "tf32"
        meta = dict(DK=Dk, DV=Dv, BT=64, PRECISION=prec)
        tiles = dict(BK=min(32, triton.next_power_of_2(Dk)),
                     BV=min(32 if dt == "fp32" else 64, triton.next_power_of_2(Dv)))
        state_tiles = dict(BK=min(64, triton.next_power_of_2(Dk)), BV=min(64, triton.next_power_of_2(Dv)))
        f32 = {"GC": "fp32", "INIT": "fp32", "HS": "fp32", "HLAST": "fp32", "DHS": "fp32", "O": "fp32",
               "DVo": "fp32", "DQ": "fp32", "DKo": "fp32", "DGP": "fp32"}
        for reverse in (False, True):
            build(gt._gla_state_pass, {"_": dt, **f32}, {**meta, **state_tiles, "REVERSE": reverse, "USE_INIT": True},
                  4, 2)
        for kernel in (gt._gla_fwd_o, gt._gla_bwd_dv, gt._gla_bwd_dqk):
            build(kernel, {"_": dt, **f32}, {**meta, **tiles, "BC": gt.SUB_CHUNK}, 4, 2)
    print("compiled all GLA kernels for sm_90")


def test_gla_kernels_compile_for_sm90():
    """Every GLA kernel compiles for an H100 (ahead of time, in a subprocess: no GPU needed)."""
    check_compiles("test_gla_kernels", "_compile_main", "compiled all GLA kernels")
