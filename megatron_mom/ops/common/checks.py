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
