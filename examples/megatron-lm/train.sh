#!/usr/bin/env bash
# Pretrain on one node with torchrun, one process per GPU (or NPROC_PER_NODE CPU processes).
#   CONFIG=configs/mom-380m.sh MEGATRON_LM_PATH=~/Megatron-LM TP=2 bash examples/megatron-lm/train.sh
# Knobs: see args.sh. Extra pretrain_gpt.py flags go after the script name.
# The log is also written to $RUN_DIR/logs/train-<time>.log.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/args.sh"
if [[ -z ${NPROC_PER_NODE:-} ]]; then
  NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | wc -l)
  (( NPROC_PER_NODE > 0 )) || NPROC_PER_NODE=1
fi
LOG=$RUN_DIR/logs/train-$(date +%Y%m%d-%H%M%S).log
echo "train.sh: $NPROC_PER_NODE processes, TP=$TP PP=$PP CP=$CP SP=$SP, log $LOG"
# The launcher runs the script as python would; without CUDA it first sets up CPU training.
torchrun --standalone --nproc-per-node "$NPROC_PER_NODE" \
  -m megatron_mom.integrations.megatron_lm.launch "$PRETRAIN" "${ARGS[@]}" "$@" 2>&1 | tee "$LOG"
