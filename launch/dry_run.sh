#!/usr/bin/env bash
# Memory / time of ONE rank of a large job, on this machine, with torch's fake process group:
# every collective is a no-op (so losses are meaningless), everything else is the real rank's
# work. Runs on CPU or on one GPU.
#
#   WORLD=8 SP=8 SEQ_LEN=1048576 PRESET=tiny ./launch/dry_run.sh           # 1M tokens over 8 ranks
#   WORLD=8 SP=4 SEQ_LEN=65536 PRESET=small FAKE_RANK=5 ./launch/dry_run.sh --layout zigzag
#
# Environment: WORLD (default 8), SP (default WORLD), SEQ_LEN (default 1048576), PRESET
# (default tiny), FAKE_RANK (the rank to run, default 0), STEPS (default 3), BATCH (global
# sequences per step, default WORLD/SP), DATA (default synthetic), RUN_DIR (default runs/dry-run).
set -euo pipefail

WORLD=${WORLD:-8}
SP=${SP:-$WORLD}
SEQ_LEN=${SEQ_LEN:-1048576}
BATCH=${BATCH:-$((WORLD / SP))}

set -x
exec python -m seqpar.train --fake-world-size "$WORLD" --fake-rank "${FAKE_RANK:-0}" \
    --preset "${PRESET:-tiny}" --sp "$SP" --seq-len "$SEQ_LEN" --batch-size "$BATCH" \
    --steps "${STEPS:-3}" --data "${DATA:-synthetic}" --eval-batches 1 --keep-checkpoints 0 --no-plot \
    --run-dir "${RUN_DIR:-runs/dry-run}" "$@"
