"""Triton kernels (softmax attention block, chunked linear attention) against plain references.

On machines without CUDA the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1,
fp32 and fp16 only: the interpreter's bf16 arithmetic is broken). Triton reads TRITON_INTERPRET
when a function is *decorated*: for its own tl.* functions when triton is first imported, for
ours when the kernel module is imported. tests/conftest.py sets it before any test module is
imported; if triton or the kernels were imported without it anyway, the in-process cases skip and
``test_interpreter_subprocess`` reruns this file in a fresh interpreter process with the
variable set, so the suite works whatever order pytest imports modules in.
With CUDA the same cases run on the GPU, plus bf16 variants.

Tolerances (max abs error vs an fp64 reference on the same rounded inputs):
fp32 1e-4 (o, lse, grads; 5e-4 for linear attention), fp16 2e-2, bf16 (GPU) 6e-2 relative to
the tensor's scale.
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
import triton.language as tl  # noqa: E402
from aot_compile import check_compiles, compile_sm90  # noqa: E402

from seqpar.kernels import linear_triton  # noqa: E402
from seqpar.kernels import softmax_triton  # noqa: E402
from seqpar.kernels.softmax_triton import _band_tiles  # noqa: E402
from seqpar.kernels.linear import chunk_linear_attention  # noqa: E402
from seqpar.kernels.linear_reference import (  # noqa: E402
    chunk_linear_attention_backward_reference,
    linear_attention_recurrent_reference,
)
from seqpar.kernels.softmax import attention_block_forward, merge_partials_  # noqa: E402
from seqpar.kernels.triton_common import check_int32_offsets  # noqa: E402
from seqpar.kernels.softmax_reference import (  # noqa: E402
    attention_block_backward_reference,
    attention_block_forward_reference,
)


def _kernels_interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    # triton.language's own jit functions (tl.cdiv, ...) must be interpreted too: they were
    # decorated when triton was first imported, perhaps by another module before the variable was set
    return all(isinstance(f, InterpretedFunction)
               for f in (softmax_triton._attn_fwd, linear_triton._lin_fwd_h, triton.language.cdiv))


# In-process cases run on CUDA, or on CPU when the kernels were decorated for the interpreter.
IN_PROCESS = CUDA or (os.environ.get("TRITON_INTERPRET") == "1" and _kernels_interpreted())
DEVICE = "cuda" if CUDA else "cpu"
needs_kernels = pytest.mark.skipif(not IN_PROCESS, reason="kernel module imported without TRITON_INTERPRET; "
                                   "covered by test_interpreter_subprocess")

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16",
                 marks=pytest.mark.skipif(not CUDA, reason="bf16 needs a GPU (interpreter bf16 is broken)")),
]
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def test_interpreter_subprocess():
    """Rerun this file in a fresh process with TRITON_INTERPRET=1 when the in-process run can't."""
    if IN_PROCESS:
        pytest.skip("cases ran in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "not compile_for_sm90",
                          __file__],
                         env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]


