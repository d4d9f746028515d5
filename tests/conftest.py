"""Shared set-up: Triton's CPU interpreter on machines without CUDA, and one gloo process pool
for the whole session."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton decorates its own standard-library functions (tl.cdiv, ...) when triton.language is
    # first imported, reading TRITON_INTERPRET then. Set it before any test module, or a framework
    # such as megatron-core, imports triton, so the Triton kernels run in the CPU interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from distributed_pool import GlooPool


@pytest.fixture(scope="session")
def pool():
    p = GlooPool()
    yield p
    p.close()
