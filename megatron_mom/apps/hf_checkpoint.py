"""`megatron-mom export` and `megatron-mom import`: Megatron distributed checkpoints <->
Hugging Face `MomForCausalLM` folders (the tensor mapping is `megatron_mom.apps.hf`).

Export reads any model-parallel layout: the checkpoint's tensors are read whole (global shapes)
straight from its files, so no model is built and the TP/PP it was saved with does not matter;
layers saved stacked (Megatron-LM's homogeneous layout) or one by one, and Transformer Engine's
fused-norm names, are both read. The model's settings come from the run's `config.yaml`
(`megatron-mom train`) or from the `args` Megatron-LM keeps in `common.pt`.

Import writes one of two layouts:
- `megatron-lm`: a model-only checkpoint in Megatron-LM's `release` layout, which
  `pretrain_gpt.py --load` reads at any TP/PP (no optimizer or RNG state: Megatron-LM starts
  those fresh for a release checkpoint);
- `megatron-mom`: a complete `megatron-mom train` run directory (model, fresh optimizer and
  schedule, iteration 0) built at the chosen TP/PP, which `megatron-mom train --resume`
  continues. Run it under torchrun with TP * PP (* DP) processes, like training.

Nothing read here runs code: safetensors for Hugging Face weights, and for distributed
checkpoints `megatron_mom.train.safe_load` (`weights_only` loads, a restricted unpickler for
torch's `.metadata` index).
"""
from __future__ import annotations

import contextlib
import inspect
import json
import shutil
import struct
from pathlib import Path
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_mom.apps.hf import (
    CONFIG_FILE,
    DTYPE_NAMES,
    INDEX_FILE,
    WEIGHTS_FILE,
    ConversionError,
    GPTDescription,
    MegatronSettings,
    StateDict,
    copy_tokenizer_files,
    describe_fla,
    describe_for_log,
    fla_config,
    fla_to_megatron,
    megatron_to_fla,
    parse_size,
    read_fla_folder,
    refuse,
    state_dtype,
    tokenizer_files,
    unexpressible,
    write_fla_folder,
)

MEGATRON_LM_TRACKER = "latest_checkpointed_iteration.txt"
MEGATRON_LM_RELEASE = "release"
# Per-layer checkpoint keys (as `megatron-mom train` saves them); Megatron-LM reads the same
# content metadata back and builds its keys alike.
MODEL_METADATA = {"non_homogeneous_layers": True, "singleton_local_shards": False,
                  "chained_optim_avoid_prefix": True}
# Transformer Engine fuses the pre-attention and pre-MLP norms into the next linear layer.
TE_NORM_NAMES = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
                 "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}
PRESETS_MODULE = "megatron_mom.integrations.megatron_lm.presets"
PRECISION = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# ------------------------------------------------------------------ safe reading
def load_common(ckpt_dir: Path) -> dict:
    """`common.pt` of a distributed checkpoint, tensors and plain data only (Megatron-Core
    registers the few classes Megatron-LM stores there, argparse.Namespace among them)."""
    import megatron.core  # noqa: F401  (registers Megatron's safe globals)
    from megatron_mom.train.safe_load import COMMON_FILE, load_plain
    return load_plain(Path(ckpt_dir) / COMMON_FILE, str(Path(ckpt_dir) / COMMON_FILE))


# ------------------------------------------------------------------ where and what
def locate(path: str) -> Tuple[Path, str]:
    """(checkpoint directory, 'megatron-mom' or 'megatron-lm') for a run/save directory or one
    checkpoint directory."""
    from megatron_mom.train import checkpoint
    p = Path(path)
    tracker = p / MEGATRON_LM_TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        name = MEGATRON_LM_RELEASE if text == MEGATRON_LM_RELEASE else f"iter_{int(text):07d}"
        return p / name, "megatron-lm"
    if (p / "common.pt").is_file() and not (p / checkpoint.CONFIG_FILE).is_file():
        return p, "megatron-lm"
    try:
        return checkpoint.resolve_checkpoint(path), "megatron-mom"
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no checkpoint at {path!r}: give a megatron-mom run directory (or its checkpoints/ "
            f"or an iter_* folder), or a Megatron-LM --save directory (or one of its "
            f"iter_*/release folders)") from None


