"""MoMConfig: the hyperparameters of one Mixture-of-Memories mixer, and `MoMExecution`: how
it runs (kernels, projection form, memory of the backward), which never changes what it
computes beyond rounding.

Megatron's own `TransformerConfig` stays untouched so that Megatron-LM's argument parsing
builds it as usual; the MoM layer spec carries a `MoMConfig` beside it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional

from megatron_mom.ops.common import checker
from megatron_mom.ops.options import KernelOptions

BACKENDS = ("auto", "triton", "torch")
GROUPED_PROJECTION = ("auto", "on", "off")
# The chunk lengths every backend runs (the Triton kernels are built for these; the torch
# path's C x C matrices would make a long chunk crawl on the CPU).
CHUNK_SIZES = (16, 32, 64)
# What the Triton kernels are built for (ops/gated_delta_rule/triton.py HEAD_DIMS,
# ops/short_conv/triton.py MAX_WIDTH; tests/layer/test_config.py keeps them equal). The torch
# backend runs any size.
TRITON_HEAD_DIMS = (16, 32, 64, 128, 256)
TRITON_MAX_CONV_SIZE = 8


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


# MoMExecution's fields that flags (--mom-*) and YAML files (mom.*) set, beside MoMConfig's.
EXECUTION_SETTINGS = ("backend", "grouped_projection", "lean_backward", "recompute_states")


@dataclass(frozen=True)
class MoMExecution:
    """How a MoM mixer runs: the same results, up to rounding, whatever these say.

    backend:         kernels for the recurrence, short convolutions, mix and gated
                     RMSNorm: "auto" (Triton on CUDA tensors, else torch), "triton" or "torch".
    grouped_projection: how the memories' k, v, b, a are projected in training: "auto" as
                     one grouped GEMM over the routed rows only (torch._grouped_mm) for bf16
                     CUDA inputs on compute capability 9.x/10.x, where it is a single CUTLASS
                     kernel, else dense; "on" grouped wherever the layer allows it (any
                     device, not float64: for tests); "off" always the dense projection of
                     every memory for every token (the reference).
    lean_backward:   the memory path (convolutions, L2 norms, recurrence) keeps its inputs
                     and one head's buffers for the backward, which recomputes the rest and the
                     recurrence's states one head at a time: less peak memory for more GPU
                     time (side CUDA streams run its sequential kernels beside other work; its
                     many launches can make the eager step host-bound, which a CUDA graph
                     removes; numbers in docs/performance.md). Triton backend only.
    recompute_states: the recurrence keeps only its inputs for the backward, which reruns its
                     forward kernels first (no per-chunk states, W, U between the two): a
                     third less activation memory for ~7% more GPU time in a 380M GPT
                     (docs/performance.md). The same switch as kernels.recompute_states: either
                     one set turns both on.
    kernels:         how the recurrence's Triton kernels run (`megatron_mom.ops.KernelOptions`:
                     dot precision, storage between kernels, recomputed states, backward head
                     groups, side streams, launch settings).
    """

    backend: str = "auto"
    grouped_projection: str = "auto"
    lean_backward: bool = False
    recompute_states: bool = False
    kernels: KernelOptions = KernelOptions()

    def __post_init__(self):
        need = checker("MoMExecution")

        need(self.backend in BACKENDS,
             f"backend must be one of {BACKENDS}, got {self.backend!r}")
        need(isinstance(self.lean_backward, bool),
             f"lean_backward must be True or False, got {self.lean_backward!r}")
        need(self.grouped_projection in GROUPED_PROJECTION,
             f"grouped_projection must be one of {GROUPED_PROJECTION}, "
             f"got {self.grouped_projection!r}")
        need(isinstance(self.recompute_states, bool),
             f"recompute_states must be True or False, got {self.recompute_states!r}")
        need(isinstance(self.kernels, KernelOptions),
             f"kernels must be a megatron_mom.ops.KernelOptions, got {self.kernels!r}")
        # One switch in two places (the flat setting flags and YAML give, and the kernels'
        # options): either one on turns both on, so they never disagree.
        if self.recompute_states and not self.kernels.recompute_states:
            object.__setattr__(self, "kernels", self.kernels.replace(recompute_states=True))
        elif self.kernels.recompute_states:
            object.__setattr__(self, "recompute_states", True)

    def replace(self, **changes) -> "MoMExecution":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class MoMConfig:
    """Hyperparameters of a MoM mixer (arXiv:2502.13685; equations in docs/method.md), and
    how it runs (`execution`).

    num_memories:    M, routed memories (the always-on shared memory is extra).
    topk:            memories each token is routed to.
    shared_memory:   add one memory that sees every token.
    num_heads:       H; heads are split across tensor-parallel ranks.
    head_dim:        K, the query/key size per head.
    expand_v:        V = K * expand_v, the value size per head.
    conv_size:       width W of the causal short convolutions, >= 1 (1 mixes nothing over
                     time: a learned per-channel scale before the SiLU; there is no "off").
                     The Triton kernels take head_dim and value_dim in (16, 32, 64, 128,
                     256) and conv_size <= 8 (checked here for backend "triton", when the
                     layer is built on a CUDA device for "auto"); "torch" takes any.
    use_output_gate: gate the normalised output with silu(x W_g_out).
    norm_eps:        epsilon of the per-head output RMSNorm.
    aux_loss_coeff:  load-balancing loss coefficient (0 disables it).
    z_loss_coeff:    router z-loss coefficient (0 disables it).
    chunk_size:      chunk length of the chunked gated-delta-rule kernels: 16, 32 or 64.
    execution:       how the mixer runs (`MoMExecution`). Its EXECUTION_SETTINGS (backend,
                     grouped_projection, lean_backward, recompute_states) are also accepted
                     as keywords of MoMConfig(...) and replace(...), and read as attributes
                     (mom.backend is mom.execution.backend).
    """

    num_memories: int = 4
    topk: int = 2
    shared_memory: bool = True
    num_heads: int = 4
    head_dim: int = 256
    expand_v: float = 1.0
    conv_size: int = 4
    use_output_gate: bool = True
    norm_eps: float = 1e-6
    aux_loss_coeff: float = 0.01
    z_loss_coeff: float = 0.0
    chunk_size: int = 64
    execution: MoMExecution = MoMExecution()

    def __post_init__(self):
        need = checker("MoMConfig")

        for name in ("num_memories", "topk", "num_heads", "head_dim"):
            value = getattr(self, name)
            need(_is_int(value) and value >= 1, f"{name} must be a positive integer, got {value!r}")
        need(self.topk <= self.num_memories,
             f"topk ({self.topk}) must be <= num_memories ({self.num_memories}); "
             f"lower topk or add memories")
        need(_is_int(self.conv_size) and self.conv_size >= 1,
             f"conv_size must be an integer >= 1, got {self.conv_size!r}: the short "
             f"convolution cannot be turned off (conv_size 1 is a per-channel scale, no mixing "
             f"over time)")
        need(_is_int(self.chunk_size) and self.chunk_size in CHUNK_SIZES,
             f"chunk_size must be one of {CHUNK_SIZES}, got {self.chunk_size!r}")
        for name in ("shared_memory", "use_output_gate"):
            value = getattr(self, name)
            need(isinstance(value, bool), f"{name} must be True or False, got {value!r}")
        need(_is_finite_number(self.expand_v) and self.expand_v > 0,
             f"expand_v must be a finite number > 0, got {self.expand_v!r}")
        v = self.head_dim * self.expand_v
        need(abs(v - round(v)) < 1e-9,
             f"head_dim * expand_v must be an integer (value head size), got {v}")
        need(_is_finite_number(self.norm_eps) and self.norm_eps > 0,
             f"norm_eps must be a finite number > 0, got {self.norm_eps!r}")
        for name in ("aux_loss_coeff", "z_loss_coeff"):
            value = getattr(self, name)
            need(_is_finite_number(value) and value >= 0,
                 f"{name} must be a finite number >= 0, got {value!r}")
        need(isinstance(self.execution, MoMExecution),
             f"execution must be a MoMExecution, got {self.execution!r}")
        if self.backend == "triton":
            self.check_triton_sizes()

    def check_triton_sizes(self, why: str = "backend='triton'") -> None:
        """Raise a clear error when the Triton kernels cannot run these sizes (`why` says
        what picked them)."""
        for name, dim in (("head_dim", self.key_dim), ("value_dim = head_dim * expand_v",
                                                       self.value_dim)):
            if dim not in TRITON_HEAD_DIMS:
                raise ValueError(f"MoMConfig: {name} = {dim} is not one the Triton kernels run "
                                 f"({why}); use one of {TRITON_HEAD_DIMS}, or backend='torch'")
        if self.conv_size > TRITON_MAX_CONV_SIZE:
            raise ValueError(f"MoMConfig: conv_size = {self.conv_size} is wider than the Triton "
                             f"kernels' {TRITON_MAX_CONV_SIZE} ({why}); use conv_size <= "
                             f"{TRITON_MAX_CONV_SIZE}, or backend='torch'")

    @property
    def key_dim(self) -> int:
        """K: query/key size per head."""
        return self.head_dim

    @property
    def value_dim(self) -> int:
        """V: value size per head."""
        return int(round(self.head_dim * self.expand_v))

    @property
    def num_slots(self) -> int:
        """Memories a token is written to: its top-k plus the shared memory."""
        return self.topk + int(self.shared_memory)

    @property
    def num_memory_weights(self) -> int:
        """Sets of k/v/beta/a projections: one per memory, plus one for the shared memory."""
        return self.num_memories + int(self.shared_memory)

    def replace(self, **changes) -> "MoMConfig":
        return dataclasses.replace(self, **changes)

    def check_parallel(self, tp_size: int = 1, cp_size: int = 1,
                       hidden_size: Optional[int] = None) -> None:
        """Raise a clear error when this config cannot run at the given parallel sizes."""
        if self.num_heads % tp_size:
            raise ValueError(
                f"MoMConfig: num_heads ({self.num_heads}) must be divisible by the "
                f"tensor-parallel size ({tp_size}); choose num_heads as a multiple of "
                f"tensor_model_parallel_size")
        if self.num_heads % (tp_size * cp_size):
            raise ValueError(
                f"MoMConfig: num_heads ({self.num_heads}) must be divisible by "
                f"tensor_model_parallel_size * context_parallel_size ({tp_size} * {cp_size}): "
                f"context parallelism splits each rank's heads across the CP group")


def _with_execution_keywords(init):
    """MoMConfig's __init__, also taking MoMExecution's EXECUTION_SETTINGS as keywords (the
    flat form that flags, YAML files and existing callers use): they go into `execution`."""
    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        moved = {name: kwargs.pop(name) for name in EXECUTION_SETTINGS if name in kwargs}
        if moved:
            execution = kwargs.get("execution", MoMExecution())
            if not isinstance(execution, MoMExecution):
                raise ValueError(f"MoMConfig: execution must be a MoMExecution, got "
                                 f"{execution!r}")
            kwargs["execution"] = execution.replace(**moved)
        init(self, *args, **kwargs)
    return __init__


MoMConfig.__init__ = _with_execution_keywords(MoMConfig.__init__)
for _name in EXECUTION_SETTINGS:
    setattr(MoMConfig, _name, property(lambda self, name=_name: getattr(self.execution, name),
                                       doc=f"execution.{_name}"))


def settings_fields() -> List[dataclasses.Field]:
    """The settings that Megatron-LM flags and YAML files give, each one value: MoMConfig's
    fields (without `execution`), then MoMExecution's EXECUTION_SETTINGS."""
    model = [f for f in dataclasses.fields(MoMConfig) if f.name != "execution"]
    return model + [f for f in dataclasses.fields(MoMExecution) if f.name in EXECUTION_SETTINGS]


def from_settings(values: Mapping[str, Any]) -> MoMConfig:
    """The MoMConfig of one value per `settings_fields()` name (missing ones: defaults)."""
    values = dict(values)
    execution = {name: values.pop(name) for name in EXECUTION_SETTINGS if name in values}
    return MoMConfig(**values, execution=MoMExecution(**execution))
