"""Host-side helpers shared by the Triton kernel modules (no kernels, no ranks)."""
from __future__ import annotations

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return bool(triton.knobs.runtime.interpret)


def check_launch_device(t: torch.Tensor, cpu_hint: str = "the torch backend") -> None:
    """Refuse a launch on a tensor Triton cannot run on: CUDA, or any device under the interpreter.

    Called where a kernel is launched (the real implementation of a ``seqpar::`` op), not where
    shapes are checked: FakeTensor tracing and the compiler run the ops' fake implementations,
    which allocate the outputs on any device without launching."""
    if t.device.type != "cuda" and not interpreting():
        raise ValueError(f"the Triton kernels need CUDA tensors (got {t.device}); on CPU use {cpu_hint} "
                         "or set TRITON_INTERPRET=1 before importing the kernel module")


def check_int32_offsets(**tensors: torch.Tensor | None) -> None:
    """Offsets inside one batch entry are int32 in the kernels: refuse what would overflow."""
    for name, t in tensors.items():
        if t is None or t.numel() == 0:
            continue
        span = sum((s - 1) * abs(st) for s, st in zip(t.shape[1:], t.stride()[1:]))
        if span >= 2**31:
            raise ValueError(f"{name} {tuple(t.shape)} with strides {t.stride()} spans {span} elements per batch "
                             f"entry; the Triton kernels index within a batch entry with int32 (< 2**31)")


def strides4(t: torch.Tensor) -> tuple[int, int, int, int]:
    """The four strides of a [B, T, H, D] tensor, as kernel arguments."""
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)
