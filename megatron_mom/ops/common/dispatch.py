"""Which implementation an op runs: its Triton kernels or its torch reference (the one backend
dispatch of `megatron_mom.ops`)."""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Callable, Optional, Sequence

BACKENDS = ("auto", "triton", "torch")


def triton_module(op: str, required: bool = False) -> Optional[ModuleType]:
    """`megatron_mom.ops.<op>.triton`, or None when it cannot be imported here (no Triton);
    `required`: raise instead, saying which backend to use."""
    try:
        return importlib.import_module(f"megatron_mom.ops.{op}.triton")
    except ImportError as err:
        if required:
            raise RuntimeError(f"{op}: backend='triton' needs the `triton` package and "
                               f"megatron_mom's Triton kernels ({err}); use backend='torch' "
                               f"instead") from err
        return None


def interpreting() -> bool:
    """Whether Triton interprets its kernels on the CPU (TRITON_INTERPRET=1) rather than
    compiling them for a GPU."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(op: str, backend: str, suits: bool,
                    choices: Sequence[str] = BACKENDS) -> str:
    """The backend one call of `op` runs: "auto" is "triton" where `suits` (the inputs fit the
    kernels, e.g. CUDA tensors) and the Triton module imports, else "torch"; "triton" raises a
    clear error where the inputs do not suit the kernels (unless TRITON_INTERPRET=1) or the
    module cannot be imported; the others (e.g. "torch") as given."""
    if backend not in choices:
        raise ValueError(f"{op}: backend must be one of {tuple(choices)}, got {backend!r}")
    if backend == "auto":
        return "triton" if suits and triton_module(op) is not None else "torch"
    if backend == "triton":
        # before the import: a kernel module imported outside the interpreter stays compiled
        if not suits and not interpreting():
            raise RuntimeError(f"{op}: backend='triton' runs the kernels on CUDA tensors "
                               f"(float32, float16 or bfloat16), and these inputs are not; use "
                               f"backend='auto' (Triton where it can run, else torch) or "
                               f"'torch', or set TRITON_INTERPRET=1 to interpret the kernels "
                               f"on the CPU")
        triton_module(op, required=True)
    return backend


def triton_impl(op: str, name: str, backend: str, suits: bool) -> Optional[Callable]:
    """The Triton function `name` of `op` when `resolve_backend` picks Triton, else None (the
    caller runs its torch reference)."""
    if resolve_backend(op, backend, suits) != "triton":
        return None
    return getattr(triton_module(op, required=True), name)
