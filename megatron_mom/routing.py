"""Token order <-> memory-major packed order.

Every token is written to S slots: its top-k memories plus (optionally) the shared memory.
The packed layout lays those N * S (token, memory) rows out memory-major, then sequence, then
time, so that each (memory, sequence) pair is one contiguous segment: the recurrence and the
short convolutions then run on `cu_seqlens` segments and never cross a memory or a sequence.

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
    """memory: [N, S] memory per slot (distinct within a row); seq_id: [N] non-decreasing
    sequence index of each token (tokens are in sequence-major, time order)."""
    N, S = memory.shape
    token = torch.arange(N, device=memory.device)
    # Rows sorted by (memory, token) are sorted by (memory, sequence, time).
    key = (memory * N + token[:, None]).reshape(-1)                    # [N * S]
    order = torch.argsort(key)
    slot_row = torch.empty_like(order)
    slot_row[order] = torch.arange(N * S, device=memory.device)
    seg = (memory * num_seqs + seq_id[:, None]).reshape(-1)
    counts = torch.zeros(num_memories * num_seqs, dtype=torch.int64, device=memory.device)
    counts.scatter_add_(0, seg, torch.ones_like(seg))
    cu_seqlens = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return PackedLayout(token=order // S, memory=memory.reshape(-1)[order],
                        slot_row=slot_row.view(N, S), cu_seqlens=cu_seqlens)


def mix(o_packed: Tensor, layout: PackedLayout, weight: Tensor) -> Tensor:
    """Sum each token's slots back: y[n] = sum_j weight[n, j] * o_packed[slot_row[n, j]].

    o_packed: [L, ...]; weight: [N, S]. Accumulates in weight's dtype (float32 or float64).
    A gather, not a scatter: deterministic."""
    o_slots = o_packed[layout.slot_row]                                # [N, S, ...]
    w = weight.view(*weight.shape, *([1] * (o_slots.dim() - 2)))
    return (o_slots.to(weight.dtype) * w).sum(1)


def sequence_ids(batch: int, seqlen: int, cu_seqlens: Tensor | None, device) -> tuple[Tensor, int]:
    """Sequence index of each token in sequence-major order, and the number of sequences.

    Without `cu_seqlens` every batch row is a sequence; with it (packed documents, batch 1)
    each document is its own sequence."""
    if cu_seqlens is None:
        ids = torch.arange(batch, device=device).repeat_interleave(seqlen)
        return ids, batch
    tok = torch.arange(batch * seqlen, device=device)
    ids = torch.searchsorted(cu_seqlens[1:].to(device), tok, right=True)
    return ids.clamp(max=cu_seqlens.numel() - 2), cu_seqlens.numel() - 1
