"""Small helpers shared by the Triton kernels of `megatron_mom.ops` (no Megatron imports).

Packed sequences are described by `cu_seqlens` [N+1] (int32, on the device). Chunk-parallel
kernels launch one program per chunk for an upper bound of the chunk count
(T_total // C + N, known from shapes alone) and find their (sequence, chunk) on the device by a
binary search over `chunk_offsets` [N+1], the running count of chunks per sequence. Nothing
here reads a device value on the host, so launches stay CUDA-graph capturable.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor


def dense_cu_seqlens(batch: int, seqlen: int, device: torch.device) -> Tensor:
    """cu_seqlens [B+1] that describes B dense rows of `seqlen` tokens as packed sequences."""
    return torch.arange(0, (batch + 1) * seqlen, seqlen, device=device, dtype=torch.int32)


def chunk_offsets(cu_seqlens: Tensor, chunk_size: int) -> Tensor:
    """[N+1] int32: chunk_offsets[n] = number of chunks of sequences 0..n-1 (device-side)."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    counts = torch.div(lengths + chunk_size - 1, chunk_size, rounding_mode="floor")
    out = torch.zeros(cu_seqlens.numel(), dtype=torch.int32, device=cu_seqlens.device)
    out[1:] = counts.cumsum(0)
    return out


def max_chunks(total_tokens: int, num_seqs: int, chunk_size: int) -> int:
    """Upper bound of sum_n ceil(L_n / C) over sequences whose lengths sum to total_tokens."""
    return total_tokens // chunk_size + num_seqs


def search_steps(num_seqs: int) -> int:
    """Binary-search iterations that pin one of `num_seqs` sequences down."""
    return max(1, math.ceil(math.log2(max(num_seqs, 1))) + 1)


def as_int32(cu_seqlens: Optional[Tensor]) -> Optional[Tensor]:
    if cu_seqlens is None:
        return None
    return cu_seqlens if cu_seqlens.dtype == torch.int32 else cu_seqlens.to(torch.int32)


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


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))
