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
exponential of a large positive number, and none spans more than one chunk. The computation is
split into stages (:class:`ChunkedRun`: states, outputs; state gradients, input gradients) that
the sequence-parallel strategies (seqpar.linear) call between their communication steps, so that
their local work is exactly this kernel's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from seqpar.kernels.linear_transitions import ScalarDecay
from seqpar.kernels.linear_transitions import decay_factor, decay_state
from seqpar.kernels.linear_transitions import flushed_exp as _flushed_exp
from seqpar.kernels.softmax_reference import compute_dtype


def default_scale(q: torch.Tensor, scale: float | None) -> float:
    """``scale`` or Dk ** -0.5."""
    return float(q.shape[-1]) ** -0.5 if scale is None else float(scale)


# ---------------------------------------------------------------------------------------------
# Token-by-token oracle.


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
# Chunked forward / backward (Lightning Attention-2 tiling), in stages.
#
# A run of T tokens is cut into NT chunks of L tokens (the last one zero-padded: zero q, k, v and
# zero log gates change nothing), held as [B, H, NT, L, D] tensors; chunks are computed in
# batches of a few (cache-sized), and the scans over chunk states are NT small multiply-adds of
# [B, H, Dk, Dv]. Cumulative gates are chunk-local (b_i sums the gates of chunk
# c up to token i), so exp(b) only spans one chunk and nothing underflows over long runs.
#
# The stages are what the sequence-parallel strategies (seqpar.linear) call between their
# communication steps:
#   forward:  chunk_states (states at every chunk start, from an initial state or zero; the final
#             state) -> chunk_outputs;
#   backward: chunk_state_grads (gradient of the state at every chunk end, from dht or zero; the
#             gradient of the initial state) -> chunk_input_grads (dq, dk, dv, dg).
# States computed from zero are shifted to another initial state / final-state gradient by
# with_initial_state / with_final_grad (one multiply-add per chunk, not per token).

# chunks computed in one batch: the [B, H, n, L, L] intra-chunk matrices stay small enough for a
# CPU cache (batching all chunks made every temporary stream through memory: 2x slower at
# T = 8192, H = 8, D = 64 than one chunk at a time)
_MAX_BLOCK_ELEMS = 1 << 15
# lowest cumulative log gate inside a chunk for which the intra-chunk decays are factorised
_FACTOR_MIN_LOG = -60.0


@dataclass
class ChunkGates:
    """Log gates of a run cut into chunks of L tokens. ``b`` [B, H, NT, L] is the chunk-local
    cumulative log gate (None: no gate), ``log_chunk`` [B, H, NT] the log decay of each chunk."""

    T: int
    L: int
    b: torch.Tensor | None
    log_chunk: torch.Tensor

    @property
    def NT(self) -> int:
        return self.log_chunk.shape[-1]

    @property
    def log_total(self) -> torch.Tensor:
        """Log decay of the whole run [B, H]."""
        return self.log_chunk.sum(-1)

    def gamma(self, sl: slice) -> torch.Tensor | None:
        """exp(b): decay from the chunk's start to token i (inclusive), [B, H, n, L, 1]."""
        return None if self.b is None else _flushed_exp(self.b[:, :, sl]).unsqueeze(-1)

    def to_end(self, sl: slice) -> torch.Tensor | None:
        """exp(b_last - b): decay from token j (exclusive) to the chunk's end, [B, H, n, L, 1]."""
        if self.b is None:
            return None
        b = self.b[:, :, sl]
        return _flushed_exp(b[..., -1:] - b).unsqueeze(-1)

    def intra(self, sl: slice, dtype, device) -> torch.Tensor:
        """exp(b_i - b_j) for j <= i, 0 above the diagonal: [B, H, n, L, L] (or [L, L])."""
        mask = torch.ones(self.L, self.L, dtype=torch.bool, device=device).tril()
        if self.b is None:
            return mask.to(dtype)
        b = self.b[:, :, sl]
        return _flushed_exp((b.unsqueeze(-1) - b.unsqueeze(-2)).masked_fill_(~mask, float("-inf")))


