"""ModuleSpecs: a MoM transformer layer, and hybrid MoM/attention blocks from a pattern.

    from megatron_mom import MoMConfig, get_mom_layer_spec, get_hybrid_block_spec
    GPTModel(config, transformer_layer_spec=get_mom_layer_spec(MoMConfig()), ...)
    config = TransformerConfig(..., hetereogenous_dist_checkpoint=True)   # MoM and attention
    GPTModel(config, transformer_layer_spec=get_hybrid_block_spec(config, "MMMA", MoMConfig()), ...)

Backends: "local" builds from Megatron-Core's own modules (CPU or GPU, no extra packages);
"te" uses Transformer Engine modules and fails clearly without it; "auto" picks TE when it
imports, else local.
"""
from __future__ import annotations

from typing import Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType, LayerType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from megatron_mom.layer.attention import SDPAttention
from megatron_mom.config import MoMConfig
from megatron_mom.layer.mixer import MixtureOfMemories, MoMSubmodules
from megatron_mom.layer.parallel import SequenceParallelNorm
from megatron_mom.layer.projection import GroupedColumnParallelLinear, with_grouped_form

SPEC_BACKENDS = ("auto", "local", "te")
LAYER_SYMBOLS = {"M": "MoM", "A": "softmax attention"}


def have_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # broken TE installs raise more than ImportError
        return False
    return True


def resolve_spec_backend(backend: str) -> str:
    if backend not in SPEC_BACKENDS:
        raise ValueError(f"backend must be one of {SPEC_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "te" if have_te() else "local"
    if backend == "te" and not have_te():
        raise ImportError("backend='te' needs Transformer Engine (pip install "
                          "transformer-engine[pytorch]); use backend='local' or 'auto' without it")
    return backend


def _te():
    from megatron.core.extensions import transformer_engine as te_ext
    return te_ext


def _norm(backend: str):
    return _te().TENorm if backend == "te" else SequenceParallelNorm


def _mlp_spec(backend: str) -> ModuleSpec:
    if backend == "te":
        te = _te()
        return ModuleSpec(module=MLP, submodules=MLPSubmodules(
            linear_fc1=te.TELayerNormColumnParallelLinear, linear_fc2=te.TERowParallelLinear))
    return ModuleSpec(module=MLP, submodules=MLPSubmodules(
        linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))


def _pre_mlp_norm(backend: str):
    # TE fuses the pre-MLP norm into the MLP's first linear layer.
    return IdentityOp if backend == "te" else _norm(backend)


def get_mom_module_spec(mom: MoMConfig, backend: str = "auto") -> ModuleSpec:
    """The MoM mixer alone (the `self_attention` submodule of a TransformerLayer)."""
    backend = resolve_spec_backend(backend)
    if not isinstance(mom, MoMConfig):
        raise TypeError(f"mom must be a MoMConfig, got {type(mom).__name__}")
    if backend == "te":
        te = _te()
        projections = MoMSubmodules(in_proj=with_grouped_form(te.TEColumnParallelLinear),
                                    out_proj=te.TERowParallelLinear)
    else:
        projections = MoMSubmodules(in_proj=GroupedColumnParallelLinear,
                                    out_proj=RowParallelLinear)
    return ModuleSpec(module=MixtureOfMemories, params={"mom": mom}, submodules=projections)


def get_mom_layer_spec(mom: Optional[MoMConfig] = None, backend: str = "auto") -> ModuleSpec:
    """A full TransformerLayer: norm -> MoM -> residual -> norm -> MLP -> residual.

    Pass it as `GPTModel(transformer_layer_spec=...)`. Under sequence parallelism without TE or
    apex use `get_hybrid_block_spec(config, "M" * num_layers, mom)`, whose final norm supports
    it (Megatron's fallback final norm does not)."""
    mom = mom if mom is not None else MoMConfig()
    backend = resolve_spec_backend(backend)
    return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=_norm(backend),
        self_attention=get_mom_module_spec(mom, backend),
        self_attn_bda=get_bias_dropout_add,
        pre_mlp_layernorm=_pre_mlp_norm(backend),
        mlp=_mlp_spec(backend),
        mlp_bda=get_bias_dropout_add))


def get_attention_layer_spec(backend: str = "auto") -> ModuleSpec:
    """A softmax-attention TransformerLayer that fits beside MoM layers (same norms and MLP).

    Its core attention is fused and memory-linear on both backends: Transformer Engine's, or
    PyTorch SDPA (`megatron_mom.layer.attention.SDPAttention`) on the local backend, in place of
    Megatron's unfused `DotProductAttention`."""
    backend = resolve_spec_backend(backend)
    if backend == "te":
        te = _te()
        attention = SelfAttentionSubmodules(
            linear_qkv=te.TELayerNormColumnParallelLinear, core_attention=te.TEDotProductAttention,
            linear_proj=te.TERowParallelLinear, q_layernorm=IdentityOp, k_layernorm=IdentityOp)
        input_norm = IdentityOp
    else:
        attention = SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear, core_attention=SDPAttention,
            linear_proj=RowParallelLinear, q_layernorm=IdentityOp, k_layernorm=IdentityOp)
        input_norm = _norm(backend)
    return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=input_norm,
        self_attention=ModuleSpec(module=SelfAttention, submodules=attention,
                                  params={"attn_mask_type": AttnMaskType.causal}),
        self_attn_bda=get_bias_dropout_add,
        pre_mlp_layernorm=_pre_mlp_norm(backend),
        mlp=_mlp_spec(backend),
        mlp_bda=get_bias_dropout_add))


