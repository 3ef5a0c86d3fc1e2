"""Decoding state of MoM layers (model-level generation: megatron_mom.train.decoding).

Per layer and sequence a MoM layer keeps E = M (+1 shared) recurrent states [H, K, V] and, per
memory, the last W-1 inputs of its q, k and v short convolutions (its routed subsequence's
history). A token updates only the memories it is routed to. The cache lives in
`inference_context.key_value_memory_dict[layer_number]`, like Megatron's attention KV cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_mom.ops.conv_gated_delta_rule import MemoryState


@dataclass
class MoMCache:
    """A layer's decoding memories: a MemoryState whose tensors lead with [B, E] (sequence,
    memory): recurrent [B, E, H, K, V] float32 (float64 for float64 models), conv_q and conv_k
    [B, E, H*K, W-1], conv_v [B, E, H*V, W-1]."""
    memories: MemoryState

    @classmethod
    def empty(cls, batch: int, memories: int, heads: int, K: int, V: int, W: int, dtype, device):
        fresh = MemoryState.zeros(batch * memories, heads, K, V, W, dtype, device)
        return cls(fresh.map(lambda t: t.view(batch, memories, *t.shape[1:])))

    def rows(self, start: int, count: int) -> "MoMCache":
        """View of `count` sequences from `start` (Megatron's batch_size_offset)."""
        return MoMCache(self.memories.map(lambda t: t[start:start + count]))

    def zero_(self) -> None:
        for t in self.memories.tensors():
            t.zero_()

    def segments(self) -> MemoryState:
        """The E * B (memory, sequence) segments' memories in packed order (memory-major): the
        prefill's initial state. Always a copy (at B = 1 or E = 1 the reordering alone would
        be a view of the cache, which `write_segments` could not copy onto itself)."""
        return self.memories.map(to_segments)

    def write_segments(self, memories: MemoryState) -> None:
        """Inverse of `segments`: store the segments' final memories."""
        batch = self.memories.recurrent.shape[0]
        self.memories.copy_(memories.map(lambda t: from_segments(t, batch)))

    def routed(self, memory: Tensor) -> MemoryState:
        """memory [B, S]: each token's routed memory ids -> the memories of its B * S (token,
        slot) rows, token-major (a gather: shapes do not depend on the routing)."""
        return self.memories.map(lambda t: t.gather(1, _routed_index(t, memory)).flatten(0, 1))

    def write_routed(self, memory: Tensor, memories: MemoryState) -> None:
        """Inverse of `routed`: store the rows' new memories; the others stay as they were."""
        for t, new in zip(self.memories.tensors(), memories.tensors()):
            t.scatter_(1, _routed_index(t, memory), new.view(*memory.shape, *t.shape[2:]).to(t.dtype))


def _routed_index(t: Tensor, memory: Tensor) -> Tensor:
    """memory [B, S] expanded to index dim 1 of the cache rows t [B, E, ...]."""
    B, S = memory.shape
    return memory.view(B, S, *([1] * (t.dim() - 2))).expand(B, S, *t.shape[2:])


def layer_cache(inference_context, layer_number: int, batch: int, make) -> MoMCache:
    """This layer's cache rows for the current batch; allocated on first use, reset at the
    start of every new prompt (sequence_len_offset == 0)."""
    if not inference_context.is_static_batching():
        raise NotImplementedError("MixtureOfMemories decodes with Megatron's static batching "
                                  "(StaticInferenceContext); dynamic batching is not supported")
    store = inference_context.key_value_memory_dict
    if layer_number not in store:
        store[layer_number] = make(inference_context.max_batch_size)
    cache = store[layer_number].rows(inference_context.batch_size_offset, batch)
    if inference_context.sequence_len_offset == 0:
        cache.zero_()
    return cache


def to_segments(x: Tensor) -> Tensor:
    """[B, E, ...] cache rows -> [E * B, ...] in packed segment order (memory-major), always a
    new tensor."""
    return x.transpose(0, 1).clone(memory_format=torch.contiguous_format).flatten(0, 1)


def from_segments(x: Tensor, batch: int) -> Tensor:
    """Inverse of `to_segments`."""
    # sizes spelt out: a width-1 convolution keeps an empty history, where -1 is ambiguous
    return x.view(x.shape[0] // batch, batch, *x.shape[1:]).transpose(0, 1)