def _gpt_model_default(name: str):
    from megatron.core.models.gpt import GPTModel
    return inspect.signature(GPTModel.__init__).parameters[name].default


def describe_run(cfg) -> Tuple[GPTDescription, MegatronSettings]:
    """The model a `megatron-mom train` RunConfig builds (train/build.py)."""
    from megatron_mom.train import build
    tc = build.transformer_config(cfg, on_cpu=True)
    fixed = "fixed by megatron-mom train"
    settings = MegatronSettings(
        normalization=tc.normalization, layernorm_epsilon=tc.layernorm_epsilon,
        zero_centered_gamma=tc.layernorm_zero_centered_gamma,
        swiglu=tc.gated_linear_unit and tc.activation_func is torch.nn.functional.silu,
        add_bias_linear=tc.add_bias_linear, add_qkv_bias=tc.add_qkv_bias,
        qk_layernorm=tc.qk_layernorm,
        post_layernorm_residual=tc.apply_residual_connection_post_layernorm,
        kv_channels=tc.kv_channels, position_embedding_type="rope",
        rotary_base=float(_gpt_model_default("rotary_base")),
        rotary_percent=float(_gpt_model_default("rotary_percent")),
        rotary_interleaved=tc.rotary_interleaved, num_experts=tc.num_moe_experts,
        mtp_num_layers=tc.mtp_num_layers,
        names={"layernorm_epsilon": f"the block norms' epsilon ({fixed})",
               "mom.norm_eps": "mom.norm_eps (--set mom.norm_eps=...)",
               "num_attention_heads": "model.num_attention_heads"})
    m = cfg.model
    desc = GPTDescription(
        pattern=m.pattern, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        vocab_size=build.VOCAB_SIZE, num_attention_heads=m.num_attention_heads,
        num_query_groups=tc.num_query_groups or m.num_attention_heads,
        max_position_embeddings=m.seq_length, norm_eps=tc.layernorm_epsilon,
        tie_embeddings=m.tie_embeddings, mom=cfg.mom_config(), init_method_std=m.init_method_std)
    return desc, settings


MEGATRON_LM_FLAGS = {
    "normalization": "--normalization", "layernorm_epsilon": "--norm-epsilon",
    "zero_centered_gamma": "--apply-layernorm-1p", "swiglu": "--swiglu",
    "add_bias_linear": "bias in linear layers (no --disable-bias-linear)",
    "add_qkv_bias": "--add-qkv-bias", "qk_layernorm": "--qk-layernorm",
    "post_layernorm_residual": "--apply-residual-connection-post-layernorm",
    "kv_channels": "--kv-channels", "position_embedding_type": "--position-embedding-type",
    "rotary_base": "--rotary-base", "rotary_percent": "--rotary-percent",
    "rotary_interleaved": "--rotary-interleaved", "rope_scaling": "--use-rope-scaling",
    "num_experts": "--num-experts", "mtp_num_layers": "--mtp-num-layers",
    "mom.norm_eps": "--mom-norm-eps", "mom.conv_size": "--mom-conv-size",
    "num_attention_heads": "--num-attention-heads", "num_query_groups": "--num-query-groups",
}


