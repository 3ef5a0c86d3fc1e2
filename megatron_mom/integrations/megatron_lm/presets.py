"""`--spec` presets for Megatron-LM's `pretrain_gpt.py`:

    --spec megatron_mom.integrations.megatron_lm.presets mom      # every layer MoM
    --spec megatron_mom.integrations.megatron_lm.presets hybrid   # an attention layer after 7 MoM

`mom` and `hybrid` differ only in their default layer pattern; `--mom-layer-pattern` overrides
it for either. MoM hyperparameters come from the `--mom-*` flags
(megatron_mom.integrations.megatron_lm.args).

Each preset is one object that serves both forms of `--spec`:
- Megatron-LM 0.14-0.18 import the object and hand it to `TransformerBlock` as is. The object
  is a `TransformerBlockSubmodules` whose `layer_specs` / `layer_norm` are built on first use
  (the flags are parsed by then) from `megatron.training.get_args()`.
- Megatron-LM 0.19 calls it as `preset(model_config, vp_stage=...)`; it returns a plain
  `TransformerBlockSubmodules` for that virtual stage.
The object form never learns which virtual pipeline stage it is built for, so each entry of
`layer_specs` is a `PatternLayer`: it looks up its own global layer number when Megatron builds
it and builds the MoM or attention `TransformerLayer` the pattern asks for there. Only the
number of layers of the stage has to be known, and under interleaved pipelining it is the same
for every virtual stage unless the split is uneven (then we refuse with a clear message).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import (
    BaseTransformerLayer,
    get_transformer_layer_offset,
)

from megatron_mom.layer import specs
from megatron_mom.config import MoMConfig
from megatron_mom.integrations.megatron_lm import args as mom_args

HYBRID_PERIOD = "MMMMMMMA"  # paper: one softmax-attention layer after every 7 MoM layers


def default_pattern(kind: str, num_layers: int) -> str:
    if kind == "mom":
        return "M" * num_layers
    if num_layers < len(HYBRID_PERIOD):
        raise ValueError(
            f"megatron-mom: the 'hybrid' preset puts attention at every {len(HYBRID_PERIOD)}th "
            f"layer, so {num_layers} layers would have none; pass --mom-layer-pattern "
            f"(e.g. {'M' * (num_layers - 1)}A)")
    return (HYBRID_PERIOD * (num_layers // len(HYBRID_PERIOD) + 1))[:num_layers]


def global_layer_index(config, layer_number: int, vp_stage: Optional[int] = None,
                       pp_rank: Optional[int] = None) -> int:
    """0-based model-wide index of the stage-local 1-based `layer_number` (as TransformerLayer
    numbers itself)."""
    return layer_number - 1 + get_transformer_layer_offset(config, vp_stage, pp_rank)


@dataclasses.dataclass
class PatternLayerSubmodules:
    """The layer specs a PatternLayer chooses from, by pattern symbol."""

    M: ModuleSpec
    A: ModuleSpec


class PatternLayer(BaseTransformerLayer):
    """Stands for "layer i of `pattern`": building it builds the MoM ('M') or attention ('A')
    TransformerLayer of its global position. Subclasses BaseTransformerLayer so Megatron treats
    its spec as a layer spec."""

    def __new__(cls, config, submodules: PatternLayerSubmodules, layer_number: int = 1,
                pattern: str = "", vp_stage: Optional[int] = None, pg_collection=None,
                **kwargs):
        pp_rank = None
        if pg_collection is not None and getattr(pg_collection, "pp", None) is not None:
            pp_rank = pg_collection.pp.rank()
        symbol = pattern[global_layer_index(config, layer_number, vp_stage, pp_rank)]
        # Megatron-LM builds the model's TransformerConfig from its own flags, which have
        # none for these: the preset marks the config it is built with. The patched schedules
        # set the aux-loss gradient scale for configs with mom_aux_loss; TransformerBlock keys
        # the checkpoint per layer with hetereogenous_dist_checkpoint (specs.mixes_layer_kinds).
        if symbol == "M":
            config.mom_aux_loss = True
        if specs.mixes_layer_kinds(pattern):
            config.hetereogenous_dist_checkpoint = True
        return build_module(getattr(submodules, symbol), config=config, layer_number=layer_number,
                            vp_stage=vp_stage, pg_collection=pg_collection, **kwargs)


def _backend(args) -> str:
    if getattr(args, "transformer_impl", "local") != "transformer_engine":
        return "local"
    if not specs.have_te():
        raise ImportError(
            "megatron-mom: --transformer-impl transformer_engine (Megatron-LM's default) needs "
            "Transformer Engine; install it or pass --transformer-impl local")
    return "te"


class MoMPreset(TransformerBlockSubmodules):
    """A lazily built MoM/attention block spec (see the module docstring)."""

    def __init__(self, kind: str):  # no dataclass __init__: the fields are properties here
        assert kind in ("mom", "hybrid")
        self.kind = kind
        self._built = None

    def __repr__(self):
        return f"megatron_mom.integrations.megatron_lm.presets.{self.kind}"

    def __eq__(self, other):
        return self is other

    __hash__ = object.__hash__

    # ---------------------------------------------------------------- 0.19: callable form
    def __call__(self, config, vp_stage: Optional[int] = None) -> TransformerBlockSubmodules:
        """`config`: Megatron-LM 0.19's GPTModelConfig (its TransformerConfig is
        `config.transformer`) or a TransformerConfig."""
        transformer = getattr(config, "transformer", config)
        return self.build(transformer, _megatron_args(), vp_stage=vp_stage)

    # ---------------------------------------------------------------- 0.14-0.18: object form
    @property
    def layer_specs(self):
        return self._object_form().layer_specs

    @property
    def layer_norm(self):
        return self._object_form().layer_norm

    def _object_form(self) -> TransformerBlockSubmodules:
        args = _megatron_args()
        if self._built is None or self._built[0] is not args:  # built once per parsed args
            self._built = (args, self.build(_megatron_config(args), args, vp_stage=None))
        return self._built[1]

    # ----------------------------------------------------------------
    def build(self, config, args, vp_stage: Optional[int] = None) -> TransformerBlockSubmodules:
        """Block spec of this pipeline (and virtual) stage, from Megatron-LM's parsed args."""
        mom = mom_args.mom_config_from_args(args)
        mom_args.check_parallel_args(args, mom)
        pattern = args.mom_layer_pattern or default_pattern(self.kind, config.num_layers)
        specs.check_pattern(pattern, config.num_layers)
        specs.check_attention_settings(config, pattern)
        if getattr(args, "reset_attention_mask", False):
            raise ValueError(
                "megatron-mom: --reset-attention-mask asks for attention masks between "
                "documents, which MoM layers (they read no mask) and the SDPA attention core "
                "(causal) would not apply; drop it (documents then see their predecessors in "
                "the sequence, as without it)")
        args.mom_layer_pattern = pattern  # the training-log hook averages over the M layers
        backend = _backend(args)
        cp = getattr(args, "context_parallel_size", 1) or 1
        if cp > 1 and "A" in pattern and backend == "local":
            raise ValueError(
                f"megatron-mom: --context-parallel-size {cp} with attention layers (pattern "
                f"{pattern}) needs Transformer Engine's attention (--transformer-impl "
                f"transformer_engine): Megatron's local attention has no context parallelism. "
                f"MoM layers alone run it: use the 'mom' preset or an all-M --mom-layer-pattern")
        return block_spec(config, pattern, mom, backend, vp_stage)


