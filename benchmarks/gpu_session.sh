#!/usr/bin/env bash
# One GPU session in ONE device call (<= 10 minutes): GPU tests, kernel benchmark, strategy benchmark.
#
#   bash benchmarks/gpu_session.sh                 # on the device machine, from the repository root
#   (device tool: command "bash benchmarks/gpu_session.sh", timeout_s 600, carry [".whl"] if wheels exist)
#
# Needs no network. If .whl/*.whl exist (e.g. flash-linear-attention + fla-core 0.6.0, downloaded
# here beforehand), they are installed --no-deps into /tmp/site and put on PYTHONPATH. seqpar itself is
# installed editable without dependencies (or, failing that, put on PYTHONPATH as a package tree).
#
# Every step runs under `timeout`, bounded by what is left of SESSION_BUDGET_S (default 560 s), so
# the whole fits in the 600 s limit and the results of the steps that finished are in $OUT
# (default benchmarks/results when OUT is unset). The log of everything is $OUT/gpu_session.log.
# At most 7 files land in $OUT (the device tool returns 8).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
LOG="$OUT/gpu_session.log"
PY="${PYTHON:-python3}"
BUDGET="${SESSION_BUDGET_S:-560}"
START=$(date +%s)
export PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1
exec > >(tee -a "$LOG") 2>&1

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# step NAME SECONDS CMD...: run CMD under timeout min(SECONDS, time left - 5); report its status.
step() {
  local name="$1" want="$2"; shift 2
  local avail=$(( $(left) - 5 ))
  local t=$(( want < avail ? want : avail ))
  if (( t < 10 )); then echo "=== $name: SKIPPED (budget spent, ${avail}s left)"; return 0; fi
  echo "=== $name (timeout ${t}s, $(left)s of the session left): $*"
  local s=$(date +%s)
  timeout -k 5 "$t" "$@"
  local rc=$?
  echo "=== $name: rc=$rc$( ((rc == 124 || rc == 137)) && echo ' (TIMED OUT)') in $(( $(date +%s) - s ))s"
  return 0
}

echo "=== gpu_session $(date -u +%FT%TZ) on $(hostname); OUT=$OUT; budget ${BUDGET}s"
nvidia-smi || echo "nvidia-smi failed"
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
"$PY" -c "import triton; print('triton', triton.__version__)" || echo "no triton"

if compgen -G ".whl/*.whl" > /dev/null; then
  echo "=== installing carried wheels into /tmp/site: $(ls .whl)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# seqpar.comm / seqpar.kernels exist only through setup.py's package_dir mapping. The machine has
# no network, so `pip install -e .` cannot fetch setuptools for its build: put a package tree on
# PYTHONPATH instead, and keep the checkout's own seqpar/ (which lacks comm/ and kernels/) off
# sys.path, subprocesses included (PYTHONSAFEPATH: no cwd / script dir in front of sys.path).
if ! "$PY" -c "import os, seqpar.kernels as k; assert os.path.samefile(os.path.dirname(k.__file__), 'kernels')" 2>/dev/null; then
  rm -rf /tmp/seqpar_tree && mkdir -p /tmp/seqpar_tree && cp -r seqpar /tmp/seqpar_tree/seqpar
  ln -s "$PWD/comm" /tmp/seqpar_tree/seqpar/comm && ln -s "$PWD/kernels" /tmp/seqpar_tree/seqpar/kernels
  export PYTHONPATH="/tmp/seqpar_tree${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONSAFEPATH=1
"$PY" -c "import seqpar, seqpar.comm, seqpar.kernels; print('seqpar', seqpar.__version__, seqpar.kernels.__file__)"
"$PY" -c "import fla; print('fla', getattr(fla, '__version__', '?'))" 2>/dev/null || echo "fla not importable"

TAG=$("$PY" -c "import torch, re; n = torch.cuda.get_device_name(0).lower() if torch.cuda.is_available() else 'cpu'; m = re.search(r'\b([a-z]\d{2,4}[a-z]?)\b', n); print(m.group(1) if m else 'gpu')" 2>/dev/null || echo gpu)

# STEPS selects what runs (default: tests kernels strategies): tests, kernels, linear (the linear
# kernels alone), strategies, families (the linear families' Triton runs against fla: opt in, e.g.
# STEPS="families linear" for a second device call)
STEPS="${STEPS:-tests kernels strategies}"
want() { [[ " $STEPS " == *" $1 "* ]]; }
# -v: test names stream out, so a step cut by its timeout still shows which tests passed / failed
PYTEST=("$PY" -m pytest -v -p no:cacheprovider)

# 1. GPU tests (each file its own step, so one slow file does not starve the others)
if want tests; then
step "pytest triton kernels" 130 "${PYTEST[@]}" tests/test_triton_kernels.py
step "pytest gpu staging" 100 "${PYTEST[@]}" -s tests/test_gpu_staging.py
if [[ -f tests/test_sdpa_backend.py ]]; then
  step "pytest sdpa backend" 50 "${PYTEST[@]}" tests/test_sdpa_backend.py
else
  echo "=== pytest sdpa backend: SKIPPED (tests/test_sdpa_backend.py does not exist)"
fi

fi

# 2. kernel benchmark (correctness check first, then a subset of sizes; writes .json and .md)
want kernels && step "bench_kernels" 140 "$PY" benchmarks/bench_kernels.py --softmax-T 16384 65536 --linear-T 65536 262144 \
  --out "$OUT/kernels_${TAG}.json"

want linear && step "bench_kernels linear" 120 "$PY" benchmarks/bench_kernels.py --softmax-T --linear-T 16384 65536 \
  --out "$OUT/kernels_linear_${TAG}.json"

want families && step "linear families" 150 "$PY" benchmarks/linear_families.py --parts timing --device cuda \
  --dtype bf16 --T 16384 65536 --heads 16 --dk 128 --dv 128 --out "$OUT/linear_families_${TAG}.json"

# 3. one rank of an 8-rank job per strategy (fake process group), then T = 1M for a subset
if want strategies; then
step "bench_strategies T=256K" 110 "$PY" benchmarks/bench_strategies.py --world-size 8 --seq-len 262144 \
  --heads 16 --kv-heads 4 --head-dim 128 --time-budget-s 90 --out "$OUT/strategies_${TAG}_T256k"
step "bench_strategies T=1M" 90 "$PY" benchmarks/bench_strategies.py --world-size 8 --seq-len 1048576 \
  --heads 16 --kv-heads 4 --head-dim 128 --configs ring:zigzag allgather:zigzag lasp2:g_gamma ulysses:contiguous \
  --warmup 0 --repeats 1 --time-budget-s 55 --out "$OUT/strategies_${TAG}_T1m"

fi

echo "=== done in $(( $(date +%s) - START ))s; files in $OUT:"
ls -la "$OUT"
