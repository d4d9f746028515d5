"""The test oracle for masked softmax attention: dense fp64 attention with an explicit [Tq, Tk]
boolean mask, logit softcap and attention sinks, differentiated by autograd.

Nothing here is shared with the library's kernels or plans: the mask is built token by token from
global positions, documents (``cu_seqlens``) and the window, exactly as the API defines them.
"""
from __future__ import annotations

import torch


def band_mask(q_len: int, k_len: int, diagonal_offset: int | None, window_offset: int | None) -> torch.Tensor:
    """Block-local mask: key j visible to query i iff j <= i + diagonal_offset (None: no upper
    bound) and j >= i + window_offset (None: no lower bound)."""
    i = torch.arange(q_len).unsqueeze(1)
    j = torch.arange(k_len).unsqueeze(0)
    visible = torch.ones(q_len, k_len, dtype=torch.bool)
    if diagonal_offset is not None:
        visible &= j <= i + diagonal_offset
    if window_offset is not None:
        visible &= j >= i + window_offset
    return visible


def document_ids(positions: torch.Tensor, cu_seqlens: torch.Tensor | list[int] | None) -> torch.Tensor:
    """The document index of every global position (all 0 without documents)."""
    if cu_seqlens is None:
        return torch.zeros_like(positions)
    bounds = torch.as_tensor(cu_seqlens, dtype=torch.long).cpu()
    return torch.bucketize(positions.cpu(), bounds[1:], right=True)


def global_mask(q_positions: torch.Tensor, k_positions: torch.Tensor, *, causal: bool,
                window: int | None = None, cu_seqlens=None) -> torch.Tensor:
    """[Tq, Tk] bool: query at global position i sees key at j iff same document, and (causal)
    j <= i, and (window) i - window < j."""
    i = q_positions.cpu().long().unsqueeze(1)
    j = k_positions.cpu().long().unsqueeze(0)
    visible = document_ids(q_positions, cu_seqlens).unsqueeze(1) == document_ids(k_positions, cu_seqlens).unsqueeze(0)
    if causal:
        visible &= j <= i
    if window is not None:
        visible &= j > i - window
    return visible


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, *, scale: float,
                     softcap: float | None = None, sinks: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, Tq, Hq, Dv], lse [B, Hq, Tq]) in fp64, differentiable in q, k, v and sinks.

    q [B, Tq, Hq, D], k / v [B, Tk, Hkv, D] (query head h reads KV head h // (Hq // Hkv)),
    ``mask`` [Tq, Tk] bool (True: visible). Scores are scale * q.k, then softcap * tanh(s / softcap),
    then masked. ``sinks`` [Hq]: one extra logit per head in every row's denominator (lse includes
    it). Rows that see nothing (and have no sink) give o = 0, lse = -inf."""
    qd, kd, vd = q.double(), k.double(), v.double()
    group = q.shape[2] // k.shape[2]
    kd = kd.repeat_interleave(group, dim=2)
    vd = vd.repeat_interleave(group, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", qd, kd) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask.to(s.device), float("-inf"))
    if sinks is not None:
        sink = sinks.double().view(1, -1, 1, 1).expand(s.shape[0], -1, s.shape[2], 1)
        s = torch.cat([s, sink], dim=-1)
    lse = torch.logsumexp(s, dim=-1)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    p = torch.exp(s - safe.unsqueeze(-1))
    if sinks is not None:
        p = p[..., :-1]
    o = torch.einsum("bhqk,bkhd->bqhd", p, vd)
    return o, lse
