"""The main job: train, resume and sample a MoM hybrid GPT on Megatron-Core.

    from megatron_mom.train import load_config, train
    result = train(load_config("examples/configs/tiny_hybrid.yaml"))

Modules: config (YAML schema), data (corpus -> GPTDataset), build (process groups, model,
optimizer), loop (the training loop), checkpoint (atomic save/resume), generate (sampling),
plot (loss curve).
"""
from megatron_mom.train.config import ConfigError, RunConfig, build_config, load_config


def train(cfg, **kwargs):
    from megatron_mom.train.loop import train as _train
    return _train(cfg, **kwargs)


__all__ = ["ConfigError", "RunConfig", "build_config", "load_config", "train"]
