"""The fused-SDPA softmax block backend ("sdpa") against the plain PyTorch reference (CPU).

Tolerances: fp64 inputs 1e-12 (both sides are fp64; differences are summation order), fp32
inputs 1e-5 absolute on O(1) values. The CUDA path of the backend has never run (no GPU here);
its test skips without CUDA. Also: the backward with a given ``out`` and the once-per-call
``prepare_backward`` (host synchronisations counted), and the version check of the private
fused ops (the installed torch passes; simulated mismatches warn once and fall back).
"""
from __future__ import annotations

import pytest
import torch

import seqpar
from seqpar.kernels import (
    attention_block_accumulate_,
    attention_block_backward,
    attention_block_forward,
    attention_reference,
)
from seqpar.kernels.softmax import block_backend, merge_partials_, resolve_backend
from seqpar.kernels.softmax_reference import attention_block_backward_reference, attention_block_forward_reference
from seqpar.kernels import softmax_sdpa
from seqpar.kernels.softmax import prepare_backward
from seqpar.kernels.softmax_sdpa import (
    _out_for_delta,
    _pieces,
    attention_block_backward_sdpa,
    attention_block_forward_sdpa,
    fused_ops_problem,
    sdpa_supports,
)

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
OFFSETS = [None, 0, -1, 3, -5, 20]


