"""The decoding cache hands the memory path its memories (`MoMCache.segments` / `.routed`) and
takes them back (`.write_segments` / `.write_routed`), at every batch size, including 1
(where the memory-major reordering alone would be a view of the cache)."""
import pytest
import torch

from megatron_mom import MoMConfig
from megatron_mom.layer.inference import MoMCache

H, K, V, W = 2, 4, 6, 3


def filled_cache(B, E, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cache = MoMCache.empty(B, E, H, K, V, W, torch.float32, "cpu")
    for t in cache.memories.tensors():
        t.copy_(torch.randn(t.shape, generator=gen))
    return cache


@pytest.mark.parametrize("B, E", [(1, 3), (3, 1), (2, 3)])
def test_segments_are_memory_major_copies_and_write_back(B, E):
    cache = filled_cache(B, E)
    state = cache.segments()
    assert state.recurrent.shape == (E * B, H, K, V) and state.conv_v.shape == (E * B, H * V, W - 1)
    for e in range(E):
        for b in range(B):
            assert torch.equal(state.conv_k[e * B + b], cache.memories.conv_k[b, e])
    assert all(s.data_ptr() != c.data_ptr() for s, c in
               zip(state.tensors(), cache.memories.tensors()))
    new = state.map(lambda t: t + 1)
    cache.write_segments(new)
    for e in range(E):
        for b in range(B):
            assert torch.equal(cache.memories.recurrent[b, e], new.recurrent[e * B + b])


@pytest.mark.parametrize("B", [1, 3])
def test_routed_rows_gather_and_scatter_by_memory_id(B):
    E, S = 4, 2
    cache = filled_cache(B, E, seed=1)
    before = cache.memories.conv_q.clone()
    memory = torch.stack([torch.randperm(E)[:S] for _ in range(B)])          # [B, S]
    state = cache.routed(memory)
    assert state.recurrent.shape == (B * S, H, K, V)
    for b in range(B):
        for j in range(S):
            assert torch.equal(state.conv_q[b * S + j], cache.memories.conv_q[b, memory[b, j]])
    cache.write_routed(memory, state.map(lambda t: t * 0 - 1))
    for b in range(B):
        for e in range(E):
            routed = bool((memory[b] == e).any())
            assert torch.equal(cache.memories.conv_q[b, e], -torch.ones_like(before[b, e]) if routed
                               else before[b, e])


def test_batch_one_prefill_then_decode_matches_full_forward(megatron_single):
    from test_decode import incremental
    from test_mixer import HIDDEN, build_layer
    mom = MoMConfig(num_memories=3, topk=2, num_heads=2, head_dim=8, chunk_size=16)
    layer = build_layer(mom).eval()
    x = torch.randn(9, 1, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full, _ = layer(x)
        steps = incremental(layer, x, [4] + [1] * 5)
    torch.testing.assert_close(steps, full, rtol=1e-10, atol=1e-12)