def _close(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    got = got.double().cpu()
    ref = ref.double().cpu()
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    assert not torch.isnan(got).any(), f"{name}: NaN"
    scale = max(1.0, ref[torch.isfinite(ref)].abs().max().item() if torch.isfinite(ref).any() else 1.0)
    assert torch.equal(torch.isinf(got), torch.isinf(ref)), f"{name}: -inf pattern differs"
    assert torch.equal(got[torch.isinf(got)], ref[torch.isinf(ref)]), f"{name}: inf signs differ"
    err = (got - ref).masked_fill(torch.isinf(ref), 0).abs().max().item() if got.numel() else 0.0
    assert err <= tol * scale, f"{name}: max abs err {err:.3e} > {tol * scale:.3e}"


# --------------------------------------------------------------------------------------------
# ahead-of-time compilation for an H100 (sm_90), no GPU needed: catches what the interpreter
# cannot (dtype rules of tl.dot, layouts, register/shared-memory limits of the NVIDIA backend)
# --------------------------------------------------------------------------------------------

def _compile_main() -> None:
    """Compile every kernel for sm_90 with Triton's bundled ptxas (run in a process where the
    kernels were decorated for the JIT, not the interpreter)."""
    def build(fn, ptrs: dict, floats: tuple, consts: dict, num_warps: int, num_stages: int) -> None:
        compile_sm90(fn, ptrs, consts, num_warps, num_stages, floats)

    st, lt = softmax_triton, linear_triton
    # softmax variants: (dtype, head dim, HAS_MASK (upper/diagonal bound), HAS_WINDOW (lower bound), HAS_SOFTCAP)
    for dt, D, mask, window, softcap in (("bf16", 128, True, False, False), ("fp16", 64, False, False, False),
                                         ("fp32", 24, True, False, False), ("bf16", 128, True, True, True),
                                         ("fp32", 24, False, True, True)):
        prec = "ieee" if dt == "fp32" else "tf32"
        tiles = lambda bm, bn: {"BLOCK_M": 32, "BLOCK_N": 32} if dt == "fp32" else {"BLOCK_M": bm, "BLOCK_N": bn}  # noqa: E731
        c = dict(HEAD_DIM=D, HEAD_DV=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_DV=triton.next_power_of_2(D),
                 HAS_MASK=mask, HAS_WINDOW=window, HAS_SOFTCAP=softcap, UPCAST=False, PRECISION=prec)
        caps = ("cap_k", "cap_out")
        for acc in (False, True) if not (window or softcap) else (False,):  # the epilogue is orthogonal to both
            build(st._attn_fwd, {"_": dt, "O": "fp32", "LSE": "fp32"}, ("qk_scale", *caps),
                  {**c, "ACCUMULATE": acc, **tiles(128, 64)}, 8, 3)
        build(st._attn_bwd_dkdv, {"_": dt, "LSE": "fp32", "DELTA": "fp32", "DK": "fp32", "DV": "fp32"},
              ("qk_scale", "scale", *caps), {**c, **tiles(64, 64)}, 8, 3)
        build(st._attn_bwd_dq, {"_": dt, "LSE": "fp32", "DELTA": "fp32", "DQ": "fp32"},
              ("qk_scale", "scale", *caps), {**c, **tiles(128, 64)}, 8, 2)
    for dt, D, mask in (("bf16", 128, True), ("fp16", 64, False), ("fp32", 24, True)):
        prec = "ieee" if dt == "fp32" else "tf32"
        hs = "bf16" if dt == "bf16" else "fp32"
        lc = dict(DK=D, DV=D, BT=64, BK=min(64, triton.next_power_of_2(D)), BV=min(64, triton.next_power_of_2(D)),
                  UPCAST=False, PRECISION=prec, USE_G=mask)
        ph = {"PRECISION_H": "tf32" if hs == "fp32" and dt != "fp32" else prec}
        build(lt._lin_fwd_h, {"_": dt, "GC": "fp32", "H0": "fp32", "HS": hs, "HT": "fp32"}, (),
              {**lc, "USE_H0": True, "STORE_HT": True}, 8, 2)
        build(lt._lin_fwd_o, {"_": dt, "GC": "fp32", "HS": hs, "O": "fp32"}, ("scale",), {**lc, **ph}, 8, 2)
        build(lt._lin_bwd_dh, {"_": dt, "GC": "fp32", "DHT": "fp32", "DHS": hs, "DH0": "fp32"}, ("scale",),
              {**lc, "USE_DHT": True, "STORE_DH0": True}, 8, 2)
        build(lt._lin_bwd_dv, {"_": dt, "GC": "fp32", "DHS": hs, "DVo": "fp32"}, ("scale",), {**lc, **ph}, 8, 2)
        build(lt._lin_bwd_dqk, {"_": dt, "GC": "fp32", "HS": hs, "DHS": hs, "DQ": "fp32", "DKo": "fp32",
                                "DGP": "fp32"}, ("scale",), {**lc, **ph, "STORE_DG": mask}, 8, 2)
    print("compiled all kernels for sm_90")


def test_kernels_compile_for_sm90():
    """Every kernel compiles for an H100 (ahead of time, in a subprocess: no GPU needed)."""
    check_compiles("test_triton_kernels", "_compile_main", "compiled all kernels")


# --------------------------------------------------------------------------------------------
# softmax attention block
# --------------------------------------------------------------------------------------------

# (B, Tq, Tk, Hq, Hkv, D, diagonal_offset)
SOFTMAX_CASES = [
    (1, 63, 63, 2, 2, 32, None),     # no mask, odd T
    (1, 63, 63, 4, 2, 64, 0),        # causal, GQA 2
    (1, 37, 63, 2, 1, 32, -1),       # strictly causal, MQA, Tq != Tk
    (1, 37, 50, 2, 2, 24, 3),        # offset +3, head dim padded 24 -> 32
    (2, 45, 30, 4, 1, 32, -5),       # offset -5: first rows see nothing
    (1, 20, 30, 2, 2, 32, -25),      # every row fully masked
    (1, 40, 70, 2, 2, 32, 40),       # large offset: mostly full rows
    (1, 33, 47, 2, 1, 128, 0),       # head dim 128
    (1, 17, 17, 1, 1, 16, -1),       # head dim 16
]


def _softmax_inputs(case, dtype, strided: bool = False):
    B, Tq, Tk, Hq, Hkv, D, m = case
    g = torch.Generator().manual_seed(hash(case) % 2**31)
    if strided:  # slices of bigger tensors: q[:, a:b], k/v from one packed kv tensor
        q = torch.randn(B, Tq + 7, Hq, D, generator=g).to(DEVICE, dtype)[:, 3:3 + Tq]
        kv = torch.randn(B, Tk, 2, Hkv, D, generator=g).to(DEVICE, dtype)
        k, v = kv[:, :, 0], kv[:, :, 1]
    else:
        q = torch.randn(B, Tq, Hq, D, generator=g).to(DEVICE, dtype)
        k = torch.randn(B, Tk, Hkv, D, generator=g).to(DEVICE, dtype)
        v = torch.randn(B, Tk, Hkv, D, generator=g).to(DEVICE, dtype)
    do = torch.randn(B, Tq, Hq, D, generator=g).to(DEVICE, dtype)
    return q, k, v, do, D ** -0.5, m


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SOFTMAX_CASES, ids=[str(c) for c in SOFTMAX_CASES])
def test_softmax_forward_backward(case, dtype):
    q, k, v, do, scale, m = _softmax_inputs(case, dtype, strided=case[6] == 0)
    tol = TOL[dtype]
    o, lse = softmax_triton.attention_block_forward_triton(q, k, v, scale=scale, diagonal_offset=m)
    assert o.dtype == torch.float32 and lse.dtype == torch.float32
    ro, rlse = attention_block_forward_reference(q.double(), k.double(), v.double(), scale=scale, diagonal_offset=m)
    _close("o", o, ro, tol)
    _close("lse", lse, rlse, tol)
    delta = (ro * do.double()).sum(-1).transpose(1, 2)
    grads = softmax_triton.attention_block_backward_triton(do, q, k, v, rlse.float(), delta.float(),
                                                           scale=scale, diagonal_offset=m)
    ref = attention_block_backward_reference(do.double(), q.double(), k.double(), v.double(), rlse, delta,
                                             scale=scale, diagonal_offset=m)
    for name, gt, rf in zip(("dq", "dk", "dv"), grads, ref):
        assert gt.dtype == torch.float32
        _close(name, gt, rf, tol)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [SOFTMAX_CASES[1], SOFTMAX_CASES[4]], ids=["causal_gqa", "offset-5"])
