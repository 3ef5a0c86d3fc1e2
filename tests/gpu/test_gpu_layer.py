"""The MoM layer on the GPU: Triton kernels (bf16 and fp32) against the torch-reference layer in
float32 on the same weights: outputs, input gradients and every parameter gradient.

Tolerances (relative L2 error against the float32 reference):
  fp32 Triton: 5e-3 (Triton's fp32 dots run in tf32);  bf16: 3e-2 (bf16 operands and outputs).
"""

import pytest
import torch

pytestmark = pytest.mark.gpu


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def build(mom, hidden, dtype):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.spec_utils import build_module
    from megatron_mom.layer.specs import get_mom_module_spec
    config = TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=4,
                               params_dtype=dtype, gradient_accumulation_fusion=False)
    return build_module(get_mom_module_spec(mom, backend="local"), config=config,
                        layer_number=1).cuda()


def run(layer, x, dy, packed=None):
    x = x.clone().requires_grad_(True)
    out, _ = layer(x, packed_seq_params=packed)
    out.backward(dy.to(out.dtype))
    grads = {n: p.grad.float().clone() for n, p in layer.named_parameters()}
    return out.float(), x.grad.float(), grads


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 5e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("K", [128, 256])
@pytest.mark.parametrize("lean", [False, True], ids=["default", "lean"])
def test_triton_layer_matches_reference(megatron_single, dtype, tol, K, lean):
    from megatron_mom import MoMConfig
    hidden = 512
    mom = MoMConfig(num_memories=4, topk=2, shared_memory=True, num_heads=4, head_dim=K,
                    backend="torch", aux_loss_coeff=0.01)
    torch.manual_seed(0)
    ref_layer = build(mom, hidden, torch.float32)
    fast = build(mom.replace(backend="triton", lean_backward=lean), hidden, dtype)
    # Both sides hold the same (dtype-representable) weights and inputs, so they route alike:
    # a near-tie flipped by rounding would change whole memories, not just round them.
    with torch.no_grad():
        for p in ref_layer.parameters():
            p.copy_(p.to(dtype).float())
    fast.load_state_dict({k: v.to(dtype) if torch.is_tensor(v) else v
                         for k, v in ref_layer.state_dict().items()})
    x = torch.randn(1000, 2, hidden, device="cuda").to(dtype).float()  # T % chunk != 0
    dy = torch.randn(1000, 2, hidden, device="cuda")
    ref = run(ref_layer, x, dy)
    got = run(fast, x.to(dtype), dy)
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    assert rel(got[0], ref[0]) < tol, rel(got[0], ref[0])
    assert rel(got[1], ref[1]) < tol, rel(got[1], ref[1])
    errs = {n: rel(got[2][n], ref[2][n]) for n in ref[2]}
    worst = max(errs, key=errs.get)
    assert errs[worst] < 2 * tol, (worst, errs[worst])


