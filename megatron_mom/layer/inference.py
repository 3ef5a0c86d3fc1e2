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

from megatron_mom.ops.common import compute_dtype


@dataclass
class MoMCache:
    state: Tensor    # [B, E, H, K, V] float32 (float64 for float64 models)
    conv_q: Tensor   # [B, E, H*K, W-1]
    conv_k: Tensor   # [B, E, H*K, W-1]
    conv_v: Tensor   # [B, E, H*V, W-1]

    @classmethod
    def empty(cls, batch: int, memories: int, heads: int, K: int, V: int, W: int, dtype, device):
        state_dtype = compute_dtype(dtype)
        z = lambda *shape, dt=dtype: torch.zeros(*shape, dtype=dt, device=device)
        return cls(state=z(batch, memories, heads, K, V, dt=state_dtype),
                   conv_q=z(batch, memories, heads * K, W - 1),
                   conv_k=z(batch, memories, heads * K, W - 1),
                   conv_v=z(batch, memories, heads * V, W - 1))

    def rows(self, start: int, count: int) -> "MoMCache":
        """View of `count` sequences from `start` (Megatron's batch_size_offset)."""
        sl = slice(start, start + count)
        return MoMCache(self.state[sl], self.conv_q[sl], self.conv_k[sl], self.conv_v[sl])

    def zero_(self) -> None:
        for t in (self.state, self.conv_q, self.conv_k, self.conv_v):
            t.zero_()


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
    """[B, E, ...] cache rows -> [E * B, ...] in packed segment order (memory-major)."""
    return x.transpose(0, 1).reshape(-1, *x.shape[2:])


def from_segments(x: Tensor, batch: int) -> Tensor:
    """Inverse of `to_segments`."""
    return x.view(-1, batch, *x.shape[1:]).transpose(0, 1)
