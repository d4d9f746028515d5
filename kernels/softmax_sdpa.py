"""Softmax attention block on torch's fused SDPA ops that return the log-sum-exp ("sdpa" backend).

Same contract as :mod:`seqpar.kernels.softmax_reference` (the oracle): q [B, Tq, Hq, D],
k/v [B, Tk, Hkv, D], GQA by index, key j visible to query i iff (``diagonal_offset`` m is None or
j <= i + m) and (``window_offset`` w is None or j >= i + w), outputs and grads in the compute
dtype (fp32, fp64 for fp64), lse [B, Hq, Tq] natural log, rows that see no key give o = 0 and
lse = -inf. ``softcap`` is not supported by the fused ops (:func:`sdpa_supports` is False, the
dispatcher runs the reference / Triton for that block); nor is ``window_offset`` on CUDA.

Ops used:

* CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` and its ``_backward``. They take
  [B, H, T, D] views (we pass ``x.transpose(1, 2)``, no copy), fp64 natively, and GQA natively
  (query head h reads KV head h // G, checked against the reference). Non-fp64 inputs are cast to
  fp32 first, so results are those of the fp32 reference. Their outputs come back in the memory
  order of the query ([B, T, H, D] for our views), so ``o.transpose(1, 2)`` and the grads are
  contiguous [B, T, H, D] tensors, handed on without a copy.
* CUDA (opt-in): ``aten._scaled_dot_product_flash_attention`` and its ``_backward`` for fp16/bf16 with D % 8 == 0, D <= 256. The CUDA op has no GQA, so K/V are
  expanded to Hq heads *locally inside this call only* (a compute copy, never communicated) and
  dk/dv are summed over each group. The block output and grads come out in the input dtype and
  are cast to fp32: one bf16 rounding per block that the Triton backend does not have.

Version check. These ops are private to torch. Before their first use on a device type,
:func:`fused_ops_problem` checks that they exist with the positional argument names and order, the
``scale`` keyword and the leading return values this module relies on (``op.default._schema``);
if not, :func:`sdpa_supports` is False for that device type (the dispatcher then runs the
reference / Triton kernels: exact, slower) and a ``RuntimeWarning`` says so, once per process.
Windowed blocks also need the ``attn_mask`` keyword (:data:`FUSED_MASK_KEYWORD`,
:func:`fused_mask_problem`, checked at the first windowed block): without it only windowed blocks
fall back (one ``RuntimeWarning``).

Strides. The CPU ops read every tensor operand (q, k, v; in backward also grad_out and out)
through its batch, head and token strides only and assume a unit-stride head-dim axis
(``stride(-1) == 1``): a ``permute``-d or ``[..., ::2]`` view gave silently wrong results (O(1)
errors) before :func:`_operand` was added; the CUDA flash ops raise on such a tensor ("must
have contiguous last dimension"). Any other strides are read in place (checked on CPU against
contiguous copies: [B, H, T, D] and [T, B, H, D] storage, padded rows, stride-0 ``expand``-ed
batch / token / head axes, fp64 and fp32). :func:`_operand` copies an operand only when its last
axis is not unit-stride, in the same pass as the dtype cast.

Masks. The fused ops know "no mask" and top-left causal (key j visible to query i iff j <= i,
whatever Tq and Tk on CPU; the CUDA flash op aligns causal masks bottom-right when Tq != Tk, so
its causal pieces are square). :func:`_pieces` rewrites any ``diagonal_offset`` m into at most
two such pieces, each a (query range, key range, causal) triple:

* m >= Tk - 1 or None: no mask (one piece);
* m <= 0: queries [-m, Tq) against all keys, causal (rows i < -m see nothing: o = 0, lse = -inf);
  one piece on CPU; on CUDA the square causal part plus a no-mask piece for the rows below it;
* 0 < m < Tk - 1: on CPU all queries against keys [0, m), no mask, plus all queries against keys
  [m, Tk), causal; on CUDA all queries against keys [0, m], plus queries [1, Tq) against keys
  [m + 1, Tk), causal (square). The forward merges the pieces by log-sum-exp, the backward adds
  their grads.

The first piece that covers every row is handed on as is (no zero-filled buffer, no merge).

Windows (``window_offset`` w given; CPU only). The fused CPU ops take ``attn_mask``: an additive
float mask of the compute dtype (0 visible, -inf hidden; a bool mask is refused), broadcast from
[1, 1, Tq, Tk]. :func:`_band_extent` first cuts the block down to the rows that see at least one
key and the keys any of them sees (w > m, or a band outside the block: nothing is computed, o = 0,
lse = -inf). Offsets are re-based to that sub-block; a window bound that hides nothing there is
dropped and the sub-block goes through the pieces above (no mask tensor); otherwise one op call
with the band as an additive mask (:func:`_additive_mask`, cached per shape / offsets / dtype /
device, up to 32 small masks). Every row of that call sees a key, so the op's lse = 0 for fully
masked rows never arises; rows outside the sub-block get o = 0, lse = -inf (dq = 0), keys outside
it dk = dv = 0. The sub-block is not tiled further: a band much narrower than a tall block costs
the full sub-block of scores (the planner keeps banded blocks about window + 128 keys wide).

Backward. The fused backward ops take (grad_out, q, k, v, out, logsumexp) and compute
``D = rowsum(out * grad_out)`` themselves, then dS = exp(s - logsumexp) * (dP - D). We pass the
given row-global lse (-inf rows as 0, like the reference) and an ``out`` with
rowsum(out * do) = delta:

* the caller's ``out`` when it has one: the driver passes the forward's final output o whenever
  delta = rowsum(o * do) (no lse gradient), sliced like do; exact, nothing computed;
* otherwise one reconstructed from delta (:func:`_out_for_delta`): out = u * delta / (u . do)
  with u = do / max|do|, so rowsum(out * do) = delta up to a few ulps. delta may carry an lse
  gradient (``delta - dlse``). Rows where do = 0 but delta != 0 (a loss on lse only) have no
  such out. The driver builds it once per call (:func:`backward_operands_sdpa`, one host
  synchronisation per call, none per block) and runs the whole call on the reference kernels
  (exact, slower) when such a row exists; a direct call of
  :func:`attention_block_backward_sdpa` without ``out`` builds it for its block and falls back
  for that block.
"""
from __future__ import annotations

