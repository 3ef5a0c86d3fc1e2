"""Token order <-> memory-major packed order.

Every token is written to S slots: its top-k memories plus (optionally) the shared memory.
The packed layout lays those N * S (token, memory) rows out memory-major, then sequence, then
time, so that each (memory, sequence) pair is one contiguous segment: the recurrence and the
short convolutions then run on `cu_seqlens` segments and never cross a memory or a sequence.

Tokens come in time-major order, n = t * b + batch_index: a free view of Megatron's [s, b, ...]
activations (sequence-major order would cost a transposing copy of the whole projection on
the way in and of the read-out on the way out). With packed documents (b = 1) both coincide.

Everything here has static shapes (N * S rows, E * Q + 1 boundaries) and no host syncs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_mom.ops.mix import mix as ops_mix, sum_over_slots


@dataclass
class PackedLayout:
    token: Tensor       # [L] token index of each packed row, L = N * S
    memory: Tensor      # [L] memory index of each packed row
    slot: Tensor        # [L] flat (token, slot) index n * S + j of each packed row
    slot_row: Tensor    # [N, S] packed row of each (token, slot); inverse of `slot`
    cu_seqlens: Tensor  # [E * Q + 1] segment boundaries, segment (m, q) at m * Q + q

    @property
    def num_rows(self) -> int:
        return self.token.numel()


def pack(memory: Tensor, seq_id: Tensor, num_seqs: int, num_memories: int) -> PackedLayout:
    """memory: [N, S] memory per slot (distinct within a row); seq_id: [N] sequence index of
    each token. Sequences may interleave (time-major order), but within a sequence token
    indices must increase with time."""
    N, S = memory.shape
    seg = (memory * num_seqs + seq_id[:, None]).reshape(-1)            # [N * S] segment of a row
    # The rows n * S + j are in token order, so a stable sort by segment alone sorts by
    # (memory, sequence, time) whatever the interleaving of sequences. A radix sort takes a
    # pass per byte of its key: the narrowest integer type that holds every segment id.
    narrow = torch.int16 if num_memories * num_seqs <= 2 ** 15 else torch.int32
    order = torch.sort(seg.to(narrow), stable=True).indices            # packed row -> n * S + j
    slot_row = torch.empty_like(order)
    slot_row[order] = torch.arange(N * S, device=memory.device)
    counts = torch.zeros(num_memories * num_seqs, dtype=torch.int64, device=memory.device)
    counts.scatter_add_(0, seg, torch.ones_like(seg))
    cu_seqlens = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return PackedLayout(token=order // S, memory=memory.reshape(-1).index_select(0, order),
                        slot=order, slot_row=slot_row.view(N, S), cu_seqlens=cu_seqlens)


def memory_ends(layout: PackedLayout, num_memories: int) -> Tensor:
    """[E] int32 end row of each memory's packed rows: the group offsets of a grouped GEMM
    over the packed rows (`torch._grouped_mm(..., offs=)`)."""
    Q = (layout.cu_seqlens.numel() - 1) // num_memories
    return layout.cu_seqlens[Q::Q].to(torch.int32)


# Every packed row belongs to exactly one (token, slot): `slot_row` is a permutation of the
# rows. The moves below (and `ops.mix`) use that to write their backward passes as gathers
# (`index_select`) and non-accumulating stores (`index_copy_`, each target written once):
# deterministic, no atomic adds, no autograd index_put accumulation, and no zero-filled
# full-size buffers to add into.

class _Spread(torch.autograd.Function):
    """x [N, ...] in token order -> [L, ...]: each token copied to its S packed rows."""

    @staticmethod
    def forward(ctx, x, token, slot_row):
        ctx.save_for_backward(slot_row)
        return x.index_select(0, token)

    @staticmethod
    def backward(ctx, grad):
        (slot_row,) = ctx.saved_tensors
        return sum_over_slots(grad, slot_row), None, None


class _Select(torch.autograd.Function):
    """x [N, E, ...] -> [L, ...]: each packed row takes its token's row of its memory."""

    @staticmethod
    def forward(ctx, x, token, memory):
        N, E = x.shape[:2]
        flat = token * E + memory                                      # [L] row of x.flatten(0, 1)
        ctx.save_for_backward(flat)
        ctx.shape = x.shape
        if x.stride(0) == E * x.stride(1):
            return x.flatten(0, 1).index_select(0, flat)
        return x[token, memory]  # rows of a strided slice (the projection): no flat view

    @staticmethod
    def backward(ctx, grad):
        (flat,) = ctx.saved_tensors
        N, E = ctx.shape[:2]
        out = grad.new_empty(N * E, *ctx.shape[2:])
        out.index_copy_(0, flat, grad)                                 # routed pairs, once each
        if flat.numel() < N * E:
            out.index_fill_(0, _unrouted(flat, N, E), 0)               # the other N * (E - S)
        return out.view(ctx.shape), None, None


