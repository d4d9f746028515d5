"""LASP (ring): states travel from chunk to chunk by point-to-point messages, O(1) volume per rank.

Global chunks are visited in order; the rank holding chunk c waits for S_in(c) from the holder
of chunk c-1 (or keeps it, when it holds both), and sends S_out(c) = Gamma_c S_in(c) + M_c on.
Backward passes dS_end the other way (dS_in(c) = Gamma_c dS_end(c) + dM_c).

Two schedules, same messages:

- ``lasp1_serial`` (LASP as published): wait for S_in, run the kernel with initial_state=S_in
  and output_final_state, send the final state. Every rank's whole compute sits on the critical
  path of the chain: time ~ P * (hop + chunk compute).
- ``lasp1`` (pipelined): before waiting, every rank runs the first stage of the chunked kernel
  on its pieces from a zero state (``states()``: the chunk states and M_c; backward:
  ``state_grads()``, giving dM_c, and the chunk states recomputed from the saved S_in). When S_in
  arrives, the hop of S_out = Gamma S_in + M goes out right after one Dk x Dv multiply-add,
  *before* the kernel's second stage (``outputs()`` from the chunk states shifted to S_in;
  backward ``input_grads()``); so the chain costs ~ P * hop + one piece of compute, and the
  local work is exactly the kernel's.

Zigzag: chunk c is on rank c for c < P and on rank 2P-1-c after, so the chain goes up the ranks
and back down: 2(P-1) serial hops (twice contiguous's P-1), each rank sends at most two states
per pass (rank P-1 keeps the state between its two chunks). The volume stays O(1) per rank but
the latency of the chain doubles; prefer lasp2 on zigzag.

The final state is on the holder of the last chunk; when it is an output, one all-reduce (zeros
elsewhere) gives it to every rank (with documents: the final state of every document, from the
rank where it ends), and in backward one all-reduce sums the final-state gradients of all ranks
(the final state acts as a tensor broadcast to every rank). A message is one state: the
transitions never travel. With documents, no message goes to a piece whose first token starts a
document (it does not read the entering state).
"""
from __future__ import annotations

import torch

from seqpar.comm import CommHandle
from seqpar.linear.common import (
    Piece,
    Run,
    actual_states,
    closing_grad,
    document_finals,
    enter,
    initial_state_grad,
    input_grads,
    leave,
    local_state_grads,
    local_states,
    piece_outputs,
    piece_state_grad,
    piece_transition,
)


