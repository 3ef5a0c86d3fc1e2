"""Process groups, model, optimizer and learning-rate schedule of a training run.

Everything here is Megatron-Core: `GPTModel` with our hybrid block spec, `Float16Module` for
bf16/fp16, `DistributedDataParallel`, `get_megatron_optimizer` and `OptimizerParamScheduler`.
On a machine without a GPU the CPU redirections of `megatron_mom.testing.cpu` are switched on and
the
process group uses gloo; under torchrun on GPUs it uses NCCL.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_mom.ops.common import interpreting
from megatron_mom.testing import cpu
from megatron_mom.train.config import ConfigError, RunConfig

VOCAB_SIZE = 512  # Megatron's byte-level tokenizer: 256 bytes + special ids, padded


@dataclass
class Parallel:
    """This process' place in the run."""
    device: torch.device
    rank: int
    world_size: int
    tp: int
    pp: int
    dp: int
    dp_rank: int
    on_cpu: bool

    @property
    def is_logger(self) -> bool:
        """The one rank that prints and writes plots and metric files."""
        return self.rank == 0


def init_parallel(cfg: RunConfig) -> Parallel:
    """Start (or reuse) the process group and (re)build Megatron's parallel state."""
    if cfg.mom_config().backend == "triton" and not torch.cuda.is_available() \
            and not interpreting():
        raise ConfigError("mom.backend 'triton' runs the kernels on a GPU and there is none "
                          "here: use mom.backend=auto (Triton on a GPU, else torch) or torch, "
                          "or set TRITON_INTERPRET=1 to interpret the kernels on the CPU (slow)")
    if cfg.model.num_layers % cfg.parallel.pipeline_model_parallel_size:
        raise ConfigError(f"model.num_layers ({cfg.model.num_layers}) must be divisible by "
                         f"pipeline_model_parallel_size "
                         f"({cfg.parallel.pipeline_model_parallel_size})")
    return init_process_groups(cfg.parallel.tensor_model_parallel_size,
                               cfg.parallel.pipeline_model_parallel_size, cfg.train.seed)


def init_process_groups(tp: int = 1, pp: int = 1, seed: int = 1234) -> Parallel:
    """gloo on CPU (with the CPU redirections), NCCL on GPUs; one process unless launched by
    torchrun. Rebuilds Megatron's parallel state when called again in the same process."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        cpu.enable()
    if not dist.is_initialized():
        if not on_cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        backend = "gloo" if on_cpu else "nccl"
        if "RANK" in os.environ:  # launched by torchrun
            dist.init_process_group(backend)
        else:  # a plain `megatron-mom train`: one process, so an in-process store (no port
            # to pick and lose to another process between choosing and binding it)
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % (tp * pp):
        raise ConfigError(f"the world size ({world} processes) must be a multiple of "
                         f"tensor_model_parallel_size * pipeline_model_parallel_size "
                         f"({tp} * {pp}); change the torchrun --nproc-per-node or the sizes")
    if ps.model_parallel_is_initialized():  # a second run in the same process (tests)
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tp, pp)
    model_parallel_cuda_manual_seed(seed)
    device = torch.device("cpu") if on_cpu else torch.device("cuda", torch.cuda.current_device())
    return Parallel(device=device, rank=rank, world_size=world, tp=tp, pp=pp,
                    dp=ps.get_data_parallel_world_size(), dp_rank=ps.get_data_parallel_rank(),
                    on_cpu=on_cpu)


def params_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# train.recompute: Megatron's activation recompute. "selective" reruns each layer's mixing core
# (MoM: projection, memory path, mix and read-out norm; attention: core attention) in the
# backward, "full" each layer.
RECOMPUTE = {
    "none": {},
    "selective": dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
}


def transformer_config(cfg: RunConfig, on_cpu: bool):
    from megatron.core.transformer import TransformerConfig
    from megatron_mom.layer.specs import mixes_layer_kinds

    m, t, p = cfg.model, cfg.train, cfg.parallel
    dtype = params_dtype(t.precision)
    # Fusions need apex / Transformer Engine kernels that neither the CPU nor a plain GPU
    # install has; the unfused paths are exact.
    overrides = cpu.megatron_cpu_config_overrides()
    overrides["use_cpu_initialization"] = on_cpu
    overrides.update(RECOMPUTE[t.recompute])
    return TransformerConfig(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads, hidden_dropout=m.dropout,
        attention_dropout=m.dropout, init_method_std=m.init_method_std,
        normalization="RMSNorm", add_bias_linear=False, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        # At TP = 1 there is nothing to split: off, as Megatron-LM's argument check sets it
        # (megatron-core's TransformerConfig refuses the pair).
        sequence_parallel=p.sequence_parallel and p.tensor_model_parallel_size > 1,
        params_dtype=dtype, pipeline_dtype=dtype,
        bf16=t.precision == "bf16", fp16=t.precision == "fp16",
        hetereogenous_dist_checkpoint=mixes_layer_kinds(m.pattern), **overrides)


def build_gpt(cfg: RunConfig, config, device: torch.device):
    """The bare GPTModel of this pipeline stage (no DDP / fp16 wrappers)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron_mom.layer.specs import get_hybrid_block_spec

    spec = get_hybrid_block_spec(config, cfg.model.pattern, cfg.mom_config(),
                                 backend=cfg.model.spec_backend)
    model = GPTModel(config, spec, vocab_size=VOCAB_SIZE,
                     max_sequence_length=cfg.model.seq_length,
                     pre_process=ps.is_pipeline_first_stage(),
                     post_process=ps.is_pipeline_last_stage(),
                     share_embeddings_and_output_weights=cfg.model.tie_embeddings,
                     position_embedding_type="rope")
    return model.to(device)


@dataclass
class Trainables:
    model: torch.nn.Module      # DDP(Float16Module?(GPTModel))
    gpt: torch.nn.Module        # the GPTModel inside, for checkpoints
    optimizer: object
    scheduler: object
    config: object              # TransformerConfig


def build_trainables(cfg: RunConfig, par: Parallel) -> Trainables:
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer.module import Float16Module

    t = cfg.train
    config = transformer_config(cfg, par.on_cpu)
    gpt = build_gpt(cfg, config, par.device)
    inner = Float16Module(config, gpt) if t.precision != "fp32" else gpt
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)
    model = DistributedDataParallel(config, ddp_config, inner)
    opt_config = OptimizerConfig(
        optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, clip_grad=t.clip_grad,
        bf16=t.precision == "bf16", fp16=t.precision == "fp16",
        params_dtype=params_dtype(t.precision),
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)
    optimizer = get_megatron_optimizer(opt_config, [model])
    decay_steps = max(t.steps - t.warmup_steps, 1)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=t.warmup_steps,
        lr_decay_steps=t.warmup_steps + decay_steps, lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay, end_wd=t.weight_decay, wd_incr_steps=t.steps,
        wd_incr_style="constant")
    # What Megatron-LM's training loop wires into the config for its schedules.
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model.no_sync
    config.grad_scale_func = optimizer.scale_loss
    return Trainables(model=model, gpt=gpt, optimizer=optimizer, scheduler=scheduler,
                      config=config)
