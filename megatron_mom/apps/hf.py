"""Whole models both ways: Megatron GPTs of our specs <-> flash-linear-attention `MomForCausalLM`.

A Hugging Face MoM model (fla's `MomConfig` in `config.json`, weights in safetensors) and a
Megatron GPT built with our specs hold the same network:

    fla (MomForCausalLM)                     Megatron (GPTModel, TP = 1 names)
    model.embeddings.weight                  embedding.word_embeddings.weight
    model.layers.i.attn_norm.weight          decoder.layers.i.input_layernorm.weight
    model.layers.i.attn.*  (MoM layer)       decoder.layers.i.self_attention.*  (apps/convert.py)
    model.layers.i.attn.{q,k,v}_proj.weight  decoder.layers.i.self_attention.linear_qkv.weight
    model.layers.i.attn.o_proj.weight        decoder.layers.i.self_attention.linear_proj.weight
    model.layers.i.mlp_norm.weight           decoder.layers.i.pre_mlp_layernorm.weight
    model.layers.i.mlp.{gate,up}_proj.weight decoder.layers.i.mlp.linear_fc1.weight (gate; up)
    model.layers.i.mlp.down_proj.weight      decoder.layers.i.mlp.linear_fc2.weight
    model.norm.weight                        decoder.final_layernorm.weight
    lm_head.weight (absent when tied)        output_layer.weight (absent when tied)

`GPTDescription` is what both sides must agree on; the settings of a Megatron model that fla's
model cannot express are refused by name when a description is made. Every conversion accounts
for every tensor: each one is used exactly once, none is invented, and dtypes are kept.
Megatron checkpoint input/output (any TP/PP, Megatron-LM's layout too) is in
`megatron_mom.apps.hf_checkpoint`; the commands are `megatron-mom export` / `import`
(docs/convert.md).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from megatron_mom.config import MoMConfig
from megatron_mom.apps.convert import from_official_mom, to_official_mom

StateDict = Dict[str, Tensor]

# fla's MomBlock builds its softmax-attention layers with `Attention`'s default rotary base and
# without passing the attn section's `rope_theta` or `qkv_bias` (fla 0.6.0), so those are fixed.
FLA_ROPE_THETA = 10000.0
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
                   "added_tokens.json")
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class ConversionError(ValueError):
    """A model, checkpoint or folder that cannot be converted; the message names the setting
    (or tensor) and, where there is one, the fix."""


@dataclass(frozen=True)
class GPTDescription:
    """A MoM/attention GPT in the terms fla's `MomConfig` and our Megatron specs share.

    pattern: one symbol per layer, 'M' (MoM) or 'A' (softmax attention with RoPE).
    vocab_size: rows of the embedding (Megatron's padded vocabulary).
    norm_eps: epsilon of every RMSNorm, the MoM output norm included (fla has one).
    """

    pattern: str
    hidden_size: int
    ffn_hidden_size: int
    vocab_size: int
    num_attention_heads: int
    num_query_groups: int
    max_position_embeddings: int
    norm_eps: float
    tie_embeddings: bool
    mom: MoMConfig
    init_method_std: float = 0.02

    @property
    def num_layers(self) -> int:
        return len(self.pattern)

    @property
    def attention_head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def differences(self, other: "GPTDescription") -> List[str]:
        """'name: mine vs other' for every field that differs."""
        return [f"{f.name}: {getattr(self, f.name)!r} vs {getattr(other, f.name)!r}"
                for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


# ------------------------------------------------------------------ what fla cannot express
@dataclass
class MegatronSettings:
    """The Megatron settings that decide whether fla's model can hold a GPT, and `names`: how
    the user sets each one (a config key or a Megatron-LM flag), for the refusal messages."""

    normalization: str = "RMSNorm"
    layernorm_epsilon: float = 1e-5
    zero_centered_gamma: bool = False
    swiglu: bool = True
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    post_layernorm_residual: bool = False
    kv_channels: Optional[int] = None
    position_embedding_type: str = "rope"
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    rotary_interleaved: bool = False
    rope_scaling: bool = False
    num_experts: Optional[int] = None
    mtp_num_layers: Optional[int] = None
    names: Dict[str, str] = field(default_factory=dict)


def unexpressible(settings: MegatronSettings, desc: GPTDescription) -> List[str]:
    """Why fla's `MomForCausalLM` cannot hold this GPT (empty: it can)."""
    s, name = settings, (lambda key: settings.names.get(key, key))
    problems: List[str] = []

    def need(ok: bool, message: str):
        if not ok:
            problems.append(message)

    need(s.normalization == "RMSNorm", f"{name('normalization')} is {s.normalization!r}: "
         f"fla's blocks use RMSNorm")
    need(not s.zero_centered_gamma, f"{name('zero_centered_gamma')}: fla's RMSNorm scales by "
         f"its weight, not 1 + weight")
    need(s.swiglu, f"{name('swiglu')} is off: fla's MLP is SwiGLU (gate_proj, up_proj, "
         f"down_proj with SiLU)")
    need(not s.add_bias_linear, f"{name('add_bias_linear')}: fla's linear layers have no biases")
    need(not s.post_layernorm_residual, f"{name('post_layernorm_residual')}: fla adds the "
         f"residual before the norm")
    need(not s.num_experts, f"{name('num_experts')} ({s.num_experts}): fla's MoM MLPs are dense")
    need(not s.mtp_num_layers, f"{name('mtp_num_layers')} ({s.mtp_num_layers}): fla's model "
         f"has no multi-token-prediction layers")
    if "M" in desc.pattern:
        need(s.layernorm_epsilon == desc.mom.norm_eps,
             f"{name('layernorm_epsilon')} ({s.layernorm_epsilon:g}) differs from "
             f"{name('mom.norm_eps')} ({desc.mom.norm_eps:g}): fla's MomConfig has one norm_eps "
             f"for the block norms and the MoM output norm; train with the two equal")
    if "A" in desc.pattern:
        _attention_problems(s, desc, name, need)
    else:
        need(s.position_embedding_type in ("rope", "none"),
             f"{name('position_embedding_type')} is {s.position_embedding_type!r}: fla's MoM "
             f"model has no position embeddings")
    return problems


def _attention_problems(s: MegatronSettings, desc: GPTDescription, name, need) -> None:
    heads, groups = desc.num_attention_heads, desc.num_query_groups
    need(s.position_embedding_type == "rope", f"{name('position_embedding_type')} is "
         f"{s.position_embedding_type!r}: fla's attention layers use rotary embeddings")
    need(s.rotary_base == FLA_ROPE_THETA, f"{name('rotary_base')} is {s.rotary_base:g}: fla's "
         f"MomBlock builds attention with rotary base {FLA_ROPE_THETA:g} whatever attn.rope_theta "
         f"says")
    need(s.rotary_percent == 1.0, f"{name('rotary_percent')} is {s.rotary_percent}: fla rotates "
         f"the whole head")
    need(not s.rotary_interleaved, f"{name('rotary_interleaved')}: fla rotates halves "
         f"(GPT-NeoX style), not interleaved pairs")
    need(not s.rope_scaling, f"{name('rope_scaling')}: fla's attention has no RoPE scaling")
    need(not s.add_qkv_bias, f"{name('add_qkv_bias')}: fla's MomBlock builds attention "
         f"without q/k/v biases")
    need(not s.qk_layernorm, f"{name('qk_layernorm')}: fla's MomBlock builds attention "
         f"without q/k norms")
    need(desc.hidden_size % heads == 0 and heads % groups == 0,
         f"{name('num_attention_heads')} ({heads}) must divide the hidden size "
         f"({desc.hidden_size}) and be a multiple of {name('num_query_groups')} ({groups})")
    head_dim = s.kv_channels if s.kv_channels is not None else desc.attention_head_dim
    need(head_dim * heads == desc.hidden_size, f"{name('kv_channels')} is {head_dim}: fla's "
         f"attention heads are hidden_size / num_heads = {desc.attention_head_dim} wide")


def refuse(problems: List[str], what: str) -> None:
    if problems:
        raise ConversionError(f"{what} cannot be expressed as fla's MomForCausalLM:\n  - "
                              + "\n  - ".join(problems))


# ------------------------------------------------------------------ fla's MomConfig
def fla_config(desc: GPTDescription, dtype: torch.dtype,
               token_ids: Optional[dict] = None) -> dict:
    """config.json of fla's `MomForCausalLM` for this model."""
    mom = desc.mom
    attn_layers = [i for i, s in enumerate(desc.pattern) if s == "A"]
    attn = None
    if attn_layers:
        attn = {"layers": attn_layers, "num_heads": desc.num_attention_heads,
                "num_kv_heads": desc.num_query_groups, "qkv_bias": False, "window_size": None,
                "rope_theta": FLA_ROPE_THETA}
    config = {
        "architectures": ["MomForCausalLM"], "model_type": "mom",
        "vocab_size": desc.vocab_size, "hidden_size": desc.hidden_size,
        "num_hidden_layers": desc.num_layers, "intermediate_size": desc.ffn_hidden_size,
        "hidden_act": "swish", "norm_eps": desc.norm_eps,
        "max_position_embeddings": desc.max_position_embeddings,
        "tie_word_embeddings": desc.tie_embeddings, "initializer_range": desc.init_method_std,
        "attn_mode": "chunk", "mom_backend": "gated_deltanet", "num_heads": mom.num_heads,
        "head_dim": mom.head_dim, "expand_v": mom.expand_v, "conv_size": mom.conv_size,
        "use_short_conv": True, "use_output_gate": mom.use_output_gate,
        "num_memories": mom.num_memories, "topk": mom.topk, "shared_mem": mom.shared_memory,
        "single_kv_proj": False, "aux_loss_scale": mom.aux_loss_coeff, "attn": attn,
        "torch_dtype": DTYPE_NAMES[dtype], "use_cache": True,
    }
    config.update(token_ids or {})
    return config


def _intermediate_size(config: dict) -> int:
    """fla's GatedMLP rule when intermediate_size is not given (a multiple of 256 near
    2/3 * hidden_ratio * hidden_size)."""
    if config.get("intermediate_size") is not None:
        return int(config["intermediate_size"])
    ratio = config.get("hidden_ratio") or 4
    size = int(config["hidden_size"] * ratio * 2 / 3)
    return 256 * ((size + 255) // 256)


def _attn_specs(config: dict, num_layers: int) -> Tuple[str, int, int]:
    """(pattern, num_heads, num_kv_heads) from the attn section (one dict or a list)."""
    attn = config.get("attn")
    specs = [] if attn is None else ([attn] if isinstance(attn, dict) else list(attn))
    pattern = ["M"] * num_layers
    heads = set()
    for spec in specs:
        bad = {k: spec[k] for k in ("qkv_bias", "window_size", "qk_norm") if spec.get(k)}
        if spec.get("rope_theta", FLA_ROPE_THETA) != FLA_ROPE_THETA:
            bad["rope_theta"] = spec["rope_theta"]
        if bad:
            raise ConversionError(f"attn section sets {bad}: our attention layers have no "
                                  f"biases, windows or q/k norms and use rotary base "
                                  f"{FLA_ROPE_THETA:g} (as fla's MomBlock does)")
        for layer in spec["layers"]:
            if not 0 <= layer < num_layers or pattern[layer] == "A":
                raise ConversionError(f"attn.layers: layer {layer} is out of range or listed "
                                      f"twice (num_hidden_layers = {num_layers})")
            pattern[layer] = "A"
        heads.add((spec["num_heads"], spec.get("num_kv_heads") or spec["num_heads"]))
    if len(heads) > 1:
        raise ConversionError(f"attn: attention layers with different head counts {heads}; "
                              f"Megatron's attention layers share num_attention_heads")
    # Without attention layers the count is unused, but Megatron wants it to divide the hidden
    # size and to be a multiple of the TP size, as the MoM head count must be.
    mom_heads = config.get("num_heads", 4)
    unused = mom_heads if config["hidden_size"] % mom_heads == 0 else 1
    num_heads, kv_heads = heads.pop() if heads else (unused, unused)
    return "".join(pattern), int(num_heads), int(kv_heads)


def describe_fla(config: dict, mom_overrides: Optional[dict] = None) -> GPTDescription:
    """The GPT a `MomConfig` (config.json as a dict) describes; `mom_overrides` sets the
    execution fields of MoMConfig (backend, chunk_size, ...) that fla's config does not hold."""
    if config.get("model_type") != "mom":
        raise ConversionError(f"config.json: model_type is {config.get('model_type')!r}, not "
                              f"'mom' (fla's MomConfig)")
    fixed = {"mom_backend": "gated_deltanet", "single_kv_proj": False, "use_short_conv": True,
             "hidden_act": "swish", "attnres_block_size": None}
    for key, want in fixed.items():
        if config.get(key, want) != want:
            raise ConversionError(f"config.json: {key} = {config[key]!r} has no counterpart in "
                                  f"our MoM layer (only {key} = {want!r})")
    num_layers = int(config["num_hidden_layers"])
    pattern, heads, kv_heads = _attn_specs(config, num_layers)
    try:
        mom = MoMConfig(num_memories=config.get("num_memories", 4), topk=config.get("topk", 2),
                        shared_memory=config.get("shared_mem", True),
                        num_heads=config.get("num_heads", 4), head_dim=config.get("head_dim", 256),
                        expand_v=config.get("expand_v", 1.0), conv_size=config.get("conv_size", 4),
                        use_output_gate=config.get("use_output_gate", True),
                        norm_eps=config.get("norm_eps", 1e-6),
                        aux_loss_coeff=config.get("aux_loss_scale", 0.01),
                        **(mom_overrides or {}))
    except (TypeError, ValueError) as err:
        raise ConversionError(f"config.json: {err}") from None
    return GPTDescription(
        pattern=pattern, hidden_size=int(config["hidden_size"]),
        ffn_hidden_size=_intermediate_size(config), vocab_size=int(config["vocab_size"]),
        num_attention_heads=heads, num_query_groups=kv_heads,
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        norm_eps=float(config.get("norm_eps", 1e-6)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)), mom=mom,
        init_method_std=float(config.get("initializer_range", 0.02)))


# ------------------------------------------------------------------ key and shape accounting
def _non_mom_shapes(desc: GPTDescription) -> Dict[str, tuple]:
    """Every fla tensor outside the MoM layers, with its shape."""
    D, F, V = desc.hidden_size, desc.ffn_hidden_size, desc.vocab_size
    shapes = {"model.embeddings.weight": (V, D), "model.norm.weight": (D,)}
    if not desc.tie_embeddings:
        shapes["lm_head.weight"] = (V, D)
    d = desc.attention_head_dim
    for i, symbol in enumerate(desc.pattern):
        p = f"model.layers.{i}."
        shapes.update({p + "attn_norm.weight": (D,), p + "mlp_norm.weight": (D,),
                       p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                       p + "mlp.down_proj.weight": (D, F)})
        if symbol == "A":
            nq, nkv = desc.num_attention_heads, desc.num_query_groups
            shapes.update({p + "attn.q_proj.weight": (nq * d, D),
                           p + "attn.k_proj.weight": (nkv * d, D),
                           p + "attn.v_proj.weight": (nkv * d, D),
                           p + "attn.o_proj.weight": (D, nq * d)})
    return shapes


def _mom_prefixes(desc: GPTDescription) -> List[str]:
    return [f"model.layers.{i}.attn." for i, s in enumerate(desc.pattern) if s == "M"]


def check_fla_state(state: StateDict, desc: GPTDescription) -> None:
    """Raise unless `state` holds exactly fla's tensors for `desc`, each of the right shape and
    all of one floating dtype (the MoM layers are checked by `from_official_mom`)."""
    shapes = _non_mom_shapes(desc)
    prefixes = tuple(_mom_prefixes(desc))
    outside = {k for k in state if not k.startswith(prefixes)}
    missing, unexpected = sorted(set(shapes) - outside), sorted(outside - set(shapes))
    if missing or unexpected:
        raise ConversionError(f"the weights do not match the config: missing {missing}, "
                              f"unexpected {unexpected}")
    wrong = [f"{k} {tuple(state[k].shape)} (expected {shapes[k]})" for k in shapes
             if tuple(state[k].shape) != shapes[k]]
    if wrong:
        raise ConversionError(f"tensors of the wrong shape for the config: {wrong}")
    for prefix in prefixes:
        try:
            from_official_mom(state, desc.mom, prefix=prefix)
        except (KeyError, ValueError) as err:
            raise ConversionError(f"MoM layer {prefix!r}: {err}") from None
    dtypes = {t.dtype for t in state.values()}
    if not dtypes <= set(DTYPE_NAMES):
        raise ConversionError(f"the weights must be float32, bfloat16 or float16; found "
                              f"{sorted(map(str, dtypes))}")


# ------------------------------------------------------------------ Megatron <-> fla tensors
class _Taker:
    """Hands out the tensors of a state dict once each and reports what was never taken."""

    def __init__(self, state: StateDict, side: str):
        self.remaining, self.side = dict(state), side

    def take(self, key: str) -> Tensor:
        if key not in self.remaining:
            raise ConversionError(f"{self.side}: tensor {key!r} is missing")
        return self.remaining.pop(key)

    def take_prefix(self, prefix: str) -> StateDict:
        keys = [k for k in self.remaining if k.startswith(prefix)]
        return {k[len(prefix):]: self.remaining.pop(k) for k in keys}

    def finish(self) -> None:
        if self.remaining:
            raise ConversionError(f"{self.side}: tensors with no place in the other format: "
                                  f"{sorted(self.remaining)}")


def _split_qkv(qkv: Tensor, desc: GPTDescription) -> Tuple[Tensor, Tensor, Tensor]:
    """Megatron's fused QKV rows are grouped by query group: [q heads of group g, k_g, v_g]."""
    groups, d = desc.num_query_groups, desc.attention_head_dim
    per_group = desc.num_attention_heads // groups
    grouped = qkv.reshape(groups, (per_group + 2) * d, qkv.shape[-1])
    q, k, v = grouped.split([per_group * d, d, d], dim=1)
    return tuple(t.reshape(-1, qkv.shape[-1]).clone() for t in (q, k, v))


def _join_qkv(q: Tensor, k: Tensor, v: Tensor, desc: GPTDescription) -> Tensor:
    groups, hidden = desc.num_query_groups, q.shape[-1]
    parts = [t.reshape(groups, -1, hidden) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, hidden)


def _check_mom_round_trip(ours: StateDict, official: StateDict, desc: GPTDescription,
                          prefix: str) -> None:
    """The layer converter's inverse must give back exactly what it was given."""
    back = from_official_mom(official, desc.mom, prefix=prefix)
    if set(back) != set(ours):
        raise ConversionError(f"{prefix}: MoM layer tensors {sorted(set(ours) - set(back))} "
                              f"have no official counterpart")
    bad = [k for k in ours if back[k].shape != ours[k].shape or not torch.equal(back[k], ours[k])]
    if bad:
        raise ConversionError(f"{prefix}: MoM layer tensors {bad} do not match this MoMConfig")


def megatron_to_fla(state: StateDict, desc: GPTDescription) -> StateDict:
    """GPTModel state dict at TP = 1 (tensors only, layers keyed by global index) -> fla."""
    src = _Taker(state, "Megatron checkpoint")
    out = {"model.embeddings.weight": src.take("embedding.word_embeddings.weight")}
    F = desc.ffn_hidden_size
    for i, symbol in enumerate(desc.pattern):
        ours, theirs = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[theirs + "attn_norm.weight"] = src.take(ours + "input_layernorm.weight")
        out[theirs + "mlp_norm.weight"] = src.take(ours + "pre_mlp_layernorm.weight")
        fc1 = src.take(ours + "mlp.linear_fc1.weight")
        if fc1.shape[0] != 2 * F:
            raise ConversionError(f"{ours}mlp.linear_fc1.weight has {fc1.shape[0]} rows, "
                                  f"expected 2 * ffn_hidden_size = {2 * F} (SwiGLU)")
        out[theirs + "mlp.gate_proj.weight"] = fc1[:F].clone()
        out[theirs + "mlp.up_proj.weight"] = fc1[F:].clone()
        out[theirs + "mlp.down_proj.weight"] = src.take(ours + "mlp.linear_fc2.weight")
        if symbol == "M":
            layer = src.take_prefix(ours + "self_attention.")
            official = to_official_mom(layer, desc.mom, prefix=theirs + "attn.")
            _check_mom_round_trip(layer, official, desc, theirs + "attn.")
            out.update(official)
        else:
            q, k, v = _split_qkv(src.take(ours + "self_attention.linear_qkv.weight"), desc)
            out.update({theirs + "attn.q_proj.weight": q, theirs + "attn.k_proj.weight": k,
                        theirs + "attn.v_proj.weight": v,
                        theirs + "attn.o_proj.weight":
                            src.take(ours + "self_attention.linear_proj.weight")})
    out["model.norm.weight"] = src.take("decoder.final_layernorm.weight")
    if not desc.tie_embeddings:
        out["lm_head.weight"] = src.take("output_layer.weight")
    src.finish()
    check_fla_state(out, desc)
    return out


def fla_to_megatron(state: StateDict, desc: GPTDescription) -> StateDict:
    """fla tensors -> GPTModel state dict at TP = 1 (the inverse of `megatron_to_fla`)."""
    check_fla_state(state, desc)
    src = _Taker(state, "Hugging Face weights")
    out = {"embedding.word_embeddings.weight": src.take("model.embeddings.weight")}
    for i, symbol in enumerate(desc.pattern):
        ours, theirs = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[ours + "input_layernorm.weight"] = src.take(theirs + "attn_norm.weight")
        out[ours + "pre_mlp_layernorm.weight"] = src.take(theirs + "mlp_norm.weight")
        out[ours + "mlp.linear_fc1.weight"] = torch.cat(
            [src.take(theirs + "mlp.gate_proj.weight"), src.take(theirs + "mlp.up_proj.weight")])
        out[ours + "mlp.linear_fc2.weight"] = src.take(theirs + "mlp.down_proj.weight")
        if symbol == "M":
            official = {theirs + "attn." + k: v
                        for k, v in src.take_prefix(theirs + "attn.").items()}
            layer = from_official_mom(official, desc.mom, prefix=theirs + "attn.")
            out.update({ours + "self_attention." + k: v for k, v in layer.items()})
        else:
            a = theirs + "attn."
            out[ours + "self_attention.linear_qkv.weight"] = _join_qkv(
                src.take(a + "q_proj.weight"), src.take(a + "k_proj.weight"),
                src.take(a + "v_proj.weight"), desc)
            out[ours + "self_attention.linear_proj.weight"] = src.take(a + "o_proj.weight")
    out["decoder.final_layernorm.weight"] = src.take("model.norm.weight")
    if not desc.tie_embeddings:
        out["output_layer.weight"] = src.take("lm_head.weight")
    src.finish()
    return out


# ------------------------------------------------------------------ Hugging Face folders
def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError("megatron-mom export/import need the safetensors package: "
                          "pip install safetensors (it comes with pip install megatron-mom)")
    return safetensors.torch


def parse_size(text: str) -> int:
    """'5GB' -> 5 * 10**9 bytes (Hugging Face's decimal units; 'GiB' for powers of two)."""
    units = {"KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "KB": 10 ** 3, "MB": 10 ** 6,
             "GB": 10 ** 9, "B": 1}
    upper = str(text).strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            try:
                return int(float(upper[:-len(unit)]) * factor)
            except ValueError:
                break
    if upper.isdigit():
        return int(upper)
    raise ConversionError(f"--max-shard-size {text!r}: give a size like 5GB, 500MB or 2GiB")


def _shards(state: StateDict, max_bytes: int) -> List[List[str]]:
    """Keys in order, cut into consecutive groups of at most max_bytes (a larger tensor alone)."""
    groups, current, size = [], [], 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    if current:
        groups.append(current)
    return groups


def write_fla_folder(out: Path, state: StateDict, config: dict, max_shard_bytes: int,
                     tokenizer_dir: Optional[Path] = None) -> List[str]:
    """config.json, model.safetensors (or shards + index), tokenizer files; returns the names
    written. The folder is built under a temporary name and renamed when complete."""
    st = _safetensors()
    out = Path(out)
    if out.exists():
        raise ConversionError(f"{out} exists; give a new folder (nothing is overwritten)")
    if tokenizer_dir:
        tokenizer_files(tokenizer_dir)            # refused before anything is written
    tmp = out.with_name(f".tmp_{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    groups = _shards(state, max_shard_bytes)
    written = [CONFIG_FILE]
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    names = ([WEIGHTS_FILE] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    for name, keys in zip(names, groups):
        # safetensors refuses tensors that share storage: each one gets its own copy.
        st.save_file({k: state[k].detach().contiguous().clone() for k in keys}, str(tmp / name),
                     metadata={"format": "pt"})
    written += names
    if len(groups) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: name for name, keys in zip(names, groups) for k in keys}}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        written.append(INDEX_FILE)
    written += copy_tokenizer_files(tokenizer_dir, tmp) if tokenizer_dir else []
    tmp.rename(out)
    return written


def tokenizer_files(source: Path) -> List[str]:
    """The Hugging Face tokenizer files in `source`; refuses a folder without any."""
    found = [name for name in TOKENIZER_FILES if (Path(source) / name).is_file()]
    if not found:
        raise ConversionError(f"tokenizer folder {source} has none of {list(TOKENIZER_FILES)}")
    return found


def copy_tokenizer_files(source: Path, dest: Path) -> List[str]:
    """Copy the Hugging Face tokenizer files found in `source`; refuse a folder without any."""
    source = Path(source)
    found = tokenizer_files(source)
    dest.mkdir(parents=True, exist_ok=True)
    for name in found:
        shutil.copyfile(source / name, dest / name)
    return found


def read_fla_folder(folder: Path) -> Tuple[dict, StateDict]:
    """(config.json as a dict, every tensor) of a Hugging Face MoM folder; safetensors only
    (pickled .bin weights would run code when loaded)."""
    st = _safetensors()
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise ConversionError(f"{folder} has no {CONFIG_FILE}; give a Hugging Face model folder")
    config = json.loads((folder / CONFIG_FILE).read_text())
    if (folder / INDEX_FILE).is_file():
        weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (folder / WEIGHTS_FILE).is_file():
        weight_map, files = None, [WEIGHTS_FILE]
    else:
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        hint = f" (found {pickled}: pickles, which we never load)" if pickled else ""
        raise ConversionError(f"{folder} has neither {WEIGHTS_FILE} nor {INDEX_FILE}{hint}")
    for name in files:
        if Path(name).name != name or not (folder / name).is_file():
            raise ConversionError(f"{INDEX_FILE} names {name!r}, which is not a file of {folder}")
    state: StateDict = {}
    for name in files:
        part = st.load_file(str(folder / name))
        twice = sorted(set(part) & set(state))
        if twice:
            raise ConversionError(f"tensors {twice} appear in more than one weights file")
        if weight_map is not None:
            misplaced = sorted(k for k in part if weight_map.get(k) != name)
            if misplaced:
                raise ConversionError(f"{name} holds {misplaced}, which {INDEX_FILE} places "
                                      f"elsewhere")
        state.update(part)
    if weight_map is not None and set(weight_map) != set(state):
        raise ConversionError(f"{INDEX_FILE} lists tensors not in any file: "
                              f"{sorted(set(weight_map) - set(state))}")
    return config, state


def state_dtype(state: StateDict) -> torch.dtype:
    """The one dtype of all tensors; float32 when they mix (e.g. fla's float32 norms beside
    bfloat16 weights): a Megatron model has one parameter dtype, and upcasting is exact."""
    dtypes = {t.dtype for t in state.values()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def describe_for_log(desc: GPTDescription) -> str:
    mom = desc.mom
    attention = (f", attention {desc.num_attention_heads} heads / {desc.num_query_groups} "
                 f"groups" if "A" in desc.pattern else "")
    return (f"{desc.pattern} ({desc.num_layers} layers, hidden {desc.hidden_size}, ffn "
            f"{desc.ffn_hidden_size}, vocab {desc.vocab_size}, MoM {mom.num_memories} memories "
            f"top-{mom.topk}{' + shared' if mom.shared_memory else ''}, {mom.num_heads} heads x "
            f"{mom.head_dim}{attention}, {'tied' if desc.tie_embeddings else 'untied'} "
            f"embeddings)")
