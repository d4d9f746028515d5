"""Helpers shared by the framework integrations (framework-free)."""
from __future__ import annotations

import math

import torch

from seqpar.kernels.softmax_reference import compute_dtype

SOFTMAX_STRATEGIES = ("ring", "allgather", "ulysses", "usp")
LINEAR_STRATEGIES = ("lasp2", "lasp1")
FEATURE_MAPS = ("identity", "silu", "elu1", "relu")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise a ValueError naming them."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {choices}")
    return value


def feature_map(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The feature map of a linear-attention layer applied to queries / keys."""
    if kind == "identity":
        return x
    if kind == "silu":
        return torch.nn.functional.silu(x)
    if kind == "elu1":
        return torch.nn.functional.elu(x) + 1.0
    if kind == "relu":
        return torch.relu(x)
    raise ValueError(f"unknown feature map {kind!r}; expected one of {FEATURE_MAPS}")


def retnet_decay(num_heads: int, head_offset: int = 0, total_heads: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-head constant log-decay ``log(1 - 2**(-5 - 5 h / H))`` (RetNet / Lightning style), shape
    [num_heads], for heads ``head_offset .. head_offset + num_heads - 1`` of ``total_heads``.

    Computed in fp64 and returned in ``dtype``: pass the compute dtype of the layer (fp32, or fp64
    for fp64 inputs) so that fp64 models keep fp64 accuracy."""
    total = num_heads if total_heads is None else total_heads
    h = torch.arange(head_offset, head_offset + num_heads, dtype=torch.float64, device=device)
    return torch.log1p(-torch.pow(2.0, -5.0 - 5.0 * h / max(total, 1))).to(dtype)


def linear_attention_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, strategy: str, layout,
                           group, feature: str, g_gamma: torch.Tensor | None, scale: float | None,
                           normalize: bool, eps: float = 1e-6, cu_seqlens=None, backend: str = "auto") -> torch.Tensor:
    """Causal linear attention of local shards [B, T_local, H, D] over ``group``.

    Applies the feature map to q and k, repeats k/v heads to q's (GQA: linear attention sends
    states, not K/V, so repeating does not add traffic), runs ``seqpar.linear_attention`` and, with
    ``normalize``, a parameter-free RMS norm over the head dimension of the output (in fp32, or
    fp64 for fp64 outputs). ``cu_seqlens``: packed documents (global boundaries).
    """
    import seqpar

    if k.shape[2] != q.shape[2]:
        if q.shape[2] % k.shape[2] != 0:
            raise ValueError(f"query heads {q.shape[2]} are not a multiple of key/value heads {k.shape[2]}")
        rep = q.shape[2] // k.shape[2]
        k = k.repeat_interleave(rep, dim=2)
        v = v.repeat_interleave(rep, dim=2)
    q = feature_map(q, feature)
    k = feature_map(k, feature)
    o, _ = seqpar.linear_attention(q, k, v, strategy=strategy, layout=layout, group=group,
                                   g_gamma=g_gamma, scale=scale, cu_seqlens=cu_seqlens, backend=backend)
    if normalize:  # in fp32, or fp64 for fp64 outputs
        of = o.to(compute_dtype(o.dtype))
        o = (of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + eps)).to(o.dtype)
    return o


def default_scale(head_dim: int) -> float:
    """Softmax scale ``head_dim ** -0.5``."""
    return 1.0 / math.sqrt(head_dim)
