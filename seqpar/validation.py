"""Checks shared by the public attention calls (scalar arguments) and by the model and the
framework adapters (the head axis of q / k / v against configured head counts)."""
from __future__ import annotations

import math

import torch


def check_positive_number(name: str, value: object, meaning: str) -> float | None:
    """``value`` as a finite float > 0, or None: a TypeError for a bool, string or non-number, a
    ValueError naming the value for 0, negative, inf or NaN. ``meaning`` says what the number does
    (it goes into the ValueError)."""
    if value is None:
        return None
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{name} must be a float or None, got {type(value).__name__} {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a float or None, got {type(value).__name__} {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a finite number > 0 ({meaning}), got {number}")
    return number


def check_scale(scale: object) -> None:
    """Raise unless ``scale`` is None or a finite number > 0 (0, negative or NaN give NaN / garbage)."""
    check_positive_number("scale", scale, "or None for D ** -0.5")


def check_flag(name: str, value: object) -> None:
    """Raise a TypeError for a flag that is a string, bytes or float (``causal="False"`` is true)."""
    if isinstance(value, (str, bytes, float)) or value is None:
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def head_axis_error(where: str, layout: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                    q_heads: object, kv_heads: object) -> ValueError:
    """The ValueError for q / k / v whose head axis does not hold the configured number of heads.

    ``layout`` names the axes the caller expects, e.g. ``"[b, s, h, d]"`` (``h`` is the head axis);
    ``q_heads`` / ``kv_heads`` describe the head counts expected there (a number or a phrase).
    The message names the expected and the received shapes and the usual cause: a tensor with its
    head and token axes swapped (e.g. [b, h, s, d] where [b, s, h, d] is expected), which seqpar
    itself cannot tell apart from valid input (both are just sizes).
    """
    def expect(heads: object) -> str:
        return layout.replace("h", str(heads))
    swapped = layout.replace("s", "\0").replace("h", "s").replace("\0", "h")
    return ValueError(
        f"{where}: expected query {expect(q_heads)} and key/value {expect(kv_heads)} "
        f"({layout} = {_AXIS_NAMES[layout]}), received query {tuple(query.shape)}, key {tuple(key.shape)}, "
        f"value {tuple(value.shape)}: the head axis (dim {layout.strip('[]').split(', ').index('h')}) does not "
        f"hold the configured number of heads. The usual cause is a tensor in another layout, e.g. with the "
        f"head and token axes swapped ({swapped} given where {layout} is expected).")


_AXIS_NAMES = {
    "[b, s, h, d]": "[batch, local tokens, heads, head_dim]",
    "[s, b, h, d]": "[local tokens, batch, heads, head_dim]",
    "[b, h, s, d]": "[batch, heads, local tokens, head_dim]",
}


def check_head_axis(where: str, layout: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                    num_heads: int | None, num_kv_heads: tuple[int, ...] | int | None) -> None:
    """Raise :func:`head_axis_error` unless the head axis of ``query`` holds ``num_heads`` heads
    (None: a positive multiple of the key's heads, as GQA needs) and that of ``key`` and ``value``
    one of ``num_kv_heads`` (None: not checked). Tensors that are not 4-D are left to seqpar's own
    shape checks."""
    if any(not isinstance(t, torch.Tensor) or t.dim() != 4 for t in (query, key, value)):
        return
    axis = layout.strip("[]").split(", ").index("h")
    kv = (num_kv_heads,) if isinstance(num_kv_heads, int) else num_kv_heads
    hq, hk = query.shape[axis], key.shape[axis]
    q_ok = hq == num_heads if num_heads is not None else hk > 0 and hq > 0 and hq % hk == 0
    kv_ok = kv is None or (hk in kv and value.shape[axis] in kv)
    if not (q_ok and kv_ok):
        multiple = " or ".join(str(n) for n in sorted(set(kv))) if kv is not None else "h_kv"
        raise head_axis_error(where, layout, query, key, value,
                              q_heads=f"(a multiple of {multiple})" if num_heads is None else num_heads,
                              kv_heads="h_kv" if kv is None else " or ".join(str(n) for n in sorted(set(kv))))
