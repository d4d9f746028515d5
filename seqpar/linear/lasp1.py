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
elsewhere) gives it to every rank, and in backward one all-reduce sums the final-state gradients
of all ranks (the final state acts as a tensor broadcast to every rank). With data-dependent
gates each message also carries log A (the log decay of all tokens before it, [B, H]) so that
each rank can compute its share of d(initial_state).
"""
from __future__ import annotations

import torch

from seqpar.kernels.linear import chunk_linear_attention_backward, chunk_linear_attention_forward
from seqpar.linear.common import Piece, Run, initial_state_share, kernel_gates, pack, step, unpack
from seqpar.linear.lasp2 import finish_grads


class Lasp1:
    """The ring strategy; ``pipelined`` picks the schedule (see the module docstring)."""

    def __init__(self, pipelined: bool = True):
        self.pipelined = pipelined
        self.name = "lasp1" if pipelined else "lasp1_serial"

    # -- the chain ---------------------------------------------------------------------------

    def _n_logs(self, run: Run, pass_: str = "forward") -> int:
        """Log decays per message: forward messages carry log A with data-dependent gates."""
        return 1 if run.data_dependent and pass_ == "forward" else 0

    def _receive(self, run: Run, c: int, carry, first, pass_: str, dev):
        """What enters a chunk from chunk c (the one before it forward, after it backward)."""
        if first is not None:
            return first
        src = run.owners[c]
        if src == run.rank:
            return carry
        n_logs = self._n_logs(run, pass_)
        like = pack([run.zeros_state(dev)], [run.zeros_log(dev)] * n_logs)
        states, logs = unpack(run.recv(like, src, pass_), run, 1, n_logs)
        return states[0], (logs[0] if logs else None)

    def _pass_on(self, run: Run, c: int, value, pass_: str, sends: list):
        """Send ``value`` (state, log) to the holder of chunk c, or keep it if that is this rank."""
        dst = run.owners[c]
        if dst == run.rank:
            return value
        state, log = value
        sends.append(run.send(pack([state], [log] * self._n_logs(run, pass_)), dst, pass_))
        return None

    def _log_before(self, run: Run, c: int, carried: torch.Tensor | None, dev) -> torch.Tensor:
        known = run.known_log_totals(dev)
        if known is None:
            return carried
        return sum(known[:c], run.zeros_log(dev))

    # -- forward -----------------------------------------------------------------------------

    def forward(self, run: Run, pieces: list[Piece], h0: torch.Tensor | None):
        dev = pieces[0].q.device
        N = run.n_chunks
        if self.pipelined:  # everything that needs no neighbour, before waiting
            local = [p.kernel.states() for p in pieces]
            run.mark("forward", "local")
        outs, s_in_list, log_before, sends = [], [], [], []
        carry = None
        for i, p in enumerate(pieces):
            first = None
            if p.index == 0:
                first = (h0.to(run.cd) if h0 is not None else run.zeros_state(dev), run.zeros_log(dev))
            s_in, lb = self._receive(run, p.index - 1 if p.index > 0 else 0, carry, first, "forward", dev)
            lb = self._log_before(run, p.index, lb, dev)
            if self.pipelined:
                s_out = step(s_in, p.log_total, local[i].final)
            else:
                o, s_out = chunk_linear_attention_forward(p.q, p.k, p.v, initial_state=s_in, output_final_state=True,
                                                          **kernel_gates(run, p))
                run.mark("forward", "kernel")
            value = (s_out, lb + p.log_total)
            carry = value if p.index == N - 1 else self._pass_on(run, p.index + 1, value, "forward", sends)
            if self.pipelined:  # after the hop went out
                o = p.kernel.outputs(p.kernel.with_initial_state(local[i], s_in))
                run.mark("forward", "finish")
            outs.append(o)
            s_in_list.append(s_in)
            log_before.append(lb)
        for h in sends:
            h.wait()
        final, log_all = self._share_final(run, carry, dev)
        return outs, final, dict(s_in=s_in_list, log_before=log_before, log_all=log_all)

    def _share_final(self, run: Run, carry, dev):
        """Give the final state (and log A_N) of the last chunk's holder to every rank."""
        known = run.known_log_totals(dev)
        log_all = sum(known, run.zeros_log(dev)) if known is not None else None
        if not run.output_final_state:
            return None, log_all
        mine = carry if carry is not None else (run.zeros_state(dev), run.zeros_log(dev))
        if run.world_size == 1:
            return mine[0], (log_all if log_all is not None else mine[1])
        buf = run.all_reduce(pack([mine[0]], [mine[1]] * self._n_logs(run)), "forward").wait()
        states, logs = unpack(buf, run, 1, self._n_logs(run))
        return states[0], (logs[0] if logs else log_all)

    # -- backward ----------------------------------------------------------------------------

    def backward(self, run: Run, pieces: list[Piece], dos: list[torch.Tensor], dfinal: torch.Tensor | None,
                 saved: dict, want_h0: bool):
        N = run.n_chunks
        final_handle = None  # the sum over ranks of the final state's gradient, in flight
        if dfinal is not None and run.world_size > 1:
            final_handle = run.all_reduce(dfinal.to(run.cd), "backward")
        local = ([p.kernel.state_grads(do) for p, do in zip(pieces, dos)]
                 if self.pipelined or want_h0 else None)
        if self.pipelined:  # everything that needs no neighbour, before waiting
            states = [p.kernel.states(s_in) for p, s_in in zip(pieces, saved["s_in"])]
            run.mark("backward", "local")
        dfinal_sum = final_handle.wait() if final_handle is not None else (
            dfinal.to(run.cd) if dfinal is not None else None)
        grads: list = [None] * len(pieces)
        sends: list = []
        carry = None
        dev = pieces[0].q.device
        zero_log = run.zeros_log(dev)
        for i in reversed(range(len(pieces))):
            p, do, s_in = pieces[i], dos[i], saved["s_in"][i]
            first = None
            if p.index == N - 1:
                first = (dfinal_sum if dfinal_sum is not None else run.zeros_state(dev), zero_log)
            ds_end, _ = self._receive(run, min(p.index + 1, N - 1), carry, first, "backward", dev)
            if self.pipelined:
                ds_in = step(ds_end, p.log_total, local[i].initial)
            else:
                dq, dk, dv, dg, ds_in = chunk_linear_attention_backward(
                    do, p.q, p.k, p.v, initial_state=s_in, dht=ds_end, **kernel_gates(run, p))
                run.mark("backward", "kernel")
            if p.index > 0:
                carry = self._pass_on(run, p.index - 1, (ds_in, zero_log), "backward", sends)
            if self.pipelined:  # after the hop went out
                grads[i] = finish_grads(p, do, states[i], local[i], ds_end)
                run.mark("backward", "finish")
            else:
                grads[i] = (dq, dk, dv, dg)
        for h in sends:
            h.wait()
        dh0 = None
        if want_h0:
            dM = [sg.initial for sg in local]
            dh0 = initial_state_share(pieces, dM, saved["log_before"], dfinal, saved["log_all"])
        return grads, dh0
