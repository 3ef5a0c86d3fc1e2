import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_mom.ops.common import compute_dtype


def gated_rmsnorm_reference(y: Tensor, gate, weight: Tensor, eps: float) -> Tensor:
    """rmsnorm(y) * weight * silu(gate) over the last dimension; gate may be None."""
    ct = compute_dtype(y.dtype)
    yf = y.to(ct)
    out = yf * torch.rsqrt(yf.square().mean(-1, keepdim=True) + eps) * weight.to(ct)
    if gate is not None:
        out = out * F.silu(gate.to(ct))
    return out.to(y.dtype)
