"""Packed sequences ("segments") on the host side of the kernels.

Packed sequences are described by `cu_seqlens` [N+1] (int32, on the device). Chunk-parallel
kernels launch one program per chunk for an upper bound of the chunk count
(T_total // C + N, known from shapes alone) and find their (sequence, chunk) on the device by a
binary search over `chunk_offsets` [N+1], the running count of chunks per sequence
(`ops.common.search`). Nothing here reads a device value on the host, so launches stay
CUDA-graph capturable.
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
from torch import Tensor


def dense_cu_seqlens(batch: int, seqlen: int, device: torch.device) -> Tensor:
    """cu_seqlens [B+1] that describes B dense rows of `seqlen` tokens as packed sequences."""
    return torch.arange(batch + 1, device=device, dtype=torch.int32) * seqlen


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


class Segments:
    """Shapes and chunk bookkeeping of packed sequences that the chunked kernels' launches
    share: TT packed tokens of H heads (key size K, value size V) in N sequences given by
    `cu` [N+1] int32, chunks of C tokens, NTU the chunk-count upper bound, `offsets` the
    running chunk count per sequence, `steps` the binary search's iterations."""

    def __init__(self, tokens: int, heads: int, K: int, V: int, cu_seqlens: Tensor,
                 chunk_size: int):
        self.TT, self.H, self.K, self.V, self.C = tokens, heads, K, V, chunk_size
        self.cu = as_int32(cu_seqlens)
        self.N = self.cu.numel() - 1
        self.NTU = max_chunks(self.TT, self.N, chunk_size)
        self.offsets = chunk_offsets(self.cu, chunk_size)
        self.steps = search_steps(self.N)
        # The call's heads; `with_heads` copies keep it, so choices made from shapes (the
        # split state kernels' rule) are the same for every group of heads.
        self.call_heads = heads

    @classmethod
    def of(cls, k: Tensor, v: Tensor, cu_seqlens: Optional[Tensor], chunk_size: int):
        """The segments of k [B, T, H, K], v [B, T, H, V]: the sequences of `cu_seqlens`, or
        B dense rows without it."""
        B, T, H, K = k.shape
        cu = dense_cu_seqlens(B, T, k.device) if cu_seqlens is None else cu_seqlens
        return cls(B * T, H, K, v.shape[-1], cu, chunk_size)

    def with_heads(self, heads: int) -> "Segments":
        """The same sequences and chunk offsets for a launch over `heads` heads."""
        segments = copy.copy(self)
        segments.H = heads
        return segments

    def pieces(self, piece_chunks: int) -> "Pieces":
        """These sequences cut into pieces of `piece_chunks` chunks, made once per length and
        CUDA stream (shared with `with_heads` copies): a table made by launches on a side
        stream (`ops.common.beside`) is read only by that stream's launches, so no stream
        reads one before it is written, nor after its memory is reused."""
        return self._per_stream("_pieces", piece_chunks, lambda: Pieces(self, piece_chunks))

    def longest_first(self, pieces: Optional["Pieces"] = None) -> Tensor:
        """[N] int32 (or [NPU] over `pieces`): the sequence (piece) that each program index
        of a sequential state kernel's launch walks, longest first: the GPU starts programs
        in index order, and a long chain started last is the launch's tail. Made once per
        CUDA stream, as `pieces`."""
        cu = self.cu if pieces is None else pieces.cu
        key = 0 if pieces is None else pieces.L
        return self._per_stream("_orders", key, lambda: longest_first(cu))

    def _per_stream(self, table: str, key, make):
        stream = (torch.cuda.current_stream(self.cu.device).cuda_stream if self.cu.is_cuda
                  else None)
        cache = self.__dict__.setdefault(table, {})
        if (key, stream) not in cache:
            cache[key, stream] = make()
        return cache[key, stream]


def longest_first(cu_seqlens: Tensor) -> Tensor:
    """[N] int32: the sequences of `cu_seqlens` by decreasing length (ties in order),
    computed on the device."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    return torch.argsort(lengths, descending=True, stable=True).to(torch.int32)


class Pieces:
    """Consecutive runs of up to L chunks ("pieces") of the packed sequences, for the
    chunk-parallel state kernels (docs/kernels.md, "Chunk-parallel state passing"): sequence n
    of `segments` is cut every L * C tokens from its start, so pieces hold whole chunks and the
    last piece of a sequence may be shorter; empty sequences have none.

    NPU: piece-count upper bound T_total // (L C) + N (from shapes, like Segments.NTU);
    offsets [N+1] int32: running piece count per sequence; cu [NPU+1] int32: first token of
    each piece (pieces past the real count are empty, at the end of the tokens); first_chunk
    [NPU+1] int32: global chunk id of each piece's first chunk. All computed on the device:
    no host read, so launches over pieces stay CUDA-graph capturable."""

    def __init__(self, segments: Segments, piece_chunks: int):
        if piece_chunks < 1:
            raise ValueError(f"Pieces: piece_chunks must be >= 1, got {piece_chunks}")
        span = piece_chunks * segments.C
        self.L = piece_chunks
        self.N = segments.N
        self.NPU = max_chunks(segments.TT, segments.N, span)
        self.offsets = chunk_offsets(segments.cu, span)
        self.steps = search_steps(self.N)
        self.cu, self.first_chunk = _piece_bounds(segments.cu, segments.offsets, self.offsets,
                                                  self.NPU, piece_chunks, segments.C)


def _piece_bounds(cu: Tensor, chunk_offs: Tensor, piece_offs: Tensor, num_pieces: int,
                  piece_chunks: int, chunk_size: int):
    """(first token [NPU+1], first chunk [NPU+1]) of every piece, by a search of each piece
    index in the running piece counts; indices past the real count clamp to the end."""
    n_seq = cu.numel() - 1
    index = torch.arange(num_pieces, device=cu.device, dtype=torch.int32)
    # The sequence holding piece p: the last n with offsets[n] <= p (skips empty sequences).
    seq = torch.searchsorted(piece_offs[1:], index, right=True).clamp_(max=max(n_seq - 1, 0))
    local = index - piece_offs[seq]
    seq_end = cu[seq + 1]
    start = torch.minimum(cu[seq] + local * (piece_chunks * chunk_size), seq_end)
    chunk = torch.minimum(chunk_offs[seq] + local * piece_chunks, chunk_offs[seq + 1])
    starts = torch.cat([start, cu[n_seq:]]).to(torch.int32)
    chunks = torch.cat([chunk, chunk_offs[n_seq:]]).to(torch.int32)
    return starts, chunks