import functools
import warnings

import torch

from seqpar.kernels.softmax import merge_partials_
from seqpar.kernels.softmax_reference import (
    attention_block_backward_reference,
    attention_block_forward_reference,
    compute_dtype,
)

__all__ = [
    "sdpa_supports",
    "fused_ops_problem",
    "fused_mask_problem",
    "attention_block_forward_sdpa",
    "attention_block_backward_sdpa",
    "attention_block_accumulate_sdpa_",
    "backward_operands_sdpa",
]

_CPU_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_CUDA_DTYPES = (torch.float16, torch.bfloat16)

Piece = tuple[int, int, int, int, bool]  # q_start, q_stop, k_start, k_stop, causal

# What this module relies on, per device type: (op name, positional argument names in the order we
# pass them, leading return names). Every op is also called with the keyword ``scale``.
FUSED_OPS: dict[str, tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...]] = {
    "cpu": (
        ("_scaled_dot_product_flash_attention_for_cpu",
         ("query", "key", "value", "dropout_p", "is_causal"), ("output", "logsumexp")),
        ("_scaled_dot_product_flash_attention_for_cpu_backward",
         ("grad_out", "query", "key", "value", "out", "logsumexp", "dropout_p", "is_causal"),
         ("grad_query", "grad_key", "grad_value")),
    ),
    "cuda": (
        ("_scaled_dot_product_flash_attention",
         ("query", "key", "value", "dropout_p", "is_causal", "return_debug_mask"), ("output", "logsumexp")),
        ("_scaled_dot_product_flash_attention_backward",
         ("grad_out", "query", "key", "value", "out", "logsumexp", "cum_seq_q", "cum_seq_k", "max_q", "max_k",
          "dropout_p", "is_causal", "philox_seed", "philox_offset"),
         ("grad_query", "grad_key", "grad_value")),
    ),
}
_FUSED_OPS_OK: dict[str, bool] = {}  # device type -> checked result (filled at first use)