def _unrouted(flat: Tensor, N: int, E: int) -> Tensor:
    """Rows n * E + e of the (token, memory) pairs not in `flat`: exactly E - S per token, so
    the shape is static (no host sync)."""
    S = flat.numel() // N
    free = torch.ones(N * E, dtype=torch.int8, device=flat.device).index_fill_(0, flat, 0)
    e = torch.argsort(free.view(N, E), dim=1, descending=True, stable=True)[:, : E - S]
    return (e + torch.arange(N, device=flat.device)[:, None] * E).reshape(-1)


class _GroupedLinear(torch.autograd.Function):
    """y[r] = x[token[r]] @ weight[memory[r]].T for every packed row r: one grouped GEMM over
    the memory-major rows (`ends`: each memory's end row). Keeps x [N, D], not its packed copy
    [L, D] (S times larger): the backward gathers that again for the weight gradient."""

    @staticmethod
    def forward(ctx, x, weight, token, slot_row, ends):
        ctx.save_for_backward(x, weight, token, slot_row, ends)
        x_rows = x.index_select(0, token)                                  # [L, D]
        return torch._grouped_mm(x_rows, weight.transpose(1, 2), offs=ends)  # [L, C]

    @staticmethod
    def backward(ctx, dy):
        x, weight, token, slot_row, ends = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            d_rows = torch._grouped_mm(dy, weight, offs=ends)              # [L, D]
            dx = sum_over_slots(d_rows, slot_row)
        if ctx.needs_input_grad[1]:
            # [E, C, D] directly in the weight's layout: groups split the contraction (rows)
            dw = torch._grouped_mm(dy.t(), x.index_select(0, token), offs=ends)
            # A memory no row was routed to must get exactly zero; some grouped-GEMM kernels
            # leave an empty group's output unwritten (pytorch/pytorch#172439, sm100).
            empty = torch.diff(ends, prepend=ends.new_zeros(1)) == 0
            dw.masked_fill_(empty[:, None, None], 0)
        return dx, dw, None, None, None


def spread(x: Tensor, layout: PackedLayout) -> Tensor:
    """Token-order rows [N, ...] -> packed rows [L, ...] (each token to its S slots)."""
    return _Spread.apply(x, layout.token, layout.slot_row)


def select(x: Tensor, layout: PackedLayout) -> Tensor:
    """Per-memory rows [N, E, ...] -> packed rows [L, ...] (each slot's memory)."""
    return _Select.apply(x, layout.token, layout.memory)


def mix(o_packed: Tensor, layout: PackedLayout, weight: Tensor, out_dtype=None,
        backend: str = "auto") -> Tensor:
    """Sum each token's slots back: y[n] = sum_j weight[n, j] * o_packed[slot_row[n, j]].

    o_packed: [L, ...]; weight: [N, S]. Accumulates in float32 (float64 for float64 weights)
    and returns weight's dtype, or `out_dtype` (rounded once, at the end). The arithmetic is
    `megatron_mom.ops.mix` (Triton on CUDA under "auto"); the layout supplies the permutation
    and its inverse."""
    return ops_mix(o_packed, layout.slot_row, weight, out_dtype, token=layout.token,
                   slot=layout.slot, backend=backend)


def grouped_linear(x: Tensor, layout: PackedLayout, weight: Tensor) -> Tensor:
    """Token rows x [N, D] -> packed rows [L, C]: each row projected by its own memory's weight
    (weight [E, C, D], memory e's rows of a linear weight), as one `torch._grouped_mm`.

    Needs a dtype/device torch._grouped_mm supports and 16-byte strides (D and C)."""
    ends = memory_ends(layout, weight.shape[0])                            # [E] int32
    return _GroupedLinear.apply(x, weight, layout.token, layout.slot_row, ends)


def sequence_ids(batch: int, seqlen: int, cu_seqlens: Tensor | None, device) -> tuple[Tensor, int]:
    """Sequence index of each token in time-major order (n = t * batch + i), and the number of
    sequences.

    Without `cu_seqlens` every batch row is a sequence; with it (packed documents, batch 1)
    each document is its own sequence."""
    if cu_seqlens is None:
        ids = torch.arange(batch, device=device).repeat(seqlen)         # [s * b]
        return ids, batch
    tok = torch.arange(batch * seqlen, device=device)
    ids = torch.searchsorted(cu_seqlens[1:].to(device), tok, right=True)
    return ids.clamp(max=cu_seqlens.numel() - 2), cu_seqlens.numel() - 1
