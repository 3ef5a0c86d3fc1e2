"""Which implementation an op runs: its Triton kernels or its torch reference."""
from __future__ import annotations

import importlib
from typing import Callable, Optional


def triton_impl(op: str, name: str, backend: str, suits: bool) -> Optional[Callable]:
    """The Triton function `name` of `megatron_mom.ops.<op>.triton` when `backend` asks for
    it ("triton", or "auto" where `suits` says Triton fits the inputs, e.g. CUDA tensors), else
    None, and the caller runs its torch reference. "auto" falls back quietly when the Triton
    module cannot be imported; "triton" raises."""
    if not (backend == "triton" or (backend == "auto" and suits)):
        return None
    try:
        return getattr(importlib.import_module(f"megatron_mom.ops.{op}.triton"), name)
    except ImportError:
        if backend == "triton":
            raise
        return None
