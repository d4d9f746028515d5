"""Plain PyTorch linear attention with optional decay: the oracle for the Triton kernel and the
CPU path of every linear-attention strategy.

Conventions (flash-linear-attention's): q, k [B, T, H, Dk], v [B, T, H, Dv] (Dk and Dv may
differ). Per head the recurrence is

    S_t = exp(g_t) * S_{t-1} + k_t v_t^T        o_t = scale * S_t^T q_t

with the log-space gate ``g`` given either per token (``g`` [B, T, H], data dependent) or per head
(``g_gamma`` [H], a constant decay as in Lightning Attention / RetNet), or absent. ``scale``
defaults to Dk ** -0.5. States are [B, H, Dk, Dv].

Dtypes: everything is computed in the compute dtype (float64 for float64 inputs, float32
otherwise); outputs, gradients and states are returned in it, callers cast.

``g_gamma`` gets no gradient: it is a fixed per-head buffer (as in fla's ``chunk_simple_gla`` with
``g_gamma``). Pass a per-token ``g`` (e.g. ``g_gamma`` expanded to [B, T, H]) to learn a decay.

The chunked kernels tile the sequence as Lightning Attention-2 does: inside a chunk a masked,
decayed Q K^T, across chunks a running state. Decays are handled with the *relative* cumulative
log-gate inside a chunk (b_i = sum of g over the chunk's tokens up to i); every exponential is of
b_i - b_j with j <= i, of b_i, or of b_last - b_j, which are all <= 0 for gates g <= 0 — never the
exponential of a large positive number. The small helpers below (``chunk_decays``,
``chunk_state``, ``state_output`` ...) are the same math the sequence-parallel strategies use
across ranks (seqpar.linear).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from seqpar.kernels.softmax_reference import compute_dtype


def default_scale(q: torch.Tensor, scale: float | None) -> float:
    """``scale`` or Dk ** -0.5."""
    return float(q.shape[-1]) ** -0.5 if scale is None else float(scale)


# ---------------------------------------------------------------------------------------------
# Decay bookkeeping of one chunk (shared with seqpar.linear).


@dataclass
class ChunkDecays:
    """Decays of one run of L tokens, from the cumulative log-gate b (b_i = sum_{j<=i} g_j).

    ``gamma`` = exp(b) [B, L, H] (decay from the run's start to token i, inclusive),
    ``to_end`` = exp(b_last - b) [B, L, H] (decay from token j, exclusive, to the run's end),
    ``log_total`` = b_last [B, H] (log of the whole run's decay Gamma), ``b`` itself [B, L, H].
    With no gate every decay is 1 and ``b`` is None.
    """

    b: torch.Tensor | None
    gamma: torch.Tensor | None
    to_end: torch.Tensor | None
    log_total: torch.Tensor

    def intra(self, L: int, device, dtype) -> torch.Tensor:
        """The [B or 1, H or 1, L, L] matrix exp(b_i - b_j) for j <= i, 0 above the diagonal."""
        mask = torch.ones(L, L, dtype=torch.bool, device=device).tril()
        if self.b is None:
            return mask.to(dtype)[None, None]
        bt = self.b.transpose(1, 2)  # [B, H, L]
        diff = bt.unsqueeze(-1) - bt.unsqueeze(-2)
        return diff.masked_fill(~mask, float("-inf")).exp()


def chunk_decays(g: torch.Tensor | None, g_gamma: torch.Tensor | None, B: int, L: int, H: int,
                 dtype: torch.dtype, device: torch.device) -> ChunkDecays:
    """Decays of a run of L tokens with per-token log gates ``g`` [B, L, H] or per-head ``g_gamma``."""
    if g is None and g_gamma is None:
        return ChunkDecays(None, None, None, torch.zeros(B, H, dtype=dtype, device=device))
    if g is not None:
        b = torch.cumsum(g.to(dtype), dim=1)
    else:
        steps = torch.arange(1, L + 1, dtype=dtype, device=device)
        b = (steps[:, None] * g_gamma.to(dtype)[None, :]).unsqueeze(0).expand(B, L, H)
    last = b[:, -1]
    return ChunkDecays(b, b.exp(), (last.unsqueeze(1) - b).exp(), last.clone())


def _scaled(x: torch.Tensor, d: torch.Tensor | None) -> torch.Tensor:
    """x [B, L, H, D] times the per-token decay d [B, L, H] (None = 1)."""
    return x if d is None else x * d.unsqueeze(-1)


def decay_state(state: torch.Tensor, log_decay: torch.Tensor) -> torch.Tensor:
    """exp(log_decay) * state, with log_decay [B, H] and state [B, H, Dk, Dv]."""
    return state * log_decay.exp()[..., None, None].to(state.dtype)


def chunk_state(k: torch.Tensor, v: torch.Tensor, dec: ChunkDecays) -> torch.Tensor:
    """State of a run started from zero: M = sum_j exp(b_last - b_j) k_j v_j^T  [B, H, Dk, Dv]."""
    return torch.einsum("bjhk,bjhv->bhkv", _scaled(k, dec.to_end), v)


def state_output(q: torch.Tensor, state: torch.Tensor, dec: ChunkDecays, scale: float) -> torch.Tensor:
    """Inter-chunk output of a run that starts from ``state``: scale * (q * gamma) state  [B, L, H, Dv]."""
    return torch.einsum("bihk,bhkv->bihv", _scaled(q, dec.gamma), state.to(q.dtype)) * scale


def output_state_grad(q: torch.Tensor, do: torch.Tensor, dec: ChunkDecays, scale: float) -> torch.Tensor:
    """Gradient that a run's own outputs put on the state it starts from:
    dM = scale * sum_i gamma_i q_i do_i^T  [B, H, Dk, Dv]."""
    return torch.einsum("bihk,bihv->bhkv", _scaled(q, dec.gamma), do) * scale


def boundary_grads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, dec: ChunkDecays,
                   scale: float, state_in: torch.Tensor | None, dstate_out: torch.Tensor | None
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The parts of (dq, dk, dv) of a run that come through its boundary states: from the state it
    starts from (``state_in``, read by every query) and from the gradient of the state it ends
    with (``dstate_out``, written by every key/value). None where that state is None."""
    dq = dk = dv = None
    if state_in is not None:
        dq = _scaled(torch.einsum("bihv,bhkv->bihk", do, state_in.to(do.dtype)), dec.gamma) * scale
    if dstate_out is not None:
        dH = dstate_out.to(k.dtype)
        dk = _scaled(torch.einsum("bjhv,bhkv->bjhk", v, dH), dec.to_end)
        dv = _scaled(torch.einsum("bjhk,bhkv->bjhv", k, dH), dec.to_end)
    return dq, dk, dv


def gate_grad(q: torch.Tensor, dq: torch.Tensor, k: torch.Tensor, dk: torch.Tensor,
              dstate_out: torch.Tensor | None = None, state_out: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient of the per-token log gates of a run from its (dq, dk) and boundary states:

        dg_t = sum_{i >= t} (q_i . dq_i - k_i . dk_i)  +  <dstate_out, state_out>

    (every gate g_t scales the state at every later token of the run and the final state). The
    sum is linear in (dq, dk), so partial gradients can be turned into partial dg and added.
    """
    d = (q * dq).sum(-1) - (k * dk).sum(-1)  # [B, L, H]
    dg = d.flip(1).cumsum(1).flip(1)
    if dstate_out is not None and state_out is not None:
        dg = dg + (dstate_out.to(dg.dtype) * state_out.to(dg.dtype)).sum((-2, -1)).unsqueeze(1)
    return dg


# ---------------------------------------------------------------------------------------------
# Token-by-token oracle.


def state_or_zeros(state: torch.Tensor | None, B: int, H: int, Dk: int, Dv: int, dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
    """``state`` [B, H, Dk, Dv] in ``dtype``, or zeros of that shape when it is None."""
    return state.to(dtype) if state is not None else torch.zeros(B, H, Dk, Dv, dtype=dtype, device=device)


def linear_attention_recurrent_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                                         g: torch.Tensor | None = None, g_gamma: torch.Tensor | None = None,
                                         scale: float | None = None, initial_state: torch.Tensor | None = None,
                                         output_final_state: bool = False
                                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(o, final_state) by the recurrence, one token at a time (differentiable through autograd,
    float64-capable): the test oracle."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    cd = compute_dtype(q.dtype)
    scale = default_scale(q, scale)
    qf, kf, vf = q.to(cd), k.to(cd), v.to(cd)
    S = state_or_zeros(initial_state, B, H, Dk, Dv, cd, q.device)
    outs = []
    for t in range(T):
        if g is not None:
            S = S * g[:, t].to(cd).exp()[..., None, None]
        elif g_gamma is not None:
            S = S * g_gamma.to(cd).exp()[None, :, None, None]
        S = S + kf[:, t, :, :, None] * vf[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", qf[:, t], S) * scale)
    o = torch.stack(outs, dim=1) if outs else torch.zeros(B, 0, H, Dv, dtype=cd, device=q.device)
    return o, (S if output_final_state else None)


# ---------------------------------------------------------------------------------------------
# Chunked forward / backward (Lightning Attention-2 tiling).


def _gate_slice(g: torch.Tensor | None, s: int, e: int) -> torch.Tensor | None:
    return None if g is None else g[:, s:e]


def _chunk_states(kf, vf, g, g_gamma, S, chunk_size, cd):
    """States at the start of every chunk, and the final state."""
    B, T, H, _ = kf.shape
    starts = []
    for s in range(0, T, chunk_size):
        e = min(T, s + chunk_size)
        dec = chunk_decays(_gate_slice(g, s, e), g_gamma, B, e - s, H, cd, kf.device)
        starts.append(S)
        S = decay_state(S, dec.log_total) + chunk_state(kf[:, s:e], vf[:, s:e], dec)
    return starts, S


def chunk_linear_attention_forward_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                                             g: torch.Tensor | None = None, g_gamma: torch.Tensor | None = None,
                                             scale: float | None = None,
                                             initial_state: torch.Tensor | None = None,
                                             output_final_state: bool = False, chunk_size: int = 64
                                             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(o, final_state or None), chunk by chunk: o_c = scale * [(Q K^T * D) V + (Q * gamma) S_c],
    S_{c+1} = Gamma_c S_c + K^T (V * to_end). o and states in the compute dtype."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    cd = compute_dtype(q.dtype)
    scale = default_scale(q, scale)
    qf, kf, vf = q.to(cd), k.to(cd), v.to(cd)
    S = state_or_zeros(initial_state, B, H, Dk, Dv, cd, q.device)
    o = torch.empty(B, T, H, Dv, dtype=cd, device=q.device)
    for s in range(0, T, chunk_size):
        e = min(T, s + chunk_size)
        qc, kc, vc = qf[:, s:e], kf[:, s:e], vf[:, s:e]
        dec = chunk_decays(_gate_slice(g, s, e), g_gamma, B, e - s, H, cd, q.device)
        A = torch.einsum("bihk,bjhk->bhij", qc, kc) * dec.intra(e - s, q.device, cd)
        o[:, s:e] = torch.einsum("bhij,bjhv->bihv", A, vc) * scale + state_output(qc, S, dec, scale)
        S = decay_state(S, dec.log_total) + chunk_state(kc, vc, dec)
    return o, (S if output_final_state else None)


def chunk_linear_attention_backward_reference(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                              v: torch.Tensor, *, g: torch.Tensor | None = None,
                                              g_gamma: torch.Tensor | None = None, scale: float | None = None,
                                              initial_state: torch.Tensor | None = None,
                                              dht: torch.Tensor | None = None, chunk_size: int = 64
                                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                         torch.Tensor | None, torch.Tensor | None]:
    """(dq, dk, dv, dg or None, dh0 or None) of the chunked forward, computed explicitly: states
    are recomputed chunk by chunk, then a reverse sweep carries dS (starting from ``dht``, the
    gradient of the final state) back through the chunks. dg only when ``g`` is given, dh0 only
    when ``initial_state`` is given; g_gamma gets no gradient."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    cd = compute_dtype(q.dtype)
    scale = default_scale(q, scale)
    qf, kf, vf, dof = q.to(cd), k.to(cd), v.to(cd), do.to(cd)
    S0 = state_or_zeros(initial_state, B, H, Dk, Dv, cd, q.device)
    starts, S_final = _chunk_states(kf, vf, g, g_gamma, S0, chunk_size, cd)
    dH = state_or_zeros(dht, B, H, Dk, Dv, cd, q.device)
    dq, dk, dv = torch.empty_like(qf), torch.empty_like(kf), torch.empty_like(vf)
    for c, s in reversed(list(enumerate(range(0, T, chunk_size)))):
        e = min(T, s + chunk_size)
        qc, kc, vc, doc = qf[:, s:e], kf[:, s:e], vf[:, s:e], dof[:, s:e]
        dec = chunk_decays(_gate_slice(g, s, e), g_gamma, B, e - s, H, cd, q.device)
        D = dec.intra(e - s, q.device, cd)
        dA = torch.einsum("bihv,bjhv->bhij", doc, vc) * D * scale
        A = torch.einsum("bihk,bjhk->bhij", qc, kc) * D * scale
        bq, bk, bv = boundary_grads(qc, kc, vc, doc, dec, scale, starts[c], dH)
        dq[:, s:e] = torch.einsum("bhij,bjhk->bihk", dA, kc) + bq
        dk[:, s:e] = torch.einsum("bhij,bihk->bjhk", dA, qc) + bk
        dv[:, s:e] = torch.einsum("bhij,bihv->bjhv", A, doc) + bv
        dH = decay_state(dH, dec.log_total) + output_state_grad(qc, doc, dec, scale)
    dg = None
    if g is not None:
        dg = gate_grad(qf, dq, kf, dk, dht.to(cd) if dht is not None else None, S_final)
    dh0 = dH if initial_state is not None else None
    return dq, dk, dv, dg, dh0
