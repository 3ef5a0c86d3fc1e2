#!/usr/bin/env bash
# Multi-GPU scaling run (issue 8): Megatron-LM's pretrain_gpt.py with the megatron-mom presets at
# the paper's 1.3B shape, several parallel layouts one after another, mock data, logs under $OUT,
# then benchmarks/scaling_report.py turns the logs into a table (summary.md, summary.json).
#
#   MEGATRON_LM_PATH=~/Megatron-LM OUT=runs/scaling bash benchmarks/scaling_run.sh
#
# Knobs (environment):
#   MEGATRON_LM_PATH  Megatron-LM checkout patched with patches/apply.py (required)
#   OUT               output folder (default runs/scaling)
#   JOBS              space-separated groups run one after another; a group is a comma-separated
#                     list of jobs run at the same time on different GPUs; a job is
#                     NAME:MODEL:TP:CP:PP with MODEL hybrid | mom | attn (the hybrid's shape with
#                     attention in every layer). Processes per job = TP x CP x PP (no data
#                     parallelism, so every job sees the same batches). Default: the 4-GPU set
#                     below; the 8-GPU layouts are e.g. hybrid-tp8:hybrid:8:1:1 and
#                     hybrid-tp4pp2:hybrid:4:1:2 (give PP jobs several micro-batches).
#   SHAPE             1.3b (examples/megatron-lm/configs/{hybrid,mom}-1.3b.sh) or tiny (8 layers,
#                     hidden 64: a CPU rehearsal of the same command lines)
#   SEQ MICRO_BATCH GLOBAL_BATCH TRAIN_ITERS   (2048 4 4 40; tiny: SEQ 64)
#   JOB_TIMEOUT       seconds one group may run (default 150)
#   DEADLINE          seconds from the start after which no further group starts, and the
#                     running one is cut at (default: none)
#   WHEELS            folders of wheels to install first into /tmp/site (a bare GPU machine)
#   EXTRA_ARGS        more pretrain_gpt.py flags for every job
#   PACK_LOGS=1       pack the job logs into $OUT/logs.tar.gz at the end
# Settings that make the layouts comparable: same seed, --use-cpu-initialization (every TP
# layout starts from the same weights), dropout 0, mock vocabulary 32767 + EOD = 32768 (the
# same padded vocabulary at any TP <= 8), warmup 5 iterations. No Transformer Engine: local
# Megatron-Core modules (attention is Megatron's unfused DotProductAttention), fusions off,
# TORCH_COMPILE_DISABLE=1 (Megatron's torch.compile'd fusions would compile in every job).
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${MEGATRON_LM_PATH:?set MEGATRON_LM_PATH to a Megatron-LM checkout patched with patches/apply.py}"
OUT=${OUT:-$ROOT/runs/scaling}
SHAPE=${SHAPE:-1.3b}
JOBS=${JOBS:-"hybrid-tp4:hybrid:4:1:1 hybrid-tp1:hybrid:1:1:1,mom-tp1:mom:1:1:1,attn-tp1:attn:1:1:1 mom-tp2cp2:mom:2:2:1 attn-tp4:attn:4:1:1"}
if [[ $SHAPE == tiny ]]; then SEQ=${SEQ:-64}; else SEQ=${SEQ:-2048}; fi
MICRO_BATCH=${MICRO_BATCH:-4}
GLOBAL_BATCH=${GLOBAL_BATCH:-$MICRO_BATCH}
TRAIN_ITERS=${TRAIN_ITERS:-40}
JOB_TIMEOUT=${JOB_TIMEOUT:-150}
DEADLINE=${DEADLINE:-0}
START=$(date +%s)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1 TORCH_COMPILE_DISABLE=1
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}   # no NVLink multicast (shared hosts)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
if [[ -n ${WHEELS:-} ]]; then
  for d in $WHEELS; do
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$d"/*.whl || exit 1
  done
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$ROOT:${PYTHONPATH:-}

# pretrain() runs `make` for the dataset helpers on rank 0: keep a shipped build newer than
# its source, and give make a python3-config if the machine has none.
touch "$MEGATRON_LM_PATH"/megatron/core/datasets/helpers_cpp*.so 2>/dev/null
if ! command -v python3-config >/dev/null; then
  mkdir -p /tmp/scaling-bin
  printf '#!/bin/sh\nexec python3 -c "import sysconfig; print(sysconfig.get_config_var(\\"EXT_SUFFIX\\"))"\n' \
    > /tmp/scaling-bin/python3-config
  chmod +x /tmp/scaling-bin/python3-config
  export PATH=/tmp/scaling-bin:$PATH
fi

GPUS=0
command -v nvidia-smi >/dev/null && GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "host: $(nproc --all) CPU cores, $GPUS GPUs"
  (( GPUS > 0 )) && nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
  (( GPUS > 1 )) && nvidia-smi topo -m
  python3 - <<'EOF'
import sys, torch, triton
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, "
      f"cuda {torch.version.cuda}, nccl {'.'.join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else '-'}")
EOF
  sed -n 's/^\(MAJOR\|MINOR\|PATCH\) = \(.*\)/\1 \2/p' "$MEGATRON_LM_PATH/megatron/core/package_info.py" | tr '\n' ' ' | sed 's/^/Megatron-LM checkout /'; echo
  echo "megatron-mom ${MOM_REVISION:-$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "(no git)")}"
  echo "settings: SHAPE=$SHAPE SEQ=$SEQ MICRO_BATCH=$MICRO_BATCH GLOBAL_BATCH=$GLOBAL_BATCH TRAIN_ITERS=$TRAIN_ITERS JOB_TIMEOUT=$JOB_TIMEOUT DEADLINE=$DEADLINE"
  echo "jobs: $JOBS"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

