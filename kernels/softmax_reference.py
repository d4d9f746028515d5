"""Plain PyTorch blockwise softmax attention: the oracle for the Triton kernel and the CPU path
of every strategy.

Shapes: q [B, Tq, Hq, D], k and v [B, Tk, Hkv, D] with Hq % Hkv == 0 (query head h reads KV
head h // (Hq // Hkv); K/V are never repeated in memory). Outputs are in the compute dtype
(float64 for float64 inputs, float32 otherwise): o [B, Tq, Hq, D], lse [B, Hq, Tq] (natural log).

Mask (block-local indices i, j): key j is visible to query i iff

    (diagonal_offset is None or j <= i + diagonal_offset) and (window_offset is None or j >= i + window_offset)

``diagonal_offset`` m is the upper bound (0: causal, -1: strictly causal, other values: blocks at
other global offsets); ``window_offset`` w the lower bound (a sliding window, turned into a band
per block by the planner). Either, both (a band) or neither may be given. Rows that see no key
get o = 0 and lse = -inf (and zero gradients).

Softcap (Gemma 2): with ``softcap`` c (> 0) the scores are s = c * tanh(scale * q.k / c), capped
*before* the mask; lse is that of the capped scores (the row-global lse handed to the backward
must be computed with the same c), and the backward is exact: dS_raw = dS_capped * (1 - tanh^2).
"""
from __future__ import annotations

import torch

# Queries are processed in slices of this many rows so that the score matrix stays small.
QUERY_SLICE = 1024


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _band_hidden(tq: int, tk: int, diagonal_offset: int | None, window_offset: int | None, q_offset: int,
                 device: torch.device) -> torch.Tensor | None:
    """[tq, Tk] bool, True where the key is hidden from the query (rows q_offset..), or None
    when there is no mask."""
    if diagonal_offset is None and window_offset is None:
        return None
    i = torch.arange(q_offset, q_offset + tq, device=device).unsqueeze(1)
    j = torch.arange(tk, device=device).unsqueeze(0)
    hidden = torch.zeros(tq, tk, dtype=torch.bool, device=device)
    if diagonal_offset is not None:
        hidden |= j > i + diagonal_offset
    if window_offset is not None:
        hidden |= j < i + window_offset
    return hidden


def _capped_scores(q: torch.Tensor, k: torch.Tensor, scale: float, diagonal_offset: int | None, q_offset: int, *,
                   window_offset: int | None = None, softcap: float | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(masked scores [B, Hkv, G, tq, Tk], tanh of the raw scores / softcap or None without
    softcap) of q [B, tq, Hkv, G, D] (rows q_offset.. of the block) against k [B, Tk, Hkv, D]."""
    s = torch.einsum("bqhgd,bkhd->bhgqk", q, k) * scale
    t = None
    if softcap is not None:
        t = torch.tanh(s / softcap)
        s = t * softcap
    hidden = _band_hidden(q.shape[1], k.shape[1], diagonal_offset, window_offset, q_offset, q.device)
    if hidden is not None:
        s = s.masked_fill(hidden, float("-inf"))
    return s, t


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, diagonal_offset: int | None, q_offset: int, *,
            window_offset: int | None = None, softcap: float | None = None) -> torch.Tensor:
    # q [B, tq, Hkv, G, D], k [B, Tk, Hkv, D] -> scores [B, Hkv, G, tq, Tk] (capped, then masked)
    return _capped_scores(q, k, scale, diagonal_offset, q_offset, window_offset=window_offset, softcap=softcap)[0]


def _finite(lse: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def attention_block_forward_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                                      diagonal_offset: int | None = None, window_offset: int | None = None,
                                      softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (o, lse) of softmax(cap(scale * q k^T) + mask) v for one block."""
    B, Tq, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    cd = compute_dtype(q.dtype)
    qf = q.to(cd).reshape(B, Tq, Hkv, G, D)
    kf, vf = k.to(cd), v.to(cd)
    o = torch.empty(B, Tq, Hkv, G, v.shape[-1], dtype=cd, device=q.device)
    lse = torch.empty(B, Hkv, G, Tq, dtype=cd, device=q.device)
    for start in range(0, Tq, QUERY_SLICE):
        stop = min(Tq, start + QUERY_SLICE)
        s = _scores(qf[:, start:stop], kf, scale, diagonal_offset, start, window_offset=window_offset,
                    softcap=softcap)
        block_lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - _finite(block_lse).unsqueeze(-1))
        o[:, start:stop] = torch.einsum("bhgqk,bkhd->bqhgd", p, vf)
        lse[..., start:stop] = block_lse
    return o.reshape(B, Tq, Hq, -1), lse.reshape(B, Hq, Tq)


