#!/usr/bin/env bash
# One GPU session: the GPU test suite, then the layer and kernel benchmarks, each under its own
# time limit, logs and results under $OUT. Wheels (megatron-core, fla) are installed from the
# folders given in WHEELS (space separated) when set. Usage: bash benchmarks/run_gpu_checks.sh
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
step() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "exit $? ($name)"; tail -n 25 "$OUT/$name.txt"
}
step gpu_tests "${TEST_TIMEOUT:-200}" python3 -m pytest -m gpu ${TESTS:-tests/gpu} -q -p no:cacheprovider -rA
step bench_layer "${LAYER_TIMEOUT:-170}" python3 benchmarks/bench_layer.py --quick ${LAYER_ARGS:-} --out "$OUT"
step bench_kernels "${KERNEL_TIMEOUT:-170}" python3 benchmarks/bench_kernels.py ${KERNEL_ARGS:-} --out "$OUT"
date -u
