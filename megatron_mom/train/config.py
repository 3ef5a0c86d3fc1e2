"""The run configuration of `megatron-mom train`: YAML sections, defaults, validation.

The defaults ARE the tiny hybrid (`examples/configs/tiny_hybrid.yaml` writes them out with
comments): a 4-layer MoM/attention GPT that trains visibly in a few minutes on 2 CPU cores.
A YAML file only needs the keys it changes. Every error names the offending key and says how to
fix it (unknown keys get a "did you mean").
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from megatron_mom.config import MoMConfig, from_settings, settings_fields


class ConfigError(ValueError):
    """A bad run configuration; the message names the key and the fix."""


@dataclass
class ModelConfig:
    num_layers: int = 4
    hidden_size: int = 128
    ffn_hidden_size: int = 384
    num_attention_heads: int = 4          # of the softmax-attention layers
    pattern: str = "MMMA"                 # one symbol per layer: M = MoM, A = attention
    seq_length: int = 256
    dropout: float = 0.0
    init_method_std: float = 0.02
    tie_embeddings: bool = True
    spec_backend: str = "auto"            # auto | local | te (Transformer Engine layers)


# The `mom` section has the settings of `megatron_mom.MoMConfig` and its execution settings
# (`megatron_mom.config.settings_fields()`, validated by MoMConfig), with tiny-model defaults
# where MoMConfig's are paper-sized.
TINY_MOM = {"num_heads": 2, "head_dim": 32, "chunk_size": 32}
MoMSection = dataclasses.make_dataclass(
    "MoMSection",
    [(f.name, f.type, field(default=TINY_MOM.get(f.name, f.default)))
     for f in settings_fields()])


@dataclass
class DataConfig:
    corpus: str = "bundled"               # "bundled", or a .txt / .jsonl / .jsonl.gz file
    split: str = "98,2,0"                 # train, validation, test weights of the documents


@dataclass
class TrainConfig:
    steps: int = 300
    micro_batch_size: int = 8
    global_batch_size: int = 8            # micro_batch_size * data-parallel size * micro-batches
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    lr_decay_style: str = "cosine"        # cosine | linear | constant
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    precision: str = "fp32"               # fp32 | bf16 | fp16
    recompute: str = "none"               # none | selective | full (Megatron's activation recompute)
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 100              # 0: no validation
    eval_batches: int = 2
    save_interval: int = 100              # 0: save only at the end
    keep_checkpoints: int = 2


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False


@dataclass
class GenerateConfig:
    prompt: str = "Return the"
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 40
    decode: str = "full"                  # full (forward passes) | recurrent (MoM states)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    mom: MoMSection = field(default_factory=MoMSection)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    output_dir: str = "runs/tiny_hybrid"

    def mom_config(self) -> MoMConfig:
        return from_settings(dataclasses.asdict(self.mom))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "model.spec_backend": ("auto", "local", "te"),
    "mom.backend": ("auto", "triton", "torch"),
    "mom.grouped_projection": ("auto", "on", "off"),
    "train.lr_decay_style": ("cosine", "linear", "constant"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.recompute": ("none", "selective", "full"),
    "generate.decode": ("full", "recurrent"),
}
POSITIVE = {"model.num_layers", "model.hidden_size", "model.ffn_hidden_size",
            "model.num_attention_heads", "model.seq_length", "train.steps",
            "train.micro_batch_size", "train.global_batch_size", "train.log_interval",
            "train.keep_checkpoints", "train.eval_batches",
            "parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size",
            "generate.max_new_tokens"}
NON_NEGATIVE = {"model.dropout", "model.init_method_std", "train.lr", "train.min_lr",
                "train.warmup_steps", "train.weight_decay", "train.clip_grad",
                "train.eval_interval", "train.save_interval", "train.seed",
                "generate.temperature", "generate.top_k"}
UNIT_INTERVAL = {"model.dropout", "train.adam_beta1", "train.adam_beta2"}


def _type_ok(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, type(default))


def _yaml_float(value: Any) -> Any:
    """PyYAML reads `3e-3` (no dot) as a string; accept it for float keys."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _unknown_key(key: str, known) -> ConfigError:
    close = difflib.get_close_matches(key.split(".")[-1], known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint} (valid here: {', '.join(known)})")


