"""Plain PyTorch gated delta rule (Gated DeltaNet) and its per-key-channel variant KDA.

Conventions (flash-linear-attention's): q, k [B, T, H, Dk], v [B, T, H, Dv], beta [B, T, H] in
(0, 1], states [B, H, Dk, Dv], o_t = scale * S_t^T q_t (scale defaults to Dk ** -0.5). Per head

    gated delta rule (g None or [B, T, H]):  S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    KDA (g [B, T, H, Dk]):                  S_t = (I - beta_t k_t k_t^T) diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T

(both: decay the state, then the delta step S += beta k (v - S^T k)^T). q and k are expected
L2-normalised by the caller; ``use_qk_l2norm`` normalises them inside (differentiably), as fla's
``use_qk_l2norm_in_kernel``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from seqpar.kernels.linear_reference import (
    ChunkStateGrads,
    ChunkStates,
    _from_chunks,
    _scaled,
    _to_chunks,
    default_scale,
    state_or_zeros,
)
from seqpar.kernels.linear_transitions import MatrixTransition
from seqpar.kernels.softmax_reference import compute_dtype

# fla's l2norm: x / sqrt(sum x^2 + eps)
L2NORM_EPS = 1e-6


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last axis (differentiable)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def check_delta_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                       g: torch.Tensor | None) -> None:
    """Raise ValueError naming the shapes when q, k, v, beta, g do not fit together."""
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must be [B, T, H, Dk] of one shape, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    B, T, H, Dk = q.shape
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, Dv] = [{B}, {T}, {H}, Dv], got {tuple(v.shape)}")
    if beta.shape != (B, T, H):
        raise ValueError(f"beta must be [B, T, H] = [{B}, {T}, {H}], got {tuple(beta.shape)}")
    if g is not None and g.shape not in ((B, T, H), (B, T, H, Dk)):
        raise ValueError(f"g must be [B, T, H] = [{B}, {T}, {H}] (gated delta rule) or [B, T, H, Dk] = "
                         f"[{B}, {T}, {H}, {Dk}] (KDA), got {tuple(g.shape)}")


def gated_delta_recurrent_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
                                    g: torch.Tensor | None = None, scale: float | None = None,
                                    initial_state: torch.Tensor | None = None, output_final_state: bool = False,
                                    use_qk_l2norm: bool = False
                                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(o [B, T, H, Dv], final state [B, H, Dk, Dv] or None) of the gated delta rule (``g`` None or
    [B, T, H]) or KDA (``g`` [B, T, H, Dk]), one token at a time in the compute dtype
    (differentiable through autograd, float64-capable): the test oracle."""
    check_delta_inputs(q, k, v, beta, g)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    cd = compute_dtype(q.dtype)
    scale = default_scale(q, scale)
    qf, kf, vf, bf = q.to(cd), k.to(cd), v.to(cd), beta.to(cd)
    if use_qk_l2norm:
        qf, kf = l2norm(qf), l2norm(kf)
    S = state_or_zeros(initial_state, B, H, Dk, Dv, cd, q.device)
    outs = []
    for t in range(T):
        if g is not None:
            decay = g[:, t].to(cd).exp()
            S = S * (decay[..., None, None] if g.dim() == 3 else decay[..., None])
        k_t = kf[:, t]                                                    # [B, H, Dk]
        err = vf[:, t] - torch.einsum("bhk,bhkv->bhv", k_t, S)            # v - S^T k
        S = S + (bf[:, t, :, None] * k_t)[..., None] * err[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", qf[:, t], S) * scale)
    o = torch.stack(outs, dim=1) if outs else torch.zeros(B, 0, H, Dv, dtype=cd, device=q.device)
    return o, (S if output_final_state else None)


# ---------------------------------------------------------------------------------------------
# Chunked forward / backward in the WY (UT-transform) form, in stages (docs: /docs/linear.md,
# "Gated delta rule"). Per chunk of L tokens, with b the chunk-local cumulative log gate
# ([L, 1] per head or [L, Dk] per key channel), Kg = K * e^b, Kt = K * e^(b_L - b),
# G_ij = sum_c k_ic k_jc e^(b_ic - b_jc) (j < i) and A = diag(beta) G:
#
#     [W U] = (I + A)^{-1} diag(beta) [Kg V]                 (solve_triangular, unit lower)
#     v_new = U - W S                                          (S: the state at the chunk's start)
#     S'    = diag(e^(b_L)) S + Kt^T v_new = M S + Kt^T U,     M = diag(e^(b_L)) - Kt^T W
#     O     = scale ((Q * e^b) S + P v_new),                   P_ij = sum_c q_ic k_jc e^(b_ic - b_jc) (j <= i)
#
# Backward: dS = M^T dS' + scale (Q * e^b - P W)^T dO (linear, independent of S's value), then per
# chunk the gradients of the inputs through the solve: with X = [W U], R = diag(beta) [Kg V],
# dR = (I + A)^{-T} dX and dA = -strict_tril(dR X^T).

# chunks computed in one batch (cache-sized blocks, as in linear_reference)
_MAX_BLOCK_ELEMS = 1 << 15
# a chunk whose log decay (every channel) is >= this has its intra-chunk decays factorised as
# e^(b_i - r) e^(r - b_j), r = b_L / 2: every factor stays within e^(+-30) (one matmul per product);
# stronger chunks use sub-chunks (below)
_FACTOR_MIN_LOG = -60.0
# sub-chunk length of strongly decaying KDA chunks: exact decays inside a sub-chunk, and between
# sub-chunks factors e^(b_i - r) <= 1, e^(r - b_j) <= 1 with r the log gate at the end of j's sub-chunk
_SUB_CHUNK = 16
# the sub-chunk length when some sub-chunk of 16 decays below e^_FACTOR_MIN_LOG: exact [s, s, Dk] decays
# on the diagonal cost L s Dk elementwise work per chunk, the products below it L / s matmuls
_EXACT_SUB_CHUNK = 8


def _decay(log: torch.Tensor) -> torch.Tensor:
    """exp(log) for log <= 0 (-inf allowed), set to 0 below sqrt(tiny) of the dtype (float32: e^-43.7):
    a product of two such decays is never denormal (denormal arithmetic costs CPUs ~100x), and what is
    dropped is below 1e-19 of a term without decay. The argument is clamped before exp: an exp whose
    result underflows (to a denormal or to 0, also exp(-inf)) is ~50x slower on CPUs."""
    cut = 0.5 * math.log(torch.finfo(log.dtype).tiny)
    return log.clamp_min(cut).exp_().masked_fill_(log < cut, 0.0)


def _flush_(x: torch.Tensor) -> torch.Tensor:
    """x with its entries below sqrt(tiny) of the dtype in magnitude set to 0, in place (W, U, the chunk
    transitions: their products with O(1) states and with decays then stay normal numbers)."""
    return x.masked_fill_(x.abs() < torch.finfo(x.dtype).tiny ** 0.5, 0.0)


def _solve_unit_lower(A: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """(I + A)^{-1} rhs for strictly lower triangular A [..., L, L] (its diagonal is ignored)."""
    return torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)


def _solve_unit_upper_transposed(A: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """(I + A)^{-T} rhs for strictly lower triangular A [..., L, L]."""
    return torch.linalg.solve_triangular(A.transpose(-1, -2), rhs, upper=True, unitriangular=True)


def _l2norm_backward(x_normed: torch.Tensor, rstd: torch.Tensor, dx_normed: torch.Tensor) -> torch.Tensor:
    """Gradient on x of x_normed = x * rstd, rstd = (|x|^2 + eps)^(-1/2), given dx_normed."""
    return (dx_normed - x_normed * (x_normed * dx_normed).sum(-1, keepdim=True)) * rstd


@dataclass
class _BlockDecays:
    """The decays of the chunks of one block (computed once per block and stage).

    ``gamma`` e^b, ``to_end`` e^(b_L - b) [B, H, n, L, Dg] and ``chunk`` e^(b_L) [B, H, n, Dg]
    (all None without gates), and the intra-chunk decays e^(b_i - b_j) of the products
    :func:`_gram` in one of three forms: ``sides`` (e^(b - r), e^(r - b)) with r = b_L / 2 (weak
    chunks: one matmul); ``intra`` the exact [B, H, n, L, L] decays (strong chunks, per-head gates);
    for strong chunks with KDA gates, sub-chunks of s tokens: ``diag_sides`` (e^(b - r), e^(r - b))
    [B, H, n, L / s, s, Dk] with r half a sub-chunk's log decay when every sub-chunk of the block
    decays by no more than e^_FACTOR_MIN_LOG, else ``diag`` the exact [B, H, n, L / s, s, s, Dk]
    decays inside each sub-chunk; and ``below`` (e^(b_i - r_J) for i after sub-chunk J,
    e^(r_J - b_j) for j in J), r_J = b at J's last token, both <= 1."""

    gamma: torch.Tensor | None = None
    to_end: torch.Tensor | None = None
    chunk: torch.Tensor | None = None
    sides: tuple[torch.Tensor, torch.Tensor] | None = None
    intra: torch.Tensor | None = None
    diag: torch.Tensor | None = None
    diag_sides: tuple[torch.Tensor, torch.Tensor] | None = None
    below: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    sub: int = 0


class _DeltaGates:
    """Chunk-local cumulative log gates ``b`` [B, H, NT, L, Dg] (Dg = 1: per head, Dk: KDA; None:
    no gate) and which chunks get factorised intra-chunk decays."""

    def __init__(self, b: torch.Tensor | None, L: int):
        self.b, self.L = b, L
        self.factored = (None if b is None
                         else (b[..., -1, :] >= _FACTOR_MIN_LOG).all(-1).flatten(0, 1).all(0).tolist())
        # sub-chunk length (one sub-chunk when L is not a multiple of _SUB_CHUNK), and which chunks
        # have every sub-chunk's log decay >= _FACTOR_MIN_LOG (KDA)
        self.sub = _SUB_CHUNK if L % _SUB_CHUNK == 0 else L
        self.sub_factored = None
        if b is not None and b.shape[-1] > 1:
            ends = b.unflatten(-2, (L // self.sub, self.sub))[..., -1, :]      # [B, H, NT, L / s, Dk]
            sub_log = ends - torch.cat([torch.zeros_like(ends[..., :1, :]), ends[..., :-1, :]], dim=-2)
            self.sub_factored = (sub_log >= _FACTOR_MIN_LOG).flatten(-2).all(-1).flatten(0, 1).all(0).tolist()

    def is_factored(self, sl: slice) -> bool:
        """Whether every chunk of block ``sl`` (every batch, head, channel) has a log decay >= _FACTOR_MIN_LOG."""
        return self.factored is None or all(self.factored[sl])

    def block(self, sl: slice) -> _BlockDecays:
        """The decays of the chunks of block ``sl``."""
        if self.b is None:
            return _BlockDecays()
        b = self.b[:, :, sl]
        last = b[..., -1:, :]
        dec = _BlockDecays(gamma=_decay(b), to_end=_decay(last - b), chunk=_decay(last[..., 0, :]))
        if self.is_factored(sl):
            r = last * 0.5
            dec.sides = ((b - r).exp(), (r - b).exp())
        elif b.shape[-1] == 1:
            keep = torch.ones(self.L, self.L, dtype=torch.bool, device=b.device).tril()
            dec.intra = _decay((b - b.transpose(-1, -2)).masked_fill_(~keep, float("-inf")))
        else:
            factored_subs = all(self.sub_factored[sl])
            s = dec.sub = self.sub if factored_subs or self.L % _EXACT_SUB_CHUNK else _EXACT_SUB_CHUNK
            bs = b.unflatten(-2, (self.L // s, s))
            bs = bs - torch.cat([torch.zeros_like(bs[..., :1, :1, :]), bs[..., :-1, -1:, :]], dim=-3)
            if factored_subs:   # (bs: the log gates cumulated from the sub-chunk's start)
                rs = bs[..., -1:, :] * 0.5
                dec.diag_sides = ((bs - rs).exp(), (rs - bs).exp())
            else:
                keep = torch.ones(s, s, dtype=torch.bool, device=b.device).tril()
                dec.diag = _decay((bs.unsqueeze(-2) - bs.unsqueeze(-3)).masked_fill_(~keep[..., None], float("-inf")))
            dec.below = []
            for j1 in range(s, self.L, s):
                r = b[..., j1 - 1:j1, :]
                dec.below.append((_decay(b[..., j1:, :] - r), _decay(r - b[..., j1 - s:j1, :])))
        return dec


def _mask(x: torch.Tensor, strict: bool) -> torch.Tensor:
    return x.tril_(-1 if strict else 0)


def _gram(x: torch.Tensor, y: torch.Tensor, dec: _BlockDecays, strict: bool) -> torch.Tensor:
    """sum_c x_ic y_jc e^(b_ic - b_jc) for j <= i (j < i when ``strict``), 0 elsewhere: [B, H, n, L, L]."""
    if dec.sides is not None:
        up, down = dec.sides
        return _mask((x * up) @ (y * down).transpose(-1, -2), strict)
    if dec.intra is not None:
        return _mask((x @ y.transpose(-1, -2)).mul_(dec.intra), strict)
    if dec.below is None:
        return _mask(x @ y.transpose(-1, -2), strict)
    s, L = dec.sub, x.shape[-2]
    xs, ys = x.unflatten(-2, (L // s, s)), y.unflatten(-2, (L // s, s))
    if dec.diag_sides is not None:
        up, down = dec.diag_sides
        diag = (xs * up) @ (ys * down).transpose(-1, -2)                    # [.., L / s, s, s]
    else:
        diag = (xs.unsqueeze(-2) * ys.unsqueeze(-3) * dec.diag).sum(-1)
    out = x.new_zeros(x.shape[:-1] + (L,))
    for J in range(L // s):
        j0, j1 = J * s, (J + 1) * s
        out[..., j0:j1, j0:j1] = _mask(diag[..., J, :, :], strict)
        if j1 < L:
            below, cols = dec.below[J]
            out[..., j1:, j0:j1] = (x[..., j1:, :] * below) @ (y[..., j0:j1, :] * cols).transpose(-1, -2)
    return out


def _gram_grads(dG: torch.Tensor, x: torch.Tensor, y: torch.Tensor, dec: _BlockDecays
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dy) of :func:`_gram` given its gradient ``dG`` (zero outside the kept triangle). The
    gate gradient of the product is x * dx on b_i and -y * dy on b_j."""
    if dec.sides is not None:
        up, down = dec.sides
        return (dG @ (y * down)).mul_(up), (dG.transpose(-1, -2) @ (x * up)).mul_(down)
    if dec.intra is not None:
        dGE = dG * dec.intra
        return dGE @ y, dGE.transpose(-1, -2) @ x
    if dec.below is None:
        return dG @ y, dG.transpose(-1, -2) @ x
    s, L = dec.sub, x.shape[-2]
    xs, ys = x.unflatten(-2, (L // s, s)), y.unflatten(-2, (L // s, s))
    dGs = torch.stack([dG[..., J * s:(J + 1) * s, J * s:(J + 1) * s] for J in range(L // s)], dim=-3)
    if dec.diag_sides is not None:
        up, down = dec.diag_sides
        dx = ((dGs @ (ys * down)).mul_(up)).flatten(-3, -2)
        dy = ((dGs.transpose(-1, -2) @ (xs * up)).mul_(down)).flatten(-3, -2)
    else:
        dGE = dGs.unsqueeze(-1) * dec.diag                                   # [.., L / s, s, s, Dk]
        dx = (dGE * ys.unsqueeze(-3)).sum(-2).flatten(-3, -2)
        dy = (dGE * xs.unsqueeze(-2)).sum(-3).flatten(-3, -2)
    for J in range(L // s - 1):
        j0, j1 = J * s, (J + 1) * s
        below, cols = dec.below[J]
        dGb = dG[..., j1:, j0:j1]
        dx[..., j1:, :] += (dGb @ (y[..., j0:j1, :] * cols)).mul_(below)
        dy[..., j0:j1, :] += (dGb.transpose(-1, -2) @ (x[..., j1:, :] * below)).mul_(cols)
    return dx, dy


class DeltaChunkedRun:
    """One run of tokens of the gated delta rule (``g`` None or [B, T, H]) or KDA (``g`` [B, T, H, Dk]),
    chunked in the WY form, in the stages of the chunked-run protocol (see linear_reference.ChunkedRun).
    Every stage returns the compute dtype; ``input_grads`` returns {"q", "k", "v", "beta"} plus "g" when
    g was given. With ``use_qk_l2norm`` q and k are L2-normalised inside (gradients flow to the raw q, k)."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, beta: torch.Tensor,
                 g: torch.Tensor | None = None, scale: float | None = None, chunk_size: int = 64,
                 use_qk_l2norm: bool = False):
        check_delta_inputs(q, k, v, beta, g)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.B, self.T, self.H, self.Dk = q.shape
        self.Dv = v.shape[-1]
        self.cd = cd = compute_dtype(q.dtype)
        self.scale = default_scale(q, scale)
        self.use_qk_l2norm = use_qk_l2norm
        self.want_dg = g is not None
        self.per_channel = g is not None and g.dim() == 4
        L = chunk_size
        self.L, self.NT = L, max(1, -(-self.T // L))
        qf, kf = q.to(cd), k.to(cd)
        self._rstd: tuple[torch.Tensor, torch.Tensor] | None = None
        if use_qk_l2norm:
            rq = torch.rsqrt((qf * qf).sum(-1, keepdim=True) + L2NORM_EPS)
            rk = torch.rsqrt((kf * kf).sum(-1, keepdim=True) + L2NORM_EPS)
            qf, kf, self._rstd = qf * rq, kf * rk, (rq, rk)
        self.qn, self.kn = qf, kf  # q, k as the recurrence sees them [B, T, H, Dk]
        self.qc, self.kc = _to_chunks(qf, L, self.NT, cd), _to_chunks(kf, L, self.NT, cd)
        self.vc = _to_chunks(v, L, self.NT, cd)
        self.betac = _to_chunks(beta.unsqueeze(-1), L, self.NT, cd)  # [B, H, NT, L, 1]
        b = None
        if g is not None:
            b = _to_chunks(g if g.dim() == 4 else g.unsqueeze(-1), L, self.NT, cd).cumsum(-2)
        self.gates = _DeltaGates(b, L)
        n = max(1, _MAX_BLOCK_ELEMS // max(1, self.B * self.H * L * L))
        self.blocks = [slice(c, min(self.NT, c + n)) for c in range(0, self.NT, n)]
        self._wy: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (X = [W U], M, Kt^T U)

    def _system(self, sl: slice, dec: _BlockDecays) -> tuple[torch.Tensor, torch.Tensor]:
        """(G, A) of the chunks of block ``sl``: G the strict decayed K K^T, A = diag(beta) G."""
        G = _gram(self.kc[:, :, sl], self.kc[:, :, sl], dec, strict=True)
        return G, G * self.betac[:, :, sl]

    def _wy_form(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(X = [W U] [B, H, NT, L, Dk + Dv], M [B, H, NT, Dk, Dk], Kt^T U [B, H, NT, Dk, Dv]), computed once:
        M = diag(e^(b_L)) - Kt^T W is each chunk's transition, Kt = K * e^(b_L - b)."""
        if self._wy is None:
            Xs, Ms, Hs = [], [], []
            for sl in self.blocks:
                dec = self.gates.block(sl)
                _, A = self._system(sl, dec)
                R = torch.cat([_scaled(self.kc[:, :, sl], dec.gamma), self.vc[:, :, sl]], dim=-1)
                X = _flush_(_solve_unit_lower(A, R.mul_(self.betac[:, :, sl])))
                W, U = X.split([self.Dk, self.Dv], dim=-1)
                kt = _scaled(self.kc[:, :, sl], dec.to_end).transpose(-1, -2)
                M = (kt @ W).neg_()
                M.diagonal(dim1=-2, dim2=-1).add_(1.0 if dec.chunk is None else dec.chunk)
                Xs.append(X), Ms.append(_flush_(M)), Hs.append(_flush_(kt @ U))
            self._wy = (torch.cat(Xs, 2), torch.cat(Ms, 2), torch.cat(Hs, 2))
        return self._wy

    def _zeros_state(self) -> torch.Tensor:
        return torch.zeros(self.B, self.H, self.Dk, self.Dv, dtype=self.cd, device=self.qc.device)

    # -- the protocol ------------------------------------------------------------------------

    def states(self, initial_state: torch.Tensor | None = None) -> ChunkStates:
        """Stage 1 of the forward: the state at every chunk start, S_{c+1} = M_c S_c + Kt_c^T U_c,
        from ``initial_state`` (or 0); ``final`` the state after the run."""
        _, M, Hc = self._wy_form()
        starts = torch.empty(self.B, self.H, self.NT, self.Dk, self.Dv, dtype=self.cd, device=self.qc.device)
        S = self._zeros_state() if initial_state is None else initial_state.to(self.cd)
        for c in range(self.NT):
            starts[:, :, c] = S
            S = torch.baddbmm(Hc[:, :, c].flatten(0, 1), M[:, :, c].flatten(0, 1),
                              S.flatten(0, 1)).view_as(S)
        return ChunkStates(starts, S)

    def with_initial_state(self, states: ChunkStates, initial_state: torch.Tensor) -> ChunkStates:
        """The states of this run started from ``initial_state``, given ``states`` from zero:
        S_c += M_{c-1} ... M_0 initial_state (one [Dk, Dk] x [Dk, Dv] product per chunk)."""
        _, M, _ = self._wy_form()
        Z = initial_state.to(self.cd)
        starts = states.starts.clone()
        for c in range(self.NT):
            starts[:, :, c] += Z
            Z = M[:, :, c] @ Z
        return ChunkStates(starts, states.final + Z)

    def outputs(self, states: ChunkStates) -> torch.Tensor:
        """Stage 2 of the forward: O_c = scale ((Q * e^b) S_c + P (U - W S_c)), [B, T, H, Dv]."""
        X, _, _ = self._wy_form()
        parts = []
        for sl in self.blocks:
            dec = self.gates.block(sl)
            q_, S = self.qc[:, :, sl], states.starts[:, :, sl].to(self.cd)
            W, U = X[:, :, sl].split([self.Dk, self.Dv], dim=-1)
            o = _gram(q_, self.kc[:, :, sl], dec, strict=False) @ (U - W @ S)
            o += _scaled(q_, dec.gamma) @ S
            parts.append(o.mul_(self.scale))
        return _from_chunks(torch.cat(parts, dim=2), self.T)

    def _c_do(self, do: torch.Tensor) -> torch.Tensor:
        if do.shape != (self.B, self.T, self.H, self.Dv):
            raise ValueError(f"do must be [B, T, H, Dv] = {[self.B, self.T, self.H, self.Dv]}, got {tuple(do.shape)}")
        return _to_chunks(do, self.L, self.NT, self.cd)

    def state_grads(self, do: torch.Tensor, dht: torch.Tensor | None = None) -> ChunkStateGrads:
        """Stage 1 of the backward: the gradient of the state at every chunk end, dS_c = M_c^T dS_{c+1}
        + scale (Q * e^b - P W)^T dO_c, from ``dht`` (or 0); ``initial`` the initial state's gradient.
        Needs no state value (the map from S to the outputs and the next state is affine)."""
        X, M, _ = self._wy_form()
        dc = self._c_do(do)
        dMs = []
        for sl in self.blocks:
            dec = self.gates.block(sl)
            q_ = self.qc[:, :, sl]
            W = X[:, :, sl, :, :self.Dk]
            lhs = _scaled(q_, dec.gamma) - _gram(q_, self.kc[:, :, sl], dec, strict=False) @ W
            dMs.append((lhs.transpose(-1, -2) @ dc[:, :, sl]).mul_(self.scale))
        dM = torch.cat(dMs, dim=2)
        ends = torch.empty(self.B, self.H, self.NT, self.Dk, self.Dv, dtype=self.cd, device=self.qc.device)
        dS = self._zeros_state() if dht is None else dht.to(self.cd)
        for c in range(self.NT - 1, -1, -1):
            ends[:, :, c] = dS
            dS = torch.baddbmm(dM[:, :, c].flatten(0, 1), M[:, :, c].flatten(0, 1).transpose(-1, -2),
                               dS.flatten(0, 1)).view_as(dS)
        return ChunkStateGrads(ends, dS)

    def with_final_grad(self, grads: ChunkStateGrads, dht: torch.Tensor) -> ChunkStateGrads:
        """The state gradients with final-state gradient ``dht``, given ``grads`` computed with none:
        dS_end(c) += (M_{NT-1} ... M_{c+1})^T dht."""
        _, M, _ = self._wy_form()
        Z = dht.to(self.cd)
        ends = grads.ends.clone()
        for c in range(self.NT - 1, -1, -1):
            ends[:, :, c] += Z
            Z = M[:, :, c].transpose(-1, -2) @ Z
        return ChunkStateGrads(ends, grads.initial + Z)

    def transition(self) -> MatrixTransition:
        """The run's transition S_out = M S_in + states(None).final, M = M_{NT-1} ... M_0 [B, H, Dk, Dk]."""
        _, M, _ = self._wy_form()
        total = M[:, :, 0]
        for c in range(1, self.NT):
            total = M[:, :, c] @ total
        return MatrixTransition(total.contiguous())

    def input_grads(self, do: torch.Tensor, states: ChunkStates, grads: ChunkStateGrads,
                    dht: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Stage 2 of the backward: {"q", "k", "v", "beta"} (+ "g") gradients from the chunk-start
        states and chunk-end state gradients of the actual initial state / final-state gradient
        (``grads`` already carries ``dht``: the gate's boundary term is read from it)."""
        X, _, _ = self._wy_form()
        dc, Dk, Dv = self._c_do(do), self.Dk, self.Dv
        out: dict[str, list[torch.Tensor]] = {"q": [], "k": [], "v": [], "beta": [], "b": []}
        for sl in self.blocks:
            dec = self.gates.block(sl)
            q_, k_, v_, beta_, d_ = (self.qc[:, :, sl], self.kc[:, :, sl], self.vc[:, :, sl],
                                     self.betac[:, :, sl], dc[:, :, sl])
            S, dS_end = states.starts[:, :, sl].to(self.cd), grads.ends[:, :, sl].to(self.cd)
            X_ = X[:, :, sl]
            W, U = X_.split([Dk, Dv], dim=-1)
            v_new = U - W @ S
            kt = _scaled(k_, dec.to_end)
            # O = scale ((Q * e^b) S + P v_new), S' = e^(b_L) S + Kt^T v_new
            dv_new = (_gram(q_, k_, dec, strict=False).transpose(-1, -2) @ d_).mul_(self.scale) + kt @ dS_end
            dP = _mask(d_ @ v_new.transpose(-1, -2), strict=False).mul_(self.scale)
            dq_g = (d_ @ S.transpose(-1, -2)).mul_(self.scale)            # on Q * e^b
            dq_p, dk_p = _gram_grads(dP, q_, k_, dec)
            dkt = v_new @ dS_end.transpose(-1, -2)                         # on Kt
            dq = _scaled(dq_g, dec.gamma) + dq_p
            dk = dk_p + _scaled(dkt, dec.to_end)
            # v_new = U - W S with X = [W U] = (I + A)^{-1} R
            dX = torch.cat([(dv_new @ S.transpose(-1, -2)).neg_(), dv_new], dim=-1)
            G, A = self._system(sl, dec)
            dR = _solve_unit_upper_transposed(A, dX)
            dA = _mask(dR @ X_.transpose(-1, -2), strict=True).neg_()
            kg = _scaled(k_, dec.gamma)
            dR_w, dR_u = dR.split([Dk, Dv], dim=-1)
            dbeta = ((dR_w * kg).sum(-1, keepdim=True) + (dR_u * v_).sum(-1, keepdim=True)
                     + (dA * G).sum(-1, keepdim=True))
            dv = dR_u * beta_
            dkg = dR_w * beta_                                             # on K * e^b
            dk_rows, dk_cols = _gram_grads(dA * beta_, k_, k_, dec)
            dk += _scaled(dkg, dec.gamma) + dk_rows + dk_cols
            out["q"].append(dq), out["k"].append(dk), out["v"].append(dv), out["beta"].append(dbeta)
            if self.want_dg:
                # gradient on the chunk-local cumulative gates b (per key channel): x * dx of every
                # factor e^b_i, minus it for every factor e^(-b_j), and b_L's share in Kt and e^(b_L) S
                t_end = kt * dkt
                db = q_ * dq_p - k_ * dk_p - t_end + kg * dkg + k_ * (dk_rows - dk_cols)
                db += _scaled(q_, dec.gamma) * dq_g
                db[..., -1, :] += t_end.sum(-2) + dec.chunk * (S * dS_end).sum(-1)
                out["b"].append(db if self.per_channel else db.sum(-1, keepdim=True))
        dq, dk, dv = (_from_chunks(torch.cat(out[n], dim=2), self.T) for n in ("q", "k", "v"))
        dbeta = _from_chunks(torch.cat(out["beta"], dim=2), self.T).squeeze(-1)
        if self._rstd is not None:
            dq = _l2norm_backward(self.qn, self._rstd[0], dq)
            dk = _l2norm_backward(self.kn, self._rstd[1], dk)
        result = {"q": dq, "k": dk, "v": dv, "beta": dbeta}
        if self.want_dg:
            db = torch.cat(out["b"], dim=2)
            dg = _from_chunks(db.flip(-2).cumsum(-2).flip(-2), self.T)  # b_i = sum_{t <= i} g_t in the chunk
            result["g"] = dg if self.per_channel else dg.squeeze(-1)
        return result


class KdaChunkedRun(DeltaChunkedRun):
    """:class:`DeltaChunkedRun` for KDA: ``g`` [B, T, H, Dk] (one log gate per key channel) is required."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, beta: torch.Tensor,
                 g: torch.Tensor, scale: float | None = None, chunk_size: int = 64, use_qk_l2norm: bool = False):
        if g is None or g.dim() != 4 or g.shape != q.shape:
            raise ValueError(f"KDA needs g [B, T, H, Dk] = {list(q.shape)}, got "
                             f"{None if g is None else tuple(g.shape)}")
        super().__init__(q, k, v, beta=beta, g=g, scale=scale, chunk_size=chunk_size, use_qk_l2norm=use_qk_l2norm)
