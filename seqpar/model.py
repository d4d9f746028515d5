"""A Linear-Llama3-style hybrid decoder: softmax, linear-attention and gated delta-rule layers
in one stack.

Each layer is RMSNorm -> attention -> residual -> RMSNorm -> SwiGLU -> residual. The attention
of a layer follows ``ModelConfig.pattern``: softmax (``S``: GQA, RoPE), linear (``L``: per-head
fixed decay, a data-dependent per-head gate, GLA's per-key-channel gates, or none; a feature
map; an optional per-head output norm) or the gated delta rule (``D``: a Gated DeltaNet layer as
in Qwen3-Next, :class:`GatedDeltaNet`, without the short convolution).

The model runs on the tokens it is given. Every attention module has a ``context_parallel``
field, ``None`` by default: the layer then mixes its tokens on one device (the tokens it holds
are the whole sequence). :func:`seqpar.parallelize.parallelize_model` sets the field to a
:class:`ContextParallel` on every attention layer (and on the model, for RoPE positions), after
which the layer calls :func:`seqpar.attention` / :func:`seqpar.linear_attention` on its local
shard of the sequence. Nothing is patched: the switch is data on the modules.

Softmax layers honour ``ModelConfig.window`` (a causal sliding window) and ``ModelConfig.softcap``
(a logit softcap) on one device and across ranks alike. ``HybridLM.forward(..., cu_seqlens=...)``
runs one packed row of documents (B = 1, GLOBAL boundaries ``[0, ..., T_global]``): softmax layers
see only keys of their own document and RoPE positions restart at each document; linear and
delta-rule layers reset their state at every document start (they hand the boundaries to
:func:`seqpar.linear_attention`; on one device they run ``chunk_linear_attention`` once per
document).

Every attention module also has a ``timer`` field, ``None`` by default: given a
:class:`PhaseTimer` (:func:`attach_timer`), the layer adds the wall time of its token mixing
(forward and backward) to the timer under its ``kind`` ("softmax" or "linear"; delta-rule layers
are of kind "linear" too: they run on the linear-attention strategies); the trainer reports it
per step (see docs/training.md, "Where the step time goes").
"""
from __future__ import annotations

import math
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from seqpar.config import ModelConfig
from seqpar.validation import check_head_axis
from seqpar.kernels.linear import chunk_linear_attention
from seqpar.kernels.softmax_reference import compute_dtype
from seqpar.comm.groups import sp_group_of
from seqpar.layout import global_positions, local_positions
from seqpar.masks import check_documents, check_softcap, check_window, document_positions


@dataclass(frozen=True)
class ContextParallel:
    """How one attention layer mixes tokens across the sequence-parallel group.

    ``group`` is the sequence-parallel ProcessGroup (or :class:`seqpar.comm.UspGroups` for the
    ``usp`` strategy); ``strategy`` one of the softmax or linear strategies (on the model itself,
    which only needs the layout and group for RoPE positions, it is ``"positions"``). ``layout``
    is a layout name ("contiguous", "zigzag", "striped") or a layout object such as
    ``seqpar.layout.BalancedLayout``; it is handed to seqpar as is, never compared with a name here.
    """

    group: Any
    layout: str | Any = "contiguous"
    strategy: str = "ring"
    backend: str = "auto"
    # cross-rank agreement check of every call: "cached" (first call per signature), "always"
    # (True) or "off" (False); see seqpar.attention. Normalised to the mode's name.
    validate: bool | str | None = "cached"

    def __post_init__(self) -> None:
        from seqpar.comm import check_validate_mode

        object.__setattr__(self, "validate", check_validate_mode(self.validate))

    @property
    def sp_group(self) -> Any:
        """The plain sequence-parallel group (the ``sp`` member of USP groups)."""
        return sp_group_of(self.group)


# ---------------------------------------------------------------------------------------------
# Single-device token mixing (the default): torch SDPA for softmax layers (with an explicit band
# mask for a sliding window; plain torch ops with a softcap), the library's chunked
# linear-attention kernel (Triton on CUDA, PyTorch elsewhere) for linear layers.


