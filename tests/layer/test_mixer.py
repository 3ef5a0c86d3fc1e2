"""The MoM layer against an independent naive MoM written from the spec (float64)."""
import pytest
import torch

from megatron_mom import MoMConfig
from megatron_mom.apps.convert import from_official_mom, to_official_mom
from naive_mom import naive_mom, official_params

HIDDEN = 24


def build_layer(mom, hidden=HIDDEN, dtype=torch.float64, **config_overrides):
    from megatron.core.transformer import TransformerConfig
    from megatron_mom.testing import cpu
    from megatron_mom.layer.specs import get_mom_module_spec
    from megatron.core.transformer.spec_utils import build_module
    config = TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=4,
                               params_dtype=dtype, hidden_dropout=0.0, attention_dropout=0.0,
                               **cpu.megatron_cpu_config_overrides(), **config_overrides)
    return build_module(get_mom_module_spec(mom, backend="local"), config=config, layer_number=1)


def compare_with_naive(mom, B=2, T=13, seed=0, block_memory=None):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    MoEAuxLossAutoScaler.main_loss_backward_scale = None  # aux gradient scale 1
    layer = build_layer(mom)
    p = official_params(mom, HIDDEN, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, T, HIDDEN, generator=g, dtype=torch.float64)
    if block_memory is not None:  # a constant input channel drives one memory's logit far down
        x[..., 0] = 1.0
        p["gate.weight"][block_memory, 0] = -100.0
    layer.load_state_dict(from_official_mom(p, mom))

    for t in p.values():
        t.requires_grad_(True)
    x_ref = x.clone().requires_grad_(True)
    ref, lb, zl, counts = naive_mom(x_ref, p, mom)
    x_ours = x.transpose(0, 1).clone().requires_grad_(True)          # Megatron's [s, b, h]
    out, bias = layer(x_ours)
    assert bias is None
    out = out.transpose(0, 1)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)
    if block_memory is not None:
        assert counts[block_memory] == 0

    # Gradients, with the router losses in the naive loss (ours attach them to the graph).
    R = torch.randn(B, T, HIDDEN, generator=g, dtype=torch.float64)
    (ref * R).sum().add(lb + zl).backward()
    (out * R).sum().backward()
    torch.testing.assert_close(x_ours.grad.transpose(0, 1), x_ref.grad, rtol=1e-8, atol=1e-10)
    ours = dict(layer.named_parameters())
    grads = to_official_mom({k: v.grad for k, v in ours.items()}, mom)
    for key, ref_param in p.items():
        # a memory the naive loop never ran leaves its weights without a gradient: zero
        ref_grad = ref_param.grad if ref_param.grad is not None else torch.zeros_like(ref_param)
        torch.testing.assert_close(grads[key], ref_grad, rtol=1e-8, atol=1e-10,
                                   msg=lambda m: f"{key}: {m}")
    return ours


CASES = {
    "top2_shared": MoMConfig(num_memories=4, topk=2, num_heads=2, head_dim=8, chunk_size=16),
    "top1_shared": MoMConfig(num_memories=3, topk=1, num_heads=2, head_dim=8, chunk_size=16),
    "top2_no_shared": MoMConfig(num_memories=3, topk=2, shared_memory=False, num_heads=2,
                                head_dim=8, chunk_size=16),
    "one_memory": MoMConfig(num_memories=1, topk=1, num_heads=1, head_dim=8, chunk_size=16),
    "expand_v2_no_gate": MoMConfig(num_memories=2, topk=1, num_heads=2, head_dim=8, expand_v=2.0,
                                   use_output_gate=False, conv_size=3, chunk_size=16,
                                   z_loss_coeff=1e-3),
}


@pytest.mark.parametrize("name", list(CASES))
def test_layer_matches_naive_mom(megatron_single, name):
    compare_with_naive(CASES[name])


def test_memory_without_tokens(megatron_single):
    mom = MoMConfig(num_memories=4, topk=2, num_heads=2, head_dim=8, chunk_size=16)
    params = compare_with_naive(mom, T=21, block_memory=3)
    # The unused memory's projections get exactly zero gradient, and nothing is NaN.
    assert all(torch.isfinite(p.grad).all() for p in params.values())