# The keyword through which the fused ops of a device type take an additive float mask (windowed
# blocks); a device type missing here has no mask support (windowed blocks fall back).
FUSED_MASK_KEYWORD: dict[str, str] = {"cpu": "attn_mask"}
_FUSED_MASK_OK: dict[str, bool] = {}  # device type -> checked result (filled at first windowed block)


def _op_schema(name: str):
    """The schema of ``aten::name.default`` (raises if there is no such op)."""
    return getattr(torch.ops.aten, name).default._schema


def _schema_problem(name: str, positional: tuple[str, ...], returns: tuple[str, ...]) -> str | None:
    try:
        schema = _op_schema(name)
    except Exception as e:  # noqa: BLE001 - a missing op shows up as AttributeError or RuntimeError
        return f"aten::{name} is missing ({type(e).__name__})"
    args = list(schema.arguments)
    given = [a.name for a in args if not a.kwarg_only]
    if given[:len(positional)] != list(positional):
        return f"aten::{name} takes ({', '.join(given)}), expected ({', '.join(positional)}) first"
    if "scale" not in [a.name for a in args]:
        return f"aten::{name} has no 'scale' argument"
    required = [a.name for a in args if a.name not in positional and a.name != "scale" and not a.has_default_value()]
    if required:
        return f"aten::{name} requires arguments this module does not pass: {', '.join(required)}"
    got = [r.name for r in schema.returns]
    if got[:len(returns)] != list(returns):
        return f"aten::{name} returns ({', '.join(map(str, got))}), expected ({', '.join(returns)}) first"
    return None


def fused_ops_problem(device_type: str) -> str | None:
    """Why the fused ops of ``device_type`` ("cpu", "cuda") cannot be used with this torch, or None
    when they exist with the signatures this module calls them with."""
    ops = FUSED_OPS.get(device_type)
    if ops is None:
        return f"no fused attention ops are known for device type {device_type!r}"
    for name, positional, returns in ops:
        problem = _schema_problem(name, positional, returns)
        if problem is not None:
            return problem
    return None


def fused_mask_problem(device_type: str) -> str | None:
    """Why the fused ops of ``device_type`` cannot take an additive mask (windowed blocks), or
    None when every op of :data:`FUSED_OPS` has the :data:`FUSED_MASK_KEYWORD` keyword."""
    keyword = FUSED_MASK_KEYWORD.get(device_type)
    if keyword is None:
        return f"the fused attention ops of {device_type!r} take no mask"
    problem = fused_ops_problem(device_type)
    if problem is not None:
        return problem
    for name, _, _ in FUSED_OPS[device_type]:
        if keyword not in [a.name for a in _op_schema(name).arguments]:
            return f"aten::{name} has no {keyword!r} argument"
    return None


def _fused_mask_available(device_type: str) -> bool:
    """:func:`fused_mask_problem` checked once per device type; a problem (on a device type that
    has a mask keyword at all) warns once."""
    ok = _FUSED_MASK_OK.get(device_type)
    if ok is None:
        problem = fused_mask_problem(device_type)
        ok = _FUSED_MASK_OK[device_type] = problem is None
        if problem is not None and device_type in FUSED_MASK_KEYWORD:
            warnings.warn(f"seqpar: windowed attention blocks do not use the 'sdpa' backend on {device_type} with "
                          f"torch {torch.__version__}: {problem}; using the reference kernels for them instead "
                          "(exact, slower)", RuntimeWarning, stacklevel=3)
    return ok


