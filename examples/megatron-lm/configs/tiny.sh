# A few-second model for smoke tests and CI (CPU or one GPU): 4 layers MMAM, hidden 64,
# mock data with a 1024-token vocabulary.
NAME=${NAME:-tiny}
MOCK_VOCAB_SIZE=1024
MODEL_ARGS=(
  --spec megatron_mom.integrations.megatron_lm.presets hybrid --mom-layer-pattern MMAM
  --num-layers 4 --hidden-size 64 --ffn-hidden-size 128 --swiglu --num-attention-heads 4
  --normalization RMSNorm --disable-bias-linear --untie-embeddings-and-output-weights
  --position-embedding-type rope --seq-length 64 --max-position-embeddings 64
  --mom-num-memories 3 --mom-topk 2 --mom-num-heads 2 --mom-head-dim 16 --mom-chunk-size 16
)
TRAIN_ARGS=(
  --micro-batch-size ${MICRO_BATCH:-2} --global-batch-size ${GLOBAL_BATCH:-4}
  --train-iters ${TRAIN_ITERS:-4} --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine
  --lr-warmup-iters 1
)