def test_triton_layer_packed_documents(megatron_single):
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron_mom import MoMConfig
    mom = MoMConfig(num_memories=4, topk=2, num_heads=4, head_dim=128, backend="torch")
    torch.manual_seed(1)
    ref_layer = build(mom, 512, torch.float32)
    fast = build(mom.replace(backend="triton"), 512, torch.float32)
    fast.load_state_dict(ref_layer.state_dict())
    cu = torch.tensor([0, 3, 700, 701, 2048], device="cuda", dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    x = torch.randn(2048, 1, 512, device="cuda")
    dy = torch.randn(2048, 1, 512, device="cuda")
    ref = run(ref_layer, x, dy, packed)
    got = run(fast, x, dy, packed)
    assert rel(got[0], ref[0]) < 5e-3 and rel(got[1], ref[1]) < 5e-3


@pytest.mark.parametrize("blocked", [None, 3])
def test_grouped_projection_matches_dense_bf16(megatron_single, blocked):
    """The grouped projection (torch._grouped_mm over routed rows) against the dense in_proj in
    bf16 on identical weights and inputs: both route alike (same router, same bf16 values), so
    only the GEMMs' accumulation order differs. `blocked`: a memory no token is routed to (an
    empty group, whose weight gradient must be exactly zero)."""
    from megatron_mom import MoMConfig
    hidden, K = 512, 128
    mom = MoMConfig(num_memories=4, topk=2, shared_memory=True, num_heads=4, head_dim=K,
                    aux_loss_coeff=0.01)
    torch.manual_seed(2)
    dense = build(mom.replace(grouped_projection="off"), hidden, torch.bfloat16)
    grouped = build(mom.replace(grouped_projection="auto"), hidden, torch.bfloat16)
    x = torch.randn(1000, 2, hidden, device="cuda").to(torch.bfloat16)
    if blocked is not None:
        x[..., 0] = 1.0
        with torch.no_grad():
            dense.router.weight[blocked, 0] = -100.0
    grouped.load_state_dict(dense.state_dict())
    assert grouped._grouped_projection_applies(x), "needs bf16 on compute capability 9.x/10.x"
    assert not dense._grouped_projection_applies(x)
    dy = torch.randn(1000, 2, hidden, device="cuda")
    ref = run(dense, x, dy)
    got = run(grouped, x, dy)
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    assert rel(got[0], ref[0]) < 2e-2, rel(got[0], ref[0])
    assert rel(got[1], ref[1]) < 2e-2, rel(got[1], ref[1])
    errs = {n: rel(got[2][n], ref[2][n]) for n in ref[2]}
    worst = max(errs, key=errs.get)
    assert errs[worst] < 2e-2, (worst, errs[worst], errs)
    if blocked is not None:
        H, C = mom.num_heads, mom.num_heads * (2 * K + 2)
        head = 2 * H * K
        rows = got[2]["in_proj.weight"][head + blocked * C: head + (blocked + 1) * C]
        assert rows.abs().max().item() == 0.0
        assert ref[2]["in_proj.weight"][head + blocked * C: head + (blocked + 1) * C].abs().max() == 0



def test_grouped_projection_with_transformer_engine_in_proj(megatron_single):
    """The TE spec's in_proj (TEColumnParallelLinear with the grouped form) runs the grouped
    projection as its own forward, its pre-hooks included, and matches the TE spec's dense
    projection on the same weights (bf16)."""
    pytest.importorskip("transformer_engine.pytorch")
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.spec_utils import build_module
    from megatron_mom import MoMConfig
    from megatron_mom.layer.projection import GroupedProjection
    from megatron_mom.layer.specs import get_mom_module_spec
    hidden = 512
    mom = MoMConfig(num_memories=4, topk=2, num_heads=4, head_dim=128)
    config = TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=4,
                               params_dtype=torch.bfloat16, bf16=True,
                               gradient_accumulation_fusion=False)

    def te_layer(mode):
        return build_module(get_mom_module_spec(mom.replace(grouped_projection=mode),
                                                backend="te"),
                            config=config, layer_number=1).cuda()

    torch.manual_seed(3)
    dense, grouped = te_layer("off"), te_layer("on")
    grouped.load_state_dict(dense.state_dict(), strict=False)   # TE keeps extra fp8 state
    assert isinstance(grouped.in_proj, GroupedProjection)
    x = torch.randn(512, 2, hidden, device="cuda").to(torch.bfloat16)
    assert grouped._grouped_projection_applies(x)
    calls = []
    grouped.in_proj.register_forward_pre_hook(lambda m, args: calls.append(1))
    dy = torch.randn(512, 2, hidden, device="cuda")
    ref, got = run(dense, x, dy), run(grouped, x, dy)
    assert calls == [1]
    assert rel(got[0], ref[0]) < 2e-2 and rel(got[1], ref[1]) < 2e-2
    errs = {n: rel(got[2][n], ref[2][n]) for n in ref[2]}
    assert max(errs.values()) < 2e-2, errs


_LAYER_CAPTURE = """
import torch
from graph_capture import capture_and_replay
from megatron_mom import MoMConfig
from megatron_mom.train.build import init_process_groups
init_process_groups(tp=1, pp=1, seed=1234)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import build_module
from megatron_mom.layer.specs import get_mom_module_spec
mom = MoMConfig(num_memories=4, topk=2, shared_memory=True, num_heads=4, head_dim=128,
                lean_backward=LEAN)
config = TransformerConfig(num_layers=1, hidden_size=512, num_attention_heads=4,
                           params_dtype=torch.bfloat16, bf16=True,
                           gradient_accumulation_fusion=False)
layer = build_module(get_mom_module_spec(mom, backend="local"), config=config,
                     layer_number=1).cuda().train()
params = list(layer.parameters())
x = torch.randn(1000, 2, 512, device="cuda", dtype=torch.bfloat16).requires_grad_()
dy = torch.randn(1000, 2, 512, device="cuda", dtype=torch.bfloat16)

def step():
    for t in params + [x]:
        t.grad = None
    out, _ = layer(x)
    out.backward(dy)
    return [out] + [t.grad for t in params + [x]]

graph, captured, eager = capture_and_replay(step, warmups=2)
worst = max(((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()
            for a, b in zip(captured, eager))
assert worst < 1e-6, worst
print("layer step captured; worst difference to eager", worst)
"""


