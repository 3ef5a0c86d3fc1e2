#!/usr/bin/env bash
# One GPU session: the GPU test suite, then the layer and kernel benchmarks, each under its own
# time limit, logs and results under $OUT. Wheels (megatron-core, fla) are installed from the
# folders given in WHEELS (space separated) when set. Usage: bash benchmarks/run_gpu_checks.sh
# Triton compiles every kernel variant the suite uses first (~40 s per layer test on an H100,
# 2026-12-05; one process took over 15 minutes for the suite), so the tests run in JOBS
# processes (default 4, with pytest-xdist installed; 1: one process; every worker holds its own
# CUDA context and allocator cache, and the paper-shape tests need several GiB each, so more
# workers than 4 to one GPU are not advised), and PART=1|2|3 runs one
# third of the suite (TESTS, when set, names the files instead; PART=all, the default, all).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_checks}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -n "${WHEELS:-}" ]; then
  for d in $WHEELS; do
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$d"/*.whl
  done
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv,noheader | tee "$OUT/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/env.txt"
date -u | tee -a "$OUT/env.txt"
step() {  # name, seconds (0: skip it), command...
  local name=$1 limit=$2; shift 2
  [ "$limit" -gt 0 ] || return 0
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "exit $? ($name)"; tail -n 25 "$OUT/$name.txt"
}
case "${PART:-all}" in
  1) PART_TESTS="test_gpu_attention.py test_gpu_gdr_split.py test_gpu_kernels.py" ;;
  2) PART_TESTS="test_gpu_layer.py" ;;
  3) PART_TESTS="test_gpu_hf_export.py test_gpu_memory_modes.py test_gpu_short_conv.py
                 test_gpu_resume.py test_gpu_megatron_graphs.py test_gpu_mqar_sweep.py
                 test_gpu_mqar_graphs.py" ;;
  all) PART_TESTS="" ;;
  *) echo "PART must be 1, 2, 3 or all, got ${PART}"; exit 2 ;;
esac
SUITE=${TESTS:-$( [ -n "$PART_TESTS" ] && for f in $PART_TESTS; do printf 'tests/gpu/%s ' "$f"; done || echo tests/gpu)}
PARALLEL=""
if [ "${JOBS:-4}" -gt 1 ] && python3 -c "import xdist" 2>/dev/null; then PARALLEL="-n ${JOBS:-4} --dist load"; fi
step gpu_tests "${TEST_TIMEOUT:-540}" python3 -m pytest -m gpu $SUITE $PARALLEL -v -p no:cacheprovider -rfEs --durations=15
python3 tests/gpu/error_records.py "$OUT"     # one errors file per test module, not per worker
step bench_layer "${LAYER_TIMEOUT:-170}" python3 benchmarks/bench_layer.py --quick ${LAYER_ARGS:-} --out "$OUT"
step bench_kernels "${KERNEL_TIMEOUT:-170}" python3 benchmarks/bench_kernels.py ${KERNEL_ARGS:-} --out "$OUT"
date -u
