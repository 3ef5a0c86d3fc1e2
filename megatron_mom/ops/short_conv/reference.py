"""Causal depthwise short convolution over packed sequences, in plain PyTorch.

y_t = act(sum_i w[c, i] * x_{t - (W-1) + i}), where inputs before a sequence's first token come
from that sequence's `initial_state` (its previous W-1 inputs, oldest first) or are zero.
Nothing crosses a sequence boundary.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_mom.ops.common import compute_dtype


def seq_positions(cu_seqlens: Tensor, total: int) -> Tuple[Tensor, Tensor]:
    """For each packed token: (index of its sequence, position inside that sequence)."""
    tok = torch.arange(total, device=cu_seqlens.device)
    seq = torch.searchsorted(cu_seqlens[1:], tok, right=True)
    return seq, tok - cu_seqlens[seq]


def short_conv_reference(
    x: Tensor, weight: Tensor, cu_seqlens: Optional[Tensor] = None,
    initial_state: Optional[Tensor] = None, output_final_state: bool = False,
    activation: Optional[str] = "silu",
) -> Tuple[Tensor, Optional[Tensor]]:
    """x: [B, T, C] (B == 1 with cu_seqlens); weight: [C, W]; states: [N, C, W-1].

    Returns (y like x, final_state [N, C, W-1] or None): the last W-1 inputs of each sequence.
    """
    B, T, C = x.shape
    W = weight.shape[-1]
    ct = compute_dtype(x.dtype)
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, (B + 1) * T, T, device=x.device)
    flat = x.reshape(B * T, C).to(ct)
    seq, pos = seq_positions(cu_seqlens, B * T)
    w = weight.to(ct)
    init = None if initial_state is None else initial_state.to(ct)

    def tap(d: int) -> Tensor:
        """x_{t-d} for every packed token t, taken from history where it precedes the sequence."""
        if d == 0:  # the token itself: never from history (which W = 1 does not have)
            return flat
        shifted = F.pad(flat, (0, 0, d, 0))[: B * T]
        inside = (pos >= d)[:, None]
        if init is None:  # a select, not a product: 0 * NaN would carry NaN across the boundary
            return torch.where(inside, shifted, 0.0)
        hist = init[seq, :, (W - 1 + pos - d).clamp(min=0, max=max(W - 2, 0))]
        return torch.where(inside, shifted, hist)

    y = sum(w[:, W - 1 - d] * tap(d) for d in range(W))
    if activation == "silu":
        y = F.silu(y)
    elif activation is not None:
        raise ValueError(f"short_conv: activation must be 'silu' or None, got {activation!r}")
    y = y.to(x.dtype).reshape(B, T, C)

    final = final_state(flat, cu_seqlens, W, init) if output_final_state else None
    return y, final


def final_state(rows: Tensor, cu_seqlens: Tensor, W: int, init: Optional[Tensor],
                row_of: Optional[Tensor] = None) -> Tensor:
    """Each sequence's last W-1 inputs [N, C, W-1], oldest first, from its packed rows [TT, C]
    (packed row t is rows[row_of[t]] when `row_of` [TT] is given) or, where the sequence is
    shorter, from its initial state [N, C, W-1] (or zeros). Differentiable in rows and init."""
    N, C = cu_seqlens.numel() - 1, rows.shape[1]
    TT = rows.shape[0] if row_of is None else row_of.numel()
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    cols = []
    for j in range(W - 1):  # column j holds the input at position len - (W-1) + j
        p = lengths - (W - 1) + j
        t = (cu_seqlens[:-1] + p).clamp(min=0, max=max(TT - 1, 0))
        from_x = rows[t if row_of is None else row_of[t].long()] if TT else rows.new_zeros(N, C)
        if init is None:
            hist = rows.new_zeros(N, C)
        else:
            hist = init[torch.arange(N, device=rows.device), :, (W - 1 + p).clamp(0, W - 2)]
        cols.append(torch.where((p >= 0)[:, None], from_x, hist))
    return torch.stack(cols, dim=-1) if cols else rows.new_zeros(N, C, 0)


def short_conv_split_reference(
    x: Tensor, weights: Sequence[Optional[Tensor]], sizes: Sequence[int],
    cu_seqlens: Optional[Tensor] = None, activation: Optional[str] = "silu",
) -> Tuple[Tensor, ...]:
    """Split x [B, T, sum(sizes)] into column groups and convolve group i with weights[i]
    (None: the group as it is, a view of x)."""
    parts = x.split(list(sizes), dim=-1)
    return tuple(p if w is None else short_conv_reference(p, w, cu_seqlens, activation=activation)[0]
                 for p, w in zip(parts, weights))
