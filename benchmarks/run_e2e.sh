#!/usr/bin/env bash
# The end-to-end table of docs/performance.md on one GPU: bench_gpt.py eager for every kind at
# 4K and 16K tokens x 4/1 (24 layers, 380M shape), an 8-layer stack at 64K, and each kind with
# Megatron's per-layer CUDA graphs in a process of its own per length (Megatron keeps graphs and their
# memory pools process-wide). Every run replaces Megatron's gradient-norm fallback without apex
# or Transformer Engine (a host read per gradient tensor) by torch._foreach_norm, as a user with
# either has it (GRAD_NORM=megatron keeps the fallback), and Megatron's per-tensor
# multi_tensor_scale fallback by torch's multi-tensor ops (TENSOR_SCALE=megatron keeps it).
# Results: $OUT/e2e_*.json|md, all of them in one table in $OUT/bench_gpt_merged.md.
# Usage: bash benchmarks/run_e2e.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/e2e}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:${PYTHONPATH:-}
KINDS=${KINDS:-attention,mom,hybrid,mom1,mom-lean}
GRAPH_KINDS=${GRAPH_KINDS:-attention mom mom-selective hybrid mom-lean}
GRAD_NORM=${GRAD_NORM:-foreach}
TENSOR_SCALE=${TENSOR_SCALE:-foreach}
run() {  # name, limit seconds, bench_gpt arguments...
  local name=$1 limit=$2; shift 2
  mkdir -p "$OUT/$name"
  echo "== $(date -u +%T) $name"
  timeout "$limit" python3 benchmarks/bench_gpt.py "$@" --grad-norm "$GRAD_NORM" \
    --tensor-scale "$TENSOR_SCALE" --out "$OUT/$name" \
    > "$OUT/$name.log" 2>&1
  echo "exit $?"; grep '^{' "$OUT/$name.log" | cut -c1-220
  cp "$OUT/$name/bench_gpt.json" "$OUT/e2e_$name.json" 2>/dev/null
  cp "$OUT/$name/bench_gpt.md" "$OUT/e2e_$name.md" 2>/dev/null; rm -rf "${OUT:?}/$name"
}
[ -z "${SKIP_EAGER:-}" ] && run eager "${EAGER_TIMEOUT:-240}" --kinds "$KINDS" --seqs 4096,16384 --iters 6 --warmup 3
[ -z "${SKIP_LONG:-}" ] && run long64k "${LONG_TIMEOUT:-150}" --kinds attention,mom,mom-lean --layers 8 --seqs 65536 --iters 3 --warmup 2
for kind in $GRAPH_KINDS; do
  for seq in ${GRAPH_SEQS:-4096 16384}; do
    run "graph_${kind}_$seq" "${GRAPH_TIMEOUT:-120}" --kinds "$kind" --seqs "$seq" --iters 6 --warmup 4 --cuda-graph
  done
done
# One table of every run above, each row against the attention row of its length run the same way.
python3 benchmarks/bench_gpt.py --merge "$OUT"/e2e_*.json --out "$OUT" > /dev/null \
  && echo "table: $OUT/bench_gpt_merged.md"