@pytest.mark.parametrize("lean", [False, True], ids=["default", "lean"])
def test_layer_training_step_cuda_graph(lean):
    """A whole training step of the layer (routing, packing, grouped projection, convolutions,
    recurrence, mix, norms; forward and backward) captured in one CUDA graph and replayed
    equals the eager step: no host sync anywhere, static shapes; also in the lean mode (its
    per-head backward and kept head). In a subprocess, because a failed capture leaves the
    CUDA context unusable for later tests."""
    from graph_capture import run_script
    run = run_script(_LAYER_CAPTURE.replace("LEAN", str(lean)), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


def test_auto_backend_on_cuda_refuses_sizes_triton_cannot_run(megatron_single):
    from megatron_mom import MoMConfig
    with pytest.raises(ValueError, match="head_dim = 8 is not one the Triton kernels run "
                                         "\\(backend='auto' on a CUDA device\\)"):
        build(MoMConfig(num_heads=2, head_dim=8), 64, torch.float32)
    build(MoMConfig(num_heads=2, head_dim=8, backend="torch"), 64, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_in_one_batch_row_leaves_the_other_finite(megatron_single, dtype):
    from megatron_mom import MoMConfig
    layer = build(MoMConfig(num_heads=2, head_dim=64, backend="triton"), 256, dtype)
    x = torch.randn(300, 2, 256, device="cuda", dtype=dtype)
    x[299, 0, 0] = float("nan")
    x.requires_grad_(True)
    out, _ = layer(x)
    assert torch.isfinite(out[:, 1]).all() and not torch.isfinite(out[299, 0]).all()
    out.float().sum().backward()
    assert torch.isfinite(x.grad[:, 1]).all()


@pytest.mark.parametrize("granularity", ["full", "selective"])
def test_activation_recompute_with_triton_kernels(megatron_single, granularity):
    """A 2-layer MoM GPT on the Triton kernels (float32) with Megatron's full activation
    recompute, or its selective recompute of the core (projection to read-out norm), against the
    plain step: the same loss and gradients (to the kernels' run-to-run rounding) and router logs
    counted once (tests/layer/test_gpt.py holds the CPU part)."""
    import os
    import sys
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig
    from megatron_mom import MoMConfig, get_mom_layer_spec
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "layer"))
    from test_gpt import recompute_runs
    mom = MoMConfig(num_memories=4, topk=2, num_heads=2, head_dim=64, backend="triton",
                    z_loss_coeff=1e-3)

    def make(extra):
        config = TransformerConfig(num_layers=2, hidden_size=256, num_attention_heads=4,
                                   ffn_hidden_size=512, hidden_dropout=0.0, attention_dropout=0.0,
                                   normalization="RMSNorm", gradient_accumulation_fusion=False,
                                   bias_dropout_fusion=False, persist_layer_norm=False, **extra)
        return GPTModel(config, get_mom_layer_spec(mom, backend="local"), vocab_size=512,
                        max_sequence_length=1024).cuda()

    ids = torch.randint(0, 512, (2, 1000), device="cuda")
    pos = torch.arange(1000, device="cuda").expand(2, -1)
    (loss0, grads0, counts0, logged0), (loss1, grads1, counts1, logged1) = recompute_runs(
        make, ids, pos, granularity)
    assert rel(loss1, loss0) < 1e-6
    worst = max(grads0, key=lambda n: rel(grads1[n], grads0[n]))
    assert rel(grads1[worst], grads0[worst]) < 1e-5, worst
    assert len(counts0) == 2 and all(torch.equal(a, b) for a, b in zip(counts0, counts1))
    assert all(torch.allclose(logged0[n], logged1[n], rtol=1e-6) for n in logged0)
