"""SDPAttention (fused core attention of the local spec) against Megatron's DotProductAttention."""
import pytest
import torch

from megatron_mom import MoMConfig


def _config(heads=4, groups=4, **overrides):
    from megatron.core.transformer import TransformerConfig
    from megatron_mom.testing import cpu
    return TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=heads,
                             num_query_groups=groups, hidden_dropout=0.0, attention_dropout=0.0,
                             params_dtype=torch.float64, **cpu.megatron_cpu_config_overrides(),
                             **overrides)


def _qkv(s, b, heads, groups, hn, seed):
    g = torch.Generator().manual_seed(seed)
    new = lambda n: torch.randn(s, b, n, hn, generator=g, dtype=torch.float64).requires_grad_()
    return new(heads), new(groups), new(groups)


@pytest.mark.parametrize("heads,groups,layer_scaling", [(4, 4, False), (4, 2, False),
                                                        (4, 1, True)])
def test_sdpa_matches_dot_product_attention(megatron_single, heads, groups, layer_scaling):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron_mom.layer.attention import SDPAttention
    config = _config(heads, groups, apply_query_key_layer_scaling=layer_scaling)
    s, b, hn = 24, 2, 8
    causal = torch.ones(1, 1, s, s, dtype=torch.bool).triu(1)   # Megatron: True = masked out
    kw = dict(config=config, layer_number=3, attn_mask_type=AttnMaskType.causal,
              attention_type="self")
    ref_mod, sdpa_mod = DotProductAttention(**kw), SDPAttention(**kw)
    q, k, v = _qkv(s, b, heads, groups, hn, seed=1)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = ref_mod(q, k, v, causal)
    out = sdpa_mod(q2, k2, v2, causal)
    assert out.shape == ref.shape == (s, b, heads * hn)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    dout = torch.randn_like(ref)
    ref.backward(dout)
    out.backward(dout)
    for mine, theirs in ((q2, q), (k2, k), (v2, v)):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-10, atol=1e-10)
    # Causal: changing the last position changes no earlier output.
    q3, k3, v3 = (t.detach().clone() for t in (q, k, v))
    k3[-1] += 1.0
    v3[-1] -= 1.0
    torch.testing.assert_close(sdpa_mod(q3, k3, v3, None)[:-1], out.detach()[:-1])


def test_sdpa_padding_mask_and_decoding_alignment(megatron_single):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron_mom.layer.attention import SDPAttention
    config = _config()
    s, b, hn = 10, 1, 8
    q, k, v = (t.detach() for t in _qkv(s, b, 4, 4, hn, seed=2))
    full = SDPAttention(config, 1, AttnMaskType.causal)(q, k, v, None)
    # The last 3 queries against all 10 keys (decoding a cached sequence): bottom-right causal.
    tail = SDPAttention(config, 1, AttnMaskType.causal)(q[-3:], k, v, None)
    torch.testing.assert_close(tail, full[-3:])
    # A padding-type mask is read (True = masked out): same as the causal result.
    mask = torch.ones(1, 1, s, s, dtype=torch.bool).triu(1)
    padded = SDPAttention(config, 1, AttnMaskType.padding)(q, k, v, mask)
    torch.testing.assert_close(padded, full)


def test_sdpa_refuses_what_it_cannot_do(megatron_single):
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType
    from megatron_mom.layer.attention import SDPAttention
    with pytest.raises(ValueError, match="window_size"):
        SDPAttention(_config(window_size=(8, 0)), 1, AttnMaskType.causal)
    q, k, v = (t.detach() for t in _qkv(6, 1, 4, 4, 8, seed=3))
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=torch.tensor([0, 3, 6]))
    with pytest.raises(ValueError, match="backend='te'"):
        SDPAttention(_config(), 1, AttnMaskType.causal)(q, k, v, None, packed_seq_params=packed)


def test_hybrid_gpt_uses_sdpa_and_matches_unfused_attention(megatron_single):
    """The same hybrid GPT (same weights) with SDPA and with Megatron's DotProductAttention."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron_mom import get_hybrid_block_spec
    from megatron_mom.layer.attention import SDPAttention
    mom = MoMConfig(num_memories=2, topk=1, num_heads=2, head_dim=16, chunk_size=16)
    config = _config(heads=4, groups=2, hetereogenous_dist_checkpoint=True)
    spec = get_hybrid_block_spec(config, "MA", mom, backend="local")
    assert spec.layer_specs[1].submodules.self_attention.submodules.core_attention is SDPAttention
    torch.manual_seed(0)
    model = GPTModel(config, spec, vocab_size=64, max_sequence_length=32,
                     position_embedding_type="rope")
    ids = torch.randint(0, 64, (2, 32))
    pos = torch.arange(32)[None].expand(2, -1)
    loss = model(ids, pos, None, labels=ids).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    attention = model.decoder.layers[1].self_attention
    attention.core_attention = DotProductAttention(
        config, 2, attention.core_attention.attn_mask_type, "self")
    model.zero_grad()
    causal = torch.ones(1, 1, 32, 32, dtype=torch.bool).triu(1)
    ref = model(ids, pos, causal, labels=ids).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-9, atol=1e-11, msg=n)