def check_attention_settings(config, pattern: str) -> None:
    """Refuse attention settings that the attention layers of `pattern` would not honour."""
    if "A" in pattern and getattr(config, "qk_layernorm", False):
        raise ValueError("qk_layernorm (Megatron-LM --qk-layernorm): the hybrid's attention "
                         "layers are built without q/k norms (MoM layers L2-normalise their q "
                         "and k themselves); drop --qk-layernorm")


def check_pattern(pattern: str, num_layers: int) -> str:
    """Validate a layer pattern: one of 'M' (MoM) / 'A' (attention) per layer."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"pattern must be a non-empty string like 'MMMMMMMA', got {pattern!r}")
    bad = sorted(set(pattern) - set(LAYER_SYMBOLS))
    if bad:
        raise ValueError(f"pattern {pattern!r} has unknown layer symbols {bad}; use "
                         + ", ".join(f"'{k}' ({v})" for k, v in LAYER_SYMBOLS.items()))
    if len(pattern) != num_layers:
        raise ValueError(f"pattern has {len(pattern)} layers but config.num_layers is "
                         f"{num_layers}; give one symbol per layer (e.g. 'MMMMMMMA' * "
                         f"{max(num_layers // 8, 1)})")
    return pattern


def mixes_layer_kinds(pattern: str) -> bool:
    """Whether a pattern mixes MoM and attention layers. They hold different parameters, so
    such a stack must key its distributed checkpoint per layer (TransformerConfig's
    `hetereogenous_dist_checkpoint`, which TransformerBlock.sharded_state_dict reads): otherwise
    Megatron stacks every layer's tensor of one name into one tensor (Megatron's GDN/attention
    hybrids key per layer too)."""
    return len(set(pattern)) > 1


def check_checkpoint_keys(config, pattern: str) -> None:
    """Refuse a config that would stack the tensors of a mixed pattern's layers."""
    if mixes_layer_kinds(pattern) and not getattr(config, "hetereogenous_dist_checkpoint", True):
        raise ValueError(
            f"pattern {pattern!r} mixes MoM and attention layers, which hold different "
            f"parameters: build the TransformerConfig with hetereogenous_dist_checkpoint=True "
            f"(per-layer checkpoint keys; megatron_mom.layer.specs.mixes_layer_kinds(pattern) says "
            f"when it is needed)")


def local_layer_ids(config, vp_stage: Optional[int] = None,
                    pp_rank: Optional[int] = None) -> list[int]:
    """0-based global indices of the layers this pipeline stage (and virtual stage) builds."""
    layout = getattr(config, "pipeline_model_parallel_layout", None)
    if layout is not None:
        return list(layout.get_layer_id_list(layer_type=LayerType.decoder, vp_stage=vp_stage,
                                             pp_rank=pp_rank))
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return list(range(offset, offset + get_num_layers_to_build(config, vp_stage=vp_stage,
                                                                 pp_rank=pp_rank)))


def get_hybrid_block_spec(config, pattern: str, mom: Optional[MoMConfig] = None,
                          backend: str = "auto", vp_stage: Optional[int] = None,
                          pp_rank: Optional[int] = None) -> TransformerBlockSubmodules:
    """Block of MoM ('M') and softmax-attention ('A') layers, one symbol per layer, sliced for
    this pipeline stage. Use as `GPTModel(transformer_layer_spec=...)`; e.g. the paper's hybrid
    is `"MMMMMMMA" * 3` (one attention layer after every seven MoM layers).

    `config` is read, never changed: a pattern with both symbols needs
    `config.hetereogenous_dist_checkpoint` (Megatron's per-layer checkpoint keys), since the two
    layer kinds hold different parameters; without it this raises, naming the fix."""
    mom = mom if mom is not None else MoMConfig()
    backend = resolve_spec_backend(backend)
    check_pattern(pattern, config.num_layers)
    check_checkpoint_keys(config, pattern)
    check_attention_settings(config, pattern)
    specs = {"M": get_mom_layer_spec(mom, backend), "A": get_attention_layer_spec(backend)}
    layer_specs = [specs[pattern[i]] for i in local_layer_ids(config, vp_stage, pp_rank)]
    return TransformerBlockSubmodules(layer_specs=layer_specs, layer_norm=_norm(backend))