def describe_megatron_lm(args) -> Tuple[GPTDescription, MegatronSettings]:
    """The model Megatron-LM's `pretrain_gpt.py` built from `args` (its parsed flags) with the
    megatron-mom presets."""
    from megatron_mom.integrations.megatron_lm.args import mom_config_from_args
    from megatron_mom.integrations.megatron_lm.presets import default_pattern
    from megatron_mom._moved import new_name
    spec = getattr(args, "spec", None)
    # checkpoints trained before the move name the presets by their old path
    if not spec or (new_name(spec[0]) or spec[0]) != PRESETS_MODULE:
        raise ConversionError(f"this Megatron-LM checkpoint was not trained with the megatron-mom "
                              f"presets (--spec {PRESETS_MODULE} mom|hybrid); its --spec is "
                              f"{spec!r}")
    get = lambda name, default=None: getattr(args, name, default)
    pattern = get("mom_layer_pattern") or default_pattern(spec[1], args.num_layers)
    heads = args.num_attention_heads
    settings = MegatronSettings(
        normalization=get("normalization", "LayerNorm"),
        layernorm_epsilon=get("norm_epsilon", 1e-5),
        zero_centered_gamma=bool(get("apply_layernorm_1p", False)), swiglu=bool(get("swiglu")),
        add_bias_linear=get("add_bias_linear", True), add_qkv_bias=bool(get("add_qkv_bias")),
        qk_layernorm=bool(get("qk_layernorm")),
        post_layernorm_residual=bool(get("apply_residual_connection_post_layernorm")),
        kv_channels=get("kv_channels"),
        position_embedding_type=get("position_embedding_type", "learned_absolute"),
        rotary_base=float(get("rotary_base", 10000)),
        rotary_percent=float(get("rotary_percent", 1.0)),
        rotary_interleaved=bool(get("rotary_interleaved")),
        rope_scaling=bool(get("use_rope_scaling"))
        or bool(get("rotary_seq_len_interpolation_factor")),
        num_experts=get("num_experts"), mtp_num_layers=get("mtp_num_layers"),
        names=MEGATRON_LM_FLAGS)
    try:
        mom = mom_config_from_args(args)
    except (RuntimeError, ValueError) as err:
        raise ConversionError(str(err)) from None
    desc = GPTDescription(
        pattern=pattern, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        vocab_size=get("padded_vocab_size") or args.vocab_size, num_attention_heads=heads,
        num_query_groups=(get("num_query_groups") or heads) if get("group_query_attention")
        else heads,
        max_position_embeddings=get("max_position_embeddings") or args.seq_length,
        norm_eps=settings.layernorm_epsilon,
        tie_embeddings=not get("untie_embeddings_and_output_weights", False), mom=mom,
        init_method_std=get("init_method_std", 0.02))
    return desc, settings


def _describe_checkpoint(ckpt_dir: Path, kind: str):
    """(description, settings, tokenizer folder or None, token ids for config.json)."""
    if kind == "megatron-mom":
        from megatron_mom.train import checkpoint
        checkpoint.verify_files(ckpt_dir)
        desc, settings = describe_run(checkpoint.saved_config(ckpt_dir))
        # Megatron's byte-level tokenizer: ids 0-255 are bytes, end of document is 0.
        return desc, settings, None, {"eos_token_id": 0, "bos_token_id": None,
                                      "pad_token_id": None}
    args = load_common(ckpt_dir).get("args")
    if args is None:
        raise ConversionError(f"{ckpt_dir}/common.pt holds no Megatron-LM `args`; cannot tell "
                              f"which model this checkpoint is")
    desc, settings = describe_megatron_lm(args)
    tokenizer = getattr(args, "tokenizer_model", None)
    local = (getattr(args, "tokenizer_type", None) == "HuggingFaceTokenizer" and tokenizer
             and Path(tokenizer).is_dir())
    return desc, settings, Path(tokenizer) if local else None, \
        dict(getattr(args, "hf_token_ids", None) or {})


