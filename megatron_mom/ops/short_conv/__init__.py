"""`short_conv`: causal depthwise convolution (+ SiLU) over packed sequences.

Two forms save memory traffic where the layer feeds the convolutions:
- `short_conv(..., gather=(x_row, slot_row))` convolves rows of x picked by an index (each
  token's S packed copies) without building the packed copy;
- `short_conv_split` convolves consecutive column groups of one input with their own weights,
  and its backward fills one gradient for that input (no cat of per-group gradients).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from megatron_mom.ops.common import need_cu_seqlens, triton_impl
from megatron_mom.ops.short_conv.reference import short_conv_reference, short_conv_split_reference


def short_conv(
    x: Tensor, weight: Tensor, *, cu_seqlens: Optional[Tensor] = None,
    initial_state: Optional[Tensor] = None, output_final_state: bool = False,
    activation: Optional[str] = "silu", gather: Optional[Tuple[Tensor, Tensor]] = None,
    backend: str = "auto",
) -> Tuple[Tensor, Optional[Tensor]]:
    """x: [B, T, C] (B == 1 with cu_seqlens), weight: [C, W], states: [N, C, W-1].

    `gather` = (x_row [L], slot_row [T, S]), L = T * S: convolve the L packed rows
    x[0, x_row[r]] (x is [1, T, C], y is [1, L, C]) without building that copy. slot_row must be
    x_row's inverse, each x row's S packed rows (packing.PackedLayout.token and .slot_row): the
    gradient of x is then the sum over those S rows, by a gather (no scatter-add). Same result
    as `short_conv(x[:, x_row], ...)`; the Triton backward keeps x and the index, not the copy."""
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"short_conv: x must be [B, T, C] and weight [C, W]; got x "
                         f"{tuple(x.shape)}, weight {tuple(weight.shape)}")
    if (cu_seqlens is not None or gather is not None) and x.shape[0] != 1:
        raise ValueError(f"short_conv: with cu_seqlens or gather the batch must be 1, got "
                         f"{x.shape[0]}")
    if gather is not None:
        _check_gather(x, *gather)
    need_cu_seqlens("short_conv", cu_seqlens, x.shape[1] if gather is None else gather[0].numel())
    impl = triton_impl("short_conv", "short_conv", backend, x.device.type == "cuda")
    if impl is not None:
        return impl(x, weight, cu_seqlens=cu_seqlens, initial_state=initial_state,
                    output_final_state=output_final_state, activation=activation, gather=gather)
    if gather is not None:
        x = x.index_select(1, gather[0])                                # [1, L, C]
    return short_conv_reference(x, weight, cu_seqlens, initial_state, output_final_state, activation)


def _check_gather(x: Tensor, x_row: Tensor, slot_row: Tensor):
    if (x_row.dim() != 1 or slot_row.dim() != 2 or slot_row.shape[0] != x.shape[1]
            or slot_row.numel() != x_row.numel()
            or x_row.dtype not in (torch.int32, torch.int64) or x_row.device != x.device):
        raise ValueError(f"short_conv: gather must be (x_row [L] int, slot_row [T, S]) with "
                         f"L = T * S for x [1, T, C] on x's device; got x {tuple(x.shape)}, "
                         f"x_row {tuple(x_row.shape)} {x_row.dtype} on {x_row.device}, "
                         f"slot_row {tuple(slot_row.shape)}")


def short_conv_split(
    x: Tensor, weights: Sequence[Optional[Tensor]], sizes: Sequence[int], *,
    cu_seqlens: Optional[Tensor] = None, activation: Optional[str] = "silu",
    backend: str = "auto",
) -> Tuple[Tensor, ...]:
    """`short_conv` of each column group of x [B, T, sum(sizes)] with its own weight:
    weights[i] [sizes[i], W_i], or None to pass group i through unchanged (no convolution, no
    activation). Returns one [B, T, sizes[i]] per group (contiguous on the Triton path).

    Same result as splitting x and convolving each part, but the Triton backward writes every
    group's input gradient into one buffer of x's shape (a group whose output gets no gradient
    gives zeros there), where a split's backward would cat the groups' gradients. x may be a
    strided view (last dim contiguous)."""
    if x.dim() != 3 or len(weights) != len(sizes) or sum(sizes) != x.shape[-1]:
        raise ValueError(f"short_conv_split: x must be [B, T, sum(sizes)] with one weight per "
                         f"size; got x {tuple(x.shape)}, sizes {list(sizes)}, "
                         f"{len(weights)} weights")
    for w, c in zip(weights, sizes):
        if w is not None and (w.dim() != 2 or w.shape[0] != c):
            raise ValueError(f"short_conv_split: weight {tuple(w.shape)} must be [{c}, W]")
    if cu_seqlens is not None and x.shape[0] != 1:
        raise ValueError(f"short_conv_split: with cu_seqlens the batch must be 1, got {x.shape[0]}")
    need_cu_seqlens("short_conv_split", cu_seqlens, x.shape[1])
    impl = triton_impl("short_conv", "short_conv_split", backend, x.device.type == "cuda")
    if impl is not None:
        return impl(x, weights, sizes, cu_seqlens=cu_seqlens, activation=activation)
    return short_conv_split_reference(x, weights, sizes, cu_seqlens, activation)


__all__ = ["short_conv", "short_conv_split", "short_conv_reference", "short_conv_split_reference"]