class Lasp1:
    """The ring strategy; ``pipelined`` picks the schedule (see the module docstring)."""

    def __init__(self, pipelined: bool = True):
        self.pipelined = pipelined
        self.name = "lasp1" if pipelined else "lasp1_serial"

    # -- the chain ---------------------------------------------------------------------------

    @staticmethod
    def _post_receives(run: Run, sources: list[tuple[int, int]]) -> dict[int, CommHandle]:
        """{i: posted receive} for each (i, source piece) of ``sources`` whose state (gradient) comes
        from the holder of the source piece on another rank, posted in the order of ``sources``:
        the chain's order (ascending pieces forward, descending backward), which is also the order
        in which each peer sends, so that two messages from one peer meet the right receives."""
        posted = {}
        for i, src_piece in sources:
            src = run.owners[src_piece]
            if src != run.rank:
                posted[i] = run.post_recv(run.zeros_state(run.device), src)
        return posted

    def _receive(self, run: Run, posted: dict[int, CommHandle], i: int, carry: torch.Tensor | None,
                 pass_: str) -> torch.Tensor:
        """The state (or state gradient) piece ``i`` reads: a posted receive, or the carry kept here."""
        return carry if i not in posted else run.wait_recv(posted[i], pass_)

    def _pass_on(self, run: Run, dst_piece: int, value: torch.Tensor, pass_: str, sends: list) -> torch.Tensor | None:
        """Send ``value`` to the holder of piece ``dst_piece``, or keep it if that is this rank."""
        dst = run.owners[dst_piece]
        if dst == run.rank:
            return value
        sends.append(run.send(value.to(run.cd).contiguous(), dst, pass_))
        return None

    # -- forward -----------------------------------------------------------------------------

    def forward(self, run: Run, pieces: list[Piece], h0: torch.Tensor | None):
        posted = self._post_receives(run, [(i, p.index - 1) for i, p in enumerate(pieces) if p.continues])
        if self.pipelined:  # everything that needs no neighbour, before waiting
            local = [local_states(run, p, h0) for p in pieces]
            transitions = [piece_transition(p) if p.open_end and not p.resets else None for p in pieces]
            run.mark("forward", "local")
        outs, s_in_list, all_states, sends = [], [], [], []
        carry = None
        for i, p in enumerate(pieces):
            s_in = self._receive(run, posted, i, carry, "forward") if p.continues else None
            passes_on = p.open_end and p.index + 1 < run.n_pieces
            if self.pipelined:
                u = local[i][-1].final
                s_out = u if not passes_on else (u if p.resets or s_in is None else transitions[i].apply(s_in) + u)
            else:
                states = actual_states(run, p, h0, s_in)
                o = piece_outputs(p, states)
                s_out = states[-1].final
                run.mark("forward", "kernel")
            if passes_on:
                carry = self._pass_on(run, p.index + 1, s_out, "forward", sends)
            if self.pipelined:  # after the hop went out
                states = enter(p, local[i], s_in)
                o = piece_outputs(p, states)
                run.mark("forward", "finish")
            outs.extend(o)
            s_in_list.append(s_in)
            all_states.append(states)
        for h in sends:
            h.wait()
        final = None
        if run.output_final_state:
            final = run.sum_over_ranks(document_finals(run, pieces, all_states, h0), "forward")
        saved = dict(s_in=s_in_list)
        if self.pipelined:
            saved["transitions"] = transitions
        return outs, final, saved

    # -- backward ----------------------------------------------------------------------------

    def backward(self, run: Run, pieces: list[Piece], dos: list[list[torch.Tensor]], dfinal: torch.Tensor | None,
                 saved: dict, want_h0: bool):
        h0 = saved["h0"]
        posted = self._post_receives(run, [(i, p.index + 1) for i, p in reversed(list(enumerate(pieces)))
                                           if p.open_end and p.index + 1 < run.n_pieces])
        if self.pipelined:  # everything that needs no neighbour, before waiting
            local = [local_state_grads(run, p, d, dfinal) for p, d in zip(pieces, dos)]
            states = [enter(p, local_states(run, p, h0), s) for p, s in zip(pieces, saved["s_in"])]
            run.mark("backward", "local")
        results: list = [None] * len(pieces)
        final_grads: list = [None] * len(pieces)
        sends: list = []
        carry = None
        for i in reversed(range(len(pieces))):
            p, d = pieces[i], dos[i]
            receives = p.open_end and p.index + 1 < run.n_pieces
            ds_end = self._receive(run, posted, i, carry, "backward") if receives else None
            if self.pipelined:
                ds_in = piece_state_grad(p, local[i], ds_end, saved["transitions"][i])
            else:
                grads = [span.kernel.state_grads(do, closing_grad(run, dfinal, span) if span.closes else ds_end)
                         for span, do in zip(p.spans, d)]
                st = actual_states(run, p, h0, saved["s_in"][i])
                results[i] = input_grads(run, p, d, st, grads, dfinal, ds_end)
                final_grads[i] = grads
                ds_in = grads[0].initial if p.continues else None
                run.mark("backward", "kernel")
            if ds_in is not None:
                carry = self._pass_on(run, p.index - 1, ds_in, "backward", sends)
            if self.pipelined:  # after the hop went out
                grads = leave(p, local[i], ds_end)
                results[i] = input_grads(run, p, d, states[i], grads, dfinal, ds_end)
                final_grads[i] = grads
                run.mark("backward", "finish")
        for h in sends:
            h.wait()
        dh0 = initial_state_grad(run, pieces, final_grads, dfinal) if want_h0 else None
        return results, dh0

