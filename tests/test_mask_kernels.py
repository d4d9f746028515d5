"""Block kernels with a window (``window_offset``, a lower bound on the visible keys) and logit
soft-capping (``softcap``), against the dense fp64 oracle of tests/mask_reference.py.

Backends "torch" (the reference) and "sdpa" (CPU: windowed blocks through the fused op with an
additive mask; softcap blocks fall back to the reference) through the dispatcher: forward (o and
lse, -inf rows included), backward (fed the oracle's lse and delta = rowsum(o * do); with delta,
with ``out`` instead, and per call via ``prepare_backward`` over a 2 x 2 split of the block as the
driver makes it, with and without an lse gradient), the in-place accumulate (two key halves merge
into the whole), the sdpa sub-block cut and its version check, and bad arguments.

Tolerances: fp64 inputs 1e-10, fp32 inputs 2e-5 (the oracle is fp64 on the fp32-rounded inputs).
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from mask_reference import band_mask, masked_attention
from seqpar.kernels import attention_block_accumulate_, attention_block_backward, attention_block_forward
from seqpar.kernels import softmax_sdpa
from seqpar.kernels.softmax import block_backend, check_mask_args, prepare_backward
from seqpar.kernels.softmax_sdpa import (
    _additive_mask,
    _band_extent,
    attention_block_backward_sdpa,
    attention_block_forward_sdpa,
    fused_mask_problem,
    fused_ops_problem,
    sdpa_supports,
)

F64, F32 = torch.float64, torch.float32
TOL = {F64: 1e-10, F32: 2e-5}
BACKENDS = ("torch", "sdpa")

# (Tq, Tk, diagonal_offset, window_offset, softcap, (Hq, Hkv), dtype)
CASES = [
    (63, 63, None, -5, None, (4, 2), F64),      # window only
    (100, 7, None, -50, None, (4, 4), F32),     # window only; rows 57.. see nothing
    (7, 100, None, 40, None, (4, 2), F64),      # window only, positive: keys 0..39 never seen
    (100, 100, 2, -2, None, (4, 2), F64),       # band (5 keys) much narrower than the block
    (63, 100, 40, 10, None, (4, 2), F32),       # band, both offsets positive
    (100, 63, -3, -30, None, (4, 4), F64),      # band, both negative: rows 0..2 see nothing
    (7, 7, 0, 0, None, (4, 2), F32),            # band of width 1 (the diagonal)
    (1, 63, 10, 5, None, (4, 2), F64),          # one query
    (1, 1, 0, -1, None, (4, 4), F64),
    (7, 63, 3, 5, None, (4, 2), F64),           # window above the diagonal: nothing visible
    (7, 7, -20, -30, None, (4, 2), F32),        # band outside the block: nothing visible
    (63, 100, -1, None, None, (4, 2), F64),     # no window (unchanged path)
    (7, 63, None, None, None, (4, 4), F32),
    (63, 63, None, None, 5.0, (4, 2), F64),     # softcap alone
    (100, 63, 0, None, 5.0, (4, 4), F32),       # softcap + causal
    (63, 100, 30, 0, 5.0, (4, 2), F32),         # softcap + band
    (100, 100, 2, -2, 5.0, (4, 2), F64),        # softcap + narrow band
    (7, 63, -3, -40, 5.0, (4, 2), F64),         # softcap + band with empty rows
]


def _case_id(case) -> str:
    tq, tk, m, w, cap, (hq, hkv), dtype = case
    return f"{tq}x{tk}-m{m}-w{w}-cap{cap}-h{hq}.{hkv}-{str(dtype)[6:]}"


def _inputs(tq: int, tk: int, hq: int, hkv: int, dtype: torch.dtype, seed: int, d: int = 16):
    g = torch.Generator().manual_seed(seed)
    q, do = (torch.randn(2, tq, hq, d, generator=g, dtype=F64).to(dtype) for _ in range(2))
    k, v = (torch.randn(2, tk, hkv, d, generator=g, dtype=F64).to(dtype) for _ in range(2))
    return q, k, v, do


def _oracle(q, k, v, do, m, w, cap, scale, dlse=None):
    """fp64 (o, lse, dq, dk, dv) of the loss sum(o * do) (+ sum(lse * dlse))."""
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    o, lse = masked_attention(*leaves, band_mask(q.shape[1], k.shape[1], m, w), scale=scale, softcap=cap)
    loss = (o * do.double()).sum()
    if dlse is not None:
        loss = loss + (torch.nan_to_num(lse, neginf=0.0) * dlse.double()).sum()
    grads = torch.autograd.grad(loss, leaves)
    return (o.detach(), lse.detach()) + grads


def _close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    assert a.shape == b.shape, (what, a.shape, b.shape)
    a, b = a.double(), b.double()
    assert torch.equal(torch.isneginf(a), torch.isneginf(b)), f"{what}: -inf rows differ"
    assert torch.isfinite(torch.nan_to_num(a, neginf=0.0)).all(), f"{what}: not finite"
    err = (torch.nan_to_num(a, neginf=0.0) - torch.nan_to_num(b, neginf=0.0)).abs().max().item() if a.numel() else 0.0
    assert err <= tol, f"{what}: max error {err:.3e} > {tol:.0e}"


def _delta(o, do, dtype):
    return (o.to(dtype) * do.to(dtype)).sum(-1).transpose(1, 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_block_matches_oracle(case, backend):
    tq, tk, m, w, cap, (hq, hkv), dtype = case
    tol, scale = TOL[dtype], 0.25
    q, k, v, do = _inputs(tq, tk, hq, hkv, dtype, seed=tq * 7 + tk)
    o_ref, lse_ref, *grads_ref = _oracle(q, k, v, do, m, w, cap, scale)
    kw = dict(scale=scale, diagonal_offset=m, window_offset=w, softcap=cap, backend=backend)
    if backend == "sdpa":  # the fused op takes windows on CPU, never a softcap
        assert block_backend(backend, q, k, v, m, window_offset=w, softcap=cap) == ("torch" if cap else "sdpa")

    o, lse = attention_block_forward(q, k, v, **kw)
    assert o.dtype == lse.dtype == dtype
    _close(o, o_ref, tol, "o")
    _close(lse, lse_ref, tol, "lse")

    lse_in, delta = lse_ref.to(dtype), _delta(o_ref, do, dtype)
    for how, got in (("delta", attention_block_backward(do, q, k, v, lse_in, delta, **kw)),
                     ("out", attention_block_backward(do, q, k, v, lse_in, None, out=o_ref.to(dtype), **kw))):
        for name, a, b in zip(("dq", "dk", "dv"), got, grads_ref):
            assert a.dtype == dtype, (how, name, a.dtype)
            _close(a, b, tol, f"{how} {name}")


def _split_blocks(tq: int, tk: int, m, w):
    """A 2 x 2 split of the block as the driver makes it: (rows, keys, m, w) with block-local offsets."""
    r, s = tq // 2, tk // 3
    for rows in (slice(0, r), slice(r, tq)):
        for keys in (slice(0, s), slice(s, tk)):
            shift = rows.start - keys.start  # j <= i + m  <=>  j_loc <= i_loc + m + rows.start - keys.start
            yield rows, keys, None if m is None else m + shift, None if w is None else w + shift


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lse_grad", [False, True])
@pytest.mark.parametrize("case", [
    (63, 100, 40, 10, None, (4, 2), F64),
    (100, 63, 0, -30, 5.0, (4, 2), F64),
    (63, 63, None, -5, None, (4, 4), F32),
    (7, 63, -3, -40, 5.0, (4, 2), F32),
], ids=_case_id)
def test_prepare_backward_over_split_blocks(case, lse_grad, backend):
    """The driver's way: prepare_backward once (out = o without an lse gradient, delta only with
    one), then one attention_block_backward per block of a 2 x 2 split; windowed fused blocks and
    softcap blocks that fall back (delta from ``out``) in the same call."""
    tq, tk, m, w, cap, (hq, hkv), dtype = case
    tol, scale = TOL[dtype], 0.3
    q, k, v, do = _inputs(tq, tk, hq, hkv, dtype, seed=3)
    dlse = torch.randn(2, hq, tq, generator=torch.Generator().manual_seed(4), dtype=F64) if lse_grad else None
    o_ref, lse_ref, *grads_ref = _oracle(q, k, v, do, m, w, cap, scale, dlse)
    if lse_grad:
        delta = _delta(o_ref, do, dtype) - dlse.to(dtype)
        ops = prepare_backward(do, delta, backend=backend)
    else:
        ops = prepare_backward(do, None, out=o_ref.to(dtype), backend=backend)
    assert ops.backend == backend
    lse_in = lse_ref.to(dtype)
    dq, dk, dv = (torch.zeros(x.shape, dtype=dtype) for x in (q, k, v))
    for rows, keys, mb, wb in _split_blocks(tq, tk, m, w):
        got = attention_block_backward(
            ops.do[:, rows], q[:, rows], k[:, keys], v[:, keys], lse_in[:, :, rows],
            None if ops.delta is None else ops.delta[:, :, rows], scale=scale, diagonal_offset=mb,
            window_offset=wb, softcap=cap, backend=ops.backend, out=None if ops.out is None else ops.out[:, rows])
        dq[:, rows] += got[0]
        dk[:, keys] += got[1]
        dv[:, keys] += got[2]
    for name, a, b in zip(("dq", "dk", "dv"), (dq, dk, dv), grads_ref):
        _close(a, b, tol, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [
    (100, 100, 2, -2, None, (4, 2), F64),
    (63, 100, 30, 0, 5.0, (4, 2), F32),
    (100, 7, None, -50, None, (4, 4), F64),
], ids=_case_id)
def test_accumulate_two_key_halves(case, backend):
    tq, tk, m, w, cap, (hq, hkv), dtype = case
    q, k, v, _ = _inputs(tq, tk, hq, hkv, dtype, seed=11)
    o_ref, lse_ref = masked_attention(q, k, v, band_mask(tq, tk, m, w), scale=0.25, softcap=cap)
    o = torch.zeros(2, tq, hq, v.shape[-1], dtype=dtype)
    lse = torch.full((2, hq, tq), float("-inf"), dtype=dtype)
    s = tk // 2
    for keys in (slice(0, s), slice(s, tk)):
        shift = -keys.start
        attention_block_accumulate_(q, k[:, keys], v[:, keys], o, lse, scale=0.25,
                                    diagonal_offset=None if m is None else m + shift,
                                    window_offset=None if w is None else w + shift, softcap=cap, backend=backend)
    _close(o, o_ref, TOL[dtype], "o")
    _close(lse, lse_ref, TOL[dtype], "lse")


def test_band_extent_is_exact():
    """The sdpa sub-block: rows outside it see nothing, keys outside it are never seen, every row
    inside sees a key, and the re-based offsets give the same band inside (None: no bound there)."""
    for tq, tk in [(1, 1), (5, 9), (9, 5), (8, 8)]:
        for m in [None, -10, -3, 0, 2, 8, 30]:
            for w in [None, -12, -4, -1, 0, 3, 9]:
                want = band_mask(tq, tk, m, w)
                extent = _band_extent(tq, tk, m, w)
                if extent is None:
                    assert not want.any(), (tq, tk, m, w)
                    continue
                qs, qe, ks, ke, mb, wb = extent
                got = torch.zeros(tq, tk, dtype=torch.bool)
                got[qs:qe, ks:ke] = band_mask(qe - qs, ke - ks, mb, wb)
                assert torch.equal(got, want), (tq, tk, m, w)
                assert got[qs:qe].any(dim=1).all(), (tq, tk, m, w)


def test_sdpa_choice_and_direct_fallbacks():
    q, k, v, do = _inputs(12, 20, 4, 2, F64, seed=5)
    assert sdpa_supports(q, k, 3, v, window_offset=-4)
    assert sdpa_supports(q, k, None, v, window_offset=2)
    assert not sdpa_supports(q, k, 3, v, softcap=5.0)
    assert not sdpa_supports(q, k, None, v, window_offset=-4, softcap=30.0)
    assert block_backend("auto", q, k, v, 0, window_offset=-3) == "sdpa"
    assert block_backend("auto", q, k, v, 0, softcap=2.0) == "torch"
    assert not softmax_sdpa._mask_supported("cuda", -3, None)  # the CUDA flash op takes no mask
    assert softmax_sdpa._mask_supported("cuda", None, None)
    assert fused_mask_problem("cpu") is None, fused_mask_problem("cpu")
    # small masks are shared, read-only, in the compute dtype, -inf where hidden
    mask = _additive_mask(5, 9, 2, -1, F32, q.device)
    assert mask is _additive_mask(5, 9, 2, -1, F32, q.device) and mask.dtype == F32 and mask.shape == (1, 1, 5, 9)
    assert torch.equal(torch.isneginf(mask[0, 0]), ~band_mask(5, 9, 2, -1))
    # called directly, the sdpa functions run a softcap block on the reference (delta from out too)
    o_ref, lse_ref, *grads_ref = _oracle(q, k, v, do, 4, -6, 5.0, 0.3)
    o, lse = attention_block_forward_sdpa(q, k, v, scale=0.3, diagonal_offset=4, window_offset=-6, softcap=5.0)
    _close(o, o_ref, 1e-10, "o")
    _close(lse, lse_ref, 1e-10, "lse")
    got = attention_block_backward_sdpa(do, q, k, v, lse_ref, None, scale=0.3, diagonal_offset=4, out=o_ref,
                                        window_offset=-6, softcap=5.0)
    for name, a, b in zip(("dq", "dk", "dv"), got, grads_ref):
        _close(a, b, 1e-10, name)


def test_missing_mask_keyword_falls_back(monkeypatch):
    """A torch whose CPU op has no attn_mask (simulated): one RuntimeWarning, windowed blocks run on
    the reference (exact), unwindowed blocks stay on the fused op."""
    original = softmax_sdpa._op_schema

    def fake_schema(name):
        schema = original(name)
        text = str(schema).replace(", Tensor? attn_mask=None", "")
        return torch._C.parse_schema(text)

    monkeypatch.setattr(softmax_sdpa, "_op_schema", fake_schema)
    monkeypatch.setattr(softmax_sdpa, "_FUSED_OPS_OK", {})
    monkeypatch.setattr(softmax_sdpa, "_FUSED_MASK_OK", {})
    assert fused_ops_problem("cpu") is None
    assert "attn_mask" in fused_mask_problem("cpu")
    q, k, v, do = _inputs(20, 20, 4, 2, F64, seed=6)
    with pytest.warns(RuntimeWarning, match="windowed attention blocks do not use the 'sdpa' backend"):
        o, lse = attention_block_forward(q, k, v, scale=0.3, diagonal_offset=0, window_offset=-5, backend="sdpa")
    o_ref, lse_ref, *grads_ref = _oracle(q, k, v, do, 0, -5, None, 0.3)
    _close(o, o_ref, 1e-10, "o")
    _close(lse, lse_ref, 1e-10, "lse")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        assert block_backend("sdpa", q, k, v, 0, window_offset=-5) == "torch"
        assert block_backend("sdpa", q, k, v, 0) == "sdpa"
        got = attention_block_backward(do, q, k, v, lse_ref, None, out=o_ref, scale=0.3, diagonal_offset=0,
                                       window_offset=-5, backend="sdpa")
    for name, a, b in zip(("dq", "dk", "dv"), got, grads_ref):
        _close(a, b, 1e-10, name)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(softcap=0.0), ValueError, r"softcap must be a finite number > 0 .*got 0\.0"),
    (dict(softcap=-1.5), ValueError, r"got -1\.5"),
    (dict(softcap=float("nan")), ValueError, r"got nan"),
    (dict(softcap=math.inf), ValueError, r"got inf"),
    (dict(softcap="5"), TypeError, r"softcap must be a float or None, got str"),
    (dict(softcap=True), TypeError, r"softcap must be a float or None, got bool"),
    (dict(window_offset=True), TypeError, r"window_offset must be an int or None, got bool"),
    (dict(window_offset=1.0), TypeError, r"window_offset must be an int or None, got float"),
    (dict(diagonal_offset=False), TypeError, r"diagonal_offset must be an int or None, got bool"),
])
def test_bad_mask_arguments(kwargs, error, match):
    q, k, v, do = _inputs(4, 4, 2, 2, F32, seed=0)
    kw = dict(scale=0.5, **kwargs)
    lse, delta = torch.zeros(2, 2, 4), torch.zeros(2, 2, 4)
    for backend in BACKENDS:
        with pytest.raises(error, match=match):
            attention_block_forward(q, k, v, backend=backend, **kw)
        with pytest.raises(error, match=match):
            attention_block_backward(do, q, k, v, lse, delta, backend=backend, **kw)
        with pytest.raises(error, match=match):
            attention_block_accumulate_(q, k, v, torch.zeros(2, 4, 2, 16), lse.clone(), backend=backend, **kw)
    with pytest.raises(error, match=match):
        check_mask_args(kwargs.get("diagonal_offset"), kwargs.get("window_offset"), kwargs.get("softcap"))
    assert check_mask_args(3, -2, 5) == (3, -2, 5.0)