def _inputs(tq: int, tk: int, hq: int, hkv: int, dtype: torch.dtype, seed: int, d: int = 16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, tq, hq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(2, tk, hkv, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(2, tk, hkv, d, generator=g, dtype=torch.float64).to(dtype)
    do = torch.randn(2, tq, hq, d, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v, do


def _close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    assert a.dtype == b.dtype, (what, a.dtype, b.dtype)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    assert torch.equal(torch.isinf(a), torch.isinf(b)), what
    fa, fb = torch.nan_to_num(a, neginf=0.0), torch.nan_to_num(b, neginf=0.0)
    err = (fa - fb).abs().max().item() if a.numel() else 0.0
    assert err <= tol, f"{what}: max error {err:.3e} > {tol:.0e}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("lengths", [(24, 24), (16, 40), (40, 16)])
def test_forward_backward_match_reference(dtype, heads, offset, lengths):
    hq, hkv = heads
    tq, tk = lengths
    q, k, v, do = _inputs(tq, tk, hq, hkv, dtype, seed=97 * hkv + 13 * tq + tk + (offset or 0))
    assert sdpa_supports(q, k, offset, v)
    tol, scale = TOL[dtype], 0.3
    o, lse = attention_block_forward_sdpa(q, k, v, scale=scale, diagonal_offset=offset)
    o_ref, lse_ref = attention_block_forward_reference(q, k, v, scale=scale, diagonal_offset=offset)
    _close(o, o_ref, tol, "o")
    _close(lse, lse_ref, tol, "lse")
    # a block on its own: delta from its own output (lse gradient folded in on half the rows)
    delta = (o_ref * do.to(o_ref.dtype)).sum(-1).transpose(1, 2)
    delta[:, :, ::2] -= 0.25
    grads = attention_block_backward_sdpa(do, q, k, v, lse_ref, delta, scale=scale, diagonal_offset=offset)
    grads_ref = attention_block_backward_reference(do, q, k, v, lse_ref, delta, scale=scale, diagonal_offset=offset)
    for name, a, b in zip(("dq", "dk", "dv"), grads, grads_ref):
        _close(a, b, tol * 10, name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("offset", [None, 0, -1, 7])
def test_block_of_a_larger_row(dtype, offset):
    """Rows see two key blocks; the backward of block 2 must use the merged (global) lse and delta."""
    q, k1, v1, do = _inputs(32, 32, 4, 2, dtype, seed=7)
    _, k2, v2, _ = _inputs(32, 20, 4, 2, dtype, seed=8)
    scale, tol = 0.25, TOL[dtype]
    o, lse = attention_block_forward_reference(q, k1, v1, scale=scale)  # block 1: earlier keys, no mask
    attention_block_accumulate_(q, k2, v2, o, lse, scale=scale, diagonal_offset=offset, backend="sdpa")
    o_ref, lse_ref = attention_block_forward_reference(q, k1, v1, scale=scale)
    merge_partials_(o_ref, lse_ref, *attention_block_forward_reference(q, k2, v2, scale=scale, diagonal_offset=offset))
    _close(o, o_ref, tol, "merged o")
    _close(lse, lse_ref, tol, "merged lse")
    delta = (o_ref * do.to(o_ref.dtype)).sum(-1).transpose(1, 2)
    for kb, vb, m in ((k1, v1, None), (k2, v2, offset)):
        got = attention_block_backward(do, q, kb, vb, lse_ref, delta, scale=scale, diagonal_offset=m, backend="sdpa")
        ref = attention_block_backward_reference(do, q, kb, vb, lse_ref, delta, scale=scale, diagonal_offset=m)
        for name, a, b in zip(("dq", "dk", "dv"), got, ref):
            _close(a, b, tol * 10, name)
    # and the sum over both blocks is the gradient of the whole row (autograd of the full softmax)
    qa, ka, va = (x.to(torch.float64).requires_grad_() for x in (q, torch.cat([k1, k2], 1), torch.cat([v1, v2], 1)))
    m_full = None if offset is None else offset + k1.shape[1]
    o_full, _ = attention_block_forward_reference(qa, ka, va, scale=scale, diagonal_offset=m_full)
    o_full.backward(do.to(torch.float64))
    dq = sum(attention_block_backward(do, q, kb, vb, lse_ref, delta, scale=scale, diagonal_offset=m,
                                      backend="sdpa")[0] for kb, vb, m in ((k1, v1, None), (k2, v2, offset)))
    _close(dq.to(torch.float64), qa.grad, tol * 100, "dq of the row")


def test_out_for_delta():
    """The backward's reconstructed ``out`` reproduces the given delta (the fused op's D)."""
    _, _, _, do = _inputs(16, 16, 4, 4, torch.float64, seed=11)
    do[0, 3] = 0.0  # rows with do = 0 and delta = 0 are fine
    delta = torch.randn(2, 4, 16, dtype=torch.float64)
    delta[0, :, 3] = 0.0
    out = _out_for_delta(do, delta)
    _close((out * do).sum(-1).transpose(1, 2), delta, 1e-14, "rowsum(out * do)")
    delta[0, 1, 3] = 1.0  # do = 0 but delta != 0: no such out, the backend falls back
    assert _out_for_delta(do, delta) is None


def test_rows_without_keys_and_lse_only_gradient():
    """-inf rows give (0, -inf) and zero grads; do = 0 with delta != 0 (loss on lse only) is exact."""
    q, k, v, do = _inputs(12, 12, 2, 2, torch.float64, seed=3)
    o, lse = attention_block_forward_sdpa(q, k, v, scale=0.5, diagonal_offset=-4)
    assert torch.all(o[:, :4] == 0) and torch.all(torch.isneginf(lse[:, :, :4]))
    _close(o, attention_block_forward_reference(q, k, v, scale=0.5, diagonal_offset=-4)[0], 1e-12, "o")
    zero_do, delta = torch.zeros_like(do), -torch.ones(2, 2, 12, dtype=torch.float64)
    got = attention_block_backward_sdpa(zero_do, q, k, v, lse, delta, scale=0.5, diagonal_offset=-4)
    ref = attention_block_backward_reference(zero_do, q, k, v, lse, delta, scale=0.5, diagonal_offset=-4)
    for name, a, b in zip(("dq", "dk", "dv"), got, ref):
        _close(a, b, 1e-12, name)
    assert torch.all(got[0][:, :4] == 0)


def test_strided_views_and_low_precision_inputs():
    """Slices of packed tensors are read in place; bf16 inputs compute in fp32 like the reference."""
    packed = torch.randn(2, 40, 6, 16, dtype=torch.float32)
    q, k, v = packed[:, 4:36, :4], packed[:, :, 4:5], packed[:, :, 5:6]
    o, lse = attention_block_forward(q, k, v, scale=0.25, diagonal_offset=4, backend="sdpa")
    o_ref, lse_ref = attention_block_forward_reference(q, k, v, scale=0.25, diagonal_offset=4)
    _close(o, o_ref, 1e-5, "o")
    _close(lse, lse_ref, 1e-5, "lse")
    qb, kb, vb = (x.to(torch.bfloat16) for x in (q, k, v))
    o, lse = attention_block_forward(qb, kb, vb, scale=0.25, diagonal_offset=0, backend="sdpa")
    o_ref, lse_ref = attention_block_forward_reference(qb, kb, vb, scale=0.25, diagonal_offset=0)
    _close(o, o_ref, 1e-5, "bf16 o")


@pytest.mark.parametrize("square", [True, False])
def test_pieces_cover_the_mask_exactly(square):
    """square: the CUDA op's pieces (causal pieces square); else the CPU op's (top-left causal of
    any shape: at most one piece for m <= 0, two for 0 < m < Tk - 1)."""
    for tq, tk in [(1, 1), (5, 9), (9, 5), (8, 8)]:
        for m in [None, -10, -3, -1, 0, 1, 2, 7, 8, 30]:
            covered = torch.zeros(tq, tk, dtype=torch.int64)
            pieces = _pieces(tq, tk, m, square=square)
            for qs, qe, ks, ke, causal in pieces:
                assert not (square and causal) or qe - qs == ke - ks  # causal pieces are square
                block = torch.ones(qe - qs, ke - ks, dtype=torch.int64)
                covered[qs:qe, ks:ke] += block.tril() if causal else block
            i, j = torch.arange(tq).unsqueeze(1), torch.arange(tk).unsqueeze(0)
            want = torch.ones(tq, tk, dtype=torch.int64) if m is None else (j <= i + m).long()
            assert torch.equal(covered, want), (tq, tk, m)
            if not square:
                assert len(pieces) <= (1 if m is None or m <= 0 or m >= tk - 1 else 2)


def test_dispatcher_choice():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "sdpa"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    assert resolve_backend("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="unknown kernel backend"):
        resolve_backend("flash", cpu)
    q, k, v, _ = _inputs(8, 8, 4, 2, torch.float32, seed=1)
    assert block_backend("auto", q, k, v, -1) == "sdpa"
    assert block_backend("torch", q, k, v, 0) == "torch"
    v_wide = torch.randn(2, 8, 2, 24)
    assert not sdpa_supports(q, k, 0, v_wide)  # the fused ops need Dv == D
    assert block_backend("sdpa", q, k, v_wide, 0) == "torch"
    assert not sdpa_supports(q, k[:, :0], None)  # Tk = 0 (the CPU op would crash)
    assert not sdpa_supports(q.to(torch.int32), k.to(torch.int32), None)
    assert not sdpa_supports(torch.randn(1, 4, 3, 8), torch.randn(1, 4, 2, 8), None)  # Hq % Hkv
    # the fallback gives the reference's answer
    o, lse = attention_block_forward(q, k, v_wide, scale=0.3, diagonal_offset=0, backend="sdpa")
    o_ref, lse_ref = attention_block_forward_reference(q, k, v_wide, scale=0.3, diagonal_offset=0)
    _close(o, o_ref, 0.0, "fallback o")


@pytest.mark.parametrize("offset", [None, 0, -3, 5])
def test_backward_with_given_out(offset):
    """``out`` = the block's own output (delta = rowsum(o * do), no lse gradient): delta may be None,
    and the result is the reference's, through the dispatcher too (sdpa and the fallbacks)."""
    q, k, v, do = _inputs(24, 30, 4, 2, torch.float64, seed=41)
    o, lse = attention_block_forward_reference(q, k, v, scale=0.3, diagonal_offset=offset)
    delta = (o * do).sum(-1).transpose(1, 2)
    ref = attention_block_backward_reference(do, q, k, v, lse, delta, scale=0.3, diagonal_offset=offset)
    got = attention_block_backward_sdpa(do, q, k, v, lse, None, scale=0.3, diagonal_offset=offset, out=o)
    for backend in ("sdpa", "torch"):
        via = attention_block_backward(do, q, k, v, lse, None, scale=0.3, diagonal_offset=offset, backend=backend,
                                       out=o)
        for name, a, b, c in zip(("dq", "dk", "dv"), got, via, ref):
            _close(a, c, 1e-12, name)
            _close(b, c, 1e-12, f"{backend} {name}")


class _CountSyncs:
    """Counts ``bool(tensor)`` (the host synchronisations of this backend) while active."""

    def __init__(self, monkeypatch):
        self.count = 0
        original = torch.Tensor.__bool__

        def counting(t):
            self.count += 1
            return original(t)

        monkeypatch.setattr(torch.Tensor, "__bool__", counting)


def test_prepare_backward_once_per_call(monkeypatch):
    """The per-call preparation: out given -> no synchronisation; reconstructed from delta -> one;
    a row with do = 0 and delta != 0 -> the whole call on the reference backend (exact)."""
    q, k, v, do = _inputs(16, 16, 4, 2, torch.float64, seed=5)
    o, lse = attention_block_forward_reference(q, k, v, scale=0.5, diagonal_offset=0)
    delta = (o * do).sum(-1).transpose(1, 2) - 0.125
    syncs = _CountSyncs(monkeypatch)
    ops = prepare_backward(do, None, out=o, backend="auto")
    assert ops.backend == "sdpa" and ops.out is o and ops.delta is None and syncs.count == 0
    ops = prepare_backward(do, delta, backend="sdpa")
    assert ops.backend == "sdpa" and syncs.count == 1
    _close((ops.out * ops.do).sum(-1).transpose(1, 2), delta, 1e-14, "rowsum(out * do)")
    for rows in (slice(0, 7), slice(7, 16)):  # the blocks of a call: slices, no further synchronisation
        got = attention_block_backward(ops.do[:, rows], q[:, rows], k, v, lse[:, :, rows], ops.delta[:, :, rows],
                                       scale=0.5, diagonal_offset=rows.start, backend=ops.backend,
                                       out=ops.out[:, rows])
        ref = attention_block_backward_reference(do[:, rows], q[:, rows], k, v, lse[:, :, rows], delta[:, :, rows],
                                                 scale=0.5, diagonal_offset=rows.start)
        for name, a, b in zip(("dq", "dk", "dv"), got, ref):
            _close(a, b, 1e-12, name)
    assert syncs.count == 1
    do_bad = do.clone()
    do_bad[1, 3, 2] = 0.0
    ops = prepare_backward(do_bad, delta, backend="sdpa")
    assert ops.backend == "torch" and ops.out is None and ops.delta is delta
    assert prepare_backward(do, delta, backend="torch").backend == "torch"


def test_fused_ops_check_accepts_installed_torch():
    """The private aten ops exist with the argument names / order this module passes."""
    assert fused_ops_problem("cpu") is None, fused_ops_problem("cpu")
    assert fused_ops_problem("cuda") is None, fused_ops_problem("cuda")  # schemas exist in CPU builds too
    q, k, v, _ = _inputs(8, 8, 2, 2, torch.float32, seed=2)
    assert sdpa_supports(q, k, 0, v)


_SWAPPED = ("aten::_scaled_dot_product_flash_attention_for_cpu(Tensor query, Tensor key, Tensor value, "
            "bool is_causal=False, float dropout_p=0., *, Tensor? attn_mask=None, float? scale=None) "
            "-> (Tensor output, Tensor logsumexp)")


@pytest.mark.parametrize("mismatch", ["swapped", "missing", "returns"])
def test_fused_ops_mismatch_falls_back(monkeypatch, mismatch):
    """A torch whose private op changed (simulated): one RuntimeWarning, then every call runs on
    the reference kernels and gives the reference's answer; nothing raises."""
    import warnings

    original = softmax_sdpa._op_schema

    def fake_schema(name):
        if name != "_scaled_dot_product_flash_attention_for_cpu":
            return original(name)
        if mismatch == "missing":
            raise AttributeError(f"no op {name}")
        if mismatch == "returns":
            return torch._C.parse_schema(_SWAPPED.replace("bool is_causal=False, float dropout_p=0.",
                                                          "float dropout_p=0., bool is_causal=False")
                                         .replace("(Tensor output, Tensor logsumexp)", "Tensor output"))
        return torch._C.parse_schema(_SWAPPED)

    monkeypatch.setattr(softmax_sdpa, "_op_schema", fake_schema)
    monkeypatch.setattr(softmax_sdpa, "_FUSED_OPS_OK", {})
    assert fused_ops_problem("cpu") is not None
    q, k, v, do = _inputs(12, 12, 4, 2, torch.float64, seed=9)
    with pytest.warns(RuntimeWarning, match="'sdpa' attention backend is off on cpu"):
        o, lse = attention_block_forward(q, k, v, scale=0.3, diagonal_offset=0, backend="sdpa")
    o_ref, lse_ref = attention_block_forward_reference(q, k, v, scale=0.3, diagonal_offset=0)
    _close(o, o_ref, 0.0, "o")
    _close(lse, lse_ref, 0.0, "lse")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: no second warning
        assert block_backend("auto", q, k, v, 0) == "torch"
        assert prepare_backward(do, None, out=o, backend="auto").backend == "torch"
        qa, ka, va = (x.clone().requires_grad_() for x in (q, k, v))
        out = seqpar.attention(qa, ka, va, strategy="ring", causal=True)
        out.backward(do)
    ref = [x.clone().requires_grad_() for x in (q, k, v)]
    attention_reference(*ref, causal=True)[0].backward(do)
    for name, a, b in zip(("dq", "dk", "dv"), (qa.grad, ka.grad, va.grad), (x.grad for x in ref)):
        _close(a, b, 1e-12, name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("offset", [None, 0, -1, 64])
def test_cuda_sdpa_matches_reference(offset):
    dev = torch.device("cuda")
    q, k, v, do = (x.to(dev, torch.bfloat16) for x in _inputs(256, 320, 8, 2, torch.float32, seed=5, d=64))
    assert sdpa_supports(q, k, offset, v)
    o, lse = attention_block_forward_sdpa(q, k, v, scale=0.125, diagonal_offset=offset)
    o_ref, lse_ref = attention_block_forward_reference(q, k, v, scale=0.125, diagonal_offset=offset)
    _close(o, o_ref, 2e-2, "o")
    _close(lse, lse_ref, 1e-3, "lse")
    delta = (o_ref * do.float()).sum(-1).transpose(1, 2)
    got = attention_block_backward_sdpa(do, q, k, v, lse_ref, delta, scale=0.125, diagonal_offset=offset)
    ref = attention_block_backward_reference(do, q, k, v, lse_ref, delta, scale=0.125, diagonal_offset=offset)
    for name, a, b in zip(("dq", "dk", "dv"), got, ref):
        _close(a, b, 5e-2, name)
