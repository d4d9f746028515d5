"""The attention mask of a call, in global token positions, and the checks of its arguments.

An :class:`AttentionMask` says which key a query sees, by global position: the same document
(``documents``: the boundaries of packed documents, the ``cu_seqlens`` convention), not in the
future (``causal``) and not further back than a sliding ``window`` (query i sees key j iff
``i - window < j <= i``, the transformers convention). It is hashable, so block plans are
cached per mask (``seqpar.layout.plan_blocks`` turns it into the band of every block).

Softcap and attention sinks are not masks (they change the scores, not which keys are seen);
their checks live here too, beside the mask's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from seqpar.validation import check_positive_number


@dataclass(frozen=True)
class AttentionMask:
    """Which keys a query sees, by global position (see the module docstring).

    ``documents``: the document boundaries ``(0, e_1, ..., T)`` (None: one document);
    ``window`` (needs ``causal``): query i sees keys i - window < j <= i (None: no window)."""

    causal: bool = True
    window: int | None = None
    documents: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.window is not None and not self.causal:
            raise ValueError(f"a sliding window needs causal=True (got window={self.window}, causal=False); "
                             f"non-causal windows are not supported")

    def describe(self) -> str:
        parts = ["causal" if self.causal else "full"]
        if self.window is not None:
            parts.append(f"window {self.window}")
        if self.documents is not None:
            parts.append(f"{len(self.documents) - 1} documents")
        return ", ".join(parts)


def as_mask(mask: AttentionMask | bool) -> AttentionMask:
    """An :class:`AttentionMask` from a mask or a plain ``causal`` flag."""
    if isinstance(mask, AttentionMask):
        return mask
    if isinstance(mask, bool):
        return AttentionMask(causal=mask)
    raise TypeError(f"expected an AttentionMask or a bool (causal), got {type(mask).__name__}")


def check_window(window: object) -> int | None:
    """``window`` as an int >= 1, or None; raise a TypeError / ValueError naming the value."""
    if window is None:
        return None
    if isinstance(window, bool) or not hasattr(window, "__index__"):
        raise TypeError(f"window must be an int >= 1 or None, got {type(window).__name__} {window!r}")
    value = window.__index__()
    if value < 1:
        raise ValueError(f"window must be >= 1 (query i sees keys i - window < j <= i), got {value}")
    return value


def check_softcap(softcap: object) -> float | None:
    """``softcap`` as a finite float > 0, or None (a TypeError / ValueError naming the value)."""
    return check_positive_number("softcap", softcap, "scores become softcap * tanh(s / softcap)")


def check_sinks(sinks: object, num_q_heads: int, device: torch.device) -> torch.Tensor | None:
    """Raise unless ``sinks`` is None or a floating tensor [Hq] on ``device``."""
    if sinks is None:
        return None
    if not isinstance(sinks, torch.Tensor):
        raise TypeError(f"sinks must be a torch.Tensor [Hq] of per-head logits, got {type(sinks).__name__}")
    if sinks.dim() != 1 or sinks.shape[0] != num_q_heads:
        raise ValueError(f"sinks must have shape [Hq] = [{num_q_heads}] (one logit per query head), "
                         f"got shape {tuple(sinks.shape)}")
    if not sinks.is_floating_point():
        raise ValueError(f"sinks must be floating point, got dtype {sinks.dtype}")
    if sinks.device != device:
        raise ValueError(f"sinks are on {sinks.device} but q is on {device}")
    return sinks


def boundary_list(cu_seqlens: object, *, name: str = "cu_seqlens", global_len: int | None = None,
                  device: torch.device | None = None) -> list[int]:
    """Checked document boundaries ``[0, e_1, ..., T]`` as a list, empty documents included.

    ``cu_seqlens``: a 1-D integer tensor (on ``device`` when given) or a sequence of ints that
    starts at 0, ends at ``global_len`` (when given) and never decreases. Errors name ``name``
    and the numbers. A CUDA tensor costs one host synchronisation to read."""
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 1:
            raise ValueError(f"{name} must be 1-D [num_documents + 1], got shape {tuple(cu_seqlens.shape)}")
        if cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got dtype {cu_seqlens.dtype}")
        if device is not None and cu_seqlens.device != device:
            raise ValueError(f"{name} is on {cu_seqlens.device} but q is on {device}")
        bounds = [int(b) for b in cu_seqlens.tolist()]
    elif isinstance(cu_seqlens, Sequence) and not isinstance(cu_seqlens, (str, bytes)):
        if any(isinstance(b, bool) or not hasattr(b, "__index__") for b in cu_seqlens):
            raise TypeError(f"{name} must hold ints, got {list(cu_seqlens)[:8]!r}")
        bounds = [b.__index__() for b in cu_seqlens]
    else:
        raise TypeError(f"{name} must be a 1-D integer tensor or a sequence of ints, "
                        f"got {type(cu_seqlens).__name__}")
    if len(bounds) < 2:
        raise ValueError(f"{name} needs at least 2 entries [0, ..., T_global], got {bounds}")
    if bounds[0] != 0:
        raise ValueError(f"{name} must start at 0, got {bounds[0]} ({name}[:4] = {bounds[:4]})")
    if global_len is not None and bounds[-1] != global_len:
        raise ValueError(f"{name} must end at the global sequence length {global_len} (local length x "
                         f"world size), got {bounds[-1]}")
    for index, (a, b) in enumerate(zip(bounds, bounds[1:])):
        if b < a:
            raise ValueError(f"{name} must not decrease: {name}[{index}] = {a} > {name}[{index + 1}] = {b}")
    return bounds


def check_documents(cu_seqlens: object, global_len: int, device: torch.device | None) -> tuple[int, ...] | None:
    """The document boundaries of ``cu_seqlens`` as a tuple, or None for no documents / one document.

    ``cu_seqlens``: 1-D integer tensor (or a sequence of ints) ``[0, e_1, ..., T_global]``, the
    same on every rank, on q's device when it is a tensor (checked by :func:`boundary_list`).
    Empty documents (equal neighbours) are allowed and dropped."""
    if cu_seqlens is None:
        return None
    bounds = boundary_list(cu_seqlens, global_len=global_len, device=device)
    bounds = [b for i, b in enumerate(bounds) if i == 0 or b != bounds[i - 1]]  # drop empty documents
    return None if len(bounds) == 2 else tuple(bounds)


def document_positions(positions: torch.Tensor, documents: Sequence[int] | None) -> torch.Tensor:
    """Positions counted from the start of each token's document (for RoPE in packed rows)."""
    if documents is None:
        return positions
    bounds = torch.as_tensor(documents, dtype=positions.dtype, device=positions.device)
    doc = torch.bucketize(positions, bounds[1:], right=True)
    return positions - bounds[doc]