def test_softmax_accumulate(case, dtype):
    q, k, v, _, scale, m = _softmax_inputs(case, dtype, strided=True)
    B, Tq, Tk, Hq, Hkv, D, _ = case
    g = torch.Generator().manual_seed(7)
    # running state as non-contiguous views of bigger buffers; some rows still at -inf
    o_buf = torch.randn(B, Hq, Tq, D + 3, generator=g).to(DEVICE)
    lse_buf = torch.randn(B, Tq, Hq, 2, generator=g).to(DEVICE)
    lse_buf[:, ::3, :, 0] = float("-inf")
    o_buf.transpose(1, 2)[:, ::3, :, :D] = 0.0
    o_acc, lse_acc = o_buf.transpose(1, 2)[..., :D], lse_buf[..., 0].transpose(1, 2)
    o_ref, lse_ref = o_acc.double().clone(), lse_acc.double().clone()
    ro, rlse = attention_block_forward_reference(q.double(), k.double(), v.double(), scale=scale, diagonal_offset=m)
    merge_partials_(o_ref, lse_ref, ro, rlse)
    softmax_triton.attention_block_accumulate_triton_(q, k, v, o_acc, lse_acc, scale=scale, diagonal_offset=m)
    _close("o_acc", o_acc, o_ref, TOL[dtype])
    _close("lse_acc", lse_acc, lse_ref, TOL[dtype])


@needs_kernels
def test_softmax_fp64_falls_back_and_bad_input():
    q = torch.randn(1, 5, 2, 16, dtype=torch.float64, device=DEVICE)
    o, lse = softmax_triton.attention_block_forward_triton(q, q, q, scale=0.25, diagonal_offset=0)
    ro, rlse = attention_block_forward_reference(q, q, q, scale=0.25, diagonal_offset=0)
    assert o.dtype == torch.float64 and torch.allclose(o, ro)
    with pytest.raises(ValueError, match="multiple"):
        softmax_triton.attention_block_forward_triton(q.float(), q[:, :, :1].float().expand(1, 5, 3, 16),
                                                      q[:, :, :1].float().expand(1, 5, 3, 16), scale=1.0)
    big = torch.empty(1, 2**20, 32, 128, device="meta")  # per-batch span > int32: refused, not wrapped
    with pytest.raises(ValueError, match="int32"):
        check_int32_offsets(q=big)
    with pytest.raises(ValueError, match="int32"):  # both host wrappers check before launching
        softmax_triton.attention_block_forward_triton(big, big, big, scale=1.0, diagonal_offset=0)
    with pytest.raises(ValueError, match="int32"):
        linear_triton.chunk_linear_attention_forward_triton(big, big, big)


