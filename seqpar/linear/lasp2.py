"""LASP-2: one all-gather of the chunk states per pass, computation fully parallel.

Forward, on every rank:
1. M_c (state from zero) of each local chunk c: one einsum, O(L Dk Dv).
2. Issue ONE all-gather of {M_c} (plus log Gamma_c when the gates are data dependent; with
   g_gamma or no gate every Gamma is known locally).
3. *While it is in flight*: the intra-chunk output of every local chunk (the single-device kernel
   with initial_state=None) -- all of the O(L^2) / O(L Dk Dv) work of the pass.
4. Wait; exclusive prefix over the N global chunks in global order (N = P, or 2P for zigzag) gives
   S_in(c) and the final state (on every rank, no extra communication); add the inter-chunk term
   scale * (q * gamma) S_in(c).

Backward, on every rank:
1. dM_c = scale * sum_i gamma_i q_i do_i^T of each local chunk (plus this rank's gradient of the
   final state when the final state is an output).
2. Issue ONE all-gather of them.
3. *While it is in flight*: the intra-chunk backward (kernel with initial_state=None, dht=None).
4. Wait; the sum of the final-state gradients over ranks (the final state acts as a tensor
   broadcast to every rank) seeds the exclusive suffix dS_end(c); add the boundary terms of
   dq, dk, dv, dg (from S_in(c) and dS_end(c)) and this rank's share of d(initial_state).
"""
from __future__ import annotations

import torch

from seqpar.kernels.linear import chunk_linear_attention_backward, chunk_linear_attention_forward
from seqpar.kernels.linear_reference import boundary_grads, chunk_state, gate_grad, output_state_grad, state_output
from seqpar.linear.common import (
    Piece,
    Run,
    exclusive_scan,
    initial_state_share,
    kernel_gates,
    pack,
    step,
    suffix_scan,
    unpack,
)


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
        M = [chunk_state(p.k.to(run.cd), p.v.to(run.cd), p.dec) for p in pieces]
        logs = [p.dec.log_total for p in pieces] if run.data_dependent else []
        handle = run.all_gather(pack(M, logs), "forward")
        # overlapped with the all-gather: the intra-chunk outputs
        o_intra = [chunk_linear_attention_forward(p.q, p.k, p.v, initial_state=None, **kernel_gates(run, p))[0]
                   for p in pieces]
        run.mark("forward", "intra")
        gathered = handle.wait()
        run.mark("forward", "wait")
        M_all, log_all, _ = _by_chunk(run, gathered, n_logs=len(logs))
        log_totals = log_all if run.data_dependent else run.known_log_totals(dev)
        h0c = h0.to(run.cd) if h0 is not None else run.zeros_state(dev)
        s_in, final = exclusive_scan(h0c, M_all, log_totals)
        outs = [oi + state_output(p.q.to(run.cd), s_in[p.index], p.dec, run.scale) for oi, p in zip(o_intra, pieces)]
        saved = dict(s_in=[s_in[p.index] for p in pieces], M=M, log_totals=log_totals)
        return outs, final, saved

    def backward(self, run: Run, pieces: list[Piece], dos: list[torch.Tensor], dfinal: torch.Tensor | None,
                 saved: dict, want_h0: bool):
        dev = pieces[0].q.device
        dM = [output_state_grad(p.q.to(run.cd), do, p.dec, run.scale) for p, do in zip(pieces, dos)]
        extra = [dfinal.to(run.cd)] if dfinal is not None else []
        handle = run.all_gather(pack(dM + extra), "backward")
        # overlapped with the all-gather: the intra-chunk backward
        intra = [chunk_linear_attention_backward(do, p.q, p.k, p.v, initial_state=None, dht=None, **kernel_gates(run, p))
                 for p, do in zip(pieces, dos)]
        run.mark("backward", "intra")
        gathered = handle.wait()
        run.mark("backward", "wait")
        dM_all, _, extras = _by_chunk(run, gathered, n_extra=len(extra))
        dfinal_sum = sum(e[0] for e in extras) if extra else run.zeros_state(dev)
        log_totals = saved["log_totals"]
        ds_end = suffix_scan(dfinal_sum, dM_all, log_totals)
        grads = []
        for i, (p, do) in enumerate(zip(pieces, dos)):
            s_in, s_out = saved["s_in"][i], step(saved["s_in"][i], p.dec.log_total, saved["M"][i])
            grads.append(finish_grads(run, p, do, intra[i][:4], s_in, ds_end[p.index], s_out))
        dh0 = None
        if want_h0:
            log_before = torch.stack(log_totals).cumsum(0)
            before = [log_before[p.index - 1] if p.index > 0 else run.zeros_log(dev) for p in pieces]
            dh0 = initial_state_share(pieces, dM, before, dfinal, log_before[-1])
        return grads, dh0


def finish_grads(run: Run, p: Piece, do: torch.Tensor, intra, s_in: torch.Tensor, ds_end: torch.Tensor,
                 s_out: torch.Tensor):
    """Add the boundary terms (from S_in and dS_end) to a chunk's intra-chunk (dq, dk, dv, dg)."""
    dq, dk, dv, dg = intra
    qc, kc, vc, doc = p.q.to(run.cd), p.k.to(run.cd), p.v.to(run.cd), do.to(run.cd)
    bq, bk, bv = boundary_grads(qc, kc, vc, doc, p.dec, run.scale, s_in, ds_end)
    if dg is not None:
        dg = dg + gate_grad(qc, bq, kc, bk, ds_end, s_out)
    return dq + bq, dk + bk, dv + bv, dg