# ------------------------------------------------------------------ reading tensors
def read_model_tensors(ckpt_dir: Path) -> StateDict:
    """Every model tensor of a distributed checkpoint, whole (global shape, saved dtype), by
    checkpoint key; optimizer states are skipped. Read through `safe_load.dist_load` (no code
    runs from the files); needs a process group (one process is enough)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from megatron_mom.train.safe_load import METADATA_FILE, dist_load, read_metadata
    index = read_metadata(Path(ckpt_dir) / METADATA_FILE).state_dict_metadata
    template = {key: ShardedTensor.from_rank_offsets(
                    key, torch.empty(tuple(meta.size), dtype=meta.properties.dtype), replica_id=0)
                for key, meta in index.items()
                if isinstance(meta, TensorStorageMetadata) and not key.startswith("optimizer.")}
    loaded = dist_load(template, Path(ckpt_dir))
    return {key: loaded[key] for key in template}


def _unstack_layers(tensors: StateDict, num_layers: int) -> StateDict:
    """Megatron-LM saves homogeneous layers stacked ('decoder.layers.<name>' with a leading
    layer axis); give every layer its own keys."""
    out = {}
    for key, tensor in tensors.items():
        parts = key.split(".")
        if key.startswith("decoder.layers.") and not parts[2].isdigit():
            if tensor.shape[0] != num_layers:
                raise ConversionError(f"{key} stacks {tensor.shape[0]} layers, the model has "
                                      f"{num_layers}")
            rest = ".".join(parts[2:])
            out.update({f"decoder.layers.{i}.{rest}": tensor[i] for i in range(num_layers)})
        else:
            out[key] = tensor
    return out


def _local_norm_names(tensors: StateDict) -> StateDict:
    out = {}
    for key, tensor in tensors.items():
        for te_name, local in TE_NORM_NAMES.items():
            if key.endswith("." + te_name) and key.startswith("decoder.layers."):
                key = key[: -len(te_name)] + local
                break
        if key in out:
            raise ConversionError(f"the checkpoint holds {key} twice (under its Transformer "
                                  f"Engine and its local name)")
        out[key] = tensor
    return out


def _join_in_proj(tensors: StateDict, desc: GPTDescription) -> StateDict:
    """Our layers checkpoint their packed input projection per section (q, gate, k.0, ...):
    put each MoM layer's sections back together in `in_proj_sections` order."""
    from megatron_mom.layer.mixer import in_proj_sections
    out = dict(tensors)
    for i, symbol in enumerate(desc.pattern):
        if symbol != "M":
            continue
        prefix = f"decoder.layers.{i}.self_attention.in_proj.weight"
        names = [name for name, _ in in_proj_sections(desc.mom, 1)]
        missing = [n for n in names if f"{prefix}.{n}" not in out]
        if missing:
            raise ConversionError(f"{prefix}: sections {missing} are not in the checkpoint; was "
                                  f"it saved with another MoM configuration?")
        out[prefix] = torch.cat([out.pop(f"{prefix}.{n}") for n in names])
    return out


def checkpoint_state(ckpt_dir: Path, desc: GPTDescription) -> StateDict:
    """The GPT's TP = 1 state dict (tensors only) from a distributed checkpoint of any layout."""
    tensors = _unstack_layers(read_model_tensors(ckpt_dir), desc.num_layers)
    return _join_in_proj(_local_norm_names(tensors), desc)


# ------------------------------------------------------------------ export
def export(checkpoint_path: str, out: str, max_shard_size: str = "5GB",
           tokenizer: Optional[str] = None) -> str:
    """Write a Hugging Face MomForCausalLM folder for a Megatron checkpoint; returns a summary."""
    from megatron_mom.train import build
    ckpt_dir, kind = locate(checkpoint_path)
    desc, settings, tokenizer_dir, token_ids = _describe_checkpoint(ckpt_dir, kind)
    refuse(unexpressible(settings, desc), f"the model of {ckpt_dir}")
    max_bytes = parse_size(max_shard_size)
    if tokenizer is not None:
        tokenizer_dir = Path(tokenizer)
        tokenizer_files(tokenizer_dir)            # refused before the weights are read
    if Path(out).exists():
        raise ConversionError(f"{out} exists; give a new folder (nothing is overwritten)")
    build.init_process_groups(1, 1)
    state = megatron_to_fla(checkpoint_state(ckpt_dir, desc), desc)
    dtype = state_dtype(state)
    written = write_fla_folder(Path(out), state, fla_config(desc, dtype, token_ids), max_bytes,
                               tokenizer_dir)
    note = ("" if tokenizer_dir else "\nno tokenizer files: " + (
        "the run used Megatron's byte-level tokenizer (token id = byte, end of document = 0)"
        if kind == "megatron-mom" else "pass --tokenizer DIR to add them"))
    return (f"exported {ckpt_dir} ({kind}): {describe_for_log(desc)}, "
            f"{sum(t.numel() for t in state.values()):,} parameters in {len(state)} tensors, "
            f"{DTYPE_NAMES[dtype]} -> {out}: {', '.join(written)}{note}")


