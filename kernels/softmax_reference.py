"""Plain PyTorch blockwise softmax attention: the oracle for the Triton kernel and the CPU path
of every strategy.

Shapes: q [B, Tq, Hq, D], k and v [B, Tk, Hkv, D] with Hq % Hkv == 0 (query head h reads KV
head h // (Hq // Hkv); K/V are never repeated in memory). Outputs are in the compute dtype
(float64 for float64 inputs, float32 otherwise): o [B, Tq, Hq, D], lse [B, Hq, Tq] (natural log).

Mask: ``diagonal_offset=None`` means no mask; an integer m means key j is visible to query i
iff j <= i + m (0: causal, -1: strictly causal, other values: blocks at other global offsets).
Rows that see no key get o = 0 and lse = -inf.
"""
from __future__ import annotations

import torch

# Queries are processed in slices of this many rows so that the score matrix stays small.
QUERY_SLICE = 1024


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, diagonal_offset: int | None, q_offset: int) -> torch.Tensor:
    # q [B, tq, Hkv, G, D], k [B, Tk, Hkv, D] -> scores [B, Hkv, G, tq, Tk]
    s = torch.einsum("bqhgd,bkhd->bhgqk", q, k) * scale
    if diagonal_offset is not None:
        tq, tk = q.shape[1], k.shape[1]
        i = torch.arange(q_offset, q_offset + tq, device=q.device).unsqueeze(1)
        j = torch.arange(tk, device=q.device).unsqueeze(0)
        s = s.masked_fill(j > i + diagonal_offset, float("-inf"))
    return s


def _finite(lse: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def attention_block_forward_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                                      diagonal_offset: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (o, lse) of softmax(scale * q k^T + mask) v for one block."""
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
        s = _scores(qf[:, start:stop], kf, scale, diagonal_offset, start)
        block_lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - _finite(block_lse).unsqueeze(-1))
        o[:, start:stop] = torch.einsum("bhgqk,bkhd->bqhgd", p, vf)
        lse[..., start:stop] = block_lse
    return o.reshape(B, Tq, Hq, -1), lse.reshape(B, Hq, Tq)


def attention_block_backward_reference(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                       lse: torch.Tensor, delta: torch.Tensor, *, scale: float,
                                       diagonal_offset: int | None = None
                                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of one block, in the compute dtype.

    ``lse`` [B, Hq, Tq] is the log-sum-exp of the *whole* row (over every block the query saw)
    and ``delta`` [B, Hq, Tq] = rowsum(o * do) of the final output, so the block's probabilities
    are exp(s - lse) and dS = P * (dP - delta).
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
        s = _scores(qf[:, start:stop], kf, scale, diagonal_offset, start)
        p = torch.exp(s - lse_f[..., start:stop].unsqueeze(-1))
        do_s = dof[:, start:stop]
        dv += torch.einsum("bhgqk,bqhgd->bkhd", p, do_s)
        dp = torch.einsum("bqhgd,bkhd->bhgqk", do_s, vf)
        ds = p * (dp - delta_f[..., start:stop].unsqueeze(-1)) * scale
        dq[:, start:stop] = torch.einsum("bhgqk,bkhd->bqhgd", ds, kf)
        dk += torch.einsum("bhgqk,bqhgd->bkhd", ds, qf[:, start:stop])
    return dq.reshape(B, Tq, Hq, D), dk, dv


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                        scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable single-device attention (o, lse) in the compute dtype, via autograd of
    plain torch ops. The test oracle for every strategy."""
    B, Tq, Hq, D = q.shape
    Hkv = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    cd = compute_dtype(q.dtype)
    qf = q.to(cd).reshape(B, Tq, Hkv, Hq // Hkv, D)
    s = _scores(qf, k.to(cd), scale, 0 if causal else None, 0)
    lse = torch.logsumexp(s, dim=-1)
    o = torch.einsum("bhgqk,bkhd->bqhgd", torch.softmax(s, dim=-1), v.to(cd))
    return o.reshape(B, Tq, Hq, -1), lse.reshape(B, Hq, Tq)
