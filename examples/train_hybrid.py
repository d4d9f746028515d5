"""Train a small Linear-Llama3-style hybrid (three linear-attention layers per softmax layer)
on the Python standard library's source bytes, with sequence parallelism.

    python examples/train_hybrid.py                                   # one CPU process
    torchrun --nproc-per-node 2 examples/train_hybrid.py --sp 2       # 2 ranks, one sequence
    torchrun --nproc-per-node 8 examples/train_hybrid.py --sp 4 --layout zigzag --preset small

Every flag of ``python -m seqpar.train`` works here (``--help``); the example only changes the
defaults (pattern LLLS over 4 layers, a GLA-style gated decay, the zigzag layout, 60 steps).
"""
from __future__ import annotations

import sys

from seqpar.train import main

EXAMPLE_DEFAULTS = [
    "--preset", "tiny",
    "--pattern", "LLLS", "--n-layers", "4",
    "--linear-decay", "gate", "--feature-map", "elu1",
    "--layout", "zigzag",
    "--steps", "60", "--eval-interval", "20", "--checkpoint-interval", "30",
    "--run-dir", "runs/train_hybrid",
]

if __name__ == "__main__":
    # flags given on the command line come after the defaults, so they win
    sys.exit(main(EXAMPLE_DEFAULTS + sys.argv[1:]))
