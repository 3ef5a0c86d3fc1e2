"""Megatron-LM integration: `--mom-*` flags, `--spec` presets, training-log and aux-loss hooks
used by the version-pinned patches in `patches/`, and a CPU launcher for `pretrain_gpt.py`.

    python patches/apply.py /path/to/Megatron-LM          # once per checkout
    torchrun ... pretrain_gpt.py --spec megatron_mom.integrations.megatron_lm.presets hybrid \
        --mom-topk 2 ...

See docs/megatron-lm.md.
"""
