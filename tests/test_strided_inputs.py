"""Strided views as inputs (issue 13 item 6): every entry point must accept any strides.

q / k / v (and the linear gates ``g``, the initial state and the upstream gradient ``do``) are
built as views of differently laid out storage, then every output and gradient is compared with
the same call on ``.contiguous()`` copies of the same values. View kinds (``VIEWS``):

* ``permuted``   – ``[B, T, D, H]`` storage, ``permute(0, 1, 3, 2)``: stride(-1) = H;
* ``sliced``     – every other feature of a ``[B, T, H, 2D]`` tensor (``[..., ::2]``): stride(-1) = 2;
* ``transposed`` – ``[B, H, T, D]`` storage, ``transpose(1, 2)`` (stride(-1) = 1, token and head
  strides swapped: what HF attention modules hold);
* ``seq_first``  – ``[T, B, H, D]`` storage (Megatron's), ``transpose(0, 1)``;
* ``expanded``   – one batch entry and one head ``expand``-ed: strides 0 (for k / v this is an MQA
  tensor broadcast to every KV head).

Before the fix the default CPU backend (``sdpa``: ``aten._scaled_dot_product_flash_attention_for_cpu``
and its backward) returned O(1) errors for every input, ``do`` and rebuilt ``out`` whose last
dimension is not unit-stride (``permuted``, ``sliced``), in one process already.

Sizes are tiny (B = 2, local T = 8, D = 16): about 20 s on 2 shared CPU cores (half of it pool
start-up and the Triton interpreter). Triton runs
under its CPU interpreter (TRITON_INTERPRET=1, set by conftest.py) or on CUDA.
Tolerances: fp64 (sdpa, torch) atol = rtol = 1e-10; fp32 (Triton) 1e-5; bf16 inputs on sdpa
(compared with the contiguous bf16 call, both computed in fp32 after the cast) 1e-3.
"""
from __future__ import annotations

import os

import pytest
import torch

import seqpar

CUDA = torch.cuda.is_available()
B, T, D = 2, 8, 16
HQ, HKV, H_LIN = 4, 2, 2
VIEWS = ("permuted", "sliced", "transposed", "seq_first", "expanded")
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5),
       torch.bfloat16: dict(atol=1e-3, rtol=1e-3)}


def strided(kind: str, shape: tuple[int, ...], gen: torch.Generator, dtype=torch.float64, device="cpu",
            fn=None) -> torch.Tensor:
    """A tensor of ``shape`` (3-D [B, T, H] or 4-D [B, T, H, D]) laid out as ``kind`` describes.
    ``fn`` is applied to the storage first (e.g. to make log gates <= 0)."""
    def draw(*s):
        x = torch.randn(*s, generator=gen, dtype=torch.float64)
        return (fn(x) if fn is not None else x).to(dtype=dtype, device=device)

    b, t, h, *d = shape
    if kind == "contiguous":
        x = draw(*shape)
    elif kind == "permuted":  # last axis is not unit-stride: [b, t, d, h] -> [b, t, h, d] ([b, h, t] for 3-D)
        x = draw(b, t, *d, h).permute(0, 1, 3, 2) if d else draw(b, h, t).transpose(1, 2)
    elif kind == "sliced":
        x = draw(*shape[:-1], 2 * shape[-1])[..., ::2]
    elif kind == "transposed":
        x = draw(b, h, t, *d).transpose(1, 2)
    elif kind == "seq_first":
        x = draw(t, b, h, *d).transpose(0, 1)
    elif kind == "expanded":
        x = draw(1, t, 1, *d).expand(*shape)
    else:
        raise ValueError(kind)
    assert x.shape == shape
    if kind in ("permuted", "sliced") and shape[-1] > 1:
        assert x.stride(-1) != 1
    return x


def _leaf(x: torch.Tensor) -> torch.Tensor:
    """A leaf with the same strides (detach keeps them, stride-0 axes included)."""
    return x.detach().requires_grad_()