@needs_kernels
def test_softmax_dispatcher_triton_backend():
    q, k, v, _, scale, m = _softmax_inputs(SOFTMAX_CASES[1], torch.float32)
    o, lse = attention_block_forward(q, k, v, scale=scale, diagonal_offset=m, backend="triton")
    ro, rlse = attention_block_forward_reference(q, k, v, scale=scale, diagonal_offset=m)
    _close("o", o, ro, 1e-4)
    _close("lse", lse, rlse, 1e-4)


# --------------------------------------------------------------------------------------------
# softmax attention block: band mask (diagonal_offset and window_offset) and logit softcap,
# against the token-level oracle of tests/mask_reference.py
# --------------------------------------------------------------------------------------------

def _band_oracle(q, k, v, do, scale, diag, win, cap):
    """fp64 (o, lse, delta = rowsum(o * do), [dq, dk, dv]) of the oracle, grads by autograd."""
    from mask_reference import band_mask, masked_attention  # tests/ is on sys.path under pytest only

    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    o, lse = masked_attention(*leaves, band_mask(q.shape[1], k.shape[1], diag, win), scale=scale, softcap=cap)
    (o * do.double()).sum().backward()
    delta = (o.detach() * do.double()).sum(-1).transpose(1, 2)
    return o.detach(), lse.detach(), delta, [x.grad for x in leaves]


def _shift(offset, h):
    """Block-local offset of the key block that starts at key h."""
    return None if offset is None else offset - h


# (B, Tq, Tk, Hq, Hkv, D, diagonal_offset, window_offset, softcap, (BLOCK_M, BLOCK_N) under the interpreter).
# Band width diag - win + 1. Softcap cases use scale 0.5 (scores ~ N(0, 2.8^2): the cap of 5 bites).
BAND_CASES = {
    "window_only": (1, 100, 100, 2, 2, 32, None, -20, None, (16, 16)),
    "window_only_positive_tq_lt_tk": (1, 63, 100, 2, 2, 32, None, 10, None, (16, 16)),
    "band_narrower_than_tile_gqa": (1, 100, 100, 2, 1, 32, 0, -20, None, (32, 32)),
    "band_wider_than_tile_gqa_tq_gt_tk": (1, 130, 100, 2, 1, 32, 10, -50, None, (16, 16)),
    "band_rows_masked_at_both_ends": (2, 100, 63, 2, 2, 16, -5, -20, None, (32, 16)),
    "softcap": (1, 63, 63, 2, 1, 32, None, None, 5.0, (32, 16)),
    "softcap_causal_offset": (1, 63, 50, 2, 2, 24, 3, None, 5.0, (16, 16)),
    "softcap_band_gqa": (1, 100, 100, 2, 1, 32, 0, -40, 5.0, (16, 16)),
}
BAND_PARAMS = ([pytest.param(c, torch.float32, id=f"{name}-fp32") for name, c in BAND_CASES.items()]
               + [pytest.param(BAND_CASES["softcap_band_gqa"], dt.values[0], id=f"softcap_band_gqa-{dt.id}",
                               marks=dt.marks) for dt in DTYPES[1:]])


def _band_inputs(case, dtype, monkeypatch):
    B, Tq, Tk, Hq, Hkv, D, diag, win, cap, (bm, bn) = case
    monkeypatch.setattr(softmax_triton, "_INTERPRET_BLOCKS", {"BLOCK_M": bm, "BLOCK_N": bn})
    q, k, v, do, scale, _ = _softmax_inputs((B, Tq, Tk, Hq, Hkv, D, diag), dtype, strided=win == -20)
    return q, k, v, do, (0.5 if cap is not None else scale), diag, win, cap


@needs_kernels
@pytest.mark.parametrize("case, dtype", BAND_PARAMS)
def test_softmax_band_softcap_forward_backward(case, dtype, monkeypatch):
    q, k, v, do, scale, diag, win, cap = _band_inputs(case, dtype, monkeypatch)
    kw = dict(scale=scale, diagonal_offset=diag, window_offset=win, softcap=cap)
    ro, rlse, delta, rgrads = _band_oracle(q, k, v, do, scale, diag, win, cap)
    o, lse = softmax_triton.attention_block_forward_triton(q, k, v, **kw)
    _close("o", o, ro, TOL[dtype])
    _close("lse", lse, rlse, TOL[dtype])  # includes the -inf pattern of rows that see nothing
    grads = softmax_triton.attention_block_backward_triton(do, q, k, v, rlse.float(), delta.float(), **kw)
    for name, got, ref in zip(("dq", "dk", "dv"), grads, rgrads):
        _close(name, got, ref, TOL[dtype])


