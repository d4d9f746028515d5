#!/usr/bin/env bash
# Memory / time of ONE rank of a large job, on this machine, with torch's fake process group:
# every collective is a no-op (so no loss is computed), everything else is the real rank's work.
# It prints this rank's peak memory and step time, the bytes it would send per step (cost model)
# and the longest sequence that would fit. Runs on CPU or on one GPU.
#
#   ./launch/dry_run.sh                                             # 256K tokens over 8 ranks: ~20 s on 2 CPU cores
#   SEQ_LEN=1048576 ./launch/dry_run.sh                             # 1M tokens over 8 ranks: ~2.5 min, 2.7 GiB on 2 CPU cores
#   WORLD=8 SP=4 SEQ_LEN=65536 PRESET=small FAKE_RANK=5 ./launch/dry_run.sh --layout zigzag
#
# Environment: WORLD (default 8), SP (default WORLD), SEQ_LEN (default 262144), PRESET
# (default tiny), FAKE_RANK (the rank to run, default 0), STEPS (default 2; the first is
# warm-up), BATCH (global sequences per step, default WORLD/SP), DATA (default synthetic),
# RUN_DIR (default runs/dry-run, overwritten). Extra arguments go to `python -m seqpar.train`.
set -euo pipefail

WORLD=${WORLD:-8}
SP=${SP:-$WORLD}
SEQ_LEN=${SEQ_LEN:-262144}
BATCH=${BATCH:-$((WORLD / SP))}

set -x
exec python -m seqpar.train --fake-world-size "$WORLD" --fake-rank "${FAKE_RANK:-0}" \
    --preset "${PRESET:-tiny}" --sp "$SP" --seq-len "$SEQ_LEN" --batch-size "$BATCH" \
    --steps "${STEPS:-2}" --data "${DATA:-synthetic}" --keep-checkpoints 0 --no-plot --overwrite \
    --run-dir "${RUN_DIR:-runs/dry-run}" "$@"