def chunk_gates(g: torch.Tensor | None, g_gamma: torch.Tensor | None, B: int, T: int, H: int, L: int,
                dtype: torch.dtype, device) -> ChunkGates:
    """:class:`ChunkGates` of per-token log gates ``g`` [B, T, H] or per-head ``g_gamma`` [H]."""
    NT = max(1, -(-T // L))
    if g is None and g_gamma is None:
        return ChunkGates(T, L, None, torch.zeros(B, H, NT, dtype=dtype, device=device))
    if g is None:
        g = g_gamma.to(dtype).view(1, 1, H).expand(B, T, H)
    gp = torch.zeros(B, H, NT * L, dtype=dtype, device=device)
    gp[:, :, :T] = g.to(dtype).transpose(1, 2)
    b = gp.view(B, H, NT, L).cumsum(-1)
    return ChunkGates(T, L, b, b[..., -1].clone())


def _to_chunks(x: torch.Tensor, L: int, NT: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, H, D] -> [B, H, NT, L, D] in ``dtype`` (zero-padded to NT * L tokens), one copy."""
    B, T, H, D = x.shape
    out = torch.zeros(B, H, NT * L, D, dtype=dtype, device=x.device) if NT * L != T else None
    if out is None:
        return x.to(dtype).permute(0, 2, 1, 3).reshape(B, H, NT, L, D)
    out[:, :, :T] = x.transpose(1, 2)
    return out.view(B, H, NT, L, D)


def _from_chunks(x: torch.Tensor, T: int) -> torch.Tensor:
    """[B, H, NT, L, D] -> [B, T, H, D] (a copy, contiguous)."""
    B, H, NT, L, D = x.shape
    return x.reshape(B, H, NT * L, D)[:, :, :T].transpose(1, 2).contiguous()


def _blocks(gates: ChunkGates, B: int, H: int) -> list[slice]:
    n = max(1, _MAX_BLOCK_ELEMS // max(1, B * H * gates.L * gates.L))
    return [slice(c, min(gates.NT, c + n)) for c in range(0, gates.NT, n)]


def _scaled(x: torch.Tensor, d: torch.Tensor | None) -> torch.Tensor:
    return x if d is None else x * d


def state_or_zeros(state: torch.Tensor | None, B: int, H: int, Dk: int, Dv: int, dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
    """``state`` [B, H, Dk, Dv] in ``dtype``, or zeros of that shape when it is None."""
    return state.to(dtype) if state is not None else torch.zeros(B, H, Dk, Dv, dtype=dtype, device=device)


@dataclass
class ChunkStates:
    """States of a run at every chunk start, ``starts`` [B, H, NT, Dk, Dv], and after its end,
    ``final`` [B, H, Dk, Dv], from the initial state they were computed with."""

    starts: torch.Tensor
    final: torch.Tensor


@dataclass
class ChunkStateGrads:
    """Gradients of the state at every chunk end, ``ends`` [B, H, NT, Dk, Dv], and of the state
    before the run, ``initial`` [B, H, Dk, Dv], from the final-state gradient they were computed with."""

    ends: torch.Tensor
    initial: torch.Tensor


def _before_or_after(log_chunk: torch.Tensor, reverse: bool) -> torch.Tensor:
    """The sum of the log decays of the chunks before (after, ``reverse``) each chunk, along the
    chunk axis 2 of ``log_chunk`` [B, H, NT] or [B, H, NT, Dk]; summed directly (no difference of
    two long sums)."""
    zero = torch.zeros_like(log_chunk[:, :, :1])
    if reverse:
        return torch.cat([log_chunk[:, :, 1:].flip(2).cumsum(2).flip(2), zero], dim=2)
    return torch.cat([zero, log_chunk[:, :, :-1].cumsum(2)], dim=2)


def _add_decayed(per_chunk: torch.Tensor, log_decay: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """per_chunk [B, H, NT, Dk, Dv] + exp(log_decay) * state for every chunk (``log_decay`` [B, H, NT]
    or [B, H, NT, Dk], ``state`` [B, H, Dk, Dv]) in one pass and one new tensor: a broadcast
    product and a sum would write two chunk-sized temporaries (on CPU, fresh pages for each)."""
    return torch.addcmul(per_chunk, decay_factor(log_decay, per_chunk), state.unsqueeze(2))


def shift_states(states: ChunkStates, log_chunk: torch.Tensor | None, initial_state: torch.Tensor) -> ChunkStates:
    """States of a run started from ``initial_state``, given those from zero: S_c += A_c initial_state,
    A_c = exp(sum of the log decays ``log_chunk`` of the chunks before c) -- per head ([B, H, NT])
    or per key channel ([B, H, NT, Dk], GLA); None: no gate. One multiply-add per chunk; ``starts``
    keeps its dtype (a kernel may store states in bf16)."""
    h0 = initial_state.to(states.final.dtype)
    starts = states.starts
    if log_chunk is None:
        return ChunkStates((starts + h0.unsqueeze(2).to(starts.dtype)), states.final + h0)
    log = log_chunk.to(h0.dtype)
    shifted = _add_decayed(starts.to(h0.dtype), _before_or_after(log, reverse=False), h0)
    return ChunkStates(shifted.to(starts.dtype), states.final + decay_state(h0, log.sum(2)))


def shift_state_grads(grads: ChunkStateGrads, log_chunk: torch.Tensor | None, dht: torch.Tensor) -> ChunkStateGrads:
    """State gradients of a run whose final state has gradient ``dht``, given those with none:
    dS_end(c) += (decay from chunk c's end to the run's end) dht; ``log_chunk`` as in
    :func:`shift_states`."""
    d = dht.to(grads.initial.dtype)
    ends = grads.ends
    if log_chunk is None:
        return ChunkStateGrads(ends + d.unsqueeze(2).to(ends.dtype), grads.initial + d)
    log = log_chunk.to(d.dtype)
    shifted = _add_decayed(ends.to(d.dtype), _before_or_after(log, reverse=True), d)
    return ChunkStateGrads(shifted.to(ends.dtype), grads.initial + decay_state(d, log.sum(2)))


class ChunkedRun:
    """One run of tokens of the chunked computation, in stages (module notes above). q, k, v, g
    are cut into chunks once, on first use; every stage returns the compute dtype."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, g: torch.Tensor | None = None,
                 g_gamma: torch.Tensor | None = None, scale: float | None = None, chunk_size: int = 64):
        self.B, self.T, self.H, self.Dk = q.shape
        self.Dv = v.shape[-1]
        self.cd = compute_dtype(q.dtype)
        self.scale = default_scale(q, scale)
        self.want_dg = g is not None
        self.q, self.k, self.v = q, k, v
        self.gates = chunk_gates(g, g_gamma, self.B, self.T, self.H, chunk_size, self.cd, q.device)
        self._chunked: dict[str, torch.Tensor] = {}
        self._do: tuple[torch.Tensor, torch.Tensor] | None = None  # (do, its chunks)
        self.blocks = _blocks(self.gates, self.B, self.H)
        # exp(b_i - b_j) = exp(b_i - r) exp(r - b_j), r = b_last / 2 of the chunk, needs no [L, L]
        # exponentials; both factors stay within e^(+-60) (no overflow, no denormals) when the
        # chunk's log decay b_last >= 2 * _FACTOR_MIN_LOG. Which chunks qualify is read once per run.
        self.factored = (None if self.gates.b is None
                         else (self.gates.log_chunk >= 2 * _FACTOR_MIN_LOG).flatten(0, 1).all(0).tolist())

    def _is_factored(self, sl: slice) -> bool:
        return self.factored is None or all(self.factored[sl])

    def _sides(self, sl: slice) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(e^(b - r), e^(r - b)) of the chunks of block ``sl`` ([B, H, n, L, 1]; None without
        gates), with r half the chunk's log decay: their products are the intra-chunk decays."""
        if self.gates.b is None:
            return None, None
        b = self.gates.b[:, :, sl].unsqueeze(-1)
        r = b[..., -1:, :] * 0.5
        return (b - r).exp(), (r - b).exp()

    @property
    def log_total(self) -> torch.Tensor:
        """Log decay of the whole run [B, H]."""
        return self.gates.log_total

    def _c(self, name: str) -> torch.Tensor:
        """q, k or v in chunks (cut once)."""
        if name not in self._chunked:
            self._chunked[name] = _to_chunks(getattr(self, name), self.gates.L, self.gates.NT, self.cd)
        return self._chunked[name]

    def _c_do(self, do: torch.Tensor) -> torch.Tensor:
        """``do`` in chunks, cut once for the two backward stages of the same tensor."""
        if self._do is None or self._do[0] is not do:
            self._do = (do, _to_chunks(do, self.gates.L, self.gates.NT, self.cd))
        return self._do[1]

    def _zeros_state(self) -> torch.Tensor:
        return torch.zeros(self.B, self.H, self.Dk, self.Dv, dtype=self.cd, device=self.q.device)

    def states(self, initial_state: torch.Tensor | None = None) -> ChunkStates:
        """Stage 1 of the forward: S_0 = initial_state (or 0), S_{c+1} = Gamma_c S_c + U_c with
        U_c = K_c^T (V_c * to_end) computed for all chunks at once."""
        gates, kc, vc = self.gates, self._c("k"), self._c("v")
        U = torch.cat([_scaled(kc[:, :, sl], gates.to_end(sl)).transpose(-1, -2) @ vc[:, :, sl]
                       for sl in self.blocks], dim=2)
        decay = _flushed_exp(gates.log_chunk)[..., None, None] if gates.b is not None else None
        starts = torch.empty(self.B, self.H, gates.NT, self.Dk, self.Dv, dtype=self.cd, device=self.q.device)
        S = self._zeros_state() if initial_state is None else initial_state.to(self.cd)
        for c in range(gates.NT):
            starts[:, :, c] = S
            S = (S * decay[:, :, c] if decay is not None else S) + U[:, :, c]
        return ChunkStates(starts, S)

    def with_initial_state(self, states: ChunkStates, initial_state: torch.Tensor) -> ChunkStates:
        """The states of this run started from ``initial_state`` (``states`` were computed from zero)."""
        return shift_states(states, self.gates.log_chunk if self.gates.b is not None else None, initial_state)

    def outputs(self, states: ChunkStates) -> torch.Tensor:
        """Stage 2 of the forward: o_c = scale * [(Q_c K_c^T * D_c) V_c + (Q_c * gamma) S_c], [B, T, H, Dv]."""
        gates, qc, kc, vc = self.gates, self._c("q"), self._c("k"), self._c("v")
        parts = []
        for sl in self.blocks:
            q_, k_ = qc[:, :, sl], kc[:, :, sl]
            if self._is_factored(sl):  # (masked entries may overflow to inf: tril_ overwrites them)
                up, down = self._sides(sl)
                A = (_scaled(q_, up) @ _scaled(k_, down).transpose(-1, -2)).tril_()
            else:
                A = (q_ @ k_.transpose(-1, -2)) * gates.intra(sl, self.cd, qc.device)
            o = (A @ vc[:, :, sl]).add_(_scaled(q_, gates.gamma(sl)) @ states.starts[:, :, sl])
            parts.append(o.mul_(self.scale))
        return _from_chunks(torch.cat(parts, dim=2), self.T)

    def state_grads(self, do: torch.Tensor, dht: torch.Tensor | None = None) -> ChunkStateGrads:
        """Stage 1 of the backward: dS_end(NT-1) = dht (or 0), dS_end(c-1) = Gamma_c dS_end(c) + dM_c
        with dM_c = scale * (Q_c * gamma)^T dO_c; ``initial`` = Gamma_0 dS_end(0) + dM_0."""
        gates, qc, dc = self.gates, self._c("q"), self._c_do(do)
        dM = torch.cat([(_scaled(qc[:, :, sl], gates.gamma(sl)).transpose(-1, -2) @ dc[:, :, sl]).mul_(self.scale)
                        for sl in self.blocks], dim=2)
        decay = _flushed_exp(gates.log_chunk)[..., None, None] if gates.b is not None else None
        ends = torch.empty(self.B, self.H, gates.NT, self.Dk, self.Dv, dtype=self.cd, device=qc.device)
        dS = self._zeros_state() if dht is None else dht.to(self.cd)
        for c in range(gates.NT - 1, -1, -1):
            ends[:, :, c] = dS
            dS = (dS * decay[:, :, c] if decay is not None else dS) + dM[:, :, c]
        return ChunkStateGrads(ends, dS)

    def with_final_grad(self, grads: ChunkStateGrads, dht: torch.Tensor) -> ChunkStateGrads:
        """The state gradients of this run with final-state gradient ``dht`` (``grads`` were computed
        with none)."""
        return shift_state_grads(grads, self.gates.log_chunk if self.gates.b is not None else None, dht)

    def input_grads(self, do: torch.Tensor, states: ChunkStates, grads: ChunkStateGrads,
                    dht: torch.Tensor | None = None
                    ) -> dict[str, torch.Tensor]:
        """Stage 2 of the backward: {"q": dq, "k": dk, "v": dv, "g": dg (with g)} from the chunk-start states and the
        chunk-end state gradients of the run (both including any initial state / final-state
        gradient ``dht``, which dg needs too)."""
        gates, qc, kc, vc, dc = self.gates, self._c("q"), self._c("k"), self._c("v"), self._c_do(do)
        dq, dk, dv = [], [], []
        for sl in self.blocks:
            q_, k_, v_, d_ = qc[:, :, sl], kc[:, :, sl], vc[:, :, sl], dc[:, :, sl]
            to_end, ends, starts = gates.to_end(sl), grads.ends[:, :, sl], states.starts[:, :, sl]
            if self._is_factored(sl):  # dA_ij = scale dP_ij e^(b_i - b_j), dP = tril(dO V^T)
                up, down = self._sides(sl)
                qg, kn = _scaled(q_, up), _scaled(k_, down)
                dP = (d_ @ v_.transpose(-1, -2)).tril_()
                A = (qg @ kn.transpose(-1, -2)).tril_()
                dq.append(_scaled(dP @ kn, up).add_(_scaled(d_ @ starts.transpose(-1, -2), gates.gamma(sl)))
                          .mul_(self.scale))
                dk_intra = _scaled(dP.transpose(-1, -2) @ qg, down).mul_(self.scale)
                dv_intra = (A.transpose(-1, -2) @ d_).mul_(self.scale)
            else:
                D = gates.intra(sl, self.cd, qc.device) * self.scale
                dA = (d_ @ v_.transpose(-1, -2)) * D
                A = (q_ @ k_.transpose(-1, -2)) * D
                dq.append(dA @ k_ + _scaled(d_ @ starts.transpose(-1, -2), gates.gamma(sl)).mul_(self.scale))
                dk_intra = dA.transpose(-1, -2) @ q_
                dv_intra = A.transpose(-1, -2) @ d_
            dk.append(dk_intra.add_(_scaled(v_ @ ends.transpose(-1, -2), to_end)))
            dv.append(dv_intra.add_(_scaled(k_ @ ends, to_end)))
        self._do = None  # the last stage: its chunks are not needed again
        dq, dk, dv = (_from_chunks(torch.cat(x, dim=2), self.T) for x in (dq, dk, dv))
        dg = None
        if self.want_dg:
            dg = gate_grad(self.q.to(self.cd), dq, self.k.to(self.cd), dk, dht,
                           states.final if dht is not None else None)
        return grads_dict(dq, dk, dv, dg)

    def transition(self) -> ScalarDecay:
        """A of the whole run: exp(log_total) per head (zeros without a gate)."""
        return ScalarDecay(self.log_total)


def grads_dict(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, dg: torch.Tensor | None) -> dict:
    """The input gradients of a scalar-decay run as the protocol's dict (``g`` only when given)."""
    out = {"q": dq, "k": dk, "v": dv}
    if dg is not None:
        out["g"] = dg
    return out


def gate_grad(q: torch.Tensor, dq: torch.Tensor, k: torch.Tensor, dk: torch.Tensor,
              dstate_out: torch.Tensor | None = None, state_out: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient of the per-token log gates of a run from its (dq, dk) and boundary states:

        dg_t = sum_{i >= t} (q_i . dq_i - k_i . dk_i)  +  <dstate_out, state_out>

    (every gate g_t scales the state at every later token of the run and the final state)."""
    d = (q * dq).sum(-1) - (k * dk).sum(-1)  # [B, L, H]
    dg = d.flip(1).cumsum(1).flip(1)
    if dstate_out is not None and state_out is not None:
        dg = dg + (dstate_out.to(dg.dtype) * state_out.to(dg.dtype)).sum((-2, -1)).unsqueeze(1)
    return dg


def chunk_linear_attention_forward_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                                             g: torch.Tensor | None = None, g_gamma: torch.Tensor | None = None,
                                             scale: float | None = None,
                                             initial_state: torch.Tensor | None = None,
                                             output_final_state: bool = False, chunk_size: int = 64
                                             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(o, final_state or None), chunk by chunk: o_c = scale * [(Q K^T * D) V + (Q * gamma) S_c],
    S_{c+1} = Gamma_c S_c + K^T (V * to_end). o and states in the compute dtype."""
    run = ChunkedRun(q, k, v, g=g, g_gamma=g_gamma, scale=scale, chunk_size=chunk_size)
    states = run.states(initial_state)
    return run.outputs(states), (states.final if output_final_state else None)


def chunk_linear_attention_backward_reference(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                              v: torch.Tensor, *, g: torch.Tensor | None = None,
                                              g_gamma: torch.Tensor | None = None, scale: float | None = None,
                                              initial_state: torch.Tensor | None = None,
                                              dht: torch.Tensor | None = None, chunk_size: int = 64
                                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                         torch.Tensor | None, torch.Tensor | None]:
    """(dq, dk, dv, dg or None, dh0 or None) of the chunked forward, computed explicitly: states
    are recomputed, then the state gradients of every chunk end (from ``dht``, the gradient of
    the final state), then the input gradients of all chunks. dg only when ``g`` is given, dh0
    only when ``initial_state`` is given; g_gamma gets no gradient."""
    run = ChunkedRun(q, k, v, g=g, g_gamma=g_gamma, scale=scale, chunk_size=chunk_size)
    states = run.states(initial_state)
    grads = run.state_grads(do, dht)
    d = run.input_grads(do, states, grads, dht)
    return d["q"], d["k"], d["v"], d.get("g"), (grads.initial if initial_state is not None else None)