def block_spec(config, pattern: str, mom: MoMConfig, backend: str = "auto",
               vp_stage: Optional[int] = None) -> TransformerBlockSubmodules:
    """Block of PatternLayers for one pipeline stage. With vp_stage None under interleaved
    pipelining (the object form), every virtual stage must have the same number of layers."""
    backend = specs.resolve_spec_backend(backend)
    vp_size = getattr(config, "virtual_pipeline_model_parallel_size", None)
    if vp_stage is None and vp_size and config.pipeline_model_parallel_size > 1:
        counts = {get_num_layers_to_build(config, vp_stage=v) for v in range(vp_size)}
        if len(counts) > 1:
            raise ValueError(
                "megatron-mom: with interleaved pipelining this Megatron-LM version does not tell "
                "the spec which virtual stage it builds, and your split gives virtual stages "
                f"different layer counts {sorted(counts)}; split layers evenly (no "
                "--account-for-embedding/loss-in-pipeline-split, no uneven first/last stage, "
                "no --pipeline-model-parallel-layout) or use Megatron-LM >= 0.19")
        num_layers = counts.pop()
    else:
        num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    _describe(config, pattern, num_layers, vp_stage, backend)
    layer = ModuleSpec(module=PatternLayer, params={"pattern": pattern},
                       submodules=PatternLayerSubmodules(
                           M=specs.get_mom_layer_spec(mom, backend),
                           A=specs.get_attention_layer_spec(backend)))
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers,
                                      layer_norm=specs._norm(backend))


def _describe(config, pattern, num_layers, vp_stage, backend):
    """One line per pipeline stage (printed by its first rank) saying which layers it builds."""
    from megatron.core import parallel_state as ps
    if ps.model_parallel_is_initialized() and (
            ps.get_tensor_model_parallel_rank() != 0 or ps.get_data_parallel_rank() != 0
            or ps.get_context_parallel_rank() != 0):
        return
    pp = ps.get_pipeline_model_parallel_rank() if ps.model_parallel_is_initialized() else 0
    vp_size = getattr(config, "virtual_pipeline_model_parallel_size", None)
    def layers(vp):
        ids = specs.local_layer_ids(config, vp)
        return (f"layers {ids[0] + 1}-{ids[-1] + 1} = {''.join(pattern[i] for i in ids)}"
                if ids else "no layers")

    if vp_stage is None and vp_size and config.pipeline_model_parallel_size > 1:
        where = f"virtual stages " + ", ".join(f"[{layers(v)}]" for v in range(vp_size))
    else:
        where = layers(vp_stage)
    stage = f"pipeline stage {pp}" + ("" if vp_stage is None else f" virtual stage {vp_stage}")
    print(f"megatron-mom: {stage}: {where} (M: MoM, A: attention) of {pattern}, "
          f"spec backend {backend}", flush=True)


def _megatron_args():
    try:
        from megatron.training import get_args
    except ImportError as err:
        raise ImportError("megatron_mom.integrations.megatron_lm.presets are for Megatron-LM's "
                          "training scripts (megatron.training); from Python, use "
                          "megatron_mom.get_hybrid_block_spec") from err
    return get_args()


def _megatron_config(args):
    # The TransformerConfig Megatron-LM builds from the same flags for the model.
    from megatron.training.arguments import core_transformer_config_from_args
    return core_transformer_config_from_args(args)


mom = MoMPreset("mom")
hybrid = MoMPreset("hybrid")
