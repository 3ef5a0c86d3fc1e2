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


@dataclass
class PackedLayout:
    token: Tensor       # [L] token index of each packed row, L = N * S
    memory: Tensor      # [L] memory index of each packed row
    slot_row: Tensor    # [N, S] packed row of each (token, slot)
    cu_seqlens: Tensor  # [E * Q + 1] segment boundaries, segment (m, q) at m * Q + q

    @property
    def num_rows(self) -> int:
        return self.token.numel()


def pack(memory: Tensor, seq_id: Tensor, num_seqs: int, num_memories: int) -> PackedLayout:
    """memory: [N, S] memory per slot (distinct within a row); seq_id: [N] sequence index of
    each token. Sequences may interleave (time-major order), but within a sequence token
    indices must increase with time."""
    N, S = memory.shape
    token = torch.arange(N, device=memory.device)
    seg = (memory * num_seqs + seq_id[:, None]).reshape(-1)            # [N * S] segment of a row
    # Sorting by (segment, token) sorts by (memory, sequence, time) whatever the interleaving of
    # sequences. Keys stay below E * Q * N (< 2**63 for any realistic N).
    key = seg * N + token.repeat_interleave(S)
    order = torch.argsort(key)                                         # packed row -> n * S + j
    slot_row = torch.empty_like(order)
    slot_row[order] = torch.arange(N * S, device=memory.device)
    counts = torch.zeros(num_memories * num_seqs, dtype=torch.int64, device=memory.device)
    counts.scatter_add_(0, seg, torch.ones_like(seg))
    cu_seqlens = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return PackedLayout(token=order // S, memory=memory.reshape(-1)[order],
                        slot_row=slot_row.view(N, S), cu_seqlens=cu_seqlens)


# Every packed row belongs to exactly one (token, slot): `slot_row` is a permutation of the
# rows. The three moves below use that to write their backward passes as plain gathers and
# non-accumulating stores: deterministic (no atomic adds) and without autograd's index_put
# accumulation, and the mix keeps only the packed read-out for its backward.

class _Spread(torch.autograd.Function):
    """x [N, ...] in token order -> [L, ...]: each token copied to its S packed rows."""

    @staticmethod
    def forward(ctx, x, token, slot_row):
        ctx.save_for_backward(slot_row)
        return x[token]

    @staticmethod
    def backward(ctx, grad):
        (slot_row,) = ctx.saved_tensors
        return grad[slot_row].sum(1), None, None                      # [N, ...]


class _Select(torch.autograd.Function):
    """x [N, E, ...] -> [L, ...]: each packed row takes its token's row of its memory."""

    @staticmethod
    def forward(ctx, x, token, memory):
        ctx.save_for_backward(token, memory)
        ctx.shape = x.shape
        return x[token, memory]

    @staticmethod
    def backward(ctx, grad):
        token, memory = ctx.saved_tensors
        out = grad.new_zeros(ctx.shape)
        out[token, memory] = grad                                      # distinct pairs
        return out, None, None


class _Mix(torch.autograd.Function):
    """y[n] = sum_j weight[n, j] * o[slot_row[n, j]], accumulated in weight's dtype."""

    @staticmethod
    def forward(ctx, o, weight, slot_row):
        ctx.save_for_backward(o, weight, slot_row)
        y = None
        for j in range(slot_row.shape[1]):  # S is 2-3: no [N, S, ...] temporary kept
            term = o[slot_row[:, j]].to(weight.dtype) * _expand(weight[:, j], o.dim() - 1)
            y = term if y is None else y + term
        return y

    @staticmethod
    def backward(ctx, dy):
        o, weight, slot_row = ctx.saved_tensors
        N, S = slot_row.shape
        w = weight.view(N, S, *([1] * (o.dim() - 1)))
        d_o = torch.empty_like(o)
        d_o[slot_row.reshape(-1)] = (w * dy[:, None]).reshape(N * S, *o.shape[1:]).to(o.dtype)
        d_w = None
        if ctx.needs_input_grad[1]:
            o_slots = o[slot_row].to(dy.dtype)                         # [N, S, ...]
            d_w = (o_slots * dy[:, None]).flatten(2).sum(-1).to(weight.dtype)
        return d_o, d_w, None


def _expand(w: Tensor, trailing: int) -> Tensor:
    return w.view(-1, *([1] * trailing))


def spread(x: Tensor, layout: PackedLayout) -> Tensor:
    """Token-order rows [N, ...] -> packed rows [L, ...] (each token to its S slots)."""
    return _Spread.apply(x, layout.token, layout.slot_row)


def select(x: Tensor, layout: PackedLayout) -> Tensor:
    """Per-memory rows [N, E, ...] -> packed rows [L, ...] (each slot's memory)."""
    return _Select.apply(x, layout.token, layout.memory)


def mix(o_packed: Tensor, layout: PackedLayout, weight: Tensor) -> Tensor:
    """Sum each token's slots back: y[n] = sum_j weight[n, j] * o_packed[slot_row[n, j]].

    o_packed: [L, ...]; weight: [N, S]. Accumulates in weight's dtype (float32 or float64)."""
    return _Mix.apply(o_packed, weight, layout.slot_row)


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