@needs_kernels
@pytest.mark.parametrize("name", ["band_rows_masked_at_both_ends", "softcap_band_gqa"])
def test_softmax_band_softcap_split_keys(name, monkeypatch):
    """Two key blocks (split mid-band, off the tile grid) with shifted block-local offsets: the
    forward of the first merged with the fused accumulate of the second is the whole row; the
    backward of each with the row-global lse and delta sums (dq) / concatenates (dk, dv) to the
    whole one."""
    q, k, v, do, scale, diag, win, cap = _band_inputs(BAND_CASES[name], torch.float32, monkeypatch)
    h = k.shape[1] // 2 - 3
    blocks = [(k[:, :h], v[:, :h], diag, win), (k[:, h:], v[:, h:], _shift(diag, h), _shift(win, h))]
    ro, rlse, delta, rgrads = _band_oracle(q, k, v, do, scale, diag, win, cap)
    (k1, v1, d1, w1), (k2, v2, d2, w2) = blocks
    o_acc, lse_acc = softmax_triton.attention_block_forward_triton(q, k1, v1, scale=scale, diagonal_offset=d1,
                                                                   window_offset=w1, softcap=cap)
    softmax_triton.attention_block_accumulate_triton_(q, k2, v2, o_acc, lse_acc, scale=scale, diagonal_offset=d2,
                                                      window_offset=w2, softcap=cap)
    _close("o_acc", o_acc, ro, 1e-4)
    _close("lse_acc", lse_acc, rlse, 1e-4)
    parts = [softmax_triton.attention_block_backward_triton(do, q, kb, vb, rlse.float(), delta.float(), scale=scale,
                                                            diagonal_offset=db, window_offset=wb, softcap=cap)
             for kb, vb, db, wb in blocks]
    _close("dq", parts[0][0] + parts[1][0], rgrads[0], 1e-4)
    _close("dk", torch.cat([parts[0][1], parts[1][1]], 1), rgrads[1], 1e-4)
    _close("dv", torch.cat([parts[0][2], parts[1][2]], 1), rgrads[2], 1e-4)


@triton.jit
def _band_tiles_probe(ARGS, OUT, P, HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK: tl.constexpr, TAIL_FULL: tl.constexpr, BLOCK_P: tl.constexpr):
    """(lo, f_lo, f_hi, hi) of softmax_triton._band_tiles for P rows of (r0, N, lo_off, hi_off)."""
    offs = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    ok = offs < P
    r0 = tl.load(ARGS + offs * 4, mask=ok, other=0)
    nn = tl.load(ARGS + offs * 4 + 1, mask=ok, other=1)
    lo_off = tl.load(ARGS + offs * 4 + 2, mask=ok, other=0)
    hi_off = tl.load(ARGS + offs * 4 + 3, mask=ok, other=0)
    lo, f_lo, f_hi, hi = _band_tiles(r0, nn, lo_off, hi_off, HAS_LO, HAS_HI, BLOCK_R, BLOCK, TAIL_FULL)
    zero = offs * 0  # lo and f_lo are the constant 0 without a lower bound
    tl.store(OUT + offs * 4, lo + zero, mask=ok)
    tl.store(OUT + offs * 4 + 1, f_lo + zero, mask=ok)
    tl.store(OUT + offs * 4 + 2, f_hi + zero, mask=ok)
    tl.store(OUT + offs * 4 + 3, hi + zero, mask=ok)


