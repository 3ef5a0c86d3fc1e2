"""Per-head L2 normalisation: z / sqrt(sum z^2 + eps) over the last dimension."""
from __future__ import annotations

from torch import Tensor

from megatron_mom.ops.common import triton_impl
from megatron_mom.ops.l2norm.reference import l2norm_reference


def l2norm(x: Tensor, eps: float = 1e-6, backend: str = "auto") -> Tensor:
    """L2-normalise the last dimension of x, accumulating in float32 (float64 for float64)."""
    impl = triton_impl("l2norm", "l2norm", backend, x.device.type == "cuda")
    if impl is not None:
        return impl(x, eps)
    return l2norm_reference(x, eps)


__all__ = ["l2norm", "l2norm_reference"]
