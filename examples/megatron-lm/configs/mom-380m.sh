# MoM 380M: the paper's smaller model.
# Paper (arXiv:2502.13685 section 4.1, appendix C; docs/mom_spec.md section 7): 24 layers,
# hidden 1024, MLP ratio 3, 4 MoM heads x 256, 4 memories, top-2, shared memory, context 2048,
# AdamW lr 3e-4 cosine, weight decay 0.01, clip 1.0, 15B tokens. Our choices (not in the paper):
# 0.5M-token batches (256 x 2048), 1000 warmup steps, betas (0.9, 0.95), min lr 3e-5. "MLP ratio"
# is read as the official code does: SwiGLU, ffn = round_up(hidden * ratio * 2/3, 256) = 2048.
# Sourced by ../args.sh: defines NAME, MODEL_ARGS, TRAIN_ARGS.
NAME=mom-380m
MODEL_ARGS=(
  --spec megatron_mom.megatron_lm.presets mom
  --num-layers 24 --hidden-size 1024 --ffn-hidden-size 2048 --swiglu
  --num-attention-heads 16   # Megatron-LM requires it; only attention layers use it
  --normalization RMSNorm --norm-epsilon 1e-6 --disable-bias-linear
  --untie-embeddings-and-output-weights
  --position-embedding-type none   # MoM layers need no positional encoding
  --seq-length 2048 --max-position-embeddings 2048
  --mom-num-memories 4 --mom-topk 2 --mom-shared-memory --mom-num-heads 4 --mom-head-dim 256
  --mom-expand-v 1 --mom-conv-size 4 --mom-aux-loss-coeff 0.01
)
TRAIN_ARGS=(
  --micro-batch-size ${MICRO_BATCH:-8} --global-batch-size ${GLOBAL_BATCH:-256}
  --train-iters ${TRAIN_ITERS:-28610}   # 15B tokens at 256 x 2048 tokens per step
  --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 1000
  --weight-decay 0.01 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95
  --init-method-std 0.02 --bf16
)
