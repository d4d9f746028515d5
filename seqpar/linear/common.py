"""What the linear-attention strategies share: the call's configuration, this rank's pieces in
global order (each cut into spans at document starts), the wire format, and a recorder of the
bytes sent (docs/linear.md, "Sequence parallelism").

Notation: the layout cuts the sequence into N global pieces (P for contiguous, 2P for zigzag, the
chunks of a balanced layout); piece c maps the state entering it, S_in(c), to the state leaving it,
S_out(c) = A_c(S_in(c)) + U_c, with U_c its state from S_in = 0 and A_c its transition
(:mod:`seqpar.kernels.linear_transitions`; A_c = 0 when a document starts inside it). Backward
mirrors it: dS_end(c) is the gradient of the state leaving piece c, dM_c what piece c's own
outputs (and the final states of the documents that end inside it) put on S_in(c), and
dS_end(c-1) = A_c^T(dS_end(c)) + dM_c. Nothing here knows which family the kernels compute.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist

from seqpar.comm import CommHandle, all_gather, all_reduce, send_recv
from seqpar.kernels.linear import chunked_run
from seqpar.kernels.linear_transitions import RESET, KeyDecay, MatrixTransition, ScalarDecay, Transition
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

TRANSITION_KINDS = {"scalar": ScalarDecay, "gla": KeyDecay, "delta": MatrixTransition, "kda": MatrixTransition}


@dataclass
class Run:
    """Everything about one call that is not a tensor being differentiated."""

    group: dist.ProcessGroup | None
    rank: int
    world_size: int
    layout: object  # a layout name or a BalancedLayout
    scale: float
    chunk_size: int
    backend: str
    family: str  # seqpar.kernels.linear.FAMILIES
    g_gamma: torch.Tensor | None
    use_qk_l2norm: bool
    data_dependent: bool  # the transitions depend on the tokens (they travel with the states)
    output_final_state: bool
    stats: CommStats | None
    cd: torch.dtype  # compute and state dtype
    B: int
    H: int
    Dk: int
    Dv: int
    local_len: int
    documents: tuple[int, ...] | None  # global boundaries [0, e_1, ..., T_global], or None: one sequence
    device: torch.device = torch.device("cpu")
    owners: list[int] = field(default_factory=list)  # global piece -> rank
    piece_lengths: list[int] = field(default_factory=list)  # global piece -> tokens

    def __post_init__(self) -> None:
        found: list[tuple[int, int, int]] = []
        for r in range(self.world_size):
            for seg in segments(self.layout, r, self.world_size, self.local_len):
                found.append((seg.global_start, seg.length, r))
        found.sort()
        self.owners = [r for _, _, r in found]
        self.piece_lengths = [n for _, n, _ in found]
        self.piece_starts = [s for s, _, _ in found]
        self.piece_index = {start: c for c, start in enumerate(self.piece_starts)}
        self.most_pieces_per_rank = max(self.owners.count(r) for r in range(self.world_size))
        self.start_positions = self.document_starts()  # sorted

    def comm_groups(self) -> tuple:
        """The groups this run communicates on (None: the default group)."""
        return (self.group,) if self.world_size > 1 else ()

    @property
    def n_pieces(self) -> int:
        return len(self.owners)

    @property
    def n_documents(self) -> int:
        return 1 if self.documents is None else len(self.documents) - 1

    @property
    def state_shape(self) -> tuple[int, int, int, int]:
        return (self.B, self.H, self.Dk, self.Dv)

    def zeros_state(self, device) -> torch.Tensor:
        return torch.zeros(self.state_shape, dtype=self.cd, device=device)

    def zeros_final(self, device) -> torch.Tensor:
        """Zeros shaped like the final state: [B, H, Dk, Dv], or [N, H, Dk, Dv] per document."""
        lead = self.B if self.documents is None else self.n_documents
        return torch.zeros((lead,) + self.state_shape[1:], dtype=self.cd, device=device)

    # -- documents and pieces ----------------------------------------------------------------

    def document_starts(self) -> tuple[int, ...]:
        """Global positions where a (non-empty) document starts; 0 always."""
        if self.documents is None:
            return (0,)
        d = self.documents
        return tuple(d[i] for i in range(len(d) - 1) if d[i + 1] > d[i])

    def piece_has_start(self, c: int) -> bool:
        """Whether a document starts in piece c."""
        lo, n = self.piece_starts[c], self.piece_lengths[c]
        i = bisect.bisect_left(self.start_positions, lo)
        return i < len(self.start_positions) and self.start_positions[i] < lo + n

    def of_document(self, per_document: torch.Tensor, n: int) -> torch.Tensor:
        """Document n's entry of a per-document tensor ([N, ...] -> a [1, ...] view); without
        documents the tensor itself (the one sequence)."""
        return per_document if self.documents is None else per_document[n:n + 1]

    def known_transition(self, c: int, device) -> Transition | None:
        """A_c when every rank knows it without communication (a document start inside, no gate,
        or g_gamma), else None."""
        if self.piece_has_start(c):
            return RESET
        if self.data_dependent:
            return None
        log = torch.zeros(self.B, self.H, dtype=self.cd, device=device)
        if self.g_gamma is not None:
            log = log + self.g_gamma.to(device=device, dtype=self.cd) * self.piece_lengths[c]
        return ScalarDecay(log)

    @property
    def transition_numel(self) -> int:
        """Elements of one transition on the wire (0 when transitions are known)."""
        if not self.data_dependent:
            return 0
        return TRANSITION_KINDS[self.family].payload_numel(self.B, self.H, self.Dk)

    def transition_from_payload(self, flat: torch.Tensor) -> Transition:
        return TRANSITION_KINDS[self.family].from_payload(flat, self.B, self.H, self.Dk)

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

    def post_recv(self, like: torch.Tensor, src: int) -> CommHandle:
        """Post the receive of a tensor shaped like ``like`` from ``src`` now (read it with
        :meth:`wait_recv`): posted before the compute that precedes its use, the transfer runs as
        soon as the sender sends, not when this rank gets round to asking for it."""
        return send_recv(None, None, like, src, self.group)

    def wait_recv(self, handle: CommHandle, pass_: str) -> torch.Tensor:
        out = handle.wait()
        self.mark(pass_, "recv")
        return out

    def recv(self, like: torch.Tensor, src: int, pass_: str) -> torch.Tensor:
        return self.wait_recv(self.post_recv(like, src), pass_)

    def sum_over_ranks(self, t: torch.Tensor, pass_: str) -> torch.Tensor:
        """The sum of ``t`` over the ranks (no communication on one rank)."""
        if self.world_size == 1:
            return t
        return self.all_reduce(t.contiguous(), pass_).wait()


# ---------------------------------------------------------------------------------------------
# Local pieces and their spans.


@dataclass
class Span:
    """Local tokens [start, stop) of one piece that lie in one document, with the single-device
    chunked run of their tokens (``kernel``: ``seqpar.kernels.linear.chunked_run``)."""

    start: int
    stop: int
    document: int  # index of its document (0 without documents)
    opens: bool  # its first token starts the document: its state starts from the document's initial state
    closes: bool  # its last token ends the document: its final state is the document's final state
    kernel: object


@dataclass
class Piece:
    """One global piece held by this rank: local tokens [start, stop), cut into spans at document
    starts. Only the first span may read the state entering the piece, only the last may pass a
    state on to the next piece."""

    index: int
    start: int
    stop: int
    spans: list[Span]

    @property
    def continues(self) -> bool:
        """Reads the state entering it."""
        return not self.spans[0].opens

    @property
    def open_end(self) -> bool:
        """Passes its state on to the next piece."""
        return not self.spans[-1].closes

    @property
    def resets(self) -> bool:
        """A document starts inside it (A = 0)."""
        return any(s.opens for s in self.spans)


def _document_runs(lo: int, hi: int, documents: tuple[int, ...] | None) -> list[tuple[int, int, int]]:
    """(start, stop, document index) of the parts of global tokens [lo, hi) in one document each."""
    if documents is None:
        return [(lo, hi, 0)]
    runs = []
    n = bisect.bisect_right(documents, lo) - 1  # the document holding token lo
    while n < len(documents) - 1 and documents[n] < hi:
        a, b = max(lo, documents[n]), min(hi, documents[n + 1])
        if a < b:
            runs.append((a, b, n))
        n += 1
    return runs


def make_pieces(run: Run, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                beta: torch.Tensor | None) -> list[Piece]:
    """This rank's pieces in local order (which is also their global order), cut at document starts."""
    segs = segments(run.layout, run.rank, run.world_size, run.local_len)
    # a GPU kernel may want dense inputs; the zigzag halves are strided views
    dense = resolve_backend(run.backend, q.device) == "triton"
    total = run.piece_starts[-1] + run.piece_lengths[-1]
    pieces = []
    for seg in segs:
        index = run.piece_index[seg.global_start]
        spans = []
        for a, b, doc in _document_runs(seg.global_start, seg.global_start + seg.length, run.documents):
            s, e = seg.local_start + a - seg.global_start, seg.local_start + b - seg.global_start
            multi = dense and (s, e) != (0, run.local_len)
            cut = lambda x: None if x is None else (x[:, s:e].contiguous() if multi else x[:, s:e])  # noqa: E731
            doc_lo, doc_hi = (0, total) if run.documents is None else run.documents[doc:doc + 2]
            kernel = chunked_run(cut(q), cut(k), cut(v), g=cut(g), g_gamma=run.g_gamma, beta=cut(beta),
                                 scale=run.scale, chunk_size=run.chunk_size, backend=run.backend,
                                 use_qk_l2norm=run.use_qk_l2norm)
            spans.append(Span(s, e, doc, opens=a == doc_lo, closes=b == doc_hi, kernel=kernel))
        pieces.append(Piece(index, seg.local_start, seg.local_start + seg.length, spans))
    return pieces


