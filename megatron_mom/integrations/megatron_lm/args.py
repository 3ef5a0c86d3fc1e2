"""The `--mom-*` command-line flags and their translation into a `MoMConfig`.

`add_mom_args(parser)` is an `extra_args_provider` for Megatron-LM's argument parser; the
patched `pretrain_gpt.py` passes `extra_args_provider(...)`, which chains the provider the
script already had (ModelOpt's). Defaults come from `MoMConfig` itself so the two cannot drift.
Errors name the flags, not the dataclass fields.
"""
from __future__ import annotations

import argparse
from typing import Callable, Optional

from megatron_mom.config import (BACKENDS, GROUPED_PROJECTION, MoMConfig, from_settings,
                                 settings_fields)

# flag (without the leading "--mom-") -> MoMConfig field, or MoMExecution's for the last four
FLAGS = {
    "num-memories": "num_memories",
    "topk": "topk",
    "shared-memory": "shared_memory",
    "num-heads": "num_heads",
    "head-dim": "head_dim",
    "expand-v": "expand_v",
    "conv-size": "conv_size",
    "output-gate": "use_output_gate",
    "norm-eps": "norm_eps",
    "aux-loss-coeff": "aux_loss_coeff",
    "z-loss-coeff": "z_loss_coeff",
    "chunk-size": "chunk_size",
    "backend": "backend",
    "grouped-projection": "grouped_projection",
    "lean-backward": "lean_backward",
    "recompute-states": "recompute_states",
}
_HELP = {
    "num-memories": "M, routed memories (the shared memory is extra)",
    "topk": "memories each token is routed to (<= --mom-num-memories)",
    "shared-memory": "add the always-on shared memory (--no-mom-shared-memory: off)",
    "num-heads": "MoM heads per layer (divisible by tensor * context parallel size)",
    "head-dim": "query/key size per head",
    "expand-v": "value size per head = head-dim * expand-v",
    "conv-size": "width (>= 1) of the causal short convolutions (1: a per-channel scale)",
    "output-gate": "gate the normalised output with silu(x W) (--no-mom-output-gate: off)",
    "norm-eps": "epsilon of the per-head output RMSNorm",
    "aux-loss-coeff": "router load-balancing loss coefficient (0: off)",
    "z-loss-coeff": "router z-loss coefficient (0: off)",
    "chunk-size": "chunk length of the chunked gated-delta-rule kernels (16, 32 or 64)",
    "backend": "recurrence kernels: auto (Triton on CUDA, else torch), triton or torch",
    "grouped-projection": "project k, v, b, a of the routed rows only, as one grouped GEMM: "
                          "auto (bf16 on Hopper/Blackwell), on, off (dense)",
    "lean-backward": "memory path backward from recomputed convolutions and states, one head "
                     "at a time: less peak memory, ~10%% more layer GPU time (host-bound "
                     "on slow host CPUs unless CUDA-graphed) "
                     "(--no-mom-lean-backward: off)",
    "recompute-states": "the recurrence's backward reruns its forward kernels instead of keeping "
                        "per-chunk states: ~1/3 less activation memory, ~7%% more GPU time "
                        "(--no-mom-recompute-states: off)",
}
_DEFAULTS = {f.name: f.default for f in settings_fields()}


def add_mom_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `--mom-*` flags to Megatron-LM's parser (an `extra_args_provider`)."""
    group = parser.add_argument_group("megatron-mom", "Mixture-of-Memories sequence mixer")
    for flag, field in FLAGS.items():
        default = _DEFAULTS[field]
        kwargs = dict(dest=f"mom_{field}", default=default,
                      help=f"{_HELP[flag]} (default: {default})")
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif flag == "backend":
            kwargs["choices"] = BACKENDS
        elif flag == "grouped-projection":
            kwargs["choices"] = GROUPED_PROJECTION
        else:
            kwargs["type"] = type(default)
        group.add_argument(f"--mom-{flag}", **kwargs)
    group.add_argument(
        "--mom-layer-pattern", dest="mom_layer_pattern", default=None,
        help="one symbol per layer, M (MoM) or A (softmax attention), e.g. MMMMMMMA repeated; "
             "default: all M for the 'mom' preset, one A after every 7 M for 'hybrid'")
    return parser


def extra_args_provider(previous: Optional[Callable] = None) -> Callable:
    """An extra_args_provider adding the `--mom-*` flags after `previous` (may be None)."""
    def provider(parser):
        if previous is not None:
            parser = previous(parser)
        return add_mom_args(parser)
    return provider


def _flag(field: str) -> str:
    for flag, name in FLAGS.items():
        if name == field:
            return f"--mom-{flag}"
    return field


def mom_config_from_args(args) -> MoMConfig:
    """The MoMConfig the `--mom-*` flags describe; a ValueError naming the flags otherwise."""
    if not hasattr(args, "mom_num_memories"):
        raise RuntimeError(
            "megatron-mom: the --mom-* flags are not registered with Megatron-LM's parser; "
            "apply the megatron-mom patch to this Megatron-LM checkout "
            "(python patches/apply.py /path/to/Megatron-LM) or pass "
            "megatron_mom.integrations.megatron_lm.args.add_mom_args as extra_args_provider")
    values = {field: getattr(args, f"mom_{field}") for field in FLAGS.values()}
    try:
        return from_settings(values)
    except ValueError as err:
        msg = str(err).replace("MoMConfig: ", "").replace("MoMExecution: ", "")
        for field in sorted(FLAGS.values(), key=len, reverse=True):
            msg = msg.replace(f"{field} ", f"{_flag(field)} ")
        raise ValueError(f"megatron-mom: bad --mom-* flags: {msg}") from None


def check_parallel_args(args, mom: MoMConfig) -> None:
    """Refuse parallel layouts the MoM layer cannot run with, naming Megatron-LM's flags."""
    tp = getattr(args, "tensor_model_parallel_size", 1) or 1
    cp = getattr(args, "context_parallel_size", 1) or 1
    if mom.num_heads % tp:
        raise ValueError(
            f"megatron-mom: --mom-num-heads ({mom.num_heads}) must be divisible by "
            f"--tensor-model-parallel-size ({tp})")
    if mom.num_heads % (tp * cp):
        raise ValueError(
            f"megatron-mom: --mom-num-heads ({mom.num_heads}) must be divisible by "
            f"--tensor-model-parallel-size * --context-parallel-size ({tp} * {cp})")
    if getattr(args, "num_experts", None):
        raise ValueError(
            "megatron-mom: --num-experts is not supported with the megatron-mom presets "
            "(their MLPs are dense); drop --num-experts")
