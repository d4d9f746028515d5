#!/usr/bin/env bash
# Several nodes: run this script once on every node (same arguments everywhere).
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NPROC_PER_NODE=8 SP=8 ./launch/run_multinode.sh --preset 1b
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 NPROC_PER_NODE=8 SP=8 ./launch/run_multinode.sh --preset 1b
#
# Environment: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (default 29500), NPROC_PER_NODE
# (default: GPUs on the node), SP (sequence-parallel size; keep it <= NPROC_PER_NODE so the
# attention traffic stays inside a node: sp ranks are consecutive), PRESET (default small),
# RUN_DIR (default runs/multinode, on a shared filesystem for checkpoints), RDZV_BACKEND
# (c10d, default: elastic rendezvous at MASTER_ADDR:MASTER_PORT; or static: NODE_RANK decides
# the ranks), RDZV_ID (default seqpar), LOG_RANK (default 0), TORCHRUN (default torchrun).
set -euo pipefail

: "${NNODES:?set NNODES}"
: "${MASTER_ADDR:?set MASTER_ADDR}"
NODE_RANK=${NODE_RANK:-0}
MASTER_PORT=${MASTER_PORT:-29500}
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$(python -c "import torch; print(max(1, torch.cuda.device_count()))" 2>/dev/null || echo 1)
fi
SP=${SP:-$NPROC_PER_NODE}
PRESET=${PRESET:-small}
RUN_DIR=${RUN_DIR:-runs/multinode}
RDZV_BACKEND=${RDZV_BACKEND:-c10d}
LOG_RANK=${LOG_RANK:-0}
TORCHRUN=${TORCHRUN:-torchrun}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ "$RDZV_BACKEND" = "static" ]; then
    RDZV_ARGS=(--node-rank="$NODE_RANK" --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT")
else
    RDZV_ARGS=(--rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="${RDZV_ID:-seqpar}"
               --node-rank="$NODE_RANK")
fi

set -x
exec "$TORCHRUN" --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" "${RDZV_ARGS[@]}" \
    --local-ranks-filter="$LOG_RANK" --role rank --tee 3 \
    -m seqpar.train --preset "$PRESET" --sp "$SP" --run-dir "$RUN_DIR" "$@"
