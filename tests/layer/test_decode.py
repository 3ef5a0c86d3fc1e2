"""Decoding: prefill of any length, then chunks or single tokens, equals one full forward."""
import pytest
import torch

from megatron_mom import MoMConfig
from naive_mom import official_params
from test_mixer import HIDDEN, build_layer


def incremental(layer, x, splits):
    """Feed x [T, B, D] in pieces of the given lengths through one static inference context."""
    from megatron.core.inference.contexts import StaticInferenceContext
    ctx = StaticInferenceContext(max_batch_size=x.shape[1], max_sequence_length=x.shape[0])
    outs, t = [], 0
    for n in splits:
        out, _ = layer(x[t:t + n], inference_context=ctx)
        outs.append(out)
        t += n
        ctx.sequence_len_offset = t
    assert t == x.shape[0]
    return torch.cat(outs)


@pytest.mark.parametrize("prompt,conv_size", [(1, 4), (2, 4), (6, 4), (2, 1), (6, 1)])
def test_prefill_then_decode_matches_full_forward(megatron_single, prompt, conv_size):
    # conv width 4: prompts of 1 and 2 tokens are shorter than the convolution's history;
    # width 1 keeps no history at all
    mom = MoMConfig(num_memories=4, topk=2, num_heads=2, head_dim=8, chunk_size=16,
                    conv_size=conv_size)
    layer = build_layer(mom).eval()
    p = official_params(mom, HIDDEN, seed=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(14, 3, HIDDEN, generator=g, dtype=torch.float64)
    x[..., 0] = 1.0
    p["gate.weight"][2, 0] = -100.0      # memory 2 is never routed
    from megatron_mom.apps.convert import from_official_mom
    layer.load_state_dict(from_official_mom(p, mom))
    with torch.no_grad():
        full, _ = layer(x)
        steps = incremental(layer, x, [prompt] + [1] * (14 - prompt))
        chunks = incremental(layer, x, [prompt, 5] + [1] * (9 - prompt))
    torch.testing.assert_close(steps, full, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(chunks, full, rtol=1e-10, atol=1e-12)


def test_new_prompt_resets_the_cache(megatron_single):
    from megatron.core.inference.contexts import StaticInferenceContext
    mom = MoMConfig(num_memories=2, topk=1, num_heads=1, head_dim=8, chunk_size=16)
    layer = build_layer(mom).eval()
    x = torch.randn(5, 2, HIDDEN, dtype=torch.float64)
    ctx = StaticInferenceContext(max_batch_size=2, max_sequence_length=8)
    with torch.no_grad():
        first, _ = layer(x, inference_context=ctx)
        ctx.sequence_len_offset = 5
        layer(x[:1], inference_context=ctx)
        ctx.reset()                                  # sequence_len_offset back to 0
        again, _ = layer(x, inference_context=ctx)
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_hybrid_gpt_generation_matches_full_forward(megatron_single):
    """Greedy generation through MoM and attention layers: each decoded token's logits equal
    the full forward's logits at that position (teacher forcing on the generated text)."""
    from megatron_mom import get_hybrid_block_spec
    from megatron_mom.train.decoding import generate
    from test_gpt import gpt
    mom = MoMConfig(num_memories=3, topk=2, num_heads=2, head_dim=16, chunk_size=16)
    model = gpt(lambda c: get_hybrid_block_spec(c, "MAMM", mom, backend="local"),
                hetereogenous_dist_checkpoint=True).eval()
    prompt = torch.randint(0, 64, (2, 3))
    tokens = generate(model, prompt, max_new_tokens=8)
    assert tokens.shape == (2, 11)
    with torch.no_grad():
        pos = torch.arange(11)[None].expand(2, -1)
        logits = model(tokens, pos, None)
    assert torch.equal(logits[:, 2:-1].argmax(-1), tokens[:, 3:])
    model.train()
    assert torch.equal(generate(model, prompt, max_new_tokens=8), tokens)   # eval inside
    assert model.training                                  # and the caller's mode after
    for bad, problem in [(dict(prompt=prompt[:, :0], max_new_tokens=2), "at least one token"),
                         (dict(prompt=prompt, max_new_tokens=-3), "max_new_tokens must be")]:
        with pytest.raises(ValueError, match=problem):
            generate(model, **bad)