def test_longer_than_chunk_batch3(megatron_single):
    mom = MoMConfig(num_memories=2, topk=1, num_heads=1, head_dim=8, chunk_size=16)
    compare_with_naive(mom, B=3, T=40, seed=3)


def test_converter_round_trip_tp():
    mom = MoMConfig(num_memories=3, topk=2, num_heads=4, head_dim=8, expand_v=2.0)
    p = official_params(mom, HIDDEN, seed=5)
    for tp in (1, 2, 4):
        shards = [from_official_mom(p, mom, tp_rank=r, tp_size=tp) for r in range(tp)]
        in_rows = sum(v.shape[0] for k, v in p.items()
                      if k not in ("o_proj.weight", "gate.weight") and k.endswith(".weight")
                      and "conv1d" not in k and "o_norm" not in k)
        assert all(s["in_proj.weight"].shape[0] * tp == in_rows for s in shards)
        back = to_official_mom(shards, mom)
        assert back.keys() == p.keys()
        for key in p:
            assert torch.equal(back[key], p[key]), key


def test_converter_rejects_mismatched_state_dict():
    mom = MoMConfig(num_memories=2, topk=1, num_heads=2, head_dim=8)
    p = official_params(mom, HIDDEN)
    with pytest.raises(KeyError, match="missing.*shared_k"):
        from_official_mom({k: v for k, v in p.items() if k != "shared_k.weight"}, mom)
    with pytest.raises(KeyError, match="unexpected.*k_proj.2"):
        from_official_mom({**p, "k_proj.2.weight": p["k_proj.0.weight"]}, mom)
    with pytest.raises(ValueError, match="q_proj.weight has shape"):
        from_official_mom(p, mom.replace(head_dim=4))
    with pytest.raises(ValueError, match="divisible by the tensor-parallel size"):
        from_official_mom(p, mom, tp_rank=0, tp_size=3)
    with pytest.raises(KeyError):
        from_official_mom({"model.layers.0." + k: v for k, v in p.items()}, mom)
    assert from_official_mom({"model.layers.0." + k: v for k, v in p.items()}, mom,
                             prefix="model.layers.0.").keys()


GROUPED_CASES = {
    "top2_shared_empty_memory": (MoMConfig(num_memories=4, topk=2, num_heads=2, head_dim=8,
                                           chunk_size=16), False, 3),
    "packed_docs_no_gate": (MoMConfig(num_memories=3, topk=1, num_heads=2, head_dim=8,
                                      use_output_gate=False, chunk_size=16), True, None),
    "no_shared_expand_v2": (MoMConfig(num_memories=3, topk=2, shared_memory=False, num_heads=2,
                                      head_dim=8, expand_v=2.0, chunk_size=16), False, None),
}


