"""What the linear-attention strategies share: the run's configuration, the local chunks of a
rank in global order, packing of states for the wire, a recorder of the bytes sent, and the scans
that carry states forward and state gradients backward across chunks (docs/linear.md).

Notation: the sequence is cut into N global chunks (P for the contiguous layout, 2P for zigzag);
chunk c has the state-from-zero M_c and the log decay log Gamma_c. The state entering chunk c is
S_in(c) (S_in(0) = initial_state), S_in(c+1) = Gamma_c S_in(c) + M_c, and S_in(N) is the final
state. Backward mirrors it with dS_end(c) (the gradient of the state leaving chunk c) and
dM_c (what chunk c's own outputs put on S_in(c)).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist

from seqpar.comm import CommHandle, all_gather, all_reduce, send_recv
from seqpar.kernels.linear import chunked_run
from seqpar.kernels.linear_reference import decay_state
from seqpar.kernels.softmax import resolve_backend
from seqpar.layout import segments


# ---------------------------------------------------------------------------------------------
# Bytes on the wire.


@dataclass(frozen=True)
class CommEvent:
    """One event of a strategy on this rank: a communication call (``kind='comm'``: the pass
    ('forward' / 'backward'), the operation, and the bytes this rank put into it -- an
    all-gather's input, a send's tensor, an all-reduce's input) or a schedule marker
    (``kind='mark'``, 0 bytes: 'intra' / 'inter' / 'kernel' compute done, 'wait' / 'recv'
    returned), so that tests can check what overlaps what."""

    pass_: str
    op: str
    nbytes: int
    kind: str = "comm"


@dataclass
class CommStats:
    """Optional recorder passed to :func:`seqpar.linear_attention` (``comm_stats=``): every
    communication the strategy issues on this rank, and its schedule markers, in order."""

    events: list[CommEvent] = field(default_factory=list)

    def record(self, pass_: str, op: str, nbytes: int, kind: str = "comm") -> None:
        self.events.append(CommEvent(pass_, op, int(nbytes), kind))

    def bytes_sent(self, pass_: str | None = None) -> int:
        """Total payload bytes of this rank, for one pass or for all."""
        return sum(e.nbytes for e in self.events if pass_ is None or e.pass_ == pass_)

    def ops(self, pass_: str | None = None) -> list[str]:
        """The communication calls, in order."""
        return [e.op for e in self.events if (pass_ is None or e.pass_ == pass_) and e.kind == "comm"]

    def timeline(self, pass_: str) -> list[str]:
        """Communication calls and schedule markers of one pass, in order."""
        return [e.op for e in self.events if e.pass_ == pass_]

    def clear(self) -> None:
        self.events.clear()


# ---------------------------------------------------------------------------------------------
# The configuration of one call.


@dataclass
class Run:
    """Everything about one call that is not a tensor being differentiated."""

    group: dist.ProcessGroup | None
    rank: int
    world_size: int
    layout: str
    scale: float
    chunk_size: int
    backend: str
    g_gamma: torch.Tensor | None
    data_dependent: bool  # per-token gates g given
    output_final_state: bool
    stats: CommStats | None
    cd: torch.dtype  # compute and state dtype
    B: int
    H: int
    Dk: int
    Dv: int
    local_len: int
    owners: list[int] = field(default_factory=list)  # global chunk -> rank
    chunk_len: int = 0

    def __post_init__(self) -> None:
        owners: dict[int, int] = {}
        for r in range(self.world_size):
            for seg in segments(self.layout, r, self.world_size, self.local_len):
                owners[seg.global_start // seg.length] = r
                self.chunk_len = seg.length
        self.owners = [owners[c] for c in range(len(owners))]

    def comm_groups(self) -> tuple:
        """The groups this run communicates on (None: the default group)."""
        return (self.group,) if self.world_size > 1 else ()

    @property
    def n_chunks(self) -> int:
        return len(self.owners)

    @property
    def state_shape(self) -> tuple[int, int, int, int]:
        return (self.B, self.H, self.Dk, self.Dv)

    def zeros_state(self, device) -> torch.Tensor:
        return torch.zeros(self.state_shape, dtype=self.cd, device=device)

    def zeros_log(self, device) -> torch.Tensor:
        return torch.zeros(self.B, self.H, dtype=self.cd, device=device)

    def known_log_totals(self, device) -> list[torch.Tensor] | None:
        """log Gamma_c of every chunk when it needs no communication (no gate, or g_gamma:
        every chunk has the same length), else None."""
        if self.data_dependent:
            return None
        if self.g_gamma is None:
            return [self.zeros_log(device)] * self.n_chunks
        log_total = (self.g_gamma.to(self.cd) * self.chunk_len).expand(self.B, self.H).clone()
        return [log_total] * self.n_chunks

    # -- recorded communication --------------------------------------------------------------

    def _record(self, pass_: str, op: str, t: torch.Tensor) -> None:
        if self.stats is not None and self.world_size > 1:
            self.stats.record(pass_, op, t.numel() * t.element_size())

    def mark(self, pass_: str, label: str) -> None:
        """Record a schedule marker (no bytes)."""
        if self.stats is not None and self.world_size > 1:
            self.stats.record(pass_, label, 0, kind="mark")

    def all_gather(self, payload: torch.Tensor, pass_: str) -> CommHandle:
        self._record(pass_, "all_gather", payload)
        return all_gather(payload, self.group)

    def all_reduce(self, payload: torch.Tensor, pass_: str) -> CommHandle:
        self._record(pass_, "all_reduce", payload)
        return all_reduce(payload, self.group)

    def send(self, payload: torch.Tensor, dst: int, pass_: str) -> CommHandle:
        self._record(pass_, "send", payload)
        return send_recv(payload, dst, None, None, self.group)

    def recv(self, like: torch.Tensor, src: int, pass_: str) -> torch.Tensor:
        out = send_recv(None, None, like, src, self.group).wait()
        self.mark(pass_, "recv")
        return out


# ---------------------------------------------------------------------------------------------
# Local chunks.


@dataclass
class Piece:
    """One global chunk held by this rank: local tokens [start, stop), its inputs, and the
    single-device chunked computation of its tokens (``kernel``: the stages of
    ``seqpar.kernels.linear.chunked_run``). The strategies' local work is exactly those stages."""

    index: int
    start: int
    stop: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor | None
    kernel: object

    @property
    def log_total(self) -> torch.Tensor:
        """log Gamma of the piece [B, H] (the sum of its log gates; zeros without gates)."""
        return self.kernel.log_total


def make_pieces(run: Run, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None) -> list[Piece]:
    """This rank's chunks in local order (which is also their global order)."""
    segs = segments(run.layout, run.rank, run.world_size, run.local_len)
    # a GPU kernel may want dense inputs; the zigzag halves are strided views
    dense = len(segs) > 1 and resolve_backend(run.backend, q.device) == "triton"
    cut = lambda x, s, e: None if x is None else (x[:, s:e].contiguous() if dense else x[:, s:e])
    pieces = []
    for seg in segs:
        s, e = seg.local_start, seg.local_start + seg.length
        qs, ks, vs, gs = cut(q, s, e), cut(k, s, e), cut(v, s, e), cut(g, s, e)
        kernel = chunked_run(qs, ks, vs, g=gs, g_gamma=run.g_gamma, scale=run.scale, chunk_size=run.chunk_size,
                             backend=run.backend)
        pieces.append(Piece(seg.global_start // seg.length, s, e, qs, ks, vs, gs, kernel))
    return pieces


def kernel_gates(run: Run, piece: Piece) -> dict:
    """The gate keyword arguments of the single-device kernel for one piece."""
    return dict(g=piece.g, g_gamma=run.g_gamma, scale=run.scale, chunk_size=run.chunk_size, backend=run.backend)


# ---------------------------------------------------------------------------------------------
# Packing (one buffer per message) and the scans.


def pack(states: Sequence[torch.Tensor], logs: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """Flatten states [B, H, Dk, Dv] and log decays [B, H] into one 1-D buffer."""
    return torch.cat([t.reshape(-1) for t in list(states) + list(logs)])


def unpack(buf: torch.Tensor, run: Run, n_states: int, n_logs: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Inverse of :func:`pack` for a 1-D buffer."""
    ns, nl = run.B * run.H * run.Dk * run.Dv, run.B * run.H
    states = [buf[i * ns:(i + 1) * ns].view(run.state_shape) for i in range(n_states)]
    off = n_states * ns
    logs = [buf[off + i * nl: off + (i + 1) * nl].view(run.B, run.H) for i in range(n_logs)]
    return states, logs


def step(state: torch.Tensor, log_total: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """One chunk of the scan: Gamma * state + local (forward: local = M; backward: local = dM)."""
    return decay_state(state, log_total) + local


def exclusive_scan(h0: torch.Tensor, M: Sequence[torch.Tensor], log_totals: Sequence[torch.Tensor]
                   ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """S_in(c) of every chunk c (S_in(0) = h0) and the final state S_in(N)."""
    s_in, S = [], h0
    for m, lg in zip(M, log_totals):
        s_in.append(S)
        S = step(S, lg, m)
    return s_in, S


def suffix_scan(dfinal: torch.Tensor, dM: Sequence[torch.Tensor], log_totals: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """dS_end(c) of every chunk: dS_end(N-1) = dfinal, dS_end(c) = Gamma_{c+1} dS_end(c+1) + dM_{c+1}."""
    n = len(dM)
    out = [dfinal] * n
    for c in range(n - 2, -1, -1):
        out[c] = step(out[c + 1], log_totals[c + 1], dM[c + 1])
    return out


def initial_state_share(pieces: Sequence[Piece], dM: Sequence[torch.Tensor], log_before: Sequence[torch.Tensor],
                        dfinal_mine: torch.Tensor | None, log_all: torch.Tensor | None) -> torch.Tensor:
    """This rank's share of d(initial_state): what its own loss puts on it, through its chunks'
    outputs (exp(log A_c) dM_c, A_c the decay of every token before chunk c, dM_c the gradient
    chunk c's outputs put on the state entering it) and through its own gradient of the final
    state (A_N dfinal). The shares of all ranks sum to the full gradient."""
    share = sum(decay_state(m, lb) for m, lb in zip(dM, log_before))
    if dfinal_mine is not None:
        share = share + decay_state(dfinal_mine.to(share.dtype), log_all)
    return share