def attention_block_backward_reference(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                       lse: torch.Tensor, delta: torch.Tensor, *, scale: float,
                                       diagonal_offset: int | None = None, window_offset: int | None = None,
                                       softcap: float | None = None
                                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of one block, in the compute dtype.

    ``lse`` [B, Hq, Tq] is the log-sum-exp of the *whole* row (over every block the query saw)
    and ``delta`` [B, Hq, Tq] = rowsum(o * do) of the final output, so the block's probabilities
    are exp(s - lse) and dS = P * (dP - delta) (times 1 - tanh^2 of the raw scores / softcap
    with ``softcap``, whose lse must be of the capped scores).
    """
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    cd = compute_dtype(q.dtype)
    qf = q.to(cd).reshape(B, Tq, Hkv, G, D)
    kf, vf = k.to(cd), v.to(cd)
    dof = do.to(cd).reshape(B, Tq, Hkv, G, -1)
    lse_f = _finite(lse.to(cd).reshape(B, Hkv, G, Tq))
    delta_f = delta.to(cd).reshape(B, Hkv, G, Tq)
    dq = torch.empty(B, Tq, Hkv, G, D, dtype=cd, device=q.device)
    dk = torch.zeros(B, Tk, Hkv, D, dtype=cd, device=q.device)
    dv = torch.zeros(B, Tk, Hkv, v.shape[-1], dtype=cd, device=q.device)
    for start in range(0, Tq, QUERY_SLICE):
        stop = min(Tq, start + QUERY_SLICE)
        s, t = _capped_scores(qf[:, start:stop], kf, scale, diagonal_offset, start, window_offset=window_offset,
                              softcap=softcap)
        p = torch.exp(s - lse_f[..., start:stop].unsqueeze(-1))
        do_s = dof[:, start:stop]
        dv += torch.einsum("bhgqk,bqhgd->bkhd", p, do_s)
        dp = torch.einsum("bqhgd,bkhd->bhgqk", do_s, vf)
        ds = p * (dp - delta_f[..., start:stop].unsqueeze(-1))
        if t is not None:  # d(c tanh(x / c)) / dx = 1 - tanh^2 (t is finite even where masked: p = 0 there)
            ds = ds * (1 - t * t)
        ds = ds * scale
        dq[:, start:stop] = torch.einsum("bhgqk,bkhd->bqhgd", ds, kf)
        dk += torch.einsum("bhgqk,bqhgd->bkhd", ds, qf[:, start:stop])
    return dq.reshape(B, Tq, Hq, D), dk, dv


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                        scale: float | None = None, softcap: float | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable single-device attention (o, lse) in the compute dtype, via autograd of
    plain torch ops (``softcap``: capped scores, see the module doc). The test oracle for every
    strategy."""
    B, Tq, Hq, D = q.shape
    Hkv = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    cd = compute_dtype(q.dtype)
    qf = q.to(cd).reshape(B, Tq, Hkv, Hq // Hkv, D)
    s = _scores(qf, k.to(cd), scale, 0 if causal else None, 0, softcap=softcap)
    lse = torch.logsumexp(s, dim=-1)
    o = torch.einsum("bhgqk,bkhd->bqhgd", torch.softmax(s, dim=-1), v.to(cd))
    return o.reshape(B, Tq, Hq, -1), lse.reshape(B, Hq, Tq)
