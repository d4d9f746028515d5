"""Checks of scalar arguments shared by the public attention calls (softmax and linear)."""
from __future__ import annotations

import math


def check_scale(scale: object) -> None:
    """Raise unless ``scale`` is None or a finite number > 0 (0, negative or NaN give NaN / garbage)."""
    if scale is None:
        return
    if isinstance(scale, (bool, str, bytes)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__} {scale!r}")
    try:
        value = float(scale)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__} {scale!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"scale must be a finite number > 0 (or None for D ** -0.5), got {value}")


def check_flag(name: str, value: object) -> None:
    """Raise a TypeError for a flag that is a string, bytes or float (``causal="False"`` is true)."""
    if isinstance(value, (str, bytes, float)) or value is None:
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