@pytest.mark.parametrize("name", list(GROUPED_CASES))
def test_grouped_projection_matches_dense(megatron_single, name):
    """The grouped projection (k, v, b, a per routed row, torch._grouped_mm) against the dense
    reference on the same weights, in float32 (torch._grouped_mm has no CPU float64): outputs,
    and the gradients of the input and of every parameter, in_proj.weight included."""
    from megatron.core.packed_seq_params import PackedSeqParams
    mom, packed, blocked = GROUPED_CASES[name]
    hidden = 32
    dense = build_layer(mom.replace(grouped_projection="off"), hidden, torch.float32)
    grouped = build_layer(mom.replace(grouped_projection="on"), hidden, torch.float32)
    g = torch.Generator().manual_seed(4)
    T, B = (29, 1) if packed else (13, 3)
    x = torch.randn(T, B, hidden, generator=g)
    if blocked is not None:  # memory `blocked` receives no token: an empty group
        x[..., 0] = 1.0
        with torch.no_grad():
            dense.router.weight[blocked, 0] = -100.0
    grouped.load_state_dict(dense.state_dict())
    assert grouped._grouped_projection_applies(x) and not dense._grouped_projection_applies(x)
    assert not build_layer(mom, hidden, torch.float32)._grouped_projection_applies(x)  # auto, CPU
    cu = torch.tensor([0, 4, 5, 29], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu) if packed else None
    R = torch.randn(T, B, hidden, generator=g)
    results = []
    for layer in (dense, grouped):
        xi = x.clone().requires_grad_(True)
        out, _ = layer(xi, packed_seq_params=params)
        (out * R).sum().backward()
        results.append((out, xi.grad, {n: p.grad for n, p in layer.named_parameters()}))
    (out_d, dx_d, grads_d), (out_g, dx_g, grads_g) = results
    torch.testing.assert_close(out_g, out_d, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx_g, dx_d, rtol=1e-5, atol=1e-6)
    # Weight gradients are sums over tokens, taken per memory in the grouped form: float32
    # rounding of a sum of O(1) terms can leave ~2e-6 on an entry that cancels to near zero.
    for n in grads_d:
        torch.testing.assert_close(grads_g[n], grads_d[n], rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{n}: {m}")
    if blocked is not None:
        C = mom.num_heads * (2 * mom.key_dim + 2)
        head = mom.num_heads * mom.key_dim * 2
        rows = slice(head + blocked * C, head + (blocked + 1) * C)
        assert torch.equal(grads_g["in_proj.weight"][rows], torch.zeros_like(grads_g["in_proj.weight"][rows]))


def test_grouped_projection_falls_back_where_it_does_not_apply(megatron_single):
    # C = H * (K + V + 2) = 2 * 18 = 36 float32 = 144 bytes: aligned; H = 1: 72 bytes: not.
    x = torch.randn(5, 1, 32)
    mom = MoMConfig(num_memories=2, topk=1, num_heads=1, head_dim=8, chunk_size=16,
                    grouped_projection="on")
    assert not build_layer(mom, 32, torch.float32)._grouped_projection_applies(x)
    assert not build_layer(mom.replace(num_heads=2), 32, torch.float64)._grouped_projection_applies(
        x.double())
    assert build_layer(mom.replace(num_heads=2), 32, torch.float32)._grouped_projection_applies(x)


@pytest.mark.parametrize("mode", ["on", "off"])
def test_projection_runs_in_projs_hooks(megatron_single, mode):
    """The grouped projection is in_proj's own forward (`rows=` selects it): in_proj's forward
    pre- and post-hooks run once per step, as for the dense projection (Megatron DDP waits
    for the overlapped parameter all-gather in a pre-hook)."""
    from megatron_mom.layer.projection import GroupedProjection
    mom = MoMConfig(num_memories=2, topk=1, num_heads=2, head_dim=8, chunk_size=16,
                    grouped_projection=mode)
    layer = build_layer(mom, 32, torch.float32)
    assert isinstance(layer.in_proj, GroupedProjection)
    calls = []
    layer.in_proj.register_forward_pre_hook(lambda m, args: calls.append("pre"))
    layer.in_proj.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(sorted(kwargs)), with_kwargs=True)
    layer.in_proj.register_forward_hook(lambda m, args, out: calls.append("post"))
    x = torch.randn(5, 1, 32)
    assert layer._grouped_projection_applies(x) == (mode == "on")
    layer(x)
    assert calls == ["pre", ["rows"] if mode == "on" else [], "post"]


def bytes_held_by_nodes(out):
    """Bytes of the tensors that the autograd graph behind `out` holds as attributes of its
    nodes (a custom Function's ctx), which saved-tensor hooks, and so checkpointing, never
    see."""
    seen_nodes, seen_ptrs, total, todo = set(), set(), 0, [out.grad_fn]

    def tensors(v):
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (tuple, list)):
            for item in v:
                yield from tensors(item)
    while todo:
        node = todo.pop()
        if node is None or node in seen_nodes:
            continue
        seen_nodes.add(node)
        for value in getattr(node, "__dict__", {}).values():
            for t in tensors(value):
                if t.data_ptr() not in seen_ptrs:
                    seen_ptrs.add(t.data_ptr())
                    total += t.numel() * t.element_size()
        todo.extend(fn for fn, _ in node.next_functions)
    return total


