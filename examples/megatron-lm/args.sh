# Builds the pretrain_gpt.py command line (bash array ARGS) from a model config and the knobs
# below. Sourced by train.sh (one node, torchrun) and train.sbatch (Slurm, srun + torchrun),
# so the two never disagree. Every knob is an environment variable with a default:
#
#   CONFIG            model config (default configs/tiny.sh); see configs/*.sh
#   MEGATRON_LM_PATH  patched Megatron-LM checkout (python patches/apply.py PATH)
#   PRETRAIN          training script (default $MEGATRON_LM_PATH/pretrain_gpt.py)
#   TP PP VPP CP      tensor / pipeline / virtual-pipeline / context parallel sizes (1 1 - 1);
#                     data parallel = world size / (TP * PP * CP)
#   SP                sequence parallelism, on by default when TP > 1 (SP=0: off)
#   MICRO_BATCH GLOBAL_BATCH TRAIN_ITERS   override the config's values
#   DATA_PATH         Megatron .bin/.idx prefix(es) ("1.0 /data/a_text_document ...");
#                     unset: --mock-data
#   TOKENIZER_MODEL   HuggingFace tokenizer name or path used with DATA_PATH
#                     (default meta-llama/Llama-2-7b-hf, the paper's tokenizer)
#   RUN_DIR           run directory (default runs/$NAME): checkpoints/, logs/, tensorboard/
#   CKPT_DIR          checkpoints (default $RUN_DIR/checkpoints); a run resumes from the latest
#                     checkpoint there
#   SAVE_INTERVAL LOG_INTERVAL EVAL_INTERVAL EVAL_ITERS   (1000 10 1000 10)
#   EXIT_DURATION_MINS  save and exit cleanly after this many minutes (set below a job's
#                     time limit; resubmit to continue)
# Extra pretrain_gpt.py flags: pass them after the script name (train.sh ... --flag value).

HERE=${MOM_EXAMPLES:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
CONFIG=${CONFIG:-$HERE/configs/tiny.sh}
[[ -f $CONFIG ]] || CONFIG=$HERE/configs/$CONFIG
[[ -f $CONFIG ]] || CONFIG=$CONFIG.sh
[[ -f $CONFIG ]] || { echo "args.sh: no config ${CONFIG}" >&2; exit 2; }
source "$CONFIG"

if [[ -z ${PRETRAIN:-} ]]; then
  : "${MEGATRON_LM_PATH:?set MEGATRON_LM_PATH to a Megatron-LM checkout patched with patches/apply.py}"
  PRETRAIN=$MEGATRON_LM_PATH/pretrain_gpt.py
fi
TP=${TP:-1} PP=${PP:-1} CP=${CP:-1}
SP=${SP:-$(( TP > 1 ? 1 : 0 ))}
RUN_DIR=${RUN_DIR:-runs/$NAME}
CKPT_DIR=${CKPT_DIR:-$RUN_DIR/checkpoints}
mkdir -p "$RUN_DIR/logs" "$CKPT_DIR"

PARALLEL_ARGS=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
               --context-parallel-size "$CP")
[[ $SP == 1 ]] && PARALLEL_ARGS+=(--sequence-parallel)
[[ -n ${VPP:-} ]] && PARALLEL_ARGS+=(--num-layers-per-virtual-pipeline-stage "$VPP")

if [[ -n ${DATA_PATH:-} ]]; then
  read -r -a _paths <<< "$DATA_PATH"
  DATA_ARGS=(--data-path "${_paths[@]}" --split 99,1,0 --tokenizer-type HuggingFaceTokenizer
             --tokenizer-model "${TOKENIZER_MODEL:-meta-llama/Llama-2-7b-hf}")
else
  DATA_ARGS=(--mock-data --tokenizer-type NullTokenizer --vocab-size "${MOCK_VOCAB_SIZE:-32000}")
fi

OUTPUT_ARGS=(--save "$CKPT_DIR" --load "$CKPT_DIR" --save-interval "${SAVE_INTERVAL:-1000}"
             --log-interval "${LOG_INTERVAL:-10}" --eval-interval "${EVAL_INTERVAL:-1000}"
             --eval-iters "${EVAL_ITERS:-10}" --tensorboard-dir "$RUN_DIR/tensorboard"
             --log-throughput)
[[ -n ${EXIT_DURATION_MINS:-} ]] && OUTPUT_ARGS+=(--exit-duration-in-mins "$EXIT_DURATION_MINS")

ARGS=("${MODEL_ARGS[@]}" "${TRAIN_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${DATA_ARGS[@]}"
      "${OUTPUT_ARGS[@]}")
# TP/SP communication overlaps compute only if kernels queue in issue order.
export CUDA_DEVICE_MAX_CONNECTIONS=1
