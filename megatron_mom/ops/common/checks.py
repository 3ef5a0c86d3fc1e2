"""Input validation and dtypes shared by the ops: one error form, one list of dtypes each."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

# What every op's torch path takes, and what the Triton kernels take (float64 runs on torch).
FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def checker(where: str) -> Callable[[bool, str], None]:
    """need(ok, msg): raise ValueError("<where>: <msg>") unless `ok`. `where` names the op (or
    config), `msg` the parameter and the fix."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(f"{where}: {msg}")
    return need


def need_triton_dtypes(where: str, **tensors: Optional[Tensor]) -> None:
    """Every given tensor (None: skipped) in a dtype the Triton kernels take."""
    need = checker(where)
    for name, t in tensors.items():
        if t is not None:
            need(t.dtype in TRITON_DTYPES, f"{name} has dtype {t.dtype}; the Triton kernels "
                 f"take float32, bfloat16 or float16 (use backend='torch' for float64)")


def need_device(where: str, device: torch.device, **tensors: Optional[Tensor]) -> None:
    """Every given tensor (None: skipped) on `device`, where the kernels read it."""
    need = checker(where)
    for name, t in tensors.items():
        if t is not None:
            need(t.device == device, f"{name} is on {t.device}, the inputs on {device}; the "
                 f"kernels read it on the device")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an op accumulates in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Where need_cu_seqlens reads the values: free on the CPU; on a GPU a host sync.
VALUES_CHECKED_ON = ("cpu",)


def need_cu_seqlens(where: str, cu_seqlens: Optional[Tensor], total: int) -> None:
    """cu_seqlens [N+1]: an integer tensor of cumulative sequence lengths, 0 first, `total`
    (the packed tokens) last, never decreasing. Its values are checked only on the CPU: on a
    GPU reading them would stop the host until the device catches up (a host sync) and break
    CUDA-graph capture, so there the caller's word is taken; wrong values there read and write
    outside the sequences."""
    if cu_seqlens is None:
        return
    need = checker(where)
    need(cu_seqlens.dim() == 1 and cu_seqlens.numel() >= 2 and cu_seqlens.dtype in (
        torch.int32, torch.int64), f"cu_seqlens must be a 1-D int32 or int64 tensor [N+1] of "
         f"cumulative sequence lengths, got {cu_seqlens.dtype} of shape "
         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.device.type in VALUES_CHECKED_ON:
        first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
        need(first == 0 and last == total, f"cu_seqlens must start at 0 and end at the number "
             f"of packed tokens ({total}), got {first} ... {last}")
        need(bool((cu_seqlens[1:] >= cu_seqlens[:-1]).all()),
             "cu_seqlens must never decrease (sequence lengths >= 0)")
