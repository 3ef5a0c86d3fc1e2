"""Launching a Triton kernel with a pipelined build, falling back to one stage where that
build needs more shared memory than the GPU has."""
from __future__ import annotations

import traceback

from torch import Tensor
from triton.runtime.errors import OutOfResources

# Builds (kernel, tensor dtypes, compile-time arguments) whose pipelined form needs more shared
# memory than this GPU has: they launch with num_stages=1 from then on (a cache of a fact about
# the hardware, not a setting).
_ONE_STAGE = set()


def launch(kernel, grid, *args, num_stages: int, **kwargs) -> None:
    """kernel[grid](*args, num_stages=num_stages, **kwargs); if the pipelined build needs more
    shared memory than this GPU has, num_stages=1 instead (a compile-time check, no device
    sync), remembered for the build: the failed launch raises every time, and its traceback's
    frames hold the launch's tensors until the garbage collector breaks their cycles (it kept
    ~350 MiB alive in the layer)."""
    key = (kernel, tuple(a.dtype for a in args if isinstance(a, Tensor)),
           tuple(sorted(kwargs.items())))
    if num_stages > 1 and key not in _ONE_STAGE:
        try:
            kernel[grid](*args, num_stages=num_stages, **kwargs)
            return
        except OutOfResources as err:
            traceback.clear_frames(err.__traceback__)
            _ONE_STAGE.add(key)
    kernel[grid](*args, num_stages=1, **kwargs)
