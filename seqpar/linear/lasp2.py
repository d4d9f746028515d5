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

from seqpar.linear.common import Piece, Run, exclusive_scan, initial_state_share, pack, suffix_scan, unpack


def _by_chunk(run: Run, gathered: torch.Tensor, n_extra: int = 0, n_logs: int = 0):
    """Unpack a gathered [P, n] buffer (rank r: its chunks' states, then ``n_extra`` more states,
    then its chunks' logs) into lists indexed by global chunk, plus each rank's extra states."""
    states: list = [None] * run.n_chunks
    logs: list = [None] * run.n_chunks
    extras = []
    for r in range(run.world_size):
        chunks = [c for c in range(run.n_chunks) if run.owners[c] == r]
        st, lg = unpack(gathered[r], run, len(chunks) + n_extra, n_logs)
        for i, c in enumerate(chunks):
            states[c] = st[i]
            logs[c] = lg[i] if lg else None
        extras.append(st[len(chunks):])
    return states, logs, extras


class Lasp2:
    """The LASP-2 strategy (see the module docstring)."""

    name = "lasp2"

    def forward(self, run: Run, pieces: list[Piece], h0: torch.Tensor | None):
        dev = pieces[0].q.device
        local = [p.kernel.states() for p in pieces]
        run.mark("forward", "local")
        logs = [p.log_total for p in pieces] if run.data_dependent else []
        gathered = run.all_gather(pack([st.final for st in local], logs), "forward").wait()
        run.mark("forward", "wait")
        M_all, log_all, _ = _by_chunk(run, gathered, n_logs=len(logs))
        log_totals = log_all if run.data_dependent else run.known_log_totals(dev)
        h0c = h0.to(run.cd) if h0 is not None else run.zeros_state(dev)
        s_in, final = exclusive_scan(h0c, M_all, log_totals)
        outs = [p.kernel.outputs(st if p.index == 0 and h0 is None else p.kernel.with_initial_state(st, s_in[p.index]))
                for p, st in zip(pieces, local)]
        run.mark("forward", "finish")
        return outs, final, dict(s_in=[s_in[p.index] for p in pieces], log_totals=log_totals)

    def backward(self, run: Run, pieces: list[Piece], dos: list[torch.Tensor], dfinal: torch.Tensor | None,
                 saved: dict, want_h0: bool):
        dev = pieces[0].q.device
        local = [p.kernel.state_grads(do) for p, do in zip(pieces, dos)]
        run.mark("backward", "local")
        dM = [sg.initial for sg in local]
        extra = [dfinal.to(run.cd)] if dfinal is not None else []
        handle = run.all_gather(pack(dM + extra), "backward")
        # overlapped with the all-gather: the chunk states, from the S_in the forward found
        states = [p.kernel.states(s_in) for p, s_in in zip(pieces, saved["s_in"])]
        run.mark("backward", "states")
        gathered = handle.wait()
        run.mark("backward", "wait")
        dM_all, _, extras = _by_chunk(run, gathered, n_extra=len(extra))
        dfinal_sum = sum(e[0] for e in extras) if extra else run.zeros_state(dev)
        log_totals = saved["log_totals"]
        ds_end = suffix_scan(dfinal_sum, dM_all, log_totals)
        grads = [finish_grads(p, do, st, sg, ds_end[p.index]) for p, do, st, sg in zip(pieces, dos, states, local)]
        run.mark("backward", "finish")
        dh0 = None
        if want_h0:
            log_before = torch.stack(log_totals).cumsum(0)
            before = [log_before[p.index - 1] if p.index > 0 else run.zeros_log(dev) for p in pieces]
            dh0 = initial_state_share(pieces, dM, before, dfinal, log_before[-1])
        return grads, dh0


def finish_grads(p: Piece, do: torch.Tensor, states, state_grads, ds_end: torch.Tensor):
    """(dq, dk, dv, dg) of a piece from its chunk states (from S_in) and its state gradients
    computed with no final-state gradient, given the gradient ``ds_end`` of the state it ends with."""
    return p.kernel.input_grads(do, states, p.kernel.with_final_grad(state_grads, ds_end), ds_end)
