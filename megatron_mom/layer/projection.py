"""The MoM mixer's input projection: its row sections, and its grouped form.

`in_proj` is one column-parallel linear over all sections (one parameter, one checkpoint
layout): q | gate | per memory k, v, b, a. Its dense forward projects every memory for every
token (the reference, any device and dtype). Its grouped form, a forward of the same module
(`in_proj(x, rows=GroupedRows(...))`), projects q | gate densely and each packed (token,
memory) row's k | v | b | a by one grouped GEMM over the memory-major rows, from row slices of
the same weight: a token pays for its k (+1 shared) memories, not all M (+1). Being the
module's own forward, it runs the module's hooks as the dense forward does (Megatron DDP's
overlapped parameter all-gather waits in a forward pre-hook).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from megatron.core.tensor_parallel.layers import ColumnParallelLinear

from megatron_mom.layer import packing, parallel
from megatron_mom.config import MoMConfig


def in_proj_sections(mom: MoMConfig, tp_size: int = 1) -> list[tuple[str, int]]:
    """(name, rows) of each section of the input projection, per rank.

    Order: q, gate (when used), then for each memory e (routed 0..M-1, shared last):
    k.e, v.e, b.e, a.e. Each section holds this rank's heads, so a rank's weight is the
    concatenation of its slices of every section."""
    H, K, V = mom.num_heads // tp_size, mom.key_dim, mom.value_dim
    sections = [("q", H * K)]
    if mom.use_output_gate:
        sections.append(("gate", H * V))
    for e in range(mom.num_memory_weights):
        sections += [(f"k.{e}", H * K), (f"v.{e}", H * V), (f"b.{e}", H), (f"a.{e}", H)]
    return sections


@dataclass
class GroupedRows:
    """What the grouped form of the input projection needs beyond its weight: the packed
    layout, the rows of q | gate (the head of the weight), the number of memories' row blocks
    after them, and the column-parallel input handling (`tp_group`, `sequence_parallel`)."""

    layout: packing.PackedLayout
    head_rows: int
    num_memories: int
    tp_group: object
    sequence_parallel: bool

    def project(self, hidden_states: Tensor, weight: Tensor):
        """hidden_states [s_local, b, D] -> (q | gate of every token [N, head_rows], k | v | b | a
        of every packed row [L, C]). The input handling is ColumnParallelLinear's: the sequence
        gathered under SP (reduce-scattered in backward), else copied to the TP group
        (all-reduced in backward)."""
        x = parallel.full_sequence(hidden_states, self.tp_group, self.sequence_parallel)
        x_tok = x.reshape(-1, x.shape[-1])                                 # [N, D], time-major
        # One split (backward: one cat into the weight's gradient), no per-slice zero fills.
        w_head, w_mem = weight.split([self.head_rows, weight.shape[0] - self.head_rows])
        head = F.linear(x_tok, w_head)                                     # [N, head_rows]
        w_mem = w_mem.view(self.num_memories, -1, x_tok.shape[-1])         # [E, C, D], a view
        return head, packing.grouped_linear(x_tok, self.layout, w_mem)


class GroupedProjection:
    """Mixin of a column-parallel linear (local or Transformer Engine) that adds the grouped
    form: `forward(x, rows=GroupedRows(...))`; without `rows`, the linear's own forward."""

    def forward(self, x: Tensor, *args, rows: Optional[GroupedRows] = None, **kwargs):
        if rows is None:
            return super().forward(x, *args, **kwargs)
        return rows.project(x, self.weight)


class GroupedColumnParallelLinear(GroupedProjection, ColumnParallelLinear):
    """Megatron-Core's ColumnParallelLinear with the grouped form (the local spec's in_proj)."""


@functools.lru_cache(maxsize=None)
def with_grouped_form(linear_cls: type) -> type:
    """`linear_cls` with the grouped form (one class per linear class, e.g. Transformer
    Engine's TEColumnParallelLinear)."""
    if issubclass(linear_cls, GroupedProjection):
        return linear_cls
    if linear_cls is ColumnParallelLinear:
        return GroupedColumnParallelLinear
    return type(f"Grouped{linear_cls.__name__}", (GroupedProjection, linear_cls),
                {"__module__": __name__, "__doc__": f"{linear_cls.__name__} with the grouped "
                 f"form of the MoM input projection."})
