"""Triton device functions shared by the kernels: which sequence (or chunk run) holds an
index, by a binary search on the device (see `ops.common.segments`)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _halve(offsets, index, lo, hi):
    """One binary-search step of `sequence_of`: keep the half of [lo, hi) that holds index."""
    mid = (lo + hi) // 2
    right = tl.load(offsets + mid) <= index
    return tl.where(right, mid, lo), tl.where(right, hi, mid)


@triton.jit
def sequence_of(offsets, index, N, STEPS):
    """Largest n in [0, N) with offsets[n] <= index: the sequence (or chunk run) that holds
    `index`, given non-decreasing start offsets (empty sequences are skipped). `index` may be
    a scalar or a block; STEPS >= log2(N) + 1 binary-search steps, all on the device."""
    lo = index * 0
    hi = lo + N
    for _ in range(STEPS):
        lo, hi = _halve(offsets, index, lo, hi)
    return lo


@triton.jit
def sequence_of_unrolled(offsets, index, N, STEPS: tl.constexpr):
    """`sequence_of` with the steps unrolled (STEPS a compile-time constant). For a block of
    indices that feeds tiles of another layout: without the loop the compiler can recompute
    the search in the layout that its users need instead of converting every result."""
    lo = index * 0
    hi = lo + N
    for _ in tl.static_range(STEPS):
        lo, hi = _halve(offsets, index, lo, hi)
    return lo