CONFIGS=$ROOT/examples/megatron-lm/configs
model_args() {  # MODEL -> bash array M
  local model=$1 cfg layers
  case $model in
    hybrid|attn) cfg=$CONFIGS/hybrid-1.3b.sh ;;
    mom) cfg=$CONFIGS/mom-1.3b.sh ;;
    *) echo "scaling_run.sh: unknown model $model" >&2; return 1 ;;
  esac
  MODEL_ARGS=() TRAIN_ARGS=()
  source "$cfg"
  M=("${MODEL_ARGS[@]}" "${TRAIN_ARGS[@]}")
  layers=24
  if [[ $SHAPE == tiny ]]; then
    layers=8
    M+=(--num-layers 8 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4
        --mom-num-heads 4 --mom-head-dim 16 --mom-chunk-size 16)
  fi
  [[ $model == attn ]] && M+=(--mom-layer-pattern "$(printf 'A%.0s' $(seq "$layers"))")
  return 0
}

PORT=$((29500 + RANDOM % 1000))
run_job() {  # NAME MODEL TP CP PP FIRST_GPU LIMIT PORT
  local name=$1 model=$2 tp=$3 cp=$4 pp=$5 first=$6 limit=$7 port=$8 n log
  n=$((tp * cp * pp))
  log=$OUT/$name.log
  model_args "$model" || return 1
  local args=("${M[@]}"
    --seq-length "$SEQ" --max-position-embeddings "$SEQ"
    --micro-batch-size "$MICRO_BATCH" --global-batch-size "$GLOBAL_BATCH"
    --train-iters "$TRAIN_ITERS" --lr-warmup-iters 5 --lr-decay-iters 1000
    --hidden-dropout 0 --attention-dropout 0 --seed 1234
    --tensor-model-parallel-size "$tp" --context-parallel-size "$cp"
    --pipeline-model-parallel-size "$pp"
    --mock-data --tokenizer-type NullTokenizer --vocab-size 32767
    --log-interval 1 --log-throughput --eval-iters 0 --eval-interval 100000
    --transformer-impl local --use-cpu-initialization --no-gradient-accumulation-fusion
    --no-masked-softmax-fusion --no-persist-layer-norm --no-rope-fusion --no-bias-dropout-fusion
    --distributed-timeout-minutes 3)
  (( tp > 1 )) && args+=(--sequence-parallel)
  [[ $SHAPE == tiny ]] && args+=(--vocab-size 1023)
  # shellcheck disable=SC2206
  args+=(${EXTRA_ARGS:-})
  local devices=""
  (( GPUS > 0 )) && devices=$(seq -s, "$first" $((first + n - 1)))
  {
    echo "scaling-run: job $name model $model TP=$tp CP=$cp PP=$pp processes $n GPUs ${devices:--} limit ${limit}s"
    echo "scaling-run: start $(date +%s.%N)"
  } > "$log"
  CUDA_VISIBLE_DEVICES=${devices:-${CUDA_VISIBLE_DEVICES:-}} timeout -k 10 "$limit" \
    python3 -m torch.distributed.run --nnodes 1 --nproc-per-node "$n" --master-addr 127.0.0.1 --master-port "$port" \
    "$ROOT/benchmarks/scaling_launch.py" "$MEGATRON_LM_PATH/pretrain_gpt.py" "${args[@]}" \
    >> "$log" 2>&1
  local rc=$?
  echo "scaling-run: end $(date +%s.%N) exit $rc" >> "$log"
  echo "scaling-run: $name exit $rc ($(grep -c ' iteration  *[0-9]*/' "$log") iterations logged)"
  return 0
}

for group in $JOBS; do
  now=$(date +%s)
  limit=$JOB_TIMEOUT
  if (( DEADLINE > 0 )); then
    left=$((START + DEADLINE - now))
    (( left < limit )) && limit=$left
    if (( limit < 30 )); then
      echo "scaling-run: skipped (no time left): $group"
      for job in ${group//,/ }; do
        echo "scaling-run: job ${job%%:*} skipped: ${left}s left before the deadline" > "$OUT/${job%%:*}.log"
      done
      continue
    fi
  fi
  echo "== $(date -u +%T) group $group (limit ${limit}s)"
  first=0
  pids=()
  for job in ${group//,/ }; do
    IFS=: read -r name model tp cp pp <<< "$job"
    PORT=$((PORT + 1))
    run_job "$name" "$model" "$tp" "$cp" "$pp" "$first" "$limit" "$PORT" &
    pids+=($!)
    first=$((first + tp * cp * pp))
  done
  wait "${pids[@]}"
done
python3 "$ROOT/benchmarks/scaling_report.py" "$OUT" --ref hybrid-tp4=hybrid-tp1 \
  --ref attn-tp4=attn-tp1 --ref mom-tp2cp2=mom-tp1 --ref hybrid-tp8=hybrid-tp1 \
  --ref hybrid-tp4pp2=hybrid-tp1 ${REPORT_ARGS:-}
# A device machine may return only a few files: PACK_LOGS=1 puts the job logs into one archive.
if [[ ${PACK_LOGS:-0} == 1 ]]; then
  (cd "$OUT" && tar czf logs.tar.gz ./*.log && rm -f ./*.log)
fi
echo "scaling-run: done in $(( $(date +%s) - START ))s"
