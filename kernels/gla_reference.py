"""Plain PyTorch gated linear attention with per-key gates (GLA): the oracle for the Triton kernels
and the CPU path of the sequence-parallel strategies.

Conventions are flash-linear-attention's ``chunk_gla``: q, k [B, T, H, Dk], v [B, T, H, Dv], log
gates g [B, T, H, Dk] (<= 0), one per key channel. Per head the recurrence is

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T        o_t = scale * S_t^T q_t

with states [B, H, Dk, Dv] and ``scale`` defaulting to Dk ** -0.5. Everything is computed in the
compute dtype (float64 for float64 inputs, float32 otherwise) and returned in it.

The chunked computation (:class:`GlaChunkedRun`) is that of
:class:`seqpar.kernels.linear_reference.ChunkedRun` with a decay per key channel. With b the
chunk-local cumulative log gate (b_i = sum of g over the chunk's tokens up to i, per channel) and
S_c the state at the start of chunk c:

    o_i     = scale * [ (q_i * e^(b_i))^T S_c + sum_{j <= i} (sum_d q_id k_jd e^(b_id - b_jd)) v_j ]
    S_{c+1} = diag(e^(b_last)) S_c + (K * e^(b_last - b))^T V

The intra-chunk scores are factorised, (Q * e^(b - r)) (K * e^(r - b))^T with r = b_last / 2 per
channel, when every factor stays within e^(+-60) (a chunk's decay above e^-120 in every channel);
other chunks use the exact masked e^(b_i - b_j) per channel ([L, L, Dk] temporaries, a few heads
and chunks at a time). Every exponential spans at most one chunk; decays that underflow are
flushed to zero (checked once per run: with mild gates no decay can get there).

The gate gradient is dg_t = sum_{i >= t} (q_i * dq_i - k_i * dk_i) + (dht * S_T).sum(-1) per
channel (g_t scales every later state and the final state).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from seqpar.kernels.linear_reference import (
    ChunkStateGrads,
    ChunkStates,
    _flushed_exp,
    _to_chunks,
    default_scale,
    shift_state_grads,
    shift_states,
    state_or_zeros,
)
from seqpar.kernels.linear_transitions import KeyDecay
from seqpar.kernels.softmax_reference import compute_dtype

__all__ = ["GlaChunkedRun", "KeyGates", "check_gla_inputs", "gla_recurrent_reference", "key_gate_grad",
           "key_gates"]

# chunks per batch of the [B, H, n, L, L] intra-chunk matrices (cache-sized, as ChunkedRun)
_MAX_BLOCK_ELEMS = 1 << 15
# elements of the exact fallback's [B, H, n, L, L, Dk] decays computed at once
_MAX_EXACT_ELEMS = 1 << 21
# lowest log factor of the factorised intra-chunk decays (a chunk's decay >= e^(2 * this))
_FACTOR_MIN_LOG = -60.0


def check_gla_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> None:
    """Raise a ValueError naming the shapes when q, k [B, T, H, Dk], v [B, T, H, Dv] and
    g [B, T, H, Dk] do not fit together."""
    if q.dim() != 4 or tuple(k.shape) != tuple(q.shape) or v.dim() != 4 or tuple(v.shape[:3]) != tuple(q.shape[:3]):
        raise ValueError(f"expected q, k [B, T, H, Dk] and v [B, T, H, Dv]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if g is None or tuple(g.shape) != tuple(q.shape):
        raise ValueError(f"GLA needs per-key log gates g [B, T, H, Dk] = {tuple(q.shape)}; "
                         f"got {None if g is None else tuple(g.shape)}")


# ---------------------------------------------------------------------------------------------
# Token-by-token oracle.


def gla_recurrent_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *,
                            scale: float | None = None, initial_state: torch.Tensor | None = None,
                            output_final_state: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(o, final_state or None) by the GLA recurrence, one token at a time (differentiable by
    autograd, float64-capable): the test oracle."""
    check_gla_inputs(q, k, v, g)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    cd = compute_dtype(q.dtype)
    scale = default_scale(q, scale)
    qf, kf, vf, gf = q.to(cd), k.to(cd), v.to(cd), g.to(cd)
    S = state_or_zeros(initial_state, B, H, Dk, Dv, cd, q.device)
    outs = []
    for t in range(T):
        S = S * gf[:, t].exp().unsqueeze(-1) + kf[:, t, :, :, None] * vf[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", qf[:, t], S) * scale)
    o = torch.stack(outs, dim=1) if outs else torch.zeros(B, 0, H, Dv, dtype=cd, device=q.device)
    return o, (S if output_final_state else None)


# ---------------------------------------------------------------------------------------------
# Chunk gates and the shifts by an initial state / a final-state gradient.


@dataclass
class KeyGates:
    """Per-key log gates of a run cut into chunks of L tokens: ``b`` [B, H, NT, L, Dk] the
    chunk-local cumulative log gate, ``log_chunk`` [B, H, NT, Dk] each chunk's log decay."""

    T: int
    L: int
    b: torch.Tensor
    log_chunk: torch.Tensor

    @property
    def NT(self) -> int:
        return self.log_chunk.shape[2]

    @property
    def log_total(self) -> torch.Tensor:
        """Log decay of the whole run per key channel [B, H, Dk]."""
        return self.log_chunk.sum(2)


def key_gates(g: torch.Tensor, L: int, dtype: torch.dtype) -> KeyGates:
    """:class:`KeyGates` of log gates ``g`` [B, T, H, Dk] (zero-padded to whole chunks: padding
    keeps the cumulative gate flat)."""
    B, T, H, Dk = g.shape
    NT = max(1, -(-T // L))
    return KeyGates(T, L, *_cumulate(_to_chunks(g, L, NT, dtype)))


def _cumulate(gc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = gc.cumsum(3)
    return b, b[:, :, :, -1].clone()


def key_gate_grad(d: torch.Tensor, dht: torch.Tensor | None, final: torch.Tensor | None) -> torch.Tensor:
    """dg [B, T, H, Dk] from d = q * dq - k * dk [B, T, H, Dk]: the reverse cumulative sum over the
    run plus the boundary term (dht * S_final).sum(-1) of the final state (when ``dht`` is given)."""
    dg = d.flip(1).cumsum(1).flip(1)
    if dht is not None:
        dg = dg + (dht.to(dg.dtype) * final.to(dg.dtype)).sum(-1).unsqueeze(1)
    return dg


# ---------------------------------------------------------------------------------------------
# The chunked run.


class _ChunkWriter:
    """Writes [B, H, n, L, D] blocks of chunks straight into a [B, T, H, D] result (one strided copy
    per block, while it is in cache, instead of a concatenation and a transpose)."""

    def __init__(self, B: int, T: int, H: int, NT: int, L: int, D: int, dtype: torch.dtype, device):
        self.T, self.NT, self.L = T, NT, L
        self.out = torch.empty(B, NT * L, H, D, dtype=dtype, device=device)

    def write(self, sl: slice, block: torch.Tensor) -> None:
        B, _, H, D = self.out.shape
        self.out.view(B, self.NT, self.L, H, D)[:, sl].copy_(block.permute(0, 2, 3, 1, 4))

    def result(self) -> torch.Tensor:
        out = self.out[:, :self.T]
        return out if out.is_contiguous() else out.contiguous()


class GlaChunkedRun:
    """One run of tokens of chunked GLA, in the stages of the chunked-run protocol (module notes
    above; :class:`seqpar.kernels.linear_reference.ChunkedRun` is the scalar-gate model). q, k, v,
    g are cut into chunks once; every stage returns the compute dtype."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, g: torch.Tensor,
                 scale: float | None = None, chunk_size: int = 64):
        check_gla_inputs(q, k, v, g)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive; got {chunk_size}")
        self.B, self.T, self.H, self.Dk = q.shape
        self.Dv = v.shape[-1]
        self.cd = compute_dtype(q.dtype)
        self.scale = default_scale(q, scale)
        self.q, self.k, self.v = q, k, v
        self.gates = key_gates(g, chunk_size, self.cd)
        self.L, self.NT = chunk_size, self.gates.NT
        n = max(1, _MAX_BLOCK_ELEMS // max(1, self.B * self.H * self.L * self.L))
        self.blocks = [slice(c, min(self.NT, c + n)) for c in range(0, self.NT, n)]
        log_chunk = self.gates.log_chunk
        # chunks whose decay is above e^(2 * _FACTOR_MIN_LOG) in every channel (read once per run)
        self.factored = (log_chunk >= 2 * _FACTOR_MIN_LOG).all(-1).flatten(0, 1).all(0).tolist()
        # whether any decay inside a chunk can be denormal (each is >= its chunk's decay for g <= 0)
        tiny = torch.finfo(self.cd).tiny
        self.flush = log_chunk.numel() > 0 and bool(log_chunk.min() < math.log(tiny) + 1.0)
        self._chunked: dict[str, torch.Tensor] = {}
        self._do: tuple[torch.Tensor, torch.Tensor] | None = None  # (do, its chunks)

    @property
    def log_total(self) -> torch.Tensor:
        """Log decay of the whole run per key channel [B, H, Dk]."""
        return self.gates.log_total

    def transition(self) -> KeyDecay:
        """A of the whole run: diag(exp(log_total)) per head."""
        return KeyDecay(self.log_total)

    def _c(self, name: str) -> torch.Tensor:
        """q, k or v in chunks [B, H, NT, L, D] (cut once)."""
        if name not in self._chunked:
            self._chunked[name] = _to_chunks(getattr(self, name), self.L, self.NT, self.cd)
        return self._chunked[name]

    def _c_do(self, do: torch.Tensor) -> torch.Tensor:
        """``do`` in chunks, cut once for the two backward stages of the same tensor."""
        if tuple(do.shape) != (self.B, self.T, self.H, self.Dv):
            raise ValueError(f"do must be [B, T, H, Dv] = {(self.B, self.T, self.H, self.Dv)}; got {tuple(do.shape)}")
        if self._do is None or self._do[0] is not do:
            self._do = (do, _to_chunks(do, self.L, self.NT, self.cd))
        return self._do[1]

    def _writer(self, D: int) -> _ChunkWriter:
        return _ChunkWriter(self.B, self.T, self.H, self.NT, self.L, D, self.cd, self.q.device)

    def _zeros_state(self) -> torch.Tensor:
        return torch.zeros(self.B, self.H, self.Dk, self.Dv, dtype=self.cd, device=self.q.device)

    def _exp(self, log: torch.Tensor) -> torch.Tensor:
        """exp of a log decay, flushed to zero below the smallest normal number when the run's
        gates can get there."""
        out = log.exp()
        return _flush_(out) if self.flush else out

    def _gamma(self, sl: slice) -> torch.Tensor:
        """e^b: decay from the chunk's start to token i (inclusive), [B, H, n, L, Dk]."""
        return self._exp(self.gates.b[:, :, sl])

    def _to_end(self, sl: slice) -> torch.Tensor:
        """e^(b_last - b): decay from token j (exclusive) to its chunk's end, [B, H, n, L, Dk]."""
        b = self.gates.b[:, :, sl]
        return self._exp(b[:, :, :, -1:] - b)

    def _factors(self, sl: slice) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(up, down, gamma, to_end) of a block: up = e^(b - r), down = e^(r - b) with r = b_last / 2
        (the factors of the intra-chunk decays, within e^(+-60)), gamma = up e^r = e^b and
        to_end = down e^r = e^(b_last - b), from one exponential. (None, None, gamma, to_end) for
        a block that cannot be factorised."""
        if not all(self.factored[sl]):
            return None, None, self._gamma(sl), self._to_end(sl)
        b = self.gates.b[:, :, sl]
        r = b[:, :, :, -1:] * 0.5
        up = (b - r).exp()
        down = up.reciprocal()
        er = r.exp()
        gamma, to_end = up * er, down * er
        return up, down, (_flush_(gamma) if self.flush else gamma), (_flush_(to_end) if self.flush else to_end)

    def _exact_pieces(self, sl: slice) -> Iterator[tuple[tuple[slice, slice], torch.Tensor]]:
        """(index into the block's [B*H, n] heads and chunks, the exact masked decays
        e^(b_i - b_j) [bh, m, L, L, Dk] there), for a block that cannot be factorised: a few heads
        and chunks at a time, so that the temporaries stay within _MAX_EXACT_ELEMS."""
        per = self.L * self.L * self.Dk
        n = sl.stop - sl.start
        m = max(1, min(n, _MAX_EXACT_ELEMS // per))
        heads = max(1, _MAX_EXACT_ELEMS // (per * m))
        b = self.gates.b[:, :, sl].flatten(0, 1)
        mask = torch.ones(self.L, self.L, dtype=torch.bool, device=b.device).tril().unsqueeze(-1)
        for r in range(0, self.B * self.H, heads):
            for s in range(0, n, m):
                idx = (slice(r, r + heads), slice(s, s + m))
                bb = b[idx]
                yield idx, _flushed_exp((bb.unsqueeze(-2) - bb.unsqueeze(-3)).masked_fill_(~mask, float("-inf")))

    def states(self, initial_state: torch.Tensor | None = None) -> ChunkStates:
        """Stage 1 of the forward: S_0 = initial_state (or 0), S_{c+1} = diag(e^(b_last)) S_c + U_c
        with U_c = (K_c * e^(b_last - b))^T V_c computed for a block of chunks at once."""
        kc, vc = self._c("k"), self._c("v")
        decay = _flushed_exp(self.gates.log_chunk).unsqueeze(-1)
        starts = torch.empty(self.B, self.H, self.NT, self.Dk, self.Dv, dtype=self.cd, device=self.q.device)
        S = self._zeros_state() if initial_state is None else initial_state.to(self.cd)
        for sl in self.blocks:
            U = (kc[:, :, sl] * self._to_end(sl)).transpose(-1, -2) @ vc[:, :, sl]
            for i, c in enumerate(range(sl.start, sl.stop)):
                starts[:, :, c] = S
                S = torch.addcmul(U[:, :, i], S, decay[:, :, c])
        return ChunkStates(starts, S)

    def with_initial_state(self, states: ChunkStates, initial_state: torch.Tensor) -> ChunkStates:
        """The states of this run started from ``initial_state`` (``states`` were computed from zero)."""
        return shift_states(states, self.gates.log_chunk, initial_state)

    def outputs(self, states: ChunkStates) -> torch.Tensor:
        """Stage 2 of the forward: o_c = scale * [A_c V_c + (Q_c * e^b) S_c], [B, T, H, Dv], with
        A_ij = sum_d q_id k_jd e^(b_id - b_jd) for j <= i."""
        qc, kc, vc = self._c("q"), self._c("k"), self._c("v")
        out = self._writer(self.Dv)
        for sl in self.blocks:
            q_, k_ = qc[:, :, sl], kc[:, :, sl]
            up, down, gamma, _ = self._factors(sl)
            if up is not None:  # (masked entries may overflow to inf: tril_ overwrites them)
                A = ((q_ * up) @ (k_ * down).transpose(-1, -2)).tril_()
            else:
                A = q_.new_empty(q_.shape[:-1] + (self.L,))
                qf, kf, Af = q_.flatten(0, 1), k_.flatten(0, 1), A.flatten(0, 1)
                for idx, E in self._exact_pieces(sl):
                    Af[idx] = (E * kf[idx].unsqueeze(-3) * qf[idx].unsqueeze(-2)).sum(-1)
            o = (A @ vc[:, :, sl]).add_((q_ * gamma) @ states.starts[:, :, sl].to(self.cd))
            out.write(sl, o.mul_(self.scale))
        return out.result()

    def state_grads(self, do: torch.Tensor, dht: torch.Tensor | None = None) -> ChunkStateGrads:
        """Stage 1 of the backward: dS_end(NT-1) = dht (or 0), dS_end(c-1) = diag(e^(b_last)) dS_end(c)
        + dM_c with dM_c = scale * (Q_c * e^b)^T dO_c; ``initial`` is the gradient before chunk 0."""
        qc, dc = self._c("q"), self._c_do(do)
        decay = _flushed_exp(self.gates.log_chunk).unsqueeze(-1)
        ends = torch.empty(self.B, self.H, self.NT, self.Dk, self.Dv, dtype=self.cd, device=qc.device)
        dS = self._zeros_state() if dht is None else dht.to(self.cd)
        for sl in reversed(self.blocks):
            dM = ((qc[:, :, sl] * self._gamma(sl)).transpose(-1, -2) @ dc[:, :, sl]).mul_(self.scale)
            for i in range(sl.stop - sl.start - 1, -1, -1):
                ends[:, :, sl.start + i] = dS
                dS = torch.addcmul(dM[:, :, i], dS, decay[:, :, sl.start + i])
        return ChunkStateGrads(ends, dS)

    def with_final_grad(self, grads: ChunkStateGrads, dht: torch.Tensor) -> ChunkStateGrads:
        """The state gradients of this run with final-state gradient ``dht`` (``grads`` were
        computed with none)."""
        return shift_state_grads(grads, self.gates.log_chunk, dht)

    def input_grads(self, do: torch.Tensor, states: ChunkStates, grads: ChunkStateGrads,
                    dht: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Stage 2 of the backward: {"q": dq, "k": dk, "v": dv, "g": dg} from the chunk-start states
        and the chunk-end state gradients of the run (both including any initial state /
        final-state gradient ``dht``, which dg's boundary term needs too). Blocks run from the
        last: dg_t = sum_{i >= t} (q_i dq_i - k_i dk_i) + boundary is summed within each chunk
        and carried across chunks."""
        qc, kc, vc, dc = self._c("q"), self._c("k"), self._c("v"), self._c_do(do)
        out = {"q": self._writer(self.Dk), "k": self._writer(self.Dk), "v": self._writer(self.Dv),
               "g": self._writer(self.Dk)}
        suffix = torch.ones(self.L, self.L, dtype=self.cd, device=qc.device).triu_()  # [i, j] = (j >= i)
        carry = (torch.zeros(self.B, self.H, self.Dk, dtype=self.cd, device=qc.device) if dht is None
                 else (dht.to(self.cd) * states.final.to(self.cd)).sum(-1))
        for sl in reversed(self.blocks):
            q_, k_, v_, d_ = qc[:, :, sl], kc[:, :, sl], vc[:, :, sl], dc[:, :, sl]
            starts, ends = states.starts[:, :, sl].to(self.cd), grads.ends[:, :, sl].to(self.cd)
            up, down, gamma, to_end = self._factors(sl)
            dP = (d_ @ v_.transpose(-1, -2)).mul_(self.scale)  # dA_ij = dP_ij e^(b_i - b_j)
            if up is not None:
                qg, kn = q_ * up, k_ * down
                dP.tril_()
                A = (qg @ kn.transpose(-1, -2)).tril_().mul_(self.scale)
                dq, dk = (dP @ kn).mul_(up), (dP.transpose(-1, -2) @ qg).mul_(down)
            else:
                A, dq, dk = q_.new_empty(dP.shape), q_.new_empty(q_.shape), k_.new_empty(k_.shape)
                views = [t.flatten(0, 1) for t in (q_, k_, dP, A, dq, dk)]
                qf, kf, dPf, Af, dqf, dkf = views
                for idx, E in self._exact_pieces(sl):
                    q_s, dP_s = qf[idx], dPf[idx].unsqueeze(-1)
                    Ek = E * kf[idx].unsqueeze(-3)  # [.., i, j, d] = e^(b_id - b_jd) k_jd
                    Af[idx] = (Ek * q_s.unsqueeze(-2)).sum(-1).mul_(self.scale)
                    dqf[idx] = (dP_s * Ek).sum(-2)
                    dkf[idx] = (dP_s * E * q_s.unsqueeze(-2)).sum(-3)
            dq.addcmul_(d_ @ starts.transpose(-1, -2), gamma, value=self.scale)
            dk.addcmul_(v_ @ ends.transpose(-1, -2), to_end)
            out["q"].write(sl, dq)
            out["k"].write(sl, dk)
            out["v"].write(sl, (A.transpose(-1, -2) @ d_).add_((k_ * to_end) @ ends))
            # dg: the sum over the chunk's later tokens, then the sums of the later chunks
            dg = suffix @ (q_ * dq).sub_(k_ * dk)
            totals = dg[:, :, :, 0]
            later = torch.cat([totals[:, :, 1:].flip(2).cumsum(2).flip(2), torch.zeros_like(totals[:, :, :1])], 2)
            later.add_(carry.unsqueeze(2))
            carry = later[:, :, 0] + totals[:, :, 0]
            out["g"].write(sl, dg.add_(later.unsqueeze(3)))
        self._do = None  # the last stage: its chunks are not needed again
        return {name: w.result() for name, w in out.items()}


def _flush_(x: torch.Tensor) -> torch.Tensor:
    """Set values below the dtype's smallest normal number to zero, in place (see _flushed_exp)."""
    return torch.nn.functional.threshold_(x, torch.finfo(x.dtype).tiny, 0.0)
