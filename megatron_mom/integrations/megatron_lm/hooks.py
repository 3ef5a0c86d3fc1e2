"""What the patched Megatron-LM calls into: the MoM router losses in the training log.

(The aux-loss gradient scale needs no code here: the patch widens the condition under which
Megatron's schedule sets `MoEAuxLossAutoScaler`'s scale, the one our router uses, to models
whose config carries `mom_aux_loss`, which `presets.PatternLayer` sets.)
"""
from __future__ import annotations

from megatron_mom.layer import metrics


def aux_loss_scale() -> float:
    """The scale Megatron's schedule last set for aux-loss gradients (1.0 when never set)."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    scale = MoEAuxLossAutoScaler.main_loss_backward_scale
    return 1.0 if scale is None else float(scale.reshape(-1)[0])


def _print_last_rank(message: str) -> None:
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1:
        print(message, flush=True)


def _track_names(args):
    names = []
    if getattr(args, "mom_aux_loss_coeff", 0) > 0:
        names.append(metrics.LOAD_BALANCING_LOSS)
    if getattr(args, "mom_z_loss_coeff", 0) > 0:
        names.append(metrics.Z_LOSS)
    return names


def _mom_layer_flags(args):
    """1 for each MoM layer (the losses are averaged over MoM layers only), 0 otherwise."""
    pattern = args.mom_layer_pattern or "M" * args.num_layers  # a preset fills it in
    return [int(c == "M") for c in pattern] + [0] * (getattr(args, "mtp_num_layers", None) or 0)


def report_losses(args, iteration, writer, wandb_writer, total_loss_dict, pg_collection=None,
                  num_microbatches: int = 1) -> str:
    """Reduce, add to Megatron-LM's `total_loss_dict` (printed in the log line as
    `mom_load_balancing_loss: ...`) and clear the MoM router losses of this iteration.
    Called by the patched `training_log` on every rank, every iteration; on the iterations
    Megatron logs, it also prints the aux-loss gradient scale the schedule set (it follows the
    number of micro-batches, which a batch-size ramp changes). Returns extra text for the log
    line (empty: the losses already appear through total_loss_dict)."""
    names = _track_names(args)
    if not names:
        return ""
    log_interval = getattr(args, "log_interval", 1) or 1
    if iteration % log_interval == 0:
        _print_last_rank(f"megatron-mom: MoM aux-loss gradient scale {aux_loss_scale():.6g} "
                         f"(set by Megatron's schedule: grad scale * cp / num_microbatches)")
    flags = _mom_layer_flags(args)
    kwargs = dict(loss_scale=1.0 / num_microbatches, iteration=iteration, writer=writer,
                  wandb_writer=wandb_writer, total_loss_dict=total_loss_dict,
                  per_layer_logging=getattr(args, "moe_per_layer_logging", False),
                  force_initialize=True, track_names=names, num_layers=len(flags),
                  moe_layer_freq=flags, mtp_num_layers=None, pg_collection=pg_collection)
    try:  # megatron-core 0.18+
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:
        from megatron.core.transformer.moe.moe_utils import track_moe_metrics
        track_moe_metrics(**kwargs)  # megatron-core <= 0.17; reduces, logs and clears
        return ""
    return get_moe_metrics_tracker().report(**kwargs) or ""
