"""LASP-2: one all-gather of the chunk states per pass; the local work is the single-device kernel.

Each rank's piece c is computed by the stages of the chunked kernel
(``seqpar.kernels.linear.chunked_run``), so the local work is exactly the kernel's on that piece
and the cross-rank part is O(Dk Dv) per chunk of the piece.

Forward, on every rank:
1. ``states()`` of each local piece from a zero state (the kernel's first stage): the chunk
   states and M_c, the piece's state from zero.
2. ONE all-gather of {M_c} (plus log Gamma_c when the gates are data dependent; with g_gamma or
   no gate every Gamma is known locally).
3. Exclusive prefix over the N global pieces in global order (N = P, or 2P for zigzag) gives
   S_in(c) and the final state on every rank; the chunk states are shifted to start from
   S_in(c) (one multiply-add per chunk of 64 tokens) and ``outputs()`` (the kernel's second
   stage) gives o.

Backward, on every rank:
1. ``state_grads()`` of each piece with no final-state gradient (the kernel's reverse state
   pass): dM_c, the gradient piece c's own outputs put on S_in(c) (plus this rank's gradient of
   the final state when the final state is an output).
2. ONE all-gather of them, and *while it is in flight* the chunk states of each piece are
   recomputed from S_in(c) (saved by the forward), as the kernel's backward recomputes them.
3. The sum of the final-state gradients over ranks (the final state acts as a tensor broadcast
   to every rank) seeds the exclusive suffix dS_end(c); the state gradients are shifted by it and
   ``input_grads()`` (the kernel's last stage) gives dq, dk, dv, dg; plus this rank's share of
   d(initial_state).

The forward's all-gather is not overlapped: the only work that does not depend on it is the
first stage, which it needs. (The v0.1 schedule overlapped the intra-chunk outputs with it and
paid an extra O(L Dk Dv) correction pass over the whole piece afterwards, with exponentials of
decays accumulated over the piece that underflowed to denormals; the gather carries O(P Dk Dv).)
"""
from __future__ import annotations

import torch

from seqpar.kernels.linear_transitions import Transition
from seqpar.linear.common import (
    Piece,
    Run,
    document_finals,
    enter,
    initial_state_grad,
    input_grads,
    leave,
    local_state_grads,
    local_states,
    pack,
    piece_outputs,
    piece_state_grad,
    piece_transition,
    read_state_message,
    state_message,
)


def _gathered(run: Run, messages: list[torch.Tensor], pass_: str) -> list[torch.Tensor]:
    """The message of every global piece: one all-gather of this rank's messages (all of one size;
    a rank with fewer pieces than another pads with zeros)."""
    most = run.most_pieces_per_rank
    if len(messages) < most:
        messages = messages + [torch.zeros_like(messages[0])] * (most - len(messages))
    gathered = run.all_gather(pack(messages), pass_).wait()
    run.mark(pass_, "wait")
    return _by_piece(run, gathered, messages[0].numel())


def _by_piece(run: Run, gathered: torch.Tensor, size: int) -> list[torch.Tensor]:
    out: list = [None] * run.n_pieces
    seen = [0] * run.world_size
    for c, r in enumerate(run.owners):
        out[c] = gathered[r, seen[r] * size:(seen[r] + 1) * size]
        seen[r] += 1
    return out


class Lasp2:
    """The LASP-2 strategy (see the module docstring)."""

    name = "lasp2"

    def forward(self, run: Run, pieces: list[Piece], h0: torch.Tensor | None):
        local = [local_states(run, p, h0) for p in pieces]
        run.mark("forward", "local")
        # the transitions other ranks need (none on one rank; a piece with a document start has RESET)
        mine = [piece_transition(p) if run.data_dependent and run.world_size > 1 and not p.resets else None
                for p in pieces]
        messages = [state_message(run, st[-1].final, a) for st, a in zip(local, mine)]
        received = _gathered(run, messages, "forward") if run.world_size > 1 else None
        U: list = [None] * run.n_pieces
        A: list[Transition] = [None] * run.n_pieces
        for p, st, a in zip(pieces, local, mine):
            U[p.index], A[p.index] = st[-1].final, a
        for c in range(run.n_pieces):
            if received is not None and run.owners[c] != run.rank:
                U[c], A[c] = read_state_message(run, received[c])
            known = run.known_transition(c, run.device)
            if known is not None:
                A[c] = known
        s_in, S = [None] * run.n_pieces, None
        for c in range(run.n_pieces):
            s_in[c] = S
            S = U[c] if S is None or A[c].is_reset else A[c].apply(S) + U[c]
        states = [enter(p, st, s_in[p.index]) for p, st in zip(pieces, local)]
        outs = [o for p, st in zip(pieces, states) for o in piece_outputs(p, st)]
        run.mark("forward", "finish")
        final = None
        if run.output_final_state:
            final = S if run.documents is None else run.sum_over_ranks(document_finals(run, pieces, states, h0),
                                                                        "forward")
        return outs, final, dict(s_in=[s_in[p.index] for p in pieces], transitions=A)

    def backward(self, run: Run, pieces: list[Piece], dos: list[list[torch.Tensor]], dfinal: torch.Tensor | None,
                 saved: dict, want_h0: bool):
        h0 = saved["h0"]
        grads = [local_state_grads(run, p, d, dfinal) for p, d in zip(pieces, dos)]
        run.mark("backward", "local")
        dM = [piece_state_grad(p, g, None, None) for p, g in zip(pieces, grads)]
        zero = run.zeros_state(run.device)
        messages = [zero if m is None else m.to(run.cd) for m in dM]
        padded = messages + [zero] * (run.most_pieces_per_rank - len(messages))
        handle = run.all_gather(pack(padded), "backward") if run.world_size > 1 else None
        # overlapped with the all-gather: the span states, from the entering states the forward found
        states = [enter(p, local_states(run, p, h0), s) for p, s in zip(pieces, saved["s_in"])]
        run.mark("backward", "states")
        if handle is not None:
            gathered = handle.wait()
            run.mark("backward", "wait")
            dM_all = _by_piece(run, gathered, messages[0].numel())
        else:
            dM_all = messages
        A = saved["transitions"]
        ds_end: list = [None] * run.n_pieces
        dS = None
        for c in range(run.n_pieces - 1, 0, -1):
            dS = dM_all[c].view(run.state_shape) if dS is None or A[c].is_reset else (
                A[c].apply_transpose(dS) + dM_all[c].view(run.state_shape))
            ds_end[c - 1] = dS
        grads = [leave(p, g, ds_end[p.index]) for p, g in zip(pieces, grads)]
        result = [input_grads(run, p, d, st, g, dfinal, ds_end[p.index])
                  for p, d, st, g in zip(pieces, dos, states, grads)]
        run.mark("backward", "finish")
        dh0 = initial_state_grad(run, pieces, grads, dfinal) if want_h0 else None
        return result, dh0