# ------------------------------------------------------------------ import
def build_gpt(desc: GPTDescription, dtype: torch.dtype):
    """A TP = 1, PP = 1 GPTModel (local spec, on the CPU, not initialised) for `desc`."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig
    from megatron_mom.testing import cpu
    from megatron_mom.layer.specs import get_hybrid_block_spec, mixes_layer_kinds
    overrides = cpu.megatron_cpu_config_overrides()
    overrides.update(use_cpu_initialization=True, perform_initialization=False)
    config = TransformerConfig(
        num_layers=desc.num_layers, hidden_size=desc.hidden_size,
        ffn_hidden_size=desc.ffn_hidden_size, num_attention_heads=desc.num_attention_heads,
        num_query_groups=desc.num_query_groups, normalization="RMSNorm",
        layernorm_epsilon=desc.norm_eps, add_bias_linear=False, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=desc.init_method_std, params_dtype=dtype,
        hetereogenous_dist_checkpoint=mixes_layer_kinds(desc.pattern), **overrides)
    spec = get_hybrid_block_spec(config, desc.pattern, desc.mom, backend="local")
    return GPTModel(config, spec, vocab_size=desc.vocab_size,
                    max_sequence_length=desc.max_position_embeddings,
                    share_embeddings_and_output_weights=desc.tie_embeddings,
                    position_embedding_type="rope")


def _load_exactly(gpt, state: StateDict) -> None:
    """load_state_dict(strict=True): the converted keys must be exactly the model's (the
    linear layers' `_extra_state` entries hold None and are taken from the model itself)."""
    extra = {k: v for k, v in gpt.state_dict().items() if k.endswith("_extra_state")}
    try:
        gpt.load_state_dict({**state, **extra}, strict=True)
    except RuntimeError as err:
        raise ConversionError(f"the converted weights do not fit the Megatron model: {err}") \
            from None


def _te_key(key: str, pattern: str) -> str:
    """A local-spec checkpoint key -> the key Transformer Engine layers use for it."""
    parts = key.split(".")
    if key.startswith("decoder.layers.") and parts[2].isdigit():
        rest = ".".join(parts[3:])
        if rest == "pre_mlp_layernorm.weight":
            return ".".join(parts[:3] + ["mlp.linear_fc1.layer_norm_weight"])
        if rest == "input_layernorm.weight" and pattern[int(parts[2])] == "A":
            return ".".join(parts[:3] + ["self_attention.linear_qkv.layer_norm_weight"])
    return key


def _rename_for_te(sharded: dict, pattern: str) -> None:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    for value in sharded.values():
        if isinstance(value, ShardedTensor):
            value.key = _te_key(value.key, pattern)


def save_weights(state: StateDict, desc: GPTDescription, directory: Path, dtype: torch.dtype,
                 common: Optional[dict] = None, te_names: bool = False) -> None:
    """A model-only distributed checkpoint of `state` (collective over the process group, whose
    Megatron parallel state must be TP = PP = 1; rank 0's model is the one written)."""
    from megatron.core import dist_checkpointing
    gpt = build_gpt(desc, dtype)
    if dist.get_rank() == 0:
        _load_exactly(gpt, state)
    sharded = gpt.sharded_state_dict(metadata=dict(MODEL_METADATA))
    if te_names:
        _rename_for_te(sharded, desc.pattern)
    if dist.get_rank() == 0:
        Path(directory).mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save({"model": sharded, **(common or {})}, str(directory),
                            content_metadata=dict(MODEL_METADATA))
    dist.barrier()
    if dist.get_rank() == 0:     # what megatron-mom's loader checks the folder against
        from megatron_mom.train import checkpoint
        checkpoint.write_manifest(directory)
    dist.barrier()


TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _read_hf(hf_dir: str, with_tensors: bool, mom_overrides: Optional[dict] = None):
    """(description, tensors or None, the config's token ids) of a Hugging Face folder."""
    config, state = read_fla_folder(Path(hf_dir)) if with_tensors else (None, None)
    if config is None:
        path = Path(hf_dir) / CONFIG_FILE
        if not path.is_file():
            raise ConversionError(f"{hf_dir} has no {CONFIG_FILE}; give a Hugging Face folder")
        config = json.loads(path.read_text())
    token_ids = {k: config[k] for k in TOKEN_ID_KEYS if k in config}
    return describe_fla(config, mom_overrides), state, token_ids