def local_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                            scale: float | None = None, window: int | None = None, softcap: float | None = None,
                            cu_seqlens: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
    """Causal softmax attention on one device: q [B, T, Hq, D], k/v [B, T, Hkv, D] -> [B, T, Hq, D].

    The same masks and scores as :func:`seqpar.attention` with one rank: ``window`` (query i sees
    keys i - window < j <= i), ``softcap`` (scores become softcap * tanh(s / softcap) before the
    mask) and ``cu_seqlens`` (document boundaries [0, ..., T] of one packed row, B = 1: each
    document is attended on its own). Without a window or softcap this is SDPA's causal kernel;
    a window adds a [T, T] band mask, a softcap computes the scores with plain torch ops (the
    [B, Hq, T, T] scores are held: a reference path, not a long-context one).
    """
    window, softcap = check_window(window), check_softcap(softcap)
    documents = check_documents(cu_seqlens, q.shape[1], q.device if isinstance(cu_seqlens, torch.Tensor) else None)
    if documents is not None:
        if q.shape[0] != 1:
            raise ValueError(f"cu_seqlens describes the documents of ONE packed row; got batch size {q.shape[0]}")
        parts = [local_softmax_attention(q[:, a:b], k[:, a:b], v[:, a:b], scale=scale, window=window, softcap=softcap)
                 for a, b in zip(documents, documents[1:])]
        return torch.cat(parts, dim=1)
    T = q.shape[1]
    if window is not None and window >= T:
        window = None  # every key a causal query can see is inside the window
    if softcap is not None:
        return _capped_attention(q, k, v, scale=scale, window=window, softcap=softcap)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = k.shape[2] != q.shape[2]
    if window is None:
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=_visible(T, window, q.device), scale=scale,
                                           enable_gqa=gqa)
    return o.transpose(1, 2)


