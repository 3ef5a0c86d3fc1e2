"""Side CUDA streams: independent launches run beside each other (sequential kernels leave
most of the GPU idle)."""
from __future__ import annotations

import contextlib
from typing import Dict, Tuple

import torch

# One stream per (device, slot), made on first use and kept: a cache, never a switch.
_SIDE_STREAMS: Dict[Tuple[torch.device, int], "torch.cuda.Stream"] = {}


@contextlib.contextmanager
def beside(device: torch.device, slot: int = 0, enabled: bool = True):
    """Work enqueued inside the block goes to a side stream, after everything already enqueued
    on the current one, and runs beside what the current stream gets next. Yields `join`, which
    makes the current stream wait for that work: call it before reading the block's results or
    freeing its inputs. Tensors the block uses must be made outside it (on the current stream),
    so that the caching allocator keeps them in the current stream's pool. A plain block where
    there is no CUDA stream (CPU, the Triton interpreter) or when not `enabled`
    (KernelOptions.side_streams). `slot` picks one of several side streams, for blocks meant to
    run beside each other too."""
    if not (enabled and device.type == "cuda"):
        yield lambda: None
        return
    main = torch.cuda.current_stream(device)
    side = _SIDE_STREAMS.get((device, slot))
    if side is None:
        side = _SIDE_STREAMS[(device, slot)] = torch.cuda.Stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        yield lambda: main.wait_stream(side)
