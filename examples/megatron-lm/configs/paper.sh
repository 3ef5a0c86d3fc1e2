# The paper's models (arXiv:2502.13685 section 4.1 and appendix C; docs/method.md section 7):
# 24 layers, 4 MoM heads x 256, 4 memories, top-2, shared memory, context 2048, AdamW lr 3e-4
# cosine, weight decay 0.01, clip 1.0. 380M: hidden 1024, MLP ratio 3, 15B tokens.
# 1.3B: hidden 2048, MLP ratio 4, 100B tokens. Hybrid: one softmax-attention layer after every
# 7 MoM layers (layers 8, 16, 24), attention heads of 64 with RoPE.
# Our choices (not in the paper): 0.5M-token batches (256 x 2048), 1000 warmup steps, betas
# (0.9, 0.95), min lr 3e-5. "MLP ratio" is read as the official code does: SwiGLU,
# ffn = round_up(hidden * ratio * 2/3, 256).
# `paper_model SIZE KIND` (SIZE 380m|1.3b, KIND mom|hybrid) defines NAME, MODEL_ARGS, TRAIN_ARGS
# for ../args.sh.
paper_model() {
  local size=$1 kind=$2 hidden ffn heads micro iters
  case $size in
    380m) hidden=1024 ffn=2048 heads=16 micro=8 iters=28610 ;;    # 15B tokens at 256 x 2048
    1.3b) hidden=2048 ffn=5632 heads=32 micro=4 iters=190735 ;;   # 100B tokens at 256 x 2048
    *) echo "paper_model: size must be 380m or 1.3b, got $size" >&2; return 2 ;;
  esac
  local position=(--position-embedding-type none)   # MoM layers need no positional encoding
  [[ $kind == hybrid ]] && position=(--position-embedding-type rope --rotary-base 10000)
  NAME=$kind-$size
  MODEL_ARGS=(
    --spec megatron_mom.integrations.megatron_lm.presets "$kind"
    --num-layers 24 --hidden-size "$hidden" --ffn-hidden-size "$ffn" --swiglu
    --num-attention-heads "$heads"   # Megatron-LM requires it; only attention layers use it
    --normalization RMSNorm --norm-epsilon 1e-6 --disable-bias-linear
    --untie-embeddings-and-output-weights "${position[@]}"
    --seq-length 2048 --max-position-embeddings 2048
    --mom-num-memories 4 --mom-topk 2 --mom-shared-memory --mom-num-heads 4 --mom-head-dim 256
    --mom-expand-v 1 --mom-conv-size 4 --mom-aux-loss-coeff 0.01
  )
  TRAIN_ARGS=(
    --micro-batch-size "${MICRO_BATCH:-$micro}" --global-batch-size "${GLOBAL_BATCH:-256}"
    --train-iters "${TRAIN_ITERS:-$iters}"
    --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 1000
    --weight-decay 0.01 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95
    --init-method-std 0.02 --bf16
  )
}
