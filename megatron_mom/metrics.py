"""Training-log bookkeeping of the MoM routers: losses per layer and memory load.

Losses go to Megatron-Core's MoE aux-loss tracker under names of our own
(`mom_load_balancing_loss`, `mom_z_loss`), which Megatron-LM's logging can report; the number
of tokens each memory received is kept here, per layer, for our own logs.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from megatron.core.transformer.moe import moe_utils

LOAD_BALANCING_LOSS = "mom_load_balancing_loss"
Z_LOSS = "mom_z_loss"
_MEMORY_LOAD: Dict[int, torch.Tensor] = {}


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
    configured (schedules.py:281 in megatron-core 0.16.1), so a training loop with MoM layers
    calls this once per step. The scale is kept 0-dim: Megatron copies it into whatever buffer
    an earlier call created, and a [1]-shaped value cannot be copied into a 0-dim one."""
    scale = torch.as_tensor(loss_scale, dtype=torch.float32, device=device).reshape(())
    moe_utils.MoEAuxLossAutoScaler.set_loss_scale(scale * (cp_size / num_microbatches))


def record_router(layer_number: Optional[int], config, losses, tokens_per_memory: torch.Tensor,
                  reduce_group=None) -> None:
    """Record one forward pass of a MoM router (this rank's loss shares; `reduce_group` sums
    them where ranks routed different tokens)."""
    if layer_number is None:
        return
    num_layers = config.num_layers + (getattr(config, "mtp_num_layers", None) or 0)
    if losses.load_balancing is not None:
        _tracker_record(LOAD_BALANCING_LOSS, losses.load_balancing.detach(), layer_number,
                        num_layers, reduce_group)
    if losses.z is not None:
        _tracker_record(Z_LOSS, losses.z.detach(), layer_number, num_layers, reduce_group)
    counts = tokens_per_memory.detach().float()
    previous = _MEMORY_LOAD.get(layer_number)
    if previous is not None and previous.shape == counts.shape:
        previous += counts
    else:
        _MEMORY_LOAD[layer_number] = counts.clone()


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


def memory_load(clear: bool = True) -> Dict[int, torch.Tensor]:
    """Fraction of routed tokens each memory received, per layer, since the last clear."""
    out = {layer: counts / counts.sum().clamp(min=1) for layer, counts in sorted(_MEMORY_LOAD.items())}
    if clear:
        _MEMORY_LOAD.clear()
    return out