@needs_kernels
def test_band_tiles_follow_the_band():
    """The loop bounds of all three kernels (forward and dQ: query rows over key tiles; dK/dV:
    key rows over query tiles) are exact for every row tile (its rows past the end included,
    as the kernels compute them): the visited tiles run from the tile of the first visible column
    to the last visible column (none when the rows see nothing), and the unmasked stage is
    exactly the tiles every row sees whole (inside the columns unless the caller bounds-checks
    them, as dK/dV does for query rows); everything else is masked."""
    from mask_reference import band_mask

    groups: dict = {}  # constexprs -> [(r0, N, lo_off, hi_off, visibility, block)]
    for Tq, Tk in ((100, 100), (63, 100), (130, 63), (40, 17), (1, 30), (30, 1)):
        for diag in (None, -3000, -140, -30, -5, 0, 3, 50, 200, 3000):  # +-3000: clamped by the host
            for win in (None, -3000, -200, -50, -20, -1, 0, 10, 80, 3000):
                if diag is not None and win is not None and win > diag:
                    continue  # empty band: the host launches nothing
                d, w, _, _, _ = softmax_triton._band(Tq, Tk, diag, win, None)  # the offsets the kernels get
                for bm, bn in ((16, 16), (32, 16), (16, 64)):
                    pq, pk = triton.cdiv(Tq, bm) * bm, triton.cdiv(Tk, bn) * bn  # row tiles padded
                    # forward / dQ: rows = queries, lower bound win, upper bound diag, keys not bounds-checked
                    # dK/dV: rows = keys, lower bound -diag, upper bound -win, query rows bounds-checked
                    fwd_vis, bwd_vis = band_mask(pq, Tk, diag, win), band_mask(Tq, pk, diag, win).T
                    for cols, lo_off, hi_off, has_lo, has_hi, br, bc, tail_full, vis in (
                            (Tk, w, d, win is not None, diag is not None, bm, bn, False, fwd_vis),
                            (Tq, -d, -w, diag is not None, win is not None, bn, bm, True, bwd_vis)):
                        key = (has_lo, has_hi, br, bc, tail_full)
                        for r0 in range(0, vis.shape[0], br):
                            groups.setdefault(key, []).append((r0, cols, lo_off, hi_off, vis[r0:r0 + br], bc))
    seen = dict(skipped=0, full=0, lower_edge=0, upper_edge=0)
    for (has_lo, has_hi, br, bc, tail_full), items in groups.items():
        args = torch.tensor([it[:4] for it in items], dtype=torch.int32, device=DEVICE)
        out = torch.zeros(len(items), 4, dtype=torch.int32, device=DEVICE)
        _band_tiles_probe[(triton.cdiv(len(items), 1024),)](args, out, len(items), has_lo, has_hi, br, bc,
                                                            tail_full, 1024)
        for (r0, cols, lo_off, hi_off, sub, block), (lo, f_lo, f_hi, hi) in zip(items, out.tolist()):
            any_col, all_col = sub.any(0), sub.all(0)
            where = any_col.nonzero().flatten().tolist()
            ctx = (r0, cols, lo_off, hi_off, has_lo, has_hi, br, block, tail_full, (lo, f_lo, f_hi, hi))
            assert lo <= f_lo <= f_hi <= hi, ctx
            assert all(x % block == 0 or x == hi for x in (lo, f_lo, f_hi)), ctx
            if where:
                assert (lo, hi) == (where[0] // block * block, where[-1] + 1), ctx
            else:
                assert lo == hi, ctx
            full = [c for c in range(0, cols, block)
                    if bool(all_col[c:c + block].all()) and (tail_full or c + block <= cols)]
            assert full == list(range(f_lo, f_hi, block)), (ctx, full)
            seen["skipped"] += lo > 0 or hi < cols
            seen["full"] += f_hi > f_lo
            seen["lower_edge"] += f_lo > lo
            seen["upper_edge"] += hi > f_hi
    assert min(seen.values()) > 50, seen


@needs_kernels
def test_softmax_band_softcap_fallback_and_bad_softcap():
    g = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(1, 20, 2, 16, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(4))
    kw = dict(scale=0.5, diagonal_offset=2, window_offset=-6, softcap=3.0)
    ro, rlse, delta, rgrads = _band_oracle(q, k, v, do, 0.5, 2, -6, 3.0)
    o, lse = softmax_triton.attention_block_forward_triton(q, k, v, **kw)  # float64: the reference
    assert o.dtype == torch.float64
    _close("o", o, ro, 1e-10)
    _close("lse", lse, rlse, 1e-10)
    for name, got, ref in zip(("dq", "dk", "dv"),
                              softmax_triton.attention_block_backward_triton(do, q, k, v, rlse, delta, **kw), rgrads):
        _close(name, got, ref, 1e-10)
    o_acc = torch.zeros(1, 20, 2, 16, dtype=torch.float64, device=DEVICE)
    lse_acc = torch.full((1, 2, 20), float("-inf"), dtype=torch.float64, device=DEVICE)
    softmax_triton.attention_block_accumulate_triton_(q, k, v, o_acc, lse_acc, **kw)
    _close("o_acc", o_acc, ro, 1e-10)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="softcap"):
            softmax_triton.attention_block_forward_triton(q.float(), k.float(), v.float(), scale=0.5, softcap=bad)
    # an empty band (lower bound above the upper one) launches nothing: o = 0, lse = -inf, zero grads
    o, lse = softmax_triton.attention_block_forward_triton(q.float(), k.float(), v.float(), scale=0.5,
                                                           diagonal_offset=-3, window_offset=-2)
    assert not o.any() and bool(torch.isneginf(lse).all())
    assert not any(t.any() for t in softmax_triton.attention_block_backward_triton(
        do.float(), q.float(), k.float(), v.float(), lse, lse.clone().zero_(), scale=0.5, diagonal_offset=-3,
        window_offset=-2))


