#!/usr/bin/env bash
# One node: torchrun with NPROC ranks (default: every visible GPU, or 2 CPU processes on gloo
# when there is no GPU). Extra arguments go to `python -m seqpar.train`.
#
#   SP=4 ./launch/run_local.sh --preset small --layout zigzag        # 8 GPUs -> dp 2 x sp 4
#   NPROC=2 SP=2 ./launch/run_local.sh --preset tiny --steps 50     # CPU: 2 gloo processes
#
# Environment: NGPU or NPROC (ranks on this node), SP (sequence-parallel size, default NPROC),
# PRESET (default tiny), RUN_DIR (default runs/local), MASTER_PORT (default 29500),
# LOG_RANK (ranks whose output is shown, default 0), TORCHRUN (default torchrun).
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
LOG_RANK=${LOG_RANK:-0}
TORCHRUN=${TORCHRUN:-torchrun}
# CPU ranks share the cores: one thread each unless told otherwise (gloo is picked automatically
# when CUDA is unavailable, NCCL otherwise).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

set -x
exec "$TORCHRUN" --standalone --nnodes=1 --nproc-per-node="$NPROC" \
    --master-port="${MASTER_PORT:-29500}" \
    --local-ranks-filter="$LOG_RANK" --role rank --tee 3 \
    -m seqpar.train --preset "$PRESET" --sp "$SP" --run-dir "$RUN_DIR" "$@"
