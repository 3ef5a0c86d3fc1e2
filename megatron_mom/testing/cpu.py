"""Run Megatron-Core on a machine without a GPU (tests, the tiny CPU training job).

Megatron-Core assumes CUDA in a handful of places. `enable()` redirects exactly those, inside
this process only, and refuses to do anything when CUDA is available: on a GPU machine nothing
here is ever active. Each redirection names the Megatron-Core function it works around.
"""
from __future__ import annotations

import logging

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False
_CPU = torch.device("cpu")
# Megatron's optimizer checks `param.type()` against CUDA type names.
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpu(TorchFunctionMode):
    """Rewrites `device='cuda'` to cpu, makes `.cuda()` a no-op and reports CUDA type names.

    Covers `clip_grad_by_total_norm_fp32` (asserts torch.cuda.FloatTensor grads), the
    param.type() checks of `Float16OptimizerWithFloat16Params.__init__` and
    `DistributedOptimizer._build_model_and_main_param_groups`, and the tensors built with
    device='cuda' in the optimizers, the pipeline schedules and `get_default_causal_mask`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _CUDA_TYPE_NAMES.get(args[0].dtype, func(*args))
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = _CPU
        if kwargs.get("pin_memory"):  # get_pos_emb_on_this_cp_rank (RoPE under CP) pins one
            kwargs["pin_memory"] = False
        if func in (torch.Tensor.to,) and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


class _QuietCpuRngWarning(logging.Filter):
    # CudaRNGStatesTracker.fork warns when the CPU RNG moves inside a "CUDA" RNG fork;
    # on CPU the fork *is* the CPU generator, so the warning is expected noise.
    def filter(self, record):
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def enable() -> bool:
    """Redirect Megatron's CUDA assumptions to the CPU. Returns False (and does nothing) when
    CUDA is available."""
    global _ENABLED
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True
    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer import utils as tf_utils
    from megatron.core.fusions import fused_softmax

    # Buffers, TP layers, mappings, RoPE: device=torch.cuda.current_device().
    torch.cuda.current_device = lambda: _CPU
    # P2PCommunicator._communicate_shapes and ._communicate synchronise the GPU after p2p.
    torch.cuda.synchronize = lambda *a, **k: None
    # _get_cuda_rng_state, _set_cuda_rng_state and CudaRNGStatesTracker.add: the
    # model-parallel RNG tracker saves and restores the CUDA generator; on CPU it forks the CPU
    # generator instead.
    mp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(seed)
    logging.getLogger(mp_random.__name__).addFilter(_QuietCpuRngWarning())

    # get_default_causal_mask builds the mask on "cuda"; fused_softmax imports it by name.
    def causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    tf_utils.get_default_causal_mask = causal_mask
    fused_softmax.get_default_causal_mask = causal_mask

    _CudaToCpu().__enter__()  # stays active for the life of the process
    _ENABLED = True
    return True


def megatron_cpu_config_overrides() -> dict:
    """TransformerConfig fields that must be off without CUDA fusions."""
    return dict(use_cpu_initialization=True, gradient_accumulation_fusion=False,
                bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
                persist_layer_norm=False)