# ---------------------------------------------------------------------------------------------
# Packing (one buffer per message).


def pack(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Flatten tensors into one 1-D buffer."""
    return torch.cat([t.reshape(-1) for t in parts])


def unpack_states(buf: torch.Tensor, run: Run, n: int) -> list[torch.Tensor]:
    """The first ``n`` states [B, H, Dk, Dv] of a 1-D buffer."""
    ns = run.B * run.H * run.Dk * run.Dv
    return [buf[i * ns:(i + 1) * ns].view(run.state_shape) for i in range(n)]


def state_message(run: Run, state: torch.Tensor, transition: Transition | None) -> torch.Tensor:
    """A state, and (when transitions travel) a piece's transition, in one buffer; a known or
    reset transition travels as zeros so that every message of a pass has one size."""
    parts = [state.to(run.cd)]
    if run.transition_numel:
        if transition is None or transition.is_reset or not run.data_dependent:
            parts.append(torch.zeros(run.transition_numel, dtype=run.cd, device=state.device))
        else:
            parts.append(transition.payload().to(run.cd))
    return pack(parts)


def read_state_message(run: Run, buf: torch.Tensor) -> tuple[torch.Tensor, Transition | None]:
    """Inverse of :func:`state_message` (the transition is None when it does not travel)."""
    ns = run.B * run.H * run.Dk * run.Dv
    state = buf[:ns].view(run.state_shape)
    if not run.transition_numel:
        return state, None
    return state, run.transition_from_payload(buf[ns:ns + run.transition_numel])


# ---------------------------------------------------------------------------------------------
# The local stages of a piece (shared by both strategies).


def document_initial_state(run: Run, h0: torch.Tensor | None, document: int) -> torch.Tensor | None:
    """The state a document starts from: initial_state [B, H, Dk, Dv] (one sequence) or
    initial_state[n] of document n ([N, H, Dk, Dv]); None: zero."""
    return None if h0 is None else run.of_document(h0, document).to(run.cd)


def local_states(run: Run, piece: Piece, h0: torch.Tensor | None) -> list:
    """The states of every span of a piece that need nothing from other ranks: opening spans from
    their document's initial state, a continuing first span from zero."""
    return [span.kernel.states(document_initial_state(run, h0, span.document) if span.opens else None)
            for span in piece.spans]


def piece_transition(piece: Piece) -> Transition:
    """A of a piece: RESET when a document starts in it, else its single span's transition."""
    return RESET if piece.resets else piece.spans[0].kernel.transition()


def enter(piece: Piece, states: list, s_in: torch.Tensor | None) -> list:
    """The span states of a piece once the state entering it is known (shifts the first span)."""
    if not piece.continues or s_in is None:
        return states
    return [piece.spans[0].kernel.with_initial_state(states[0], s_in)] + states[1:]


def piece_outputs(piece: Piece, states: list) -> list[torch.Tensor]:
    return [span.kernel.outputs(st) for span, st in zip(piece.spans, states)]


def _by_document(run: Run, pieces: Sequence[Piece], per_span: Sequence[list], keep,
                 empty: torch.Tensor | None) -> torch.Tensor:
    """A per-document tensor ([B, H, Dk, Dv], or [N, H, Dk, Dv] with documents) holding, for each
    document, the value in ``per_span`` of this rank's span that ``keep`` selects (zeros for the
    documents of other ranks, so that the sum over ranks has each once); empty documents take
    ``empty``'s entry on rank 0."""
    out = run.zeros_final(run.device)
    for piece, values in zip(pieces, per_span):
        for span, value in zip(piece.spans, values):
            if keep(span):
                run.of_document(out, span.document).copy_(value)
    if run.rank == 0 and empty is not None:
        for n in empty_documents(run):
            out[n] = empty[n]
    return out


def document_finals(run: Run, pieces: Sequence[Piece], states: Sequence[list],
                    h0: torch.Tensor | None) -> torch.Tensor:
    """The final state of every document that ends on this rank (zeros elsewhere): summed over the
    ranks it gives every document's final state. Empty documents keep their initial state."""
    return _by_document(run, pieces, [[st.final for st in per_piece] for per_piece in states],
                        lambda span: span.closes, h0)


def empty_documents(run: Run) -> list[int]:
    if run.documents is None:
        return []
    d = run.documents
    return [n for n in range(len(d) - 1) if d[n + 1] == d[n]]


def closing_grad(run: Run, dfinal: torch.Tensor | None, span: Span) -> torch.Tensor | None:
    """The final-state gradient a closing span's end receives (None without one)."""
    if dfinal is None or not span.closes:
        return None
    return run.of_document(dfinal, span.document)


def local_state_grads(run: Run, piece: Piece, dos: list[torch.Tensor], dfinal: torch.Tensor | None) -> list:
    """The state gradients of every span that need nothing from other ranks: closing spans with
    their document's final-state gradient, an open last span with none (shifted later)."""
    return [span.kernel.state_grads(do, closing_grad(run, dfinal, span)) for span, do in zip(piece.spans, dos)]


def piece_state_grad(piece: Piece, grads: list, ds_end: torch.Tensor | None,
                     transition: Transition | None) -> torch.Tensor | None:
    """dS_in of a piece (None when it does not read the entering state): what its first span puts on
    the entering state, plus A^T(ds_end) when the piece passes its state on (``grads`` computed
    without ``ds_end``, the gradient of the state leaving the piece)."""
    if not piece.continues:
        return None
    dm = grads[0].initial
    if ds_end is not None and piece.open_end and not piece.resets:
        return dm + transition.apply_transpose(ds_end.to(dm.dtype))
    return dm


def actual_states(run: Run, piece: Piece, h0: torch.Tensor | None, s_in: torch.Tensor | None) -> list:
    """The span states of a piece computed from their actual initial states (the entering state
    ``s_in`` for a continuing first span)."""
    return [span.kernel.states(s_in if i == 0 and piece.continues
                               else document_initial_state(run, h0, span.document) if span.opens else None)
            for i, span in enumerate(piece.spans)]


def leave(piece: Piece, grads: list, ds_end: torch.Tensor | None) -> list:
    """The span state gradients once the gradient of the state leaving the piece is known."""
    if not piece.open_end or ds_end is None:
        return grads
    return grads[:-1] + [piece.spans[-1].kernel.with_final_grad(grads[-1], ds_end)]


def input_grads(run: Run, piece: Piece, dos: list, states: list, grads: list, dfinal: torch.Tensor | None,
                ds_end: torch.Tensor | None) -> list[dict]:
    """The input gradients of every span (the last stage)."""
    out = []
    for i, (span, do, st, sg) in enumerate(zip(piece.spans, dos, states, grads)):
        dht = closing_grad(run, dfinal, span) if span.closes else (ds_end if i == len(piece.spans) - 1 else None)
        out.append(span.kernel.input_grads(do, st, sg, dht))
    return out


def initial_state_grad(run: Run, pieces: Sequence[Piece], grads: Sequence[list],
                       dfinal: torch.Tensor | None) -> torch.Tensor:
    """This rank's share of d(initial_state): the full gradient of every document that starts on
    this rank (its opening span's state gradient), zeros for the others; the shares of all ranks
    sum to the full gradient. Empty documents pass their final-state gradient on."""
    return _by_document(run, pieces, [[g.initial for g in per_piece] for per_piece in grads],
                        lambda span: span.opens, dfinal)