# --------------------------------------------------------------------------------------------
# chunked linear attention
# --------------------------------------------------------------------------------------------

# (B, T, H, Dk, Dv, with initial_state and dht)
LINEAR_CASES = [
    (1, 130, 2, 24, 40, True),   # 3 chunks (last one partial), padded head dims, Dk != Dv
    (2, 63, 1, 32, 32, True),    # one partial chunk
    (1, 37, 2, 64, 32, False),   # no initial state / dht: dh0 None
]


def _linear_inputs(case, gate, dtype):
    B, T, H, Dk, Dv, with_states = case
    gen = torch.Generator().manual_seed(T * 31 + Dk)
    qkv = torch.randn(B, T, H, 2 * Dk + Dv, generator=gen)  # q, k, v as strided slices of one tensor
    q, k, v = (x.to(DEVICE, dtype) for x in qkv.split([Dk, Dk, Dv], dim=-1))
    g = (torch.nn.functional.logsigmoid(torch.randn(B, T, H, generator=gen) + 2.0) * 0.5).to(DEVICE) if gate == "g" else None
    g_gamma = (-0.2 * torch.rand(H, generator=gen)).to(DEVICE) if gate == "gamma" else None
    h0 = torch.randn(B, H, Dk, Dv, generator=gen).to(DEVICE) if with_states else None
    dht = torch.randn(B, H, Dk, Dv, generator=gen).to(DEVICE) if with_states else None
    do = torch.randn(B, T, H, Dv, generator=gen).to(DEVICE, dtype)
    return q, k, v, g, g_gamma, h0, dht, do


def _f64(x):
    return None if x is None else x.detach().double().cpu()


def _recurrent_autograd(q, k, v, g, g_gamma, h0, dht, do):
    """fp64 token-by-token oracle and its autograd gradients."""
    leaves = [x.requires_grad_() if x is not None else None for x in (_f64(q), _f64(k), _f64(v), _f64(g), _f64(h0))]
    qd, kd, vd, gd, h0d = leaves
    o, final = linear_attention_recurrent_reference(qd, kd, vd, g=gd, g_gamma=_f64(g_gamma), initial_state=h0d,
                                                    output_final_state=True)
    loss = (o * _f64(do)).sum() + ((final * _f64(dht)).sum() if dht is not None else 0.0)
    wrt = [x for x in leaves if x is not None]
    grads = iter(torch.autograd.grad(loss, wrt))
    full = [next(grads) if x is not None else None for x in leaves]
    return o.detach(), final.detach(), full


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gate", [None, "g", "gamma"])
@pytest.mark.parametrize("case", LINEAR_CASES, ids=[str(c) for c in LINEAR_CASES])
def test_linear_forward_backward(case, gate, dtype):
    q, k, v, g, g_gamma, h0, dht, do = _linear_inputs(case, gate, dtype)
    tol = 5e-4 if dtype == torch.float32 else TOL[dtype]
    o, final = linear_triton.chunk_linear_attention_forward_triton(q, k, v, g=g, g_gamma=g_gamma, initial_state=h0,
                                                                   output_final_state=True)
    assert o.dtype == torch.float32 and final.dtype == torch.float32
    ro, rfinal, rgrads = _recurrent_autograd(q, k, v, g, g_gamma, h0, dht, do)
    _close("o", o, ro, tol)
    _close("final_state", final, rfinal, tol)
    dq, dk, dv, dg, dh0 = linear_triton.chunk_linear_attention_backward_triton(
        do, q, k, v, g=g, g_gamma=g_gamma, initial_state=h0, dht=dht)
    assert (dg is None) == (g is None) and (dh0 is None) == (h0 is None)
    chunked = chunk_linear_attention_backward_reference(_f64(do), _f64(q), _f64(k), _f64(v), g=_f64(g),
                                                        g_gamma=_f64(g_gamma), initial_state=_f64(h0), dht=_f64(dht))
    for name, got, auto, ref in zip(("dq", "dk", "dv", "dg", "dh0"), (dq, dk, dv, dg, dh0), rgrads, chunked):
        if got is None:
            continue
        _close(name + " vs autograd", got, auto, tol)
        _close(name + " vs chunked reference", got, ref, tol)


@needs_kernels
def test_linear_dispatcher_autograd_triton_backend():
    q, k, v, g, _, h0, dht, do = _linear_inputs(LINEAR_CASES[1], "g", torch.float32)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g, h0)]
    o, final = chunk_linear_attention(*leaves[:3], g=leaves[3], initial_state=leaves[4], output_final_state=True,
                                      backend="triton")
    ((o * do).sum() + (final * dht).sum()).backward()
    ro, rfinal, rgrads = _recurrent_autograd(q, k, v, g, None, h0, dht, do)
    _close("o", o.detach(), ro, 5e-4)
    for name, x, r in zip(("dq", "dk", "dv", "dg", "dh0"), leaves, rgrads):
        _close(name, x.grad, r, 5e-4)


