"""The transition of a run of tokens of a linear recurrence (docs/linear.md, "Transitions").

Every linear-attention family has the form S_t = A_t(S_{t-1}) + B_t with A_t linear in the state
S [B, H, Dk, Dv]. Over a run of tokens the state leaving it is S_out = A(S_in) + U, where U is the
run's state from S_in = 0 (``states().final`` of a chunked run) and A the composition of its A_t.
The sequence-parallel strategies only need to apply A (forward: the state flows forward) and its
transpose A^T (backward: the state gradient flows back), and to send A over the wire:

- :class:`ScalarDecay`: A(S) = exp(log) S with ``log`` [B, H] (no gate, ``g_gamma``, ``g`` [B, T, H]);
- :class:`KeyDecay`: A(S) = diag(exp(log)) S with ``log`` [B, H, Dk] (GLA's per-key gates);
- :class:`MatrixTransition`: A(S) = M S with ``M`` [B, H, Dk, Dk] (the gated delta rule, KDA).

A run that contains a document start has A = 0: nothing before the start reaches the state after
it (:data:`RESET`, never sent: every rank knows the documents).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def flushed_exp(log: torch.Tensor) -> torch.Tensor:
    """exp(log), with values below the dtype's smallest normal number set to 0 (as a flush-to-zero
    unit would): a decay that underflows must not make every product it enters denormal, which
    costs CPUs ~100x per operation (the difference is below the dtype's resolution of any sum
    with a normal term). The argument is clamped first: an exp whose result underflows is itself
    ~50x slower than a normal one on CPUs."""
    lowest = math.log(torch.finfo(log.dtype).tiny)
    return log.clamp(min=lowest).exp().masked_fill_(log < lowest, 0.0)


def decay_factor(log_decay: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """exp(log_decay) in ``state``'s dtype, shaped to multiply a state [..., Dk, Dv]: one log decay
    per head (``log_decay`` [...]) or per key channel ([..., Dk])."""
    factor = flushed_exp(log_decay.to(state.dtype))
    return factor[..., None, None] if log_decay.dim() == state.dim() - 2 else factor[..., None]


def decay_state(state: torch.Tensor, log_decay: torch.Tensor) -> torch.Tensor:
    """exp(log_decay) * state for a state [..., Dk, Dv] (see :func:`decay_factor`)."""
    return state * decay_factor(log_decay, state)


class Transition:
    """The linear map A of a run of tokens (see the module docstring)."""

    def apply(self, state: torch.Tensor) -> torch.Tensor:
        """A(state) for a state [B, H, Dk, Dv]."""
        raise NotImplementedError

    def apply_transpose(self, grad: torch.Tensor) -> torch.Tensor:
        """A^T(grad) for a state gradient [B, H, Dk, Dv]."""
        raise NotImplementedError

    def payload(self) -> torch.Tensor:
        """The transition as one flat tensor for the wire (see :meth:`from_payload`)."""
        raise NotImplementedError

    @staticmethod
    def payload_shape(B: int, H: int, Dk: int) -> tuple[int, ...]:
        """The shape of the transition's tensor for B rows, H heads and key size Dk."""
        raise NotImplementedError

    @classmethod
    def payload_numel(cls, B: int, H: int, Dk: int) -> int:
        return math.prod(cls.payload_shape(B, H, Dk))

    @classmethod
    def from_payload(cls, flat: torch.Tensor, B: int, H: int, Dk: int) -> "Transition":
        return cls(flat.view(cls.payload_shape(B, H, Dk)))

    @property
    def is_reset(self) -> bool:
        return False


@dataclass
class _Decay(Transition):
    """A(S) = exp(log) S with one log decay per head or per key channel (diagonal, so A^T = A)."""

    log: torch.Tensor

    def apply(self, state: torch.Tensor) -> torch.Tensor:
        return decay_state(state, self.log)

    apply_transpose = apply

    def payload(self) -> torch.Tensor:
        return self.log.reshape(-1)


class ScalarDecay(_Decay):
    """A(S) = exp(log) S, ``log`` [B, H] (a log decay per head; zeros: no gate)."""

    @staticmethod
    def payload_shape(B: int, H: int, Dk: int) -> tuple[int, ...]:
        return (B, H)


class KeyDecay(_Decay):
    """A(S) = diag(exp(log)) S, ``log`` [B, H, Dk] (one log decay per key channel: GLA)."""

    @staticmethod
    def payload_shape(B: int, H: int, Dk: int) -> tuple[int, ...]:
        return (B, H, Dk)


@dataclass
class MatrixTransition(Transition):
    """A(S) = M S, ``matrix`` [B, H, Dk, Dk] (the delta rule: products of exp(g) (I - beta k k^T))."""

    matrix: torch.Tensor

    def apply(self, state: torch.Tensor) -> torch.Tensor:
        return self.matrix.to(state.dtype) @ state

    def apply_transpose(self, grad: torch.Tensor) -> torch.Tensor:
        return self.matrix.to(grad.dtype).transpose(-1, -2) @ grad

    def payload(self) -> torch.Tensor:
        return self.matrix.reshape(-1)

    @staticmethod
    def payload_shape(B: int, H: int, Dk: int) -> tuple[int, ...]:
        return (B, H, Dk, Dk)


class _Reset(Transition):
    """A = 0: the run contains a document start."""

    def apply(self, state: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(state)

    apply_transpose = apply

    @property
    def is_reset(self) -> bool:
        return True

    def __repr__(self) -> str:
        return "RESET"


RESET = _Reset()