def _visible(T: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[T, T] bool, True where query i sees key j: j <= i and (with a window) i - j < window."""
    i = torch.arange(T, device=device).unsqueeze(1)
    j = torch.arange(T, device=device).unsqueeze(0)
    visible = j <= i
    if window is not None:
        visible &= (i - j) < window
    return visible


def _capped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None,
                      window: int | None, softcap: float) -> torch.Tensor:
    """Causal attention with softcapped scores (and an optional window), in plain torch ops,
    in the compute dtype (fp32, or fp64 for fp64 inputs); the result in q's dtype."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    cd = compute_dtype(q.dtype)
    qg = q.to(cd).reshape(B, T, Hkv, Hq // Hkv, D)
    s = torch.einsum("bqhgd,bkhd->bhgqk", qg, k.to(cd)) * scale
    s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~_visible(T, window, q.device), float("-inf"))
    p = torch.softmax(s, dim=-1)
    o = torch.einsum("bhgqk,bkhd->bqhgd", p, v.to(cd))
    return o.reshape(B, T, Hq, -1).to(q.dtype)


# ---------------------------------------------------------------------------------------------
# Timing the token mixing (what the trainer's step-time breakdown reads).


class PhaseTimer:
    """Wall time per named phase, summed between :meth:`collect` calls, nearly free.

    On CPU a phase boundary is one ``time.perf_counter()``. On CUDA it is an event recorded on
    the current stream (no synchronisation); :meth:`collect` reads the events, so call it after
    the device has been synchronised (the trainer does so once per log interval). Intervals of
    one name may not nest (the layers of a model never do: each layer's mixing finishes before
    the next begins, in forward and in backward). ``enabled`` False makes :meth:`call` a plain
    call (the trainer turns the timer off during evaluation).
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else None
        self.cuda = self.device is not None and self.device.type == "cuda"
        self.enabled = True
        self._totals: dict[str, float] = {}
        self._events: list[tuple[str, Any, Any]] = []
        self._open: dict[str, list[Any]] = {}

    def _mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            return event
        return time.perf_counter()

    def start(self, name: str) -> None:
        self._open.setdefault(name, []).append(self._mark())

    def stop(self, name: str) -> None:
        stack = self._open.get(name)
        if not stack:  # a stop without its start (the timer was reset in between): nothing to add
            return
        begin, end = stack.pop(), self._mark()
        if self.cuda:
            self._events.append((name, begin, end))
        else:
            self._totals[name] = self._totals.get(name, 0.0) + (end - begin)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the body as ``name`` (when enabled)."""
        if not self.enabled:
            yield
            return
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)

    def call(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, its forward timed as ``name``, and when autograd records it, its
        backward too: identity autograd Functions on the tensor arguments that require grad and
        on the result mark where the backward of ``fn`` ends and begins."""
        if not self.enabled:
            return fn(*args)
        track = torch.is_grad_enabled()
        if track:
            args = _mark_backward(self, name, "stop", args)
        self.start(name)
        try:
            out = fn(*args)
        finally:
            self.stop(name)
        if track and isinstance(out, torch.Tensor) and out.requires_grad:
            (out,) = _mark_backward(self, name, "start", (out,))
        return out

    def collect(self) -> dict[str, float]:
        """Seconds per phase since the last call, and reset (open intervals are dropped)."""
        totals, self._totals = self._totals, {}
        for name, begin, end in self._events:
            totals[name] = totals.get(name, 0.0) + begin.elapsed_time(end) / 1e3
        self._events, self._open = [], {}
        return totals


class _BackwardMark(torch.autograd.Function):
    """Identity on its tensors; its backward starts or stops a phase of a :class:`PhaseTimer`."""

    @staticmethod
    def forward(ctx, timer: PhaseTimer, name: str, action: str, *tensors: torch.Tensor):
        ctx.timer, ctx.name, ctx.action = timer, name, action
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        if ctx.timer.enabled:
            getattr(ctx.timer, ctx.action)(ctx.name)
        return (None, None, None) + grads


def _mark_backward(timer: PhaseTimer, name: str, action: str, args: tuple) -> tuple:
    """``args`` with the tensors that require grad passed through one :class:`_BackwardMark`."""
    idx = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
    if not idx:
        return args
    marked = _BackwardMark.apply(timer, name, action, *(args[i] for i in idx))
    out = list(args)
    for i, t in zip(idx, marked):
        out[i] = t
    return tuple(out)


def attach_timer(model: nn.Module, timer: PhaseTimer | None) -> nn.Module:
    """Give every attention module of ``model`` the ``timer`` (None: stop timing). Returns the model."""
    for m in model.modules():
        if getattr(m, "kind", None) in ("softmax", "linear") and hasattr(m, "timer"):
            m.timer = timer
    return model


# ---------------------------------------------------------------------------------------------
# Layers.


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, head_dim/2] of the rotary embedding at ``positions`` (angles in fp64)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the halves of the head dimension of x [B, T, H, D] by the angles of cos/sin [T, D/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def retnet_log_decay(n_heads: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
                     ) -> torch.Tensor:
    """RetNet's per-head decay ladder in log space: log(1 - 2^(-5-h)), h = 0..H-1, computed in fp64
    and returned in ``dtype`` (the compute dtype: fp32, or fp64 for fp64 models)."""
    h = torch.arange(n_heads, dtype=torch.float64, device=device)
    return torch.log1p(-torch.pow(2.0, -5.0 - h)).to(dtype)


_FEATURE_MAPS = {
    "identity": lambda x: x,
    "elu1": lambda x: F.elu(x) + 1.0,
    "relu": F.relu,
    "silu": F.silu,
}


class SoftmaxAttention(nn.Module):
    """Causal GQA softmax attention with RoPE on global positions (document positions with
    ``cu_seqlens``), with the config's sliding ``window`` and logit ``softcap``."""

    kind = "softmax"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.window, self.softcap = cfg.window, cfg.softcap
        self.context_parallel: ContextParallel | None = None
        self.timer: PhaseTimer | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cu_seqlens: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        args = (q, k, v) if cu_seqlens is None else (q, k, v, cu_seqlens)
        o = self.mix(*args) if self.timer is None else self.timer.call(self.kind, self.mix, *args)
        return self.wo(o.reshape(B, T, -1))

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            cu_seqlens: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """Token mixing: on one device, or across the group of ``context_parallel``.

        q [B, T, n_heads, head_dim], k / v [B, T, n_kv_heads, head_dim]; before calling seqpar the
        head axis is checked against the configured counts (a [B, H, T, D] tensor raises a
        ValueError naming both shapes instead of mixing heads as tokens). ``cu_seqlens``: the
        GLOBAL document boundaries of the packed row (B = 1), or None."""
        cp = self.context_parallel
        if cp is None:
            return local_softmax_attention(q, k, v, window=self.window, softcap=self.softcap, cu_seqlens=cu_seqlens)
        import seqpar

        check_head_axis(f"{type(self).__name__}.mix", "[b, s, h, d]", q, k, v, num_heads=self.n_heads,
                        num_kv_heads=self.n_kv_heads)
        group = cp.group if cp.strategy == "usp" else cp.sp_group
        o = _eager(seqpar.attention, q, k, v, strategy=cp.strategy, layout=cp.layout, group=group, causal=True,
                   backend=cp.backend, validate=cp.validate, cu_seqlens=cu_seqlens, window=self.window,
                   softcap=self.softcap)
        return o.to(q.dtype)


class LinearAttention(nn.Module):
    """Causal linear attention with a feature map, a decay, and output norm.

    The decay (``ModelConfig.linear_decay``): ``fixed`` (RetNet's per-head ladder, ``g_gamma``
    [H]), ``gate`` (per head, g [B, T, H] = logsigmoid(low-rank projection) / gate_normalizer),
    ``gla`` (per head and key channel, g [B, T, H, head_dim], the same form: GLA's gates) or
    ``none``. K/V may have fewer heads (GQA); they are repeated locally before the mixer (the
    memory state is per query head anyway, so nothing more is communicated).
    """

    kind = "linear"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.decay, self.use_rope = cfg.linear_decay, cfg.linear_rope
        self.feature_map = _FEATURE_MAPS[cfg.feature_map]
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.gate_normalizer = cfg.gate_normalizer
        if cfg.linear_decay in ("gate", "gla"):
            gates = cfg.n_heads * (cfg.head_dim if cfg.linear_decay == "gla" else 1)
            self.gate = nn.Sequential(nn.Linear(cfg.dim, cfg.gate_rank, bias=False),
                                      nn.Linear(cfg.gate_rank, gates, bias=True))
        self.out_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.linear_output_norm else None
        self.context_parallel: ContextParallel | None = None
        self.timer: PhaseTimer | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cu_seqlens: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        rep = self.n_heads // self.n_kv_heads
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.use_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k = self.feature_map(q), self.feature_map(k)
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        g = g_gamma = None
        if self.decay in ("gate", "gla"):
            g = F.logsigmoid(_in_compute_dtype(self.gate(x))) / self.gate_normalizer
            if self.decay == "gla":
                g = g.view(B, T, self.n_heads, self.head_dim)
        elif self.decay == "fixed":
            g_gamma = retnet_log_decay(self.n_heads, device=x.device, dtype=compute_dtype(q.dtype))
        args = (q, k, v, g, g_gamma) if cu_seqlens is None else (q, k, v, g, g_gamma, cu_seqlens)
        o = self.mix(*args) if self.timer is None else self.timer.call(self.kind, self.mix, *args)
        if self.out_norm is not None:  # normalise in the parameters' dtype (fp32 under autocast)
            o = self.out_norm(o.to(self.out_norm.weight.dtype))
        return self.wo(o.reshape(B, T, -1))

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
            g_gamma: torch.Tensor | None, cu_seqlens: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """Token mixing: on one device, or across the group of ``context_parallel``.

        q, k, v [B, T, n_heads, head_dim] (k / v already repeated to n_heads); g [B, T, n_heads]
        or [B, T, n_heads, head_dim] (GLA) or g_gamma [n_heads]; ``cu_seqlens``: the GLOBAL
        document boundaries of the packed row (B = 1), the state resets at each document start.
        Before calling seqpar the head axis is checked against n_heads (see
        :meth:`SoftmaxAttention.mix`)."""
        return _mix_recurrent(self, q, k, v, n_heads=self.n_heads, g=g, g_gamma=g_gamma, cu_seqlens=cu_seqlens)


class GatedDeltaNet(nn.Module):
    """A gated delta-rule layer (Gated DeltaNet, Yang et al. 2024; the linear layers of Qwen3-Next).

    Per head h of ``delta_heads`` (query / key dimension Dk, value dimension Dv, see
    :attr:`ModelConfig.delta_dims`):

        q, k, v = silu(W_q x), silu(W_k x), silu(W_v x)       (q, k L2-normalised in the mixer)
        beta = sigmoid(W_b x)                                 [B, T, H], in (0, 1)
        g = -exp(A_log) * softplus(W_a x + dt_bias)           [B, T, H], Mamba2-style log decay
        S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = Dk^-1/2 S_t^T q_t
        out = W_o (RMSNorm(o) * silu(W_gate x))               (gated RMSNorm per head)

    ``A_log`` and ``dt_bias`` are per-head parameters initialised as Mamba2's / Qwen3-Next's
    (A uniform in [1, 16]; softplus(dt_bias) log-uniform in [1e-3, 0.1]): see
    :meth:`reset_decay_parameters`. Unlike Qwen3-Next and fla's GatedDeltaNet there is NO short
    causal convolution on q, k, v: under sequence parallelism it would need a halo exchange of the
    previous rank's last tokens (and its gradient back), which seqpar does not have; the SiLU that
    follows the convolution there is applied directly to the projections here. No RoPE.

    ``kind`` is ``"linear"``: the layer runs on the linear-attention strategies (lasp2 / lasp1),
    is timed as linear attention and needs consecutive tokens per rank, like :class:`LinearAttention`.
    """

    kind = "linear"
    family = "delta"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.key_dim, self.value_dim = cfg.delta_dims
        H, Dk, Dv = self.n_heads, self.key_dim, self.value_dim
        self.wq = nn.Linear(cfg.dim, H * Dk, bias=False)
        self.wk = nn.Linear(cfg.dim, H * Dk, bias=False)
        self.wv = nn.Linear(cfg.dim, H * Dv, bias=False)
        self.w_beta = nn.Linear(cfg.dim, H, bias=False)
        self.w_decay = nn.Linear(cfg.dim, H, bias=False)
        self.w_gate = nn.Linear(cfg.dim, H * Dv, bias=False)
        self.A_log = nn.Parameter(torch.empty(H))
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.out_norm = nn.RMSNorm(Dv, eps=cfg.norm_eps)
        self.wo = nn.Linear(H * Dv, cfg.dim, bias=False)
        self.context_parallel: ContextParallel | None = None
        self.timer: PhaseTimer | None = None
        self.reset_decay_parameters()

    @torch.no_grad()
    def reset_decay_parameters(self, a_range: tuple[float, float] = (1.0, 16.0), dt_min: float = 1e-3,
                               dt_max: float = 0.1, dt_floor: float = 1e-4) -> None:
        """Mamba2's initialisation: A_log = log(A), A ~ U(a_range); dt_bias = softplus^-1(dt),
        dt log-uniform in [dt_min, dt_max] (at least dt_floor)."""
        self.A_log.copy_(mamba2_a_log(self.A_log, a_range=a_range))
        self.dt_bias.copy_(mamba2_dt_bias(self.dt_bias, dt_min=dt_min, dt_max=dt_max, dt_floor=dt_floor))

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(g, beta) [B, T, H] of the input x [B, T, dim], in the compute dtype (fp32, fp64 for fp64)."""
        beta = torch.sigmoid(_in_compute_dtype(self.w_beta(x)))
        a = _in_compute_dtype(self.w_decay(x))
        g = -torch.exp(self.A_log.to(a.dtype)) * F.softplus(a + self.dt_bias.to(a.dtype))
        return g, beta

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """x [B, T, dim] -> [B, T, dim]. ``cos`` / ``sin`` (RoPE) are unused; ``cu_seqlens`` the
        GLOBAL document boundaries of the packed row (B = 1): the state resets at each start."""
        B, T, _ = x.shape
        H, Dk, Dv = self.n_heads, self.key_dim, self.value_dim
        q = F.silu(self.wq(x)).view(B, T, H, Dk)
        k = F.silu(self.wk(x)).view(B, T, H, Dk)
        v = F.silu(self.wv(x)).view(B, T, H, Dv)
        g, beta = self.gates(x)
        args = (q, k, v, g, beta) if cu_seqlens is None else (q, k, v, g, beta, cu_seqlens)
        o = self.mix(*args) if self.timer is None else self.timer.call(self.kind, self.mix, *args)
        o = self.out_norm(o.to(self.out_norm.weight.dtype))  # in the parameters' dtype (fp32 under autocast)
        o = o * F.silu(self.w_gate(x).view(B, T, H, Dv)).to(o.dtype)
        return self.wo(o.reshape(B, T, H * Dv))

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
            cu_seqlens: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """The gated delta rule with q and k L2-normalised inside (``use_qk_l2norm``): on one
        device, or across the group of ``context_parallel``. q, k [B, T, H, Dk], v [B, T, H, Dv],
        g and beta [B, T, H]; ``cu_seqlens`` as in :meth:`LinearAttention.mix`."""
        return _mix_recurrent(self, q, k, v, n_heads=self.n_heads, g=g, beta=beta, use_qk_l2norm=True,
                              cu_seqlens=cu_seqlens)


def _in_compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """x in fp64 when it is fp64, else in fp32 (gates are formed in the compute dtype)."""
    return x if x.dtype == torch.float64 else x.float()


def _mix_recurrent(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, n_heads: int,
                   cu_seqlens: torch.Tensor | Sequence[int] | None, **gates: Any) -> torch.Tensor:
    """The token mixing of a linear-attention or delta-rule layer: ``chunk_linear_attention`` on
    one device (once per document with ``cu_seqlens``), :func:`seqpar.linear_attention` across
    the group of ``module.context_parallel``.
    ``gates``: the keyword arguments naming the family (g, g_gamma, beta, use_qk_l2norm); None
    values are left out, so that a family's call passes only what it uses."""
    gates = {name: value for name, value in gates.items() if value is not None}
    cp = module.context_parallel
    if cp is None:
        if cu_seqlens is None:
            return chunk_linear_attention(q, k, v, **gates)[0].to(q.dtype)
        return _documents_apart(q, k, v, cu_seqlens, gates)
    import seqpar

    if cu_seqlens is not None:
        gates["cu_seqlens"] = cu_seqlens
    check_head_axis(f"{type(module).__name__}.mix", "[b, s, h, d]", q, k, v, num_heads=n_heads,
                    num_kv_heads=n_heads)
    o, _ = _eager(seqpar.linear_attention, q, k, v, strategy=cp.strategy, layout=cp.layout, group=cp.sp_group,
                  backend=cp.backend, validate=cp.validate, **gates)
    return o.to(q.dtype)


@torch.compiler.disable(reason="seqpar's sequence-parallel calls communicate: they run eagerly")
def _eager(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, kept out of torch.compile's graphs (one graph break per call): the
    sequence-parallel calls (:func:`seqpar.attention`, :func:`seqpar.linear_attention`) run
    collectives, hold a per-group lock and plan on the host; their kernels are ``seqpar::`` ops
    (:mod:`seqpar.kernels.custom_ops`). In eager mode a plain call."""
    return fn(*args, **kwargs)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _documents_apart(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | Sequence[int],
                     gates: dict[str, Any]) -> torch.Tensor:
    """Single-device linear attention of a packed row (B = 1): ``chunk_linear_attention`` on each
    document of ``cu_seqlens`` [0, ..., T] on its own (its state starts from zero), the outputs
    joined along the tokens. Per-token gates (g, beta) are cut with the documents."""
    T = q.shape[1]
    documents = check_documents(cu_seqlens, T, q.device if isinstance(cu_seqlens, torch.Tensor) else None) or (0, T)
    if q.shape[0] != 1:
        raise ValueError(f"cu_seqlens describes the documents of ONE packed row; got batch size {q.shape[0]}")
    per_token = {name for name, value in gates.items() if isinstance(value, torch.Tensor) and value.dim() >= 3}
    parts = []
    for a, b in zip(documents, documents[1:]):
        if b > a:
            cut = {name: value[:, a:b] if name in per_token else value for name, value in gates.items()}
            parts.append(chunk_linear_attention(q[:, a:b], k[:, a:b], v[:, a:b], **cut)[0].to(q.dtype))
    return torch.cat(parts, dim=1) if parts else q.new_zeros(*q.shape[:3], v.shape[-1])


#: The attention module of each layer kind of ``ModelConfig.layer_kinds``.
ATTENTION_CLASSES: dict[str, type[nn.Module]] = {"softmax": SoftmaxAttention, "linear": LinearAttention,
                                                 "delta": GatedDeltaNet}


class Block(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = ATTENTION_CLASSES[kind](cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.hidden_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cu_seqlens: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, cu_seqlens)
        return x + self.feed_forward(self.ffn_norm(x))


def mamba2_a_log(like: torch.Tensor, a_range: tuple[float, float] = (1.0, 16.0),
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """log(A), A ~ U(a_range): Mamba2's decay-rate initialisation, shaped and typed as ``like``."""
    a = torch.empty(like.shape, dtype=torch.float64, device=like.device).uniform_(*a_range, generator=generator)
    return a.log().to(like.dtype)


def mamba2_dt_bias(like: torch.Tensor, dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """softplus^-1(dt), dt log-uniform in [dt_min, dt_max] (at least dt_floor): Mamba2's step bias."""
    log_dt = torch.empty(like.shape, dtype=torch.float64, device=like.device).uniform_(
        math.log(dt_min), math.log(dt_max), generator=generator)
    dt = log_dt.exp().clamp(min=dt_floor)
    return (dt + torch.log(-torch.expm1(-dt))).to(like.dtype)  # softplus(dt_bias) == dt


def _is_decay(name: str) -> bool:
    """Whether parameter ``name`` is a delta-rule layer's Mamba2 decay (A_log / dt_bias)."""
    return name.endswith(("A_log", "dt_bias"))


def _fill_from_full(p: torch.Tensor, full: torch.Tensor) -> None:
    """Copy ``full`` (the whole parameter, on the CPU) into ``p``: into this rank's shard when
    ``p`` is a DTensor (FSDP2), without communication."""
    mesh = getattr(p, "device_mesh", None)
    if mesh is None:
        p.copy_(full)
        return
    from torch.distributed.tensor import distribute_tensor

    shard = distribute_tensor(full.to(p.to_local().device), mesh, p.placements, src_data_rank=None)
    p.to_local().copy_(shard.to_local())


class HybridLM(nn.Module):
    """The hybrid decoder language model: tokens [B, T] -> logits [B, T, vocab].

    ``positions`` (the global positions of the tokens, [T]) default to what the model's
    ``context_parallel`` says this rank holds, or 0..T-1 on one device.
    ``cu_seqlens`` (optional): the GLOBAL document boundaries ``[0, e_1, ..., T_global]`` of one
    packed row (B = 1; T_global = T x the sequence-parallel size), the same on every rank, as a
    1-D integer tensor or a sequence of ints. Softmax layers then attend within each document,
    RoPE positions restart at every document start, and linear and delta-rule layers reset their
    state at every document start.
    ``activation_checkpointing`` recomputes each layer in backward.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, kind) for kind in cfg.layer_kinds)
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.context_parallel: ContextParallel | None = None
        self.activation_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self, seed: int | None = None) -> None:
        """Normal(0, init_std) weights; residual output projections scaled by 1/sqrt(2 n_layers);
        norm weights 1, biases 0; the delta-rule layers' A_log / dt_bias as Mamba2
        (:meth:`GatedDeltaNet.reset_decay_parameters`).

        ``seed`` None: drawn from torch's global generator in parameter order. With ``seed``: each
        parameter from a CPU generator of its own, seeded by (seed, its name), so the values do not
        depend on the order, the device or the sharding: a model built on the meta device, sharded
        with FSDP2 and materialised with ``to_empty`` gets on each rank the shard of exactly the
        values one process gets (drawn one full parameter at a time, never the whole model)."""
        with torch.no_grad():
            if seed is None:  # in parameter order, the Mamba2 decays last (a stable sort)
                for name, p in sorted(self.named_parameters(), key=lambda item: _is_decay(item[0])):
                    p.copy_(self._drawn(name, p, None))
                return
            for name, p in self.named_parameters():
                _fill_from_full(p, self.initial_value(name, tuple(p.shape), p.dtype, seed))

    def initial_value(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
        """The initial value of parameter ``name`` (full ``shape``, on the CPU) under ``seed``, by
        the rules of :meth:`reset_parameters`, from a generator seeded by (seed, name)."""
        gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63 - 1))
        return self._drawn(name, torch.empty(shape, dtype=dtype), gen)

    def _drawn(self, name: str, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """A new tensor shaped, typed and placed as ``like`` holding parameter ``name``'s initial
        value by the rules of :meth:`reset_parameters`, drawn from ``generator`` (None: torch's
        global one)."""
        if name.endswith("A_log"):
            return mamba2_a_log(like, generator=generator)
        if name.endswith("dt_bias"):
            return mamba2_dt_bias(like, generator=generator)
        if like.dim() == 1:
            return torch.zeros_like(like) if name.endswith("bias") else torch.ones_like(like)
        std = self.config.init_std
        if name.endswith(("wo.weight", "w2.weight")):
            std = std / math.sqrt(2 * self.config.n_layers)
        return torch.empty_like(like).normal_(0.0, std, generator=generator)

    def positions(self, local_len: int, device: torch.device) -> torch.Tensor:
        """Global positions of the ``local_len`` tokens this rank holds."""
        cp = self.context_parallel
        if cp is None:
            return torch.arange(local_len, device=device)
        if torch.compiler.is_compiling():  # the same positions from calls torch.compile traces
            group = cp.sp_group
            return global_positions(cp.layout, dist.get_rank(group), dist.get_world_size(group), local_len,
                                    device=device)
        return local_positions(local_len, layout=cp.layout, group=cp.sp_group, device=device)

    def document_bounds(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor | Sequence[int] | None
                        ) -> tuple[int, ...] | None:
        """The document boundaries of ``cu_seqlens`` for ``tokens`` [1, T_local] (None: no
        cu_seqlens, or one document), checked once per forward: the batch must be one packed row, and the
        boundaries must end at the global length."""
        if cu_seqlens is None:
            return None
        if tokens.dim() != 2 or tokens.shape[0] != 1:
            raise ValueError(f"cu_seqlens describes the documents of ONE packed row: tokens must be [1, T_local], "
                             f"got shape {tuple(tokens.shape)}; pack the batch into one row")
        cp = self.context_parallel
        world = 1
        if cp is not None and torch.compiler.is_compiling():
            world = dist.get_world_size(cp.sp_group)  # traced as a constant
        elif cp is not None:
            from seqpar.comm.groups import group_rank_and_size

            world = group_rank_and_size(cp.sp_group)[1]
        device = tokens.device if isinstance(cu_seqlens, torch.Tensor) else None
        return check_documents(cu_seqlens, tokens.shape[1] * world, device)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        documents = self.document_bounds(tokens, cu_seqlens)
        if positions is None:
            positions = self.positions(tokens.shape[1], tokens.device)
        if documents is not None:  # RoPE counts from each document's start
            positions = document_positions(positions, documents)
        h = self.tok_embeddings(tokens)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, h.dtype)
        # the layers get the checked boundaries as a tuple (None for one document): no device
        # synchronisation per layer to read them
        for layer in self.layers:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(layer, h, cos, sin, documents, use_reentrant=False)
            else:
                h = layer(h, cos, sin, documents)
        h = self.norm(h)
        return self.output(h) if self.output is not None else F.linear(h, self.tok_embeddings.weight)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def attention_modules(self) -> list[nn.Module]:
        """The attention module of every layer, in order."""
        return [layer.attention for layer in self.layers]