# --------------------------------------------------------------------------------------------
# GPU only: realistic sizes, so the autotuned (large) tiles see many blocks, tails and bands
# --------------------------------------------------------------------------------------------

gpu_only = pytest.mark.skipif(not CUDA, reason="needs a GPU")


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [(2, 1000, 1000, 8, 2, 128, 0), (1, 777, 1531, 4, 4, 64, 754),
                                  (1, 1024, 1024, 4, 1, 128, None), (1, 513, 700, 2, 2, 128, -1)],
                         ids=["causal_gqa", "offset", "full_mqa", "strict"])
def test_softmax_gpu_sizes(case, dtype):
    q, k, v, do, scale, m = _softmax_inputs(case, dtype)
    o, lse = softmax_triton.attention_block_forward_triton(q, k, v, scale=scale, diagonal_offset=m)
    ro, rlse = attention_block_forward_reference(q.float(), k.float(), v.float(), scale=scale, diagonal_offset=m)
    _close("o", o, ro, TOL[dtype])
    _close("lse", lse, rlse, TOL[dtype])
    delta = (ro * do.float()).sum(-1).transpose(1, 2).contiguous()
    grads = softmax_triton.attention_block_backward_triton(do, q, k, v, rlse, delta, scale=scale, diagonal_offset=m)
    ref = attention_block_backward_reference(do.float(), q.float(), k.float(), v.float(), rlse, delta,
                                             scale=scale, diagonal_offset=m)
    for name, gt, rf in zip(("dq", "dk", "dv"), grads, ref):
        _close(name, gt, rf, TOL[dtype])


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", [(2, 1000, 1000, 8, 2, 128, 0, -255, None), (1, 777, 1531, 4, 4, 64, 754, 500, 30.0),
                                  (1, 1024, 1024, 4, 1, 128, None, None, 30.0),
                                  (1, 513, 700, 2, 2, 128, None, -100, None)],
                         ids=["sliding_window_gqa", "band_softcap", "softcap_mqa", "window_only"])
def test_softmax_band_softcap_gpu_sizes(case, dtype):
    B, Tq, Tk, Hq, Hkv, D, diag, win, cap = case
    q, k, v, do, scale, _ = _softmax_inputs((B, Tq, Tk, Hq, Hkv, D, diag), dtype)
    kw = dict(scale=scale, diagonal_offset=diag, window_offset=win, softcap=cap)
    ro, rlse, delta, rgrads = _band_oracle(q, k, v, do, scale, diag, win, cap)
    o, lse = softmax_triton.attention_block_forward_triton(q, k, v, **kw)
    _close("o", o, ro, TOL[dtype])
    _close("lse", lse, rlse, TOL[dtype])
    grads = softmax_triton.attention_block_backward_triton(do, q, k, v, rlse.float(), delta.float(), **kw)
    for name, got, ref in zip(("dq", "dk", "dv"), grads, rgrads):
        _close(name, got, ref, TOL[dtype])


@gpu_only
@pytest.mark.parametrize("gate", [None, "g", "gamma"])
def test_linear_gpu_sizes(gate):
    case = (2, 1000, 4, 128, 128, True)
    q, k, v, g, g_gamma, h0, dht, do = _linear_inputs(case, gate, torch.bfloat16)
    k = k * 128 ** -0.5
    o, final = linear_triton.chunk_linear_attention_forward_triton(q, k, v, g=g, g_gamma=g_gamma, initial_state=h0,
                                                                   output_final_state=True)
    f = lambda x: None if x is None else x.float()  # noqa: E731
    from seqpar.kernels.linear_reference import chunk_linear_attention_forward_reference

    ro, rfinal = chunk_linear_attention_forward_reference(f(q), f(k), f(v), g=g, g_gamma=g_gamma, initial_state=h0,
                                                          output_final_state=True)
    _close("o", o, ro, TOL[torch.bfloat16])
    _close("final_state", final, rfinal, TOL[torch.bfloat16])
    got = linear_triton.chunk_linear_attention_backward_triton(do, q, k, v, g=g, g_gamma=g_gamma, initial_state=h0,
                                                               dht=dht)
    ref = chunk_linear_attention_backward_reference(f(do), f(q), f(k), f(v), g=g, g_gamma=g_gamma, initial_state=h0,
                                                    dht=dht)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dh0"), got, ref):
        if b is not None:
            _close(name, a, b, TOL[torch.bfloat16])
