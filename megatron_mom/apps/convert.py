"""Checkpoint conversion between the official MoM layer and `MixtureOfMemories`.

The official layer (fla's `MomAttention`) names its parameters as listed in docs/method.md
(section "Official parameter names"); ours pack q, the output gate and every memory's k, v,
b, a into one column-parallel `in_proj`, sliced per tensor-parallel rank by heads.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Union

import torch
from torch import Tensor

from megatron_mom.config import MoMConfig

StateDict = Dict[str, Tensor]


def _official_section_names(mom: MoMConfig) -> List[tuple[str, str]]:
    """(our section name, official key) in in_proj order (see mixer.in_proj_sections)."""
    names = [("q", "q_proj.weight")]
    if mom.use_output_gate:
        names.append(("gate", "g_proj.weight"))
    for e in range(mom.num_memory_weights):
        shared = e == mom.num_memories
        for part in ("k", "v", "b", "a"):
            names.append((f"{part}.{e}", f"shared_{part}.weight" if shared else f"{part}_proj.{e}.weight"))
    return names


def official_keys(mom: MoMConfig) -> List[str]:
    """Every parameter name the official layer has for this configuration."""
    keys = [key for _, key in _official_section_names(mom)]
    keys += ["gate.weight", "A_log", "dt_bias", "q_conv1d.weight", "k_conv1d.weight",
             "v_conv1d.weight", "o_norm.weight", "o_proj.weight"]
    return keys


def _check_tp(mom: MoMConfig, tp_rank: int, tp_size: int):
    mom.check_parallel(tp_size)
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank must be in [0, {tp_size}), got {tp_rank}")


def _heads(t: Tensor, rank: int, size: int, dim: int = 0) -> Tensor:
    n = t.shape[dim] // size
    return t.narrow(dim, rank * n, n).clone()


def from_official_mom(state_dict: StateDict, mom: MoMConfig, tp_rank: int = 0,
                      tp_size: int = 1, prefix: str = "") -> StateDict:
    """Official MoM layer weights -> the state dict of our layer on one tensor-parallel rank.

    `prefix` selects one layer from a whole-model state dict (e.g. "model.layers.3.attn.").
    Raises on missing or unexpected keys and on shapes that do not match `mom`."""
    _check_tp(mom, tp_rank, tp_size)
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    expected = set(official_keys(mom))
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise KeyError(f"from_official_mom: state dict does not match MoMConfig "
                       f"(num_memories={mom.num_memories}, shared_memory={mom.shared_memory}, "
                       f"use_output_gate={mom.use_output_gate}): missing {missing}, "
                       f"unexpected {unexpected}")
    H, K, V, W = mom.num_heads, mom.key_dim, mom.value_dim, mom.conv_size
    rows = {"q": H * K, "gate": H * V, "k": H * K, "v": H * V, "b": H, "a": H}
    hidden = sd["q_proj.weight"].shape[1]

    def check(key, shape):
        if tuple(sd[key].shape) != tuple(shape):
            raise ValueError(f"from_official_mom: {key} has shape {tuple(sd[key].shape)}, "
                             f"expected {tuple(shape)} for this MoMConfig")

    sections = []
    for name, key in _official_section_names(mom):
        check(key, (rows[name.split(".")[0]], hidden))
        sections.append(_heads(sd[key], tp_rank, tp_size))
    check("gate.weight", (mom.num_memories, hidden))
    check("o_proj.weight", (hidden, H * V))
    check("o_norm.weight", (V,))
    for key in ("A_log", "dt_bias"):
        check(key, (H,))
    for key, channels in (("q_conv1d.weight", H * K), ("k_conv1d.weight", H * K),
                          ("v_conv1d.weight", H * V)):
        check(key, (channels, 1, W))
    return {
        "router.weight": sd["gate.weight"].clone(),
        "in_proj.weight": torch.cat(sections),
        "out_proj.weight": _heads(sd["o_proj.weight"], tp_rank, tp_size, dim=1),
        "conv_q": _heads(sd["q_conv1d.weight"][:, 0], tp_rank, tp_size),
        "conv_k": _heads(sd["k_conv1d.weight"][:, 0], tp_rank, tp_size),
        "conv_v": _heads(sd["v_conv1d.weight"][:, 0], tp_rank, tp_size),
        "A_log": _heads(sd["A_log"], tp_rank, tp_size),
        "dt_bias": _heads(sd["dt_bias"], tp_rank, tp_size),
        "out_norm_weight": sd["o_norm.weight"].clone(),
    }


def to_official_mom(state_dicts: Union[StateDict, Sequence[StateDict]], mom: MoMConfig,
                    prefix: str = "") -> StateDict:
    """Our layer's state dict (or the list of all tensor-parallel ranks' state dicts, in rank
    order) -> the official layer's parameters. `prefix` is prepended to every key."""
    ranks = [state_dicts] if isinstance(state_dicts, dict) else list(state_dicts)
    tp_size = len(ranks)
    _check_tp(mom, 0, tp_size)
    H, K, V = mom.num_heads // tp_size, mom.key_dim, mom.value_dim
    rows = {"q": H * K, "gate": H * V, "k": H * K, "v": H * V, "b": H, "a": H}
    out: StateDict = {}
    names = _official_section_names(mom)
    sizes = [rows[name.split(".")[0]] for name, _ in names]
    per_rank = [sd["in_proj.weight"].split(sizes) for sd in ranks]
    for i, (_, key) in enumerate(names):
        out[key] = torch.cat([parts[i] for parts in per_rank])
    cat = lambda key, dim=0: torch.cat([sd[key] for sd in ranks], dim=dim)
    out["gate.weight"] = ranks[0]["router.weight"].clone()
    out["o_proj.weight"] = cat("out_proj.weight", dim=1)
    out["q_conv1d.weight"] = cat("conv_q")[:, None]
    out["k_conv1d.weight"] = cat("conv_k")[:, None]
    out["v_conv1d.weight"] = cat("conv_v")[:, None]
    out["A_log"], out["dt_bias"] = cat("A_log"), cat("dt_bias")
    out["o_norm.weight"] = ranks[0]["out_norm_weight"].clone()
    return {prefix + k: v for k, v in out.items()}