def _dense(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.detach().contiguous()


def _compare(got, want, tol, what: str) -> None:
    for name, a, b in zip(("o", "lse/final", "dq", "dk", "dv", "dg", "dh0"), got, want):
        if a is None and b is None:
            continue
        assert a is not None and b is not None, f"{what}: {name} missing on one side"
        torch.testing.assert_close(a.double(), b.double(), **tol, msg=lambda m: f"{what} {name}: {m}")


# --- softmax attention -----------------------------------------------------------------------------

def _run_softmax(q, k, v, do, dlse, *, strategy, causal, backend, layout="contiguous", group=None):
    q, k, v = _leaf(q), _leaf(k), _leaf(v)
    o, lse = seqpar.attention(q, k, v, strategy=strategy, layout=layout, group=group, causal=causal,
                              backend=backend, return_lse=True)
    torch.autograd.backward([o, lse], [do, dlse])
    return [o.detach(), lse.detach(), q.grad, k.grad, v.grad]


def softmax_errors(strategy: str, backend: str, seed: int, dtype=torch.float64, device="cpu", group=None,
                   layout="contiguous", views=VIEWS, causals=(True, False)) -> list[str]:
    """Every view kind on q, k, v, do (and a strided dlse) against contiguous copies, causal and not,
    GQA; returns the failures (empty when all match)."""
    failures = []
    for causal in causals:
        for i, kind in enumerate(views):
            gen = torch.Generator().manual_seed(seed + 31 * i + int(causal))
            mk = lambda h, kd=kind: strided(kd, (B, T, h, D), gen, dtype, device)  # noqa: E731
            q, k, v = mk(HQ), mk(HKV), mk(HKV)
            do = strided("sliced" if kind == "expanded" else kind, (B, T, HQ, D), gen, dtype, device)
            dlse = torch.randn(B, T, HQ, generator=gen, dtype=torch.float64).to(device=device).transpose(1, 2)
            kw = dict(strategy=strategy, causal=causal, backend=backend, layout=layout, group=group)
            try:
                got = _run_softmax(q, k, v, do, dlse, **kw)
                want = _run_softmax(*map(_dense, (q, k, v, do, dlse)), **kw)
                _compare(got, want, TOL[dtype], f"{strategy}/{backend}/{dtype}/{kind}/causal={causal}")
            except Exception as e:  # collect, so one run reports every failing view
                failures.append(f"{strategy}/{backend}/{dtype}/{layout}/{kind}/causal={causal}: "
                                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return failures


def _triton_ready() -> bool:
    """Triton kernels usable here: on CUDA, or interpreted on CPU (conftest sets TRITON_INTERPRET=1
    before anything imports triton; if something imported it earlier, the Triton cases skip)."""
    try:
        import triton
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    if CUDA:
        return True
    from seqpar.kernels import linear_triton, softmax_triton
    return os.environ.get("TRITON_INTERPRET") == "1" and all(
        isinstance(f, InterpretedFunction) for f in (softmax_triton._attn_fwd, linear_triton._lin_fwd_h,
                                                     triton.language.cdiv))


needs_triton = pytest.mark.skipif(not _triton_ready(), reason="triton missing, or imported without the interpreter")


@pytest.mark.parametrize("strategy", ["ring", "allgather", "ulysses"])
@pytest.mark.parametrize("backend", ["sdpa", "torch"])
def test_softmax_strided_views_one_process(strategy, backend):
    """World size 1 (no torch.distributed): every view kind, causal and not, GQA 4/2, fp64."""
    failures = softmax_errors(strategy, backend, seed=1)
    assert not failures, "\n".join(failures)


def test_softmax_strided_views_auto_backend_bf16():
    """backend='auto' (sdpa on CPU) with bf16 inputs: the cast to fp32 keeps a permuted layout."""
    failures = softmax_errors("ring", "auto", seed=2, dtype=torch.bfloat16, views=("permuted", "sliced", "expanded"))
    assert not failures, "\n".join(failures)


@needs_triton
def test_softmax_strided_views_triton():
    failures = softmax_errors("ring", "triton", seed=3, dtype=torch.float32, device="cuda" if CUDA else "cpu",
                              views=("permuted", "expanded"))
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_sdpa_block_kernels_strided(dtype):
    """The sdpa block kernels themselves, for every mask shape the pieces produce (no mask, causal,
    strictly causal, a positive offset split into two pieces, Tq != Tk), with a permuted q, sliced
    k, transposed v and a permuted do, against contiguous copies."""
    from seqpar.kernels.softmax_sdpa import attention_block_backward_sdpa, attention_block_forward_sdpa
    gen = torch.Generator().manual_seed(9)
    for tq, tk, m in [(8, 8, None), (8, 8, 0), (8, 8, -1), (6, 9, 3), (9, 6, -2)]:
        q = strided("permuted", (B, tq, HQ, D), gen, dtype)
        k, v = strided("sliced", (B, tk, HKV, D), gen, dtype), strided("transposed", (B, tk, HKV, D), gen, dtype)
        do = strided("permuted", (B, tq, HQ, D), gen, dtype)
        delta = torch.randn(B, tq, HQ, generator=gen, dtype=torch.float64).transpose(1, 2)
        for args in [(q, k, v, do, delta), tuple(map(_dense, (q, k, v, do, delta)))]:
            o, lse = attention_block_forward_sdpa(*args[:3], scale=0.3, diagonal_offset=m)
            grads = attention_block_backward_sdpa(args[3], *args[:3], lse, args[4], scale=0.3, diagonal_offset=m)
            if args[0] is q:
                got = [o, lse, *grads]
        _compare(got, [o, lse, *grads], TOL[dtype], f"sdpa block {dtype} tq={tq} tk={tk} m={m}")


def case_softmax_strided(ctx, backend: str, runs: list[tuple[str, str]], views=VIEWS) -> list[str]:
    """One rank: each (strategy, layout) of ``runs`` with every view kind; rank-specific inputs."""
    failures = []
    for strategy, layout in runs:
        failures += softmax_errors(strategy, backend, seed=100 + ctx.rank, group=ctx.group, layout=layout,
                                   views=views)
    return failures


SOFTMAX_RUNS = [("ring", "zigzag"), ("allgather", "striped"), ("ulysses", "contiguous")]


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_softmax_strided_views_two_ranks(pool, backend):
    """World size 2 on gloo: ring / allgather / ulysses (GQA 4/2, so Ulysses splits the KV heads),
    every view kind, causal and not, fp64."""
    failures = sum(pool.run(case_softmax_strided, 2, backend=backend, runs=SOFTMAX_RUNS), [])
    assert not failures, "\n".join(failures)


@pytest.mark.skipif(CUDA, reason="the pool is CPU-only; CUDA runs the in-process Triton cases")
@needs_triton
def test_softmax_strided_views_two_ranks_triton(pool):
    """Triton (interpreted in the pool workers, which inherit TRITON_INTERPRET=1) under the ring."""
    failures = sum(pool.run(case_softmax_strided_fp32_triton, 2), [])
    assert not failures, "\n".join(failures)


def case_softmax_strided_fp32_triton(ctx) -> list[str]:
    return softmax_errors("ring", "triton", seed=200 + ctx.rank, dtype=torch.float32, group=ctx.group,
                          layout="zigzag", views=("sliced",), causals=(True,))


# --- linear attention ------------------------------------------------------------------------------

def _log_gate(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.logsigmoid(x + 2)


def _run_linear(q, k, v, g, h0, do, dfinal, *, strategy, backend, g_gamma, layout="contiguous", group=None):
    q, k, v = _leaf(q), _leaf(k), _leaf(v)
    g = None if g is None else _leaf(g)
    h0 = None if h0 is None else _leaf(h0)
    o, final = seqpar.linear_attention(q, k, v, strategy=strategy, layout=layout, group=group, g=g,
                                       g_gamma=g_gamma, initial_state=h0, output_final_state=True,
                                       backend=backend, chunk_size=4)
    torch.autograd.backward([o, final], [do, dfinal])
    return [o.detach(), final.detach(), q.grad, k.grad, v.grad, None if g is None else g.grad,
            None if h0 is None else h0.grad]


def linear_errors(strategy: str, backend: str, seed: int, dtype=torch.float64, device="cpu", group=None,
                  layout="contiguous", views=VIEWS, gates=("g", "g_gamma", "none")) -> list[str]:
    failures = []
    for gate in gates:
        for i, kind in enumerate(views):
            gen = torch.Generator().manual_seed(seed + 17 * i)
            mk = lambda s, kd=kind, fn=None: strided(kd, s, gen, dtype, device, fn)  # noqa: E731
            q, k, v = mk((B, T, H_LIN, D)), mk((B, T, H_LIN, D)), mk((B, T, H_LIN, 2 * D))
            g = mk((B, T, H_LIN), fn=_log_gate) if gate == "g" else None
            g_gamma = torch.tensor([-0.1, -0.3], dtype=dtype, device=device) if gate == "g_gamma" else None
            shared = torch.Generator().manual_seed(17 * i)  # initial_state must be alike on every rank
            h0 = torch.randn(B, H_LIN, 2 * D, D, generator=shared, dtype=torch.float64).to(dtype=dtype, device=device) \
                .transpose(-1, -2)
            do = strided("sliced" if kind == "expanded" else kind, (B, T, H_LIN, 2 * D), gen, dtype, device)
            cd = torch.float64 if dtype == torch.float64 else torch.float32
            dfinal = torch.randn(B, H_LIN, 2 * D, D, generator=gen, dtype=torch.float64).to(dtype=cd, device=device) \
                .transpose(-1, -2)
            kw = dict(strategy=strategy, backend=backend, g_gamma=g_gamma, layout=layout, group=group)
            try:
                got = _run_linear(q, k, v, g, h0, do, dfinal, **kw)
                want = _run_linear(*map(_dense, (q, k, v, g, h0, do, dfinal)), **kw)
                _compare(got, want, TOL[dtype], f"{strategy}/{backend}/{kind}/gate={gate}")
            except Exception as e:
                failures.append(f"linear {strategy}/{backend}/{dtype}/{layout}/{kind}/gate={gate}: "
                                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return failures


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_linear_strided_views_one_process(backend):
    """World size 1: strided q, k, v, g, initial_state, do and final-state gradient, every gate kind, fp64."""
    failures = linear_errors("lasp2", backend, seed=5)
    assert not failures, "\n".join(failures)


@needs_triton
def test_linear_strided_views_triton():
    failures = linear_errors("lasp2", "triton", seed=6, dtype=torch.float32, device="cuda" if CUDA else "cpu",
                             views=("permuted", "expanded"), gates=("g",))
    assert not failures, "\n".join(failures)


def case_linear_strided(ctx) -> list[str]:
    return linear_errors("lasp2", "auto", seed=300 + ctx.rank, group=ctx.group, layout="zigzag") \
        + linear_errors("lasp1", "torch", seed=400 + ctx.rank, group=ctx.group, gates=("g",))


def test_linear_strided_views_two_ranks(pool):
    failures = sum(pool.run(case_linear_strided, 2), [])
    assert not failures, "\n".join(failures)
