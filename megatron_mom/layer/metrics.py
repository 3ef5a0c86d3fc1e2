"""Training-log bookkeeping of the MoM routers: losses per layer and memory load.

Losses go to Megatron-Core's MoE aux-loss tracker under names of our own
(`mom_load_balancing_loss`, `mom_z_loss`), which Megatron-LM's logging can report; the number
of tokens each memory received is counted by each layer's router (`MoMRouter.routed_tokens`,
as Megatron's MoE routers count tokens per expert) and read here for our own logs.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Union

import torch

from megatron.core.transformer.moe import moe_utils

from megatron_mom.layer.router import MoMRouter

LOAD_BALANCING_LOSS = "mom_load_balancing_loss"
Z_LOSS = "mom_z_loss"


def _tracker_record(name: str, value: torch.Tensor, layer_number: int, num_layers: int,
                    reduce_group) -> None:
    save = getattr(moe_utils, "save_to_aux_losses_tracker", None)  # megatron-core <= 0.17
    if save is not None:
        tracker = moe_utils.get_moe_layer_wise_logging_tracker()
        if name in tracker and tracker[name]["values"].numel() != num_layers:
            del tracker[name]  # a model with another depth was built in this process
        save(name, value, layer_number, num_layers, reduce_group=reduce_group)
        return
    try:  # megatron-core 0.18+: a metrics tracker object
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:
        get_moe_metrics_tracker = getattr(moe_utils, "get_moe_metrics_tracker", None)
    if get_moe_metrics_tracker is not None:
        get_moe_metrics_tracker().record(name, value, layer_number=layer_number,
                                         num_layers=num_layers, reduce_group=reduce_group)


def set_router_loss_scale(loss_scale=1.0, num_microbatches: int = 1, cp_size: int = 1,
                          device=None) -> None:
    """Scale of the router losses' gradient, set the way Megatron's schedule sets it for MoE:
    loss_scale * cp_size / num_microbatches.

    Megatron's pipeline schedule sets `MoEAuxLossAutoScaler`'s scale only when MoE experts are
    configured (`forward_step_calc_loss` in pipeline_parallel/schedules.py), so a training loop
    with MoM layers calls this once per step. The scale is kept 0-dim: Megatron copies it into
    whatever buffer an earlier call created, and a [1]-shaped value cannot be copied into a
    0-dim one."""
    scale = torch.as_tensor(loss_scale, dtype=torch.float32, device=device).reshape(())
    moe_utils.MoEAuxLossAutoScaler.set_loss_scale(scale * (cp_size / num_microbatches))


def record_router(layer_number: Optional[int], config, losses, reduce_group=None) -> None:
    """Record the router losses of one forward pass of a MoM layer in Megatron's tracker
    (this rank's loss shares; `reduce_group` sums them where ranks routed different tokens)."""
    if layer_number is None:
        return
    num_layers = config.num_layers + (getattr(config, "mtp_num_layers", None) or 0)
    if losses.load_balancing is not None:
        _tracker_record(LOAD_BALANCING_LOSS, losses.load_balancing.detach(), layer_number,
                        num_layers, reduce_group)
    if losses.z is not None:
        _tracker_record(Z_LOSS, losses.z.detach(), layer_number, num_layers, reduce_group)


def router_loss_values(clear: bool = True) -> Dict[str, torch.Tensor]:
    """Per-layer router losses recorded since the last clear, {name: [num_layers] tensor}.

    Values are summed over micro-batches and not reduced across ranks."""
    tracker = moe_utils.get_moe_layer_wise_logging_tracker() if hasattr(
        moe_utils, "get_moe_layer_wise_logging_tracker") else {}
    out = {name: entry["values"].clone() for name, entry in tracker.items()
           if name in (LOAD_BALANCING_LOSS, Z_LOSS)}
    if clear:
        for name in out:
            tracker[name]["values"].zero_()
    return out


def memory_load(model: Union[torch.nn.Module, Iterable[torch.nn.Module]],
                clear: bool = True) -> Dict[int, torch.Tensor]:
    """Fraction of routed tokens each memory received since the last clear, {layer number:
    [M] float32}, for every MoM layer of `model` (a module, or a list of them such as virtual
    pipeline chunks) that has a layer number."""
    if isinstance(model, bool):
        raise TypeError("memory_load(model, clear=True): pass the model whose MoM layers to "
                        "read (the counts live in each layer's router)")
    modules = [model] if isinstance(model, torch.nn.Module) else list(model)
    out = {}
    for module in (m for chunk in modules for m in chunk.modules()):
        router = getattr(module, "router", None)
        layer = getattr(module, "layer_number", None)
        if isinstance(router, MoMRouter) and layer is not None:
            counts = router.routed_tokens.float()
            out[layer] = counts / counts.sum().clamp(min=1)
            if clear:
                router.routed_tokens.zero_()
    return dict(sorted(out.items()))
