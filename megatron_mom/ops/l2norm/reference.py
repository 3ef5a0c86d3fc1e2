import torch
from torch import Tensor

from megatron_mom.ops.common import compute_dtype


def l2norm_reference(x: Tensor, eps: float = 1e-6) -> Tensor:
    ct = compute_dtype(x.dtype)
    xf = x.to(ct)
    return (xf * torch.rsqrt(xf.square().sum(-1, keepdim=True) + eps)).to(x.dtype)
