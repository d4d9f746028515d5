"""Train a small Linear-Llama3-style hybrid (three linear-attention layers per softmax layer)
on the Python standard library's source bytes, with sequence parallelism.

    python examples/train_hybrid.py                                   # one CPU process
    torchrun --nproc-per-node 2 examples/train_hybrid.py --sp 2       # 2 ranks, one sequence
    torchrun --nproc-per-node 8 examples/train_hybrid.py --sp 4 --layout zigzag --preset small

    torchrun --nproc-per-node 2 examples/train_hybrid.py --sp 2 --preset qwen3next-tiny   # DDDS: Gated DeltaNet

Every flag of ``python -m seqpar.train`` works here (``--help``); the example only changes the
defaults (the zigzag layout, 60 steps, and -- unless ``--preset`` or ``--config`` names another
model -- pattern LLLS over 4 layers with a data-dependent gated decay).
"""
from __future__ import annotations

import sys
from typing import Sequence

from seqpar.train import main

#: The example's model on top of the tiny preset; another --preset or a --config keeps its own.
EXAMPLE_MODEL_DEFAULTS = [
    "--pattern", "LLLS", "--n-layers", "4",
    "--linear-decay", "gate", "--feature-map", "elu1",
]
EXAMPLE_DEFAULTS = [
    "--layout", "zigzag",
    "--steps", "60", "--eval-interval", "20", "--checkpoint-interval", "30",
    "--run-dir", "runs/train_hybrid",
]


def example_argv(argv: Sequence[str]) -> list[str]:
    """The example's defaults, then ``argv`` (flags given on the command line come later, so they
    win); the example's model only when ``argv`` names no other preset and no config."""
    argv = list(argv)
    names_model = any(a in ("--preset", "--config") or a.startswith(("--preset=", "--config=")) for a in argv)
    model = [] if names_model else ["--preset", "tiny", *EXAMPLE_MODEL_DEFAULTS]
    return model + EXAMPLE_DEFAULTS + argv


if __name__ == "__main__":
    sys.exit(main(example_argv(sys.argv[1:])))
