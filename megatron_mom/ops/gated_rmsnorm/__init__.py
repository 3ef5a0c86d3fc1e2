"""`gated_rmsnorm`: per-head RMSNorm of the memory read-out, times silu(output gate)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from megatron_mom.ops.common import triton_impl
from megatron_mom.ops.gated_rmsnorm.reference import gated_rmsnorm_reference


def gated_rmsnorm(y: Tensor, gate: Optional[Tensor], weight: Tensor, eps: float = 1e-6,
                  backend: str = "auto") -> Tensor:
    """y, gate: [..., V]; weight: [V]. Returns rmsnorm(y) * weight * silu(gate) in y's dtype."""
    if y.shape[-1] != weight.shape[-1] or (gate is not None and gate.shape != y.shape):
        raise ValueError(f"gated_rmsnorm: y {tuple(y.shape)}, gate "
                         f"{None if gate is None else tuple(gate.shape)} and weight "
                         f"{tuple(weight.shape)} must share the last dimension")
    impl = triton_impl("gated_rmsnorm", "gated_rmsnorm", backend, y.device.type == "cuda")
    if impl is not None:
        return impl(y, gate, weight, eps)
    return gated_rmsnorm_reference(y, gate, weight, eps)


__all__ = ["gated_rmsnorm", "gated_rmsnorm_reference"]
