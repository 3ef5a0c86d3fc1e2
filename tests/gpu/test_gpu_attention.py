"""The hybrid stack's fused attention (SDPAttention) on the GPU: a hybrid GPT in bf16 against the
same weights in float32, and SDPA's bf16 kernels against Megatron's unfused attention in float32.

Tolerance (relative L2 error): 3e-2 for bf16 against float32, as for the MoM layer."""
import pytest
import torch

pytestmark = pytest.mark.gpu


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def _config(dtype):
    from megatron.core.transformer import TransformerConfig
    return TransformerConfig(num_layers=2, hidden_size=256, num_attention_heads=8,
                             num_query_groups=2, ffn_hidden_size=512, hidden_dropout=0.0,
                             attention_dropout=0.0, normalization="RMSNorm", params_dtype=dtype,
                             bf16=dtype == torch.bfloat16, gradient_accumulation_fusion=False,
                             masked_softmax_fusion=False, bias_dropout_fusion=False,
                             apply_rope_fusion=False, persist_layer_norm=False,
                             hetereogenous_dist_checkpoint=True)


def test_sdpa_bf16_matches_unfused_float32(megatron_single):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron_mom.layer.attention import SDPAttention
    s, b, heads, groups, hn = 1024, 2, 8, 2, 32   # hn = hidden / heads
    q, k, v = (torch.randn(s, b, n, hn, device="cuda") for n in (heads, groups, groups))
    ref = DotProductAttention(_config(torch.float32), 1, AttnMaskType.causal, "self").cuda()
    mask = torch.ones(1, 1, s, s, dtype=torch.bool, device="cuda").triu(1)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    out_ref = ref(qr, kr, vr, mask)
    dout = torch.randn_like(out_ref)
    out_ref.backward(dout)
    ours = SDPAttention(_config(torch.bfloat16), 1, AttnMaskType.causal, "self").cuda()
    qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
    out = ours(qb, kb, vb, None)
    out.backward(dout.bfloat16())
    assert rel(out, out_ref) < 3e-2
    for mine, theirs in ((qb, qr), (kb, kr), (vb, vr)):
        assert rel(mine.grad, theirs.grad) < 3e-2


def test_hybrid_gpt_bf16_matches_float32(megatron_single):
    from megatron.core.models.gpt import GPTModel
    from megatron_mom import MoMConfig, get_hybrid_block_spec
    # Every token in every memory: no top-k choice that bf16 rounding of the logits could flip.
    mom = MoMConfig(num_memories=2, topk=2, num_heads=2, head_dim=64)
    models = {}
    for dtype in (torch.float32, torch.bfloat16):
        config = _config(dtype)
        torch.manual_seed(0)
        models[dtype] = GPTModel(config, get_hybrid_block_spec(config, "MA", mom, backend="local"),
                                 vocab_size=512, max_sequence_length=1024,
                                 position_embedding_type="rope").cuda()
    models[torch.bfloat16].load_state_dict(
        {n: t.bfloat16() for n, t in models[torch.float32].state_dict().items()
         if t is not None and t.is_floating_point()}, strict=False)
    ids = torch.randint(0, 512, (2, 1024), device="cuda")
    pos = torch.arange(1024, device="cuda").expand(2, -1)
    logits = {d: m(ids, pos, None) for d, m in models.items()}           # [b, s, vocab]
    assert rel(logits[torch.bfloat16], logits[torch.float32]) < 3e-2
    for d, m in models.items():
        logits[d].float().pow(2).mean().backward()
    for (n, p32), (_, p16) in zip(models[torch.float32].named_parameters(),
                                  models[torch.bfloat16].named_parameters()):
        assert rel(p16.grad, p32.grad) < 5e-2, n
