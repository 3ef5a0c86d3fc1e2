"""The mix in plain PyTorch: runs anywhere (float64 included) and is the Triton kernels' oracle.

`slot_row` [N, S] is a permutation of the L = N * S packed rows, so the backward is a gather
(`index_select`) and a store to every row exactly once: deterministic, no atomic adds, no
zero-filled [L, ...] buffer to add into.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


class _MixReference(torch.autograd.Function):
    """y[n] = sum_j weight[n, j] * o[slot_row[n, j]], accumulated in weight's dtype."""

    @staticmethod
    def forward(ctx, o, weight, slot_row, token, slot, out_dtype):
        ctx.save_for_backward(o, weight, token, slot)
        S = slot_row.shape[1]
        out_dtype = out_dtype or weight.dtype
        for j in range(S):  # S is 2-4: no [N, S, ...] temporary kept
            # o (bf16) * weight (float32) promotes: products and sums are in weight's dtype
            term = o.index_select(0, slot_row[:, j]) * _expand(weight[:, j], o.dim() - 1)
            if j == 0:
                y = term
            elif j < S - 1:
                y.add_(term)
            else:  # the last add rounds once, into the output dtype
                y = torch.add(y, term, out=term.new_empty(term.shape, dtype=out_dtype))
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, dy):
        o, weight, token, slot = ctx.saved_tensors
        ct = weight.dtype
        dy_rows = dy.index_select(0, token)                            # [L, ...] dy of each row
        w_rows = _expand(weight.reshape(-1).index_select(0, slot), o.dim() - 1)
        d_w = None
        if ctx.needs_input_grad[1]:
            d_rows = (dy_rows.to(ct) * o).flatten(1).sum(-1)           # [L] in weight's dtype
            d_w = d_rows.new_empty(weight.numel()).index_copy_(0, slot, d_rows).view(weight.shape)
        d_o = torch.mul(dy_rows, w_rows, out=torch.empty_like(o))      # computed in weight's dtype
        return d_o, d_w, None, None, None, None


def _expand(w: Tensor, trailing: int) -> Tensor:
    return w.view(-1, *([1] * trailing))


def sum_over_slots(packed: Tensor, slot_row: Tensor) -> Tensor:
    """Packed rows [L, ...] -> per token [N, ...]: the sum of each token's S rows (the
    backward of copying every token to its S packed rows), by one gather, no scatter-add."""
    N, S = slot_row.shape
    rows = packed.index_select(0, slot_row.view(-1))                   # [N * S, ...]
    return rows.view(N, S, *packed.shape[1:]).sum(1)


def inverse_slots(slot_row: Tensor) -> Tuple[Tensor, Tensor]:
    """(token [L], slot [L]) of each packed row: the inverse permutation of `slot_row` [N, S]
    (slot = n * S + j), for callers that do not keep it already."""
    flat = slot_row.reshape(-1)
    slot = torch.empty_like(flat)
    slot[flat] = torch.arange(flat.numel(), device=flat.device)
    return slot // slot_row.shape[1], slot


def mix_reference(o: Tensor, slot_row: Tensor, weight: Tensor, out_dtype=None,
                  token: Optional[Tensor] = None, slot: Optional[Tensor] = None) -> Tensor:
    """o [L, ...], slot_row [N, S], weight [N, S] -> y [N, ...] in out_dtype (default weight's).
    `token`, `slot` [L]: the inverse of slot_row, derived when not given."""
    if token is None or slot is None:
        token, slot = inverse_slots(slot_row)
    return _MixReference.apply(o, weight, slot_row, token, slot, out_dtype)