def megatron_lm_flags(desc: GPTDescription, te: bool) -> List[str]:
    """The pretrain_gpt.py flags that build this model with the megatron-mom presets."""
    mom = desc.mom
    flags = ["--spec", PRESETS_MODULE, "hybrid" if "A" in desc.pattern else "mom",
             "--num-layers", str(desc.num_layers), "--hidden-size", str(desc.hidden_size),
             "--ffn-hidden-size", str(desc.ffn_hidden_size),
             "--num-attention-heads", str(desc.num_attention_heads),
             "--max-position-embeddings", str(desc.max_position_embeddings),
             "--normalization", "RMSNorm", "--norm-epsilon", repr(desc.norm_eps), "--swiglu",
             "--disable-bias-linear", "--position-embedding-type", "rope",
             "--transformer-impl", "transformer_engine" if te else "local",
             "--mom-layer-pattern", desc.pattern, "--mom-num-memories", str(mom.num_memories),
             "--mom-topk", str(mom.topk), "--mom-num-heads", str(mom.num_heads),
             "--mom-head-dim", str(mom.head_dim), "--mom-expand-v", repr(mom.expand_v),
             "--mom-conv-size", str(mom.conv_size), "--mom-norm-eps", repr(mom.norm_eps),
             "--mom-aux-loss-coeff", repr(mom.aux_loss_coeff)]
    flags.append("--mom-shared-memory" if mom.shared_memory else "--no-mom-shared-memory")
    flags.append("--mom-output-gate" if mom.use_output_gate else "--no-mom-output-gate")
    if desc.num_query_groups != desc.num_attention_heads:
        flags += ["--group-query-attention", "--num-query-groups", str(desc.num_query_groups)]
    if not desc.tie_embeddings:
        flags.append("--untie-embeddings-and-output-weights")
    return flags


def megatron_lm_args(desc: GPTDescription, te: bool, token_ids: Optional[dict] = None):
    """The `args` Megatron-LM keeps in a checkpoint, for the settings that shape this model
    (what `check_checkpoint_args` compares and `describe_megatron_lm` reads back), plus the
    Hugging Face token ids (`hf_token_ids`, which only `export` reads)."""
    import argparse
    from megatron_mom.integrations.megatron_lm.args import FLAGS
    args = argparse.Namespace(
        num_layers=desc.num_layers, hidden_size=desc.hidden_size,
        ffn_hidden_size=desc.ffn_hidden_size, num_attention_heads=desc.num_attention_heads,
        group_query_attention=desc.num_query_groups != desc.num_attention_heads,
        num_query_groups=desc.num_query_groups, kv_channels=desc.attention_head_dim,
        max_position_embeddings=desc.max_position_embeddings,
        seq_length=desc.max_position_embeddings, padded_vocab_size=desc.vocab_size,
        vocab_size=desc.vocab_size, normalization="RMSNorm", norm_epsilon=desc.norm_eps,
        swiglu=True, add_bias_linear=False, add_qkv_bias=False, qk_layernorm=False,
        apply_layernorm_1p=False, apply_residual_connection_post_layernorm=False,
        position_embedding_type="rope", add_position_embedding=True, rotary_base=10000,
        rotary_percent=1.0, rotary_interleaved=False, use_rope_scaling=False,
        untie_embeddings_and_output_weights=not desc.tie_embeddings,
        init_method_std=desc.init_method_std, num_experts=None, mtp_num_layers=None,
        spec=[PRESETS_MODULE, "hybrid" if "A" in desc.pattern else "mom"],
        mom_layer_pattern=desc.pattern, tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        transformer_impl="transformer_engine" if te else "local",
        hf_token_ids=dict(token_ids or {}))
    for field in FLAGS.values():
        setattr(args, f"mom_{field}", getattr(desc.mom, field))
    return args


