"""`short_conv`: causal depthwise convolution (+ SiLU) over packed sequences."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from megatron_mom.ops.backend import triton_impl
from megatron_mom.ops.short_conv.reference import short_conv_reference


def short_conv(
    x: Tensor, weight: Tensor, *, cu_seqlens: Optional[Tensor] = None,
    initial_state: Optional[Tensor] = None, output_final_state: bool = False,
    activation: Optional[str] = "silu", backend: str = "auto",
) -> Tuple[Tensor, Optional[Tensor]]:
    """x: [B, T, C] (B == 1 with cu_seqlens), weight: [C, W], states: [N, C, W-1]."""
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"short_conv: x must be [B, T, C] and weight [C, W]; got x "
                         f"{tuple(x.shape)}, weight {tuple(weight.shape)}")
    if cu_seqlens is not None and x.shape[0] != 1:
        raise ValueError(f"short_conv: with cu_seqlens the batch must be 1, got {x.shape[0]}")
    impl = triton_impl("short_conv", "short_conv", backend, x.device.type == "cuda")
    if impl is not None:
        return impl(x, weight, cu_seqlens=cu_seqlens, initial_state=initial_state,
                    output_final_state=output_final_state, activation=activation)
    return short_conv_reference(x, weight, cu_seqlens, initial_state, output_final_state, activation)


__all__ = ["short_conv", "short_conv_reference"]