def _merge(obj, updates: dict, prefix: str = "") -> None:
    """Set the fields of dataclass `obj` from `updates`, checking names and types."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the config'} must be a mapping of keys to "
                          f"values, got {type(updates).__name__} {updates!r}")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise _unknown_key(key, list(fields))
        current = getattr(obj, name)
        value = _yaml_float(value) if isinstance(current, float) else value
        if dataclasses.is_dataclass(current):
            _merge(current, value, key + ".")
        elif not _type_ok(value, current):
            raise ConfigError(f"{key} must be a {type(current).__name__} (like "
                              f"{current!r}), got {type(value).__name__} {value!r}")
        else:
            setattr(obj, name, float(value) if isinstance(current, float) else value)


def _check_values(cfg: RunConfig) -> None:
    def value(key):
        section, name = key.split(".")
        return getattr(getattr(cfg, section), name)

    for key, allowed in CHOICES.items():
        if value(key) not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value(key)!r}")
    for key in sorted(POSITIVE | NON_NEGATIVE | UNIT_INTERVAL):
        if isinstance(value(key), float) and not math.isfinite(value(key)):  # NaN passes < 0
            raise ConfigError(f"{key} must be a finite number, got {value(key)!r}")
    for key in POSITIVE:
        if value(key) <= 0:
            raise ConfigError(f"{key} must be > 0, got {value(key)!r}")
    for key in NON_NEGATIVE:
        if value(key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {value(key)!r}")
    for key in UNIT_INTERVAL:
        if not 0 <= value(key) < 1:
            raise ConfigError(f"{key} must be >= 0 and < 1, got {value(key)!r}")
    m, t = cfg.model, cfg.train
    if len(m.pattern) != m.num_layers or set(m.pattern) - {"M", "A"}:
        raise ConfigError(f"model.pattern {m.pattern!r} must have one symbol per layer "
                          f"(model.num_layers = {m.num_layers}), each 'M' (MoM) or 'A' "
                          f"(attention), e.g. {('M' * (m.num_layers - 1) + 'A')!r}")
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"model.hidden_size ({m.hidden_size}) must be divisible by "
                          f"model.num_attention_heads ({m.num_attention_heads})")
    if t.min_lr > t.lr:
        raise ConfigError(f"train.min_lr ({t.min_lr}) must be <= train.lr ({t.lr})")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(f"train.global_batch_size ({t.global_batch_size}) must be a multiple "
                          f"of train.micro_batch_size ({t.micro_batch_size})")
    split = cfg.data.split.split(",")
    try:
        weights = [float(x) for x in split]
    except ValueError:
        weights = []
    if len(weights) != 3 or min(weights) < 0 or weights[0] <= 0:
        raise ConfigError(f"data.split must be three comma-separated weights for train, "
                          f"validation and test, like '98,2,0'; got {cfg.data.split!r}")
    if t.eval_interval and weights[1] <= 0:
        raise ConfigError("train.eval_interval > 0 needs validation documents: give "
                          "data.split a validation weight (e.g. '98,2,0') or set "
                          "train.eval_interval: 0")
    _check_tensor_parallel(cfg)
    try:
        mom = cfg.mom_config()
    except (TypeError, ValueError) as err:
        raise ConfigError(f"mom: {err}") from None
    if "M" in m.pattern:
        try:
            mom.check_parallel(cfg.parallel.tensor_model_parallel_size)
        except ValueError as err:
            raise ConfigError(f"mom/parallel: {err}") from None


def _check_tensor_parallel(cfg: RunConfig) -> None:
    """What Megatron splits across tensor-parallel ranks must divide by their number (Megatron
    checks these too, but only once the process group is up, and on every rank)."""
    from megatron_mom.train.build import VOCAB_SIZE
    m, tp = cfg.model, cfg.parallel.tensor_model_parallel_size
    for key, size in (("model.num_attention_heads", m.num_attention_heads),
                      ("model.ffn_hidden_size", m.ffn_hidden_size),
                      ("the tokenizer's vocabulary", VOCAB_SIZE)):
        if size % tp:
            raise ConfigError(f"{key} ({size}) must be divisible by "
                              f"parallel.tensor_model_parallel_size ({tp}); choose a "
                              f"tensor-parallel size that divides it")


def parse_override(text: str) -> tuple[str, Any]:
    """'train.steps=50' -> ('train.steps', 50); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. "
                          f"train.steps=50")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def _nest(key: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def build_config(data: Optional[dict] = None, overrides: Optional[dict] = None) -> RunConfig:
    """Defaults, then `data` (a parsed YAML mapping), then dotted `overrides`; validated."""
    cfg = RunConfig()
    _merge(cfg, data or {})
    for key, value in (overrides or {}).items():
        _merge(cfg, _nest(key, value))
    _check_values(cfg)
    return cfg


def load_config(path: Optional[str] = None, overrides: Optional[dict] = None) -> RunConfig:
    """Read a YAML run config (None: the embedded tiny-hybrid default)."""
    data = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass a YAML file such "
                              f"as examples/configs/tiny_hybrid.yaml or omit --config")
        data = read_yaml(p)
    try:
        return build_config(data, overrides)
    except ConfigError as err:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}{err}") from None


def read_yaml(path: Path) -> Any:
    """The parsed content of a YAML file ({} when empty); ConfigError for binary or
    malformed files."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a YAML text file (byte {err.start} is not UTF-8: "
                          f"binary or damaged)") from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
