#!/usr/bin/env bash
# One node: torchrun with NPROC ranks (default: every visible GPU, or 2 CPU processes on gloo
# when there is no GPU). Extra arguments go to `python -m seqpar.train`.
#
#   SP=4 ./launch/run_local.sh --preset small --layout zigzag        # 8 GPUs -> dp 2 x sp 4
#   NPROC=2 SP=2 ./launch/run_local.sh --preset tiny --steps 50     # CPU: 2 gloo processes
#
# Environment: NGPU or NPROC (ranks on this node), SP (sequence-parallel size, default NPROC),
# PRESET (default tiny), RUN_DIR (default runs/local), MASTER_PORT (default 29500),
# LOG_RANK (only show these local ranks' output, e.g. 0; default: every rank, so that an error on
# any rank is seen; only rank 0 prints progress), TORCHRUN (default torchrun).
# The workers write straight to this terminal (no --tee), so rank 0's progress bar stays one line.
set -euo pipefail

if [ -z "${NPROC:-}" ]; then
    if [ -n "${NGPU:-}" ]; then
        NPROC=$NGPU
    else
        NGPU_FOUND=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
        if [ "$NGPU_FOUND" -gt 0 ]; then NPROC=$NGPU_FOUND; else NPROC=2; fi
    fi
fi
SP=${SP:-$NPROC}
PRESET=${PRESET:-tiny}
RUN_DIR=${RUN_DIR:-runs/local}
FILTER=()
if [ -n "${LOG_RANK:-}" ]; then FILTER=(--local-ranks-filter="$LOG_RANK"); fi
TORCHRUN=${TORCHRUN:-torchrun}
# Threads: torchrun gives each of several processes one thread unless OMP_NUM_THREADS is set (a
# single process started without torchrun picks its own count); set OMP_NUM_THREADS for large CPU steps
# (gloo is picked automatically when CUDA is unavailable, NCCL otherwise).

set -x
exec "$TORCHRUN" --standalone --nnodes=1 --nproc-per-node="$NPROC" \
    --master-port="${MASTER_PORT:-29500}" \
    "${FILTER[@]}" \
    -m seqpar.train --preset "$PRESET" --sp "$SP" --run-dir "$RUN_DIR" "$@"