def _fused_ops_available(device_type: str) -> bool:
    """:func:`fused_ops_problem` checked once per device type; a problem warns once."""
    ok = _FUSED_OPS_OK.get(device_type)
    if ok is None:
        problem = fused_ops_problem(device_type)
        ok = _FUSED_OPS_OK[device_type] = problem is None
        if problem is not None:
            warnings.warn(f"seqpar: the 'sdpa' attention backend is off on {device_type} with torch "
                          f"{torch.__version__}: {problem}; using the reference kernels instead (exact, slower)",
                          RuntimeWarning, stacklevel=3)
    return ok


def _mask_supported(device_type: str, window_offset: int | None, softcap: float | None) -> bool:
    """Whether the fused ops of ``device_type`` can apply this window / softcap (not the shapes)."""
    if softcap is not None:
        return False  # no fused op caps its logits
    return window_offset is None or _fused_mask_available(device_type)


def sdpa_supports(q: torch.Tensor, k: torch.Tensor, diagonal_offset: int | None = None,
                  v: torch.Tensor | None = None, *, window_offset: int | None = None,
                  softcap: float | None = None) -> bool:
    """Whether the fused ops can compute this block (every ``diagonal_offset`` is expressible;
    ``window_offset`` on CPU only, via an additive mask; ``softcap`` never; the other limits are
    device, dtype, shapes, and the torch version's ops). False means: use the reference / Triton
    instead."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0]:
        return False
    if q.shape[1] == 0 or k.shape[1] == 0 or k.shape[2] == 0 or q.shape[2] % k.shape[2] != 0:
        return False  # the CPU op dies with SIGFPE on Tk = 0
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim or (v is not None and (v.shape[-1] != head_dim or v.shape[:3] != k.shape[:3])):
        return False
    if q.device != k.device or q.dtype != k.dtype:
        return False
    if q.device.type == "cpu":
        return q.dtype in _CPU_DTYPES and _fused_ops_available("cpu") and _mask_supported("cpu", window_offset, softcap)
    if q.device.type == "cuda":
        return (q.dtype in _CUDA_DTYPES and head_dim % 8 == 0 and head_dim <= 256 and _fused_ops_available("cuda")
                and _mask_supported("cuda", window_offset, softcap))
    return False


def _pieces(tq: int, tk: int, diagonal_offset: int | None, square: bool = True) -> list[Piece]:
    """Cover the visible (query, key) pairs by disjoint no-mask / top-left-causal pieces; causal
    pieces are square when ``square`` (the CUDA op), of any shape otherwise (the CPU op)."""
    m = diagonal_offset
    if m is None or m >= tk - 1:
        return [(0, tq, 0, tk, False)]
    if not square:
        if m <= 0:
            return [(-m, tq, 0, tk, True)] if -m < tq else []
        return [(0, tq, 0, m, False), (0, tq, m, tk, True)]
    if m <= 0:
        raw = [(-m, tq, 0, tk)] if -m < tq else []
        pieces: list[Piece] = []
    else:
        raw = [(1, tq, m + 1, tk)] if tq > 1 else []
        pieces = [(0, tq, 0, m + 1, False)]
    for qs, qe, ks, ke in raw:  # top-left causal -> square causal (+ a no-mask tail of rows)
        n = min(qe - qs, ke - ks)
        pieces.append((qs, qs + n, ks, ks + n, True))
        if qe - qs > n:
            pieces.append((qs + n, qe, ks, ks + n, False))
    return pieces


def _band_extent(tq: int, tk: int, diagonal_offset: int | None, window_offset: int | None
                 ) -> tuple[int, int, int, int, int | None, int | None] | None:
    """The sub-block of a banded block that holds every visible pair: (q_start, q_stop, k_start,
    k_stop, m, w) with every row of [q_start, q_stop) seeing at least one key, all of them in
    [k_start, k_stop), and m / w the offsets re-based to the sub-block (None where the bound
    hides nothing there). None when no query sees a key."""
    m, w = diagonal_offset, window_offset
    if m is not None and w is not None and w > m:
        return None
    qs = 0 if m is None else max(0, -m)  # rows with i + m >= 0
    qe = tq if w is None else min(tq, tk - w)  # rows with i + w <= tk - 1
    if qs >= qe:
        return None
    ks = 0 if w is None else max(0, qs + w)
    ke = tk if m is None else min(tk, qe + m)
    shift = qs - ks
    m = None if m is None or m + shift >= ke - ks - 1 else m + shift
    w = None if w is None or w + shift + (qe - qs - 1) <= 0 else w + shift
    return qs, qe, ks, ke, m, w


@functools.lru_cache(maxsize=32)
def _cached_mask(tq: int, tk: int, diagonal_offset: int | None, window_offset: int, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    i = torch.arange(tq, device=device).unsqueeze(1)
    j = torch.arange(tk, device=device).unsqueeze(0)
    hidden = j < i + window_offset
    if diagonal_offset is not None:
        hidden |= j > i + diagonal_offset
    mask = torch.zeros(tq, tk, dtype=dtype, device=device).masked_fill_(hidden, float("-inf"))
    return mask.view(1, 1, tq, tk)


_MASK_CACHE_ELEMS = 1 << 21  # larger masks are built per call (their op costs far more than the build)


def _additive_mask(tq: int, tk: int, diagonal_offset: int | None, window_offset: int, dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
    """[1, 1, tq, tk] additive mask (0 visible, -inf hidden) of the band, in ``dtype`` (the fused
    CPU ops want the query's dtype). Read-only: small ones are shared through a cache, except
    while a FakeTensorMode traces (FakeTensor, torch.compile): a fake mask must never be cached
    for real calls, nor a real one handed to a fake call."""
    faking = torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None
    if tq * tk > _MASK_CACHE_ELEMS or faking:
        return _cached_mask.__wrapped__(tq, tk, diagonal_offset, window_offset, dtype, device)
    return _cached_mask(tq, tk, diagonal_offset, window_offset, dtype, device)


def _expand_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """[B, T, Hkv, D] -> [B, T, Hkv * group, D], head h -> h // group (a local compute copy)."""
    return x if group == 1 else x.repeat_interleave(group, dim=2)


def _reduce_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """Sum the grads of the expanded heads back onto their KV head."""
    if group == 1:
        return x
    b, t, h, d = x.shape
    return x.reshape(b, t, h // group, group, d).sum(dim=3)


def _operand(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype`` with a unit-stride last axis, the one layout requirement of the fused ops
    (see the module doc). Copies only when the cast or the layout needs it (one copy for both);
    other strides, stride 0 included, are kept."""
    if x.stride(-1) == 1 or x.shape[-1] <= 1:
        return x.to(dtype)
    if x.dtype == dtype:  # (x.to(x.dtype, memory_format=...) would return x itself, strides and all)
        return x.contiguous()
    return x.to(dtype, memory_format=torch.contiguous_format)


def _op_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the fused op of ``device`` reads: the compute dtype on CPU, the input's on CUDA."""
    return compute_dtype(dtype) if device.type == "cpu" else dtype


def _fused_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
                   mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One piece: (o [B, Tq, Hq, D], lse [B, Hq, Tq]) in the compute dtype. ``mask``: an additive
    mask in the compute dtype (CPU only)."""
    cd = compute_dtype(q.dtype)
    if q.device.type == "cuda":
        group = q.shape[2] // k.shape[2]
        q, k, v = (_operand(x, x.dtype) for x in (q, k, v))
        out = torch.ops.aten._scaled_dot_product_flash_attention(
            q.transpose(1, 2), _expand_kv(k, group).transpose(1, 2), _expand_kv(v, group).transpose(1, 2),
            0.0, causal, False, scale=scale)
        return out[0].transpose(1, 2).to(cd), out[1].to(cd)
    masked = {} if mask is None else {FUSED_MASK_KEYWORD["cpu"]: mask}
    out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        _operand(q, cd).transpose(1, 2), _operand(k, cd).transpose(1, 2), _operand(v, cd).transpose(1, 2),
        0.0, causal, scale=scale, **masked)
    return out[0].transpose(1, 2), out[1]


def _fused_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, scale: float, causal: bool, mask: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One piece: (dq, dk, dv) in the compute dtype; ``out`` satisfies rowsum(out * do) = delta;
    ``mask`` as in :func:`_fused_forward` (CPU only)."""
    cd = compute_dtype(q.dtype)
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    if q.device.type == "cuda":
        group = q.shape[2] // k.shape[2]
        do, q, k, v, out = (_operand(x, q.dtype) for x in (do, q, k, v, out))
        ke, ve = _expand_kv(k, group), _expand_kv(v, group)
        seed = torch.zeros(2, dtype=torch.uint64, device=q.device)
        # cum_seq_q / cum_seq_k are None for dense inputs, as the forward op returns them: an empty
        # tensor there selects the varlen path ("batch size must be positive", seen on an H200)
        grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            t(do), t(q), t(ke), t(ve), t(out), lse.to(torch.float32).contiguous(), None, None,
            q.shape[1], k.shape[1], 0.0, causal, seed, torch.zeros((), dtype=torch.uint64, device=q.device),
            scale=scale)
        dq, dk, dv = (t(g).to(cd) for g in grads[:3])
        return dq, _reduce_kv(dk, group), _reduce_kv(dv, group)
    masked = {} if mask is None else {FUSED_MASK_KEYWORD["cpu"]: mask}
    grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        *(t(_operand(x, cd)) for x in (do, q, k, v, out)), lse.to(cd), 0.0, causal, scale=scale, **masked)
    return t(grads[0]), t(grads[1]), t(grads[2])


def _out_for_delta(do: torch.Tensor, delta: torch.Tensor) -> torch.Tensor | None:
    """An ``out`` [B, Tq, Hq, D] (compute dtype) with rowsum(out * do) = delta [B, Hq, Tq] to a few
    ulps, or None when some row has do = 0 and delta != 0 (or the result is not finite). One host
    synchronisation (the data-dependent None)."""
    cd = compute_dtype(do.dtype)
    dof = do.to(cd)
    top = dof.abs().amax(dim=-1, keepdim=True)
    u = dof / torch.where(top > 0, top, torch.ones_like(top))  # |u| <= 1, no underflow in u . do
    norm = (u * dof).sum(dim=-1, keepdim=True)  # = |do|^2 / max|do| >= max|do|
    d = delta.to(cd).transpose(1, 2).unsqueeze(-1)
    out = u * (d / torch.where(norm > 0, norm, torch.ones_like(norm)))
    # a row with norm = 0 has u = 0, hence out = 0 and rowsum(out * do) = 0: wrong iff its delta != 0
    bad = ((norm == 0) & (d != 0)).any() | ~torch.isfinite(out).all()
    return None if bool(bad) else out


def backward_operands_sdpa(do: torch.Tensor, delta: torch.Tensor | None, out: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None:
    """Once per call, for every block backward of the call: ``(do, delta, out)`` with do (and out)
    cast / laid out for the fused op once (so the per-block :func:`_operand` copies nothing) and
    rowsum(out * do) = delta. ``out`` given (then ``delta`` may be None: it is that rowsum) is
    used as is; otherwise it is reconstructed from ``delta`` (:func:`_out_for_delta`, one host
    synchronisation). None when the fused ops are unavailable on this device or no such out
    exists (a row with do = 0, delta != 0): run the call on the reference / Triton kernels."""
    if do.device.type not in FUSED_OPS or not _fused_ops_available(do.device.type):
        return None
    dtype = _op_dtype(do.dtype, do.device)
    do = _operand(do, dtype)
    if out is None:
        if delta is None:
            raise ValueError("backward_operands_sdpa needs delta or out")
        out = _out_for_delta(do, delta)
        if out is None:
            return None
    return do, delta, _operand(out, dtype)


def _empty_result(q: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(o = 0, lse = -inf) of a block where no row sees a key."""
    B, Tq, Hq, _ = q.shape
    cd = compute_dtype(q.dtype)
    return (torch.zeros(B, Tq, Hq, v.shape[-1], dtype=cd, device=q.device),
            torch.full((B, Hq, Tq), float("-inf"), dtype=cd, device=q.device))


def _windowed_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      diagonal_offset: int | None, window_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A block with a window (CPU): the sub-block of :func:`_band_extent`, masked or as pieces."""
    extent = _band_extent(q.shape[1], k.shape[1], diagonal_offset, window_offset)
    if extent is None:
        return _empty_result(q, v)
    qs, qe, ks, ke, m, w = extent
    qb, kb, vb = q[:, qs:qe], k[:, ks:ke], v[:, ks:ke]
    if w is None:
        o_p, lse_p = attention_block_forward_sdpa(qb, kb, vb, scale=scale, diagonal_offset=m)
    else:
        cd = compute_dtype(q.dtype)
        o_p, lse_p = _fused_forward(qb, kb, vb, scale, False, _additive_mask(qe - qs, ke - ks, m, w, cd, q.device))
    if (qs, qe) == (0, q.shape[1]):
        return o_p, lse_p
    o, lse = _empty_result(q, v)
    o[:, qs:qe] = o_p
    lse[:, :, qs:qe] = lse_p
    return o, lse


def attention_block_forward_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                                 diagonal_offset: int | None = None, window_offset: int | None = None,
                                 softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) of one block on the fused op (call only where :func:`sdpa_supports`; a ``softcap``,
    or a window the device's ops cannot mask, runs on the reference instead). A single piece
    covering every row is returned as the op made it (o a [B, Tq, Hq, D] view, lse possibly strided)."""
    if not _mask_supported(q.device.type, window_offset, softcap):
        return attention_block_forward_reference(q, k, v, scale=scale, diagonal_offset=diagonal_offset,
                                                 window_offset=window_offset, softcap=softcap)
    if window_offset is not None:
        return _windowed_forward(q, k, v, scale, diagonal_offset, window_offset)
    B, Tq, Hq, _ = q.shape
    cd = compute_dtype(q.dtype)
    o = lse = None
    for qs, qe, ks, ke, causal in _pieces(Tq, k.shape[1], diagonal_offset, square=q.device.type == "cuda"):
        o_p, lse_p = _fused_forward(q[:, qs:qe], k[:, ks:ke], v[:, ks:ke], scale, causal)
        if o is None and (qs, qe) == (0, Tq):
            o, lse = o_p, lse_p
            continue
        if o is None:
            o = torch.zeros(B, Tq, Hq, v.shape[-1], dtype=cd, device=q.device)
            lse = torch.full((B, Hq, Tq), float("-inf"), dtype=cd, device=q.device)
        merge_partials_(o[:, qs:qe], lse[:, :, qs:qe], o_p, lse_p)
    if o is None:  # no row sees a key
        o, lse = _empty_result(q, v)
    return o, lse


def _add_rows_(acc: torch.Tensor | None, part: torch.Tensor, start: int, stop: int, length: int) -> torch.Tensor:
    """``acc`` (allocated on first use; a part covering all ``length`` rows is taken as is) plus
    ``part`` on rows [start, stop) of dim 1."""
    if acc is None:
        if (start, stop) == (0, length):
            return part
        acc = torch.zeros((part.shape[0], length) + tuple(part.shape[2:]), dtype=part.dtype, device=part.device)
    acc[:, start:stop] += part
    return acc


def _zero_grads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cd = compute_dtype(q.dtype)
    return (torch.zeros(q.shape, dtype=cd, device=q.device), torch.zeros(k.shape, dtype=cd, device=q.device),
            torch.zeros(v.shape, dtype=cd, device=q.device))


def _windowed_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor,
                       out: torch.Tensor, scale: float, diagonal_offset: int | None, window_offset: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of :func:`_windowed_forward` (CPU); ``out`` as in the block backward."""
    Tq, Tk = q.shape[1], k.shape[1]
    extent = _band_extent(Tq, Tk, diagonal_offset, window_offset)
    if extent is None:
        return _zero_grads(q, k, v)
    qs, qe, ks, ke, m, w = extent
    args = (do[:, qs:qe], q[:, qs:qe], k[:, ks:ke], v[:, ks:ke], lse[:, :, qs:qe])
    if w is None:
        grads = attention_block_backward_sdpa(*args, None, scale=scale, diagonal_offset=m, out=out[:, qs:qe])
    else:
        cd = compute_dtype(q.dtype)
        lse_f = lse[:, :, qs:qe].to(cd)  # every row of the sub-block sees a key: lse is finite
        grads = _fused_backward(*args[:4], out[:, qs:qe], lse_f, scale, False,
                                _additive_mask(qe - qs, ke - ks, m, w, cd, q.device))
    if (qs, qe, ks, ke) == (0, Tq, 0, Tk):
        return grads
    dq, dk, dv = _zero_grads(q, k, v)
    dq[:, qs:qe] = grads[0]
    dk[:, ks:ke] = grads[1]
    dv[:, ks:ke] = grads[2]
    return dq, dk, dv


def attention_block_backward_sdpa(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  lse: torch.Tensor, delta: torch.Tensor | None, *, scale: float,
                                  diagonal_offset: int | None = None, out: torch.Tensor | None = None,
                                  window_offset: int | None = None, softcap: float | None = None
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of one block given the row-global ``lse`` and ``delta`` (see module doc).

    ``out`` [B, Tq, Hq, D]: any tensor with rowsum(out * do) = delta (then ``delta`` may be None),
    e.g. from :func:`backward_operands_sdpa`; without it one is reconstructed for this block.
    A ``softcap`` (or a window the device's ops cannot mask) runs on the reference, with delta
    computed from ``out`` when None."""
    if not _mask_supported(q.device.type, window_offset, softcap):
        if delta is None:
            if out is None:
                raise ValueError("attention_block_backward_sdpa needs delta or out")
            cd = compute_dtype(do.dtype)
            delta = (out.to(cd) * do.to(cd)).sum(dim=-1).transpose(1, 2)
        return attention_block_backward_reference(do, q, k, v, lse, delta, scale=scale, diagonal_offset=diagonal_offset,
                                                  window_offset=window_offset, softcap=softcap)
    if out is None:
        out = _out_for_delta(do, delta)
        if out is None:
            return attention_block_backward_reference(do, q, k, v, lse, delta, scale=scale,
                                                      diagonal_offset=diagonal_offset, window_offset=window_offset)
    if window_offset is not None:
        return _windowed_backward(do, q, k, v, lse, out, scale, diagonal_offset, window_offset)
    cd = compute_dtype(q.dtype)
    lse_f = lse.to(cd)
    lse_f = torch.where(torch.isinf(lse_f), torch.zeros_like(lse_f), lse_f)
    Tq, Tk = q.shape[1], k.shape[1]
    dq = dk = dv = None
    for qs, qe, ks, ke, causal in _pieces(Tq, Tk, diagonal_offset, square=q.device.type == "cuda"):
        dq_p, dk_p, dv_p = _fused_backward(do[:, qs:qe], q[:, qs:qe], k[:, ks:ke], v[:, ks:ke], out[:, qs:qe],
                                           lse_f[:, :, qs:qe], scale, causal)
        dq = _add_rows_(dq, dq_p, qs, qe, Tq)
        dk = _add_rows_(dk, dk_p, ks, ke, Tk)
        dv = _add_rows_(dv, dv_p, ks, ke, Tk)
    if dq is None:  # no row sees a key
        dq, dk, dv = _zero_grads(q, k, v)
    return dq, dk, dv


def attention_block_accumulate_sdpa_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o_acc: torch.Tensor,
                                     lse_acc: torch.Tensor, *, scale: float, diagonal_offset: int | None = None,
                                     window_offset: int | None = None, softcap: float | None = None) -> None:
    """Forward, then merge into the running (o_acc, lse_acc) in place (no fused epilogue)."""
    o_blk, lse_blk = attention_block_forward_sdpa(q, k, v, scale=scale, diagonal_offset=diagonal_offset,
                                                  window_offset=window_offset, softcap=softcap)
    merge_partials_(o_acc, lse_acc, o_blk, lse_blk)