def import_megatron_lm(hf_dir: str, out: str, transformer_impl: str = "local") -> str:
    """HF folder -> Megatron-LM `--save`-style directory holding a `release` checkpoint."""
    from megatron_mom.train import build
    if transformer_impl not in ("local", "transformer_engine"):
        raise ConversionError(f"--transformer-impl must be local or transformer_engine, got "
                              f"{transformer_impl!r}")
    desc, hf_state, token_ids = _read_hf(hf_dir, with_tensors=True)
    state = fla_to_megatron(hf_state, desc)
    root = Path(out)
    if root.exists():
        raise ConversionError(f"{out} exists; give a new directory (nothing is overwritten)")
    build.init_process_groups(1, 1)
    tmp = root.with_name(f".tmp_{root.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtype = state_dtype(state)
    te = transformer_impl == "transformer_engine"
    common = {"checkpoint_version": 3.0, "iteration": 0,
              "args": megatron_lm_args(desc, te, token_ids)}
    save_weights({k: v.to(dtype) for k, v in state.items()}, desc, tmp / MEGATRON_LM_RELEASE,
                 dtype, common=common, te_names=te)
    (tmp / MEGATRON_LM_TRACKER).write_text(MEGATRON_LM_RELEASE + "\n")
    tokenizer = _copy_tokenizer_if_any(Path(hf_dir), tmp / "tokenizer")
    tmp.rename(root)
    flags = megatron_lm_flags(desc, transformer_impl == "transformer_engine")
    tok = (f" --tokenizer-type HuggingFaceTokenizer --tokenizer-model {root / 'tokenizer'}"
           if tokenizer else "")
    return (f"imported {hf_dir}: {describe_for_log(desc)}, {DTYPE_NAMES[dtype]} -> {out} "
            f"(Megatron-LM release checkpoint; loads at any TP/PP whose padded vocabulary is "
            f"{desc.vocab_size})\npretrain_gpt.py --load {out} {' '.join(flags)}{tok}")


def _copy_tokenizer_if_any(hf_dir: Path, dest: Path) -> List[str]:
    try:
        return copy_tokenizer_files(hf_dir, dest)
    except ConversionError:
        return []


def import_run(hf_dir: str, out: str, config_path: Optional[str] = None,
               overrides: Optional[dict] = None) -> str:
    """HF folder -> a `megatron-mom train` run directory whose iteration-0 checkpoint (model
    weights, fresh optimizer, schedule and RNG) has the layout of the run config (TP/PP from
    `overrides`); collective over all processes of a torchrun launch."""
    from megatron_mom.train import build, checkpoint
    from megatron_mom.train.config import dump_config
    cfg = _run_config_for(hf_dir, out, config_path, overrides or {})
    desc, _ = describe_run(cfg)
    root = Path(cfg.output_dir) / "checkpoints"
    if Path(cfg.output_dir).exists() and any(Path(cfg.output_dir).iterdir()):
        raise ConversionError(f"{cfg.output_dir} exists and is not empty; import into a new "
                              f"directory")
    rank0 = build.init_process_groups(1, 1).rank == 0
    _, hf_state, _ = _read_hf(hf_dir, with_tensors=rank0)
    state = fla_to_megatron(hf_state, desc) if rank0 else {}
    dtype = build.params_dtype(cfg.train.precision)
    # Outside checkpoints/, whose .tmp_* entries training cleans up as crashed saves.
    weights = Path(cfg.output_dir) / ".import_weights"
    save_weights({k: v.to(dtype) for k, v in state.items()}, desc, weights, dtype)
    par = build.init_parallel(cfg)
    trainables = build.build_trainables(cfg, par)
    _load_weights(weights, trainables.gpt)
    # The optimizer's float32 main copies were made from the random initial weights.
    trainables.optimizer.reload_model_params()
    _fresh_adam_states(trainables.optimizer)
    with _save_step_zero(trainables.optimizer):
        saved = checkpoint.save_checkpoint(root, 0, trainables, {"iteration": 0,
                                                                 "consumed_samples": 0},
                                           cfg, cfg.train.keep_checkpoints)
    if par.rank == 0:
        shutil.rmtree(weights, ignore_errors=True)   # a save may have swept it as a temporary
        (Path(cfg.output_dir) / checkpoint.CONFIG_FILE).write_text(dump_config(cfg))
    dist.barrier()
    launch = (f"torchrun --nproc-per-node {par.world_size} -m megatron_mom.apps.cli.main"
              if par.world_size > 1 else "megatron-mom")
    return (f"imported {hf_dir}: {describe_for_log(desc)} -> {saved} (TP={par.tp} PP={par.pp}, "
            f"{cfg.train.precision}); continue with\n{launch} train --config "
            f"{Path(cfg.output_dir) / checkpoint.CONFIG_FILE} --resume")


def _load_weights(directory: Path, gpt) -> None:
    """The model-only checkpoint of `save_weights` into this rank's part of `gpt`."""
    from megatron_mom.train.safe_load import dist_load
    loaded = dist_load({"model": gpt.sharded_state_dict(metadata=dict(MODEL_METADATA))},
                       directory)
    gpt.load_state_dict(loaded["model"])


def _fresh_adam_states(optimizer) -> None:
    """Give every parameter the Adam state of a step that has not happened yet (zero moments,
    step 0), which Adam treats exactly as no state: a checkpoint needs the tensors, since
    resuming reads them."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                state.setdefault("exp_avg", torch.zeros_like(param.data))
                state.setdefault("exp_avg_sq", torch.zeros_like(param.data))
                state.setdefault("step", torch.tensor(0.0))


@contextlib.contextmanager
def _save_step_zero(optimizer):
    """Megatron-Core (0.16.1 optimizer.py:845 and :1033, `if step:`) saves the Adam step that
    all parameters share only when it is non-zero, and loading a state without it fails
    (KeyError 'step' in torch's Adam). An imported run is at step 0: write that step."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    wrapped = [opt for opt in getattr(optimizer, "chained_optimizers", [optimizer])
               if not isinstance(opt, DistributedOptimizer)]   # those keep per-shard steps

    def with_step(original):
        def sharded_state_dict(*args, **kwargs):
            state_dict = original(*args, **kwargs)
            # Mixed-precision optimizers nest torch's state dict under "optimizer".
            state = state_dict.get("optimizer", state_dict).get("state")
            if isinstance(state, dict):
                state.setdefault("common_step", torch.tensor(0.0))
            return state_dict
        return sharded_state_dict

    for opt in wrapped:
        opt.sharded_state_dict = with_step(opt.sharded_state_dict)
    try:
        yield
    finally:
        for opt in wrapped:
            del opt.sharded_state_dict                  # back to the class method


def _run_config_for(hf_dir: str, out: str, config_path: Optional[str], overrides: dict):
    """The run config: the user's (or the default), with the model taken from config.json;
    refused unless `megatron-mom train` builds exactly that model."""
    from megatron_mom.train.config import ConfigError, load_config
    # Only the MoM execution settings are taken from here (the model comes from config.json).
    base = load_config(config_path, {k: v for k, v in overrides.items() if k.startswith("mom.")})
    mom_execution = {k: getattr(base.mom, k) for k in
                     ("backend", "chunk_size", "grouped_projection", "lean_backward",
                      "z_loss_coeff")}
    desc, _, _ = _read_hf(hf_dir, with_tensors=False, mom_overrides=mom_execution)
    dtype = _weights_dtype(Path(hf_dir))
    model = {"model.num_layers": desc.num_layers, "model.hidden_size": desc.hidden_size,
             "model.ffn_hidden_size": desc.ffn_hidden_size,
             "model.num_attention_heads": desc.num_attention_heads,
             "model.pattern": desc.pattern, "model.seq_length": desc.max_position_embeddings,
             "model.tie_embeddings": desc.tie_embeddings,
             "model.init_method_std": desc.init_method_std,
             "train.precision": PRECISION[dtype]}
    from megatron_mom.config import settings_fields
    model.update({f"mom.{f.name}": getattr(desc.mom, f.name) for f in settings_fields()})
    try:
        cfg = load_config(config_path, {**model, "output_dir": out, **overrides})
    except ConfigError as err:
        raise ConversionError(f"megatron-mom train cannot hold this model: {err}") from None
    ours, _ = describe_run(cfg)
    differ = [d for d in ours.differences(desc) if not d.startswith("max_position_embeddings")]
    if differ:
        raise ConversionError(
            "megatron-mom train cannot build this model (run config vs config.json): "
            + "; ".join(differ) + ". Import it for Megatron-LM instead (--format megatron-lm)"
            " and train with pretrain_gpt.py")
    return cfg


def _weights_dtype(hf_dir: Path) -> torch.dtype:
    """The dtype of the folder's weights, from the safetensors headers (no tensor is read)."""
    index = hf_dir / INDEX_FILE
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values()))
             if index.is_file() else [WEIGHTS_FILE])
    names = set()
    for name in files:
        with open(hf_dir / name, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        names |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    by_name = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    if not names <= set(by_name):
        raise ConversionError(f"{hf_dir}: weights of dtype {sorted(names)}; only F32, BF16 and "
                              f"F16 convert")
    return by_name[names.pop()] if len(names) == 1 else torch.float32