def saved_bytes_and_memory_runs(layer, x, dy):
    """(bytes autograd saved in the forward or its nodes hold as attributes, memory-path
    forwards run) of one forward+backward, and the output and gradients."""
    saved, runs = [0], [0]
    memories = layer._memories

    def counted(*args, **kwargs):
        runs[0] += 1
        return memories(*args, **kwargs)

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t
    layer._memories = counted
    xi = x.clone().requires_grad_(True)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out, _ = layer(xi)
        saved[0] += bytes_held_by_nodes(out)
        out.backward(dy)
    finally:
        del layer._memories
    grads = [xi.grad] + [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad(set_to_none=True)
    return saved[0], runs[0], out.detach(), grads


@pytest.mark.parametrize("backend, lean", [("torch", False), ("torch", True), ("triton", False),
                                           ("triton", True)])
def test_selective_recompute_reruns_the_core(megatron_single, backend, lean):
    """Megatron's selective recompute of "core_attn" (--recompute-activations): the layer keeps
    its input and read-out and reruns its core (projection, memory path, mix, read-out norm)
    in the backward, with the plain layer's output and gradients bit for bit and under a
    quarter of what the plain layer saves, in the lean mode too. Modules other than core_attn
    (e.g. "mlp") leave the layer as it is."""
    mom = MoMConfig(num_memories=3, topk=2, num_heads=2, head_dim=16, chunk_size=16,
                    backend=backend, lean_backward=lean)
    dtype = torch.float64 if backend == "torch" else torch.float32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(29, 2, HIDDEN, generator=g, dtype=dtype)
    dy = torch.randn(29, 2, HIDDEN, generator=g, dtype=dtype)
    results, projections = {}, {}
    runs = [("plain", {}), ("selective", dict(recompute_granularity="selective")),
            ("mlp only", dict(recompute_granularity="selective", recompute_modules=["mlp"]))]
    # The module choice is backend-independent: the slow Triton interpreter skips "mlp only".
    for name, extra in runs[:2] if backend == "triton" else runs:
        torch.manual_seed(0)
        layer = build_layer(mom, dtype=dtype, **extra)
        calls = []
        layer.in_proj.register_forward_hook(lambda m, args, out: calls.append(1))
        results[name] = saved_bytes_and_memory_runs(layer, x, dy)
        projections[name] = len(calls)
    plain, selective = results["plain"], results["selective"]
    assert torch.equal(selective[2], plain[2])
    for a, b in zip(selective[3], plain[3]):
        assert torch.equal(a, b)
    assert plain[1] == 1 and projections["plain"] == 1 and projections["selective"] == 2
    if "mlp only" in results:
        assert results["mlp only"][:2] == plain[:2] and projections["mlp only"] == 1
    assert selective[1] == 2 and selective[0] < 0.25 * plain[0], (selective[0], plain[0])


@pytest.mark.parametrize("precision", ["fp8", "fp4"])
def test_selective_recompute_and_grouped_projection_off_under_fp8_fp4(megatron_single, precision):
    """Transformer Engine's FP8 / FP4 projections need TE's own checkpoint to be rerun (their
    scaling state), and the grouped projection (a plain grouped GEMM) would bypass their
    quantization: under either the layer does neither."""
    layer = build_layer(MoMConfig(num_memories=3, topk=2, num_heads=2, head_dim=16,
                                  grouped_projection="on"), dtype=torch.float32,
                        recompute_granularity="selective").train()
    x = torch.randn(5, 1, HIDDEN)
    assert layer._recomputes_core() and layer._grouped_projection_applies(x)
    setattr(layer.config, precision, "hybrid" if precision == "fp8" else "nvfp4")
    assert not layer._recomputes_core() and not layer._grouped_projection_applies(x)
    with torch.no_grad():
        assert not build_layer(MoMConfig(num_memories=3, topk=2, num_heads=2, head_dim=16),
                               recompute_granularity="selective").train()._recomputes_core()
