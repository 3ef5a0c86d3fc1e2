"""Router: top-k choice, renormalised weights, load-balancing and z losses, gradients."""
import pytest
import torch

from megatron_mom import MoMConfig


def test_route_picks_topk_and_renormalises(megatron_single):
    from megatron_mom.layer.router import route
    mom = MoMConfig(num_memories=5, topk=2)
    logits = torch.randn(40, 5, dtype=torch.float64)
    plan = route(logits, mom)
    probs = torch.softmax(logits, -1)
    top_p, top_i = probs.topk(2, -1)
    # memories listed in increasing order; the weights follow them
    order = top_i.argsort(-1)
    assert torch.equal(plan.memory[:, :2], top_i.gather(1, order))
    torch.testing.assert_close(plan.weight[:, :2], (top_p / top_p.sum(-1, keepdim=True)).gather(1, order))
    assert torch.equal(plan.memory[:, 2], torch.full((40,), 5))   # shared memory, weight 1
    assert torch.equal(plan.weight[:, 2], torch.ones(40, dtype=torch.float64))
    assert torch.equal(plan.tokens_per_memory, torch.bincount(top_i.flatten(), minlength=5))
    no_shared = route(logits, mom.replace(shared_memory=False))
    assert no_shared.memory.shape == (40, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_route_chooses_what_megatrons_topk_routing_chooses(megatron_single, dtype):
    """The memories are those of Megatron-Core's top-k routing (softmax after top-k) on the same
    logits, ties included (rows of equal logits, rows with two equal runners-up), in
    increasing order, with its renormalised probabilities as the weights."""
    from megatron.core.transformer.moe import moe_utils
    from megatron_mom.layer.router import route
    mom = MoMConfig(num_memories=4, topk=2)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 4, generator=g, dtype=dtype)
    logits[:8] = 0.5                                         # all four tied
    logits[8:16, 1] = logits[8:16, 3] = logits[8:16].max(1).values.clamp(max=0) - 1
    logits[8:16, 0] = logits[8:16, 2] = 2.0                 # two tied winners
    logits[16:24, 2] = logits[16:24, 3] = 3.0               # a winner, two tied runners-up
    logits[16:24, 0] = 4.0
    plan = route(logits, mom)
    probs, routing_map = moe_utils.topk_routing_with_score_function(
        logits, mom.topk, use_pre_softmax=False, score_function="softmax")
    want_memory = torch.nonzero(routing_map)[:, 1].view(-1, mom.topk)   # row-major: increasing
    assert torch.equal(plan.memory[:, :2], want_memory)
    torch.testing.assert_close(plan.weight[:, :2], probs.gather(1, want_memory))
    assert torch.equal(plan.tokens_per_memory, routing_map.sum(0))


def test_losses_match_hand_computation(megatron_single):
    from megatron_mom.layer.router import route, router_losses
    mom = MoMConfig(num_memories=4, topk=2, aux_loss_coeff=0.01, z_loss_coeff=1e-3)
    logits = torch.randn(30, 4, dtype=torch.float64)
    plan = route(logits, mom)
    losses = router_losses(logits, plan.tokens_per_memory, 30, mom)
    p = torch.softmax(logits, -1)
    chosen = torch.zeros(30, 4, dtype=torch.float64).scatter(1, p.topk(2, -1).indices, 1.0)
    f = chosen.sum(0) / (30 * 2)       # fraction of (token, choice) slots per memory
    P = p.mean(0)
    torch.testing.assert_close(losses.load_balancing, 0.01 * 4 * (f * P).sum())
    torch.testing.assert_close(losses.z, 1e-3 * torch.logsumexp(logits, -1).pow(2).mean())
    # Split over two "sequence-parallel ranks": local shares with global counts sum to the whole.
    a = router_losses(logits[:12], plan.tokens_per_memory, 30, mom)
    b = router_losses(logits[12:], plan.tokens_per_memory, 30, mom)
    torch.testing.assert_close(a.total + b.total, losses.total)
    assert router_losses(logits, plan.tokens_per_memory, 30,
                         mom.replace(aux_loss_coeff=0.0, z_loss_coeff=0.0)) is None


def test_aux_loss_gradient_reaches_router_weight(megatron_single):
    """With the mixing path cut off, the router weight's gradient is exactly the aux loss's."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron_mom.layer.router import MoMRouter, attach_loss, route, router_losses
    from megatron.core.transformer import TransformerConfig
    from megatron_mom.testing import cpu
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    mom = MoMConfig(num_memories=4, topk=2, aux_loss_coeff=0.1)
    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=1,
                               **cpu.megatron_cpu_config_overrides())
    router = MoMRouter(config, mom)
    x = torch.randn(50, 16)
    logits = router(x)
    plan = route(logits, mom)
    losses = router_losses(logits, plan.tokens_per_memory, 50, mom)
    w = attach_loss(plan.weight, losses.total)
    (w.detach() * 0 + w * 0).sum().backward()      # zero mixing gradient, aux gradient only
    W = router.weight.detach().clone().requires_grad_()
    p = torch.softmax(x @ W.T, -1)
    f = plan.tokens_per_memory.double() / (50 * 2)
    (0.1 * 4 * (f * p.mean(0)).sum()).backward()
    assert router.weight.grad.abs().sum() > 0
    torch.testing.assert_close(router.weight.grad, W.grad)


def test_packed_moves_match_plain_indexing_and_gradcheck():
    """spread / select / mix against plain indexing with autograd, and torch.autograd.gradcheck."""
    from megatron_mom.layer import packing
    g = torch.Generator().manual_seed(0)
    N, S, E = 11, 3, 5
    memory = torch.stack([torch.randperm(E, generator=g)[:S] for _ in range(N)])
    seq_id = torch.tensor([0] * 4 + [1] * 7)
    layout = packing.pack(memory, seq_id, 2, E)
    assert torch.equal(torch.sort(layout.slot_row.flatten()).values, torch.arange(N * S))
    x = torch.randn(N, 4, dtype=torch.float64, requires_grad=True)
    xm = torch.randn(N, E, 4, dtype=torch.float64, requires_grad=True)
    o = torch.randn(N * S, 2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(N, S, dtype=torch.float64, requires_grad=True)
    ours = (packing.spread(x, layout), packing.select(xm, layout), packing.mix(o, layout, w))
    plain = (x[layout.token], xm[layout.token, layout.memory],
             (o[layout.slot_row] * w[..., None, None]).sum(1))
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a, b)
        r = torch.randn_like(a)
        ga = torch.autograd.grad(a, (x, xm, o, w), r, allow_unused=True)
        gb = torch.autograd.grad(b, (x, xm, o, w), r, allow_unused=True)
        for u, v in zip(ga, gb):
            assert (u is None) == (v is None)
            if u is not None:
                torch.testing.assert_close(u, v)
    assert torch.autograd.gradcheck(lambda x: packing.spread(x, layout), (x,))
    assert torch.autograd.gradcheck(lambda xm: packing.select(xm, layout), (xm,))
    assert torch.autograd.gradcheck(lambda o, w: packing.mix(o, layout, w), (o, w))


def test_packed_moves_in_bf16():
    """bf16 rows with float32 mixing weights (the layer's case): the mix accumulates in float32
    and rounds once; its gradients are the float32 products rounded to the operands' dtypes.
    Also select from a strided [N, E, C] slice (the projection) and with E == S."""
    from megatron_mom.layer import packing
    g = torch.Generator().manual_seed(2)
    N, S, E = 9, 3, 4
    memory = torch.stack([torch.randperm(E, generator=g)[:S] for _ in range(N)])
    layout = packing.pack(memory, torch.tensor([0] * 5 + [1] * 4), 2, E)
    o = torch.randn(N * S, 2, 3, generator=g).bfloat16().requires_grad_(True)
    w = torch.rand(N, S, generator=g, requires_grad=True)
    y = packing.mix(o, layout, w, out_dtype=torch.bfloat16)
    o32 = o.detach().float().requires_grad_(True)
    ref = (o32[layout.slot_row] * w[..., None, None]).sum(1)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=8e-3, atol=1e-5)
    dy = torch.randn(N, 2, 3, generator=g).bfloat16()
    d_o, d_w = torch.autograd.grad(y, (o, w), dy)
    r_o, r_w = torch.autograd.grad(ref, (o32, w), dy.float())
    assert d_o.dtype == torch.bfloat16 and torch.equal(d_o, r_o.bfloat16())
    torch.testing.assert_close(d_w, r_w)

    proj = torch.randn(N, 5 + E * 6, dtype=torch.float64, requires_grad=True)
    xm = proj[:, 5:].view(N, E, 6)                                  # row stride 5 + E * 6
    for lay in (layout, packing.pack(torch.arange(E).repeat(N, 1), torch.zeros(N, dtype=torch.long), 1, E)):
        out = packing.select(xm, lay)
        torch.testing.assert_close(out, xm[lay.token, lay.memory])
        r = torch.randn_like(out)
        (ga,) = torch.autograd.grad(out, proj, r)
        (gb,) = torch.autograd.grad(xm[lay.token, lay.memory], proj, r)
        torch.testing.assert_close(ga, gb)


def test_grouped_linear_matches_per_row_products():
    """packing.grouped_linear (torch._grouped_mm, float32: no CPU float64) against each packed
    row's own product, with gradients; memory 2 receives no row (an empty group)."""
    from megatron_mom.layer import packing
    g = torch.Generator().manual_seed(3)
    N, S, E, D, C = 10, 2, 4, 8, 12
    memory = torch.stack([torch.tensor([0, 1, 3])[torch.randperm(3, generator=g)[:S]]
                          for _ in range(N)])
    layout = packing.pack(memory, torch.zeros(N, dtype=torch.long), 1, E)
    x = torch.randn(N, D, generator=g, requires_grad=True)
    w = torch.randn(E, C, D, generator=g, requires_grad=True)
    y = packing.grouped_linear(x, layout, w)
    ref = torch.einsum("ld,lcd->lc", x[layout.token], w[layout.memory])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    r = torch.randn_like(ref)
    got, want = torch.autograd.grad(y, (x, w), r), torch.autograd.grad(ref, (x, w), r)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1][2], torch.zeros(C, D))


def test_pack_time_major_matches_sequence_major():
    """The layer's time-major tokens (n = t * b + i) pack into the same segments, rows and
    boundaries as the same tokens in sequence-major order (n = i * s + t)."""
    from megatron_mom.layer import packing
    g = torch.Generator().manual_seed(1)
    b, s, S, E = 3, 7, 3, 5
    memory_sm = torch.stack([torch.randperm(E, generator=g)[:S] for _ in range(b * s)])
    seq_sm = torch.arange(b).repeat_interleave(s)                  # the former sequence_ids
    sm = packing.pack(memory_sm, seq_sm, b, E)
    # token (i, t): sequence-major index i * s + t, time-major index t * b + i
    tm_to_sm = torch.arange(b * s).view(b, s).t().reshape(-1)       # [s * b]
    seq_tm, num_seqs = packing.sequence_ids(b, s, None, "cpu")
    assert num_seqs == b and torch.equal(seq_tm, seq_sm[tm_to_sm])
    tm = packing.pack(memory_sm[tm_to_sm], seq_tm, b, E)
    assert torch.equal(tm_to_sm[tm.token], sm.token)
    assert torch.equal(tm.memory, sm.memory)
    assert torch.equal(tm.cu_seqlens, sm.cu_seqlens)
    assert torch.equal(tm.slot_row, sm.slot_row[tm_to_sm])


@pytest.mark.parametrize("num_seqs, E", [(3, 5), (7000, 5)])
def test_pack_orders_rows_by_memory_sequence_time(num_seqs, E):
    """The packed rows are the (token, slot) pairs sorted by (memory, sequence, token), written
    out by Python's sort; cu_seqlens counts each (memory, sequence) segment, with empty ones.
    7000 sequences x 5 memories: segment ids past what 16 bits hold."""
    from megatron_mom.layer import packing
    g = torch.Generator().manual_seed(2)
    N, S = 3 * num_seqs if num_seqs > 100 else 40, 2
    memory = torch.stack([torch.randperm(E, generator=g)[:S] for _ in range(N)])
    seq_id = torch.randint(num_seqs, (N,), generator=g)         # interleaved sequences
    layout = packing.pack(memory, seq_id, num_seqs, E)
    rows = sorted(range(N * S), key=lambda r: (int(memory.view(-1)[r]), int(seq_id[r // S]), r))
    assert layout.slot.tolist() == rows
    assert torch.equal(layout.token, layout.slot // S)
    assert torch.equal(layout.memory, memory.view(-1)[layout.slot])
    assert torch.equal(layout.slot_row.view(-1)[layout.slot], torch.arange(N * S))
    counts = torch.zeros(E * num_seqs, dtype=torch.int64)
    for r in range(N * S):
        counts[int(memory.view(-1)[r]) * num_seqs + int(seq_id[r // S])] += 1
    assert torch.equal(layout.cu_seqlens, torch.cat([counts.new_zeros(1), counts.cumsum(0)]))


def test_router_loss_scale_follows_megatrons_rule(megatron_single):
    """loss_scale * cp / micro-batches, into whatever buffer shape an earlier call left."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron_mom.layer.metrics import set_router_loss_scale
    MoEAuxLossAutoScaler.main_loss_backward_scale = torch.ones(1)   # a [1] buffer, as Megatron's
    set_router_loss_scale(torch.tensor([8.0]), num_microbatches=4, cp_size=2)
    assert MoEAuxLossAutoScaler.main_loss_backward_scale.item() == 4.0
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    set_router_loss_scale(2.0, num_microbatches=4)
    assert MoEAuxLossAutoScaler.main_loss_backward_scale.item() == 0.5
    set_router_loss_scale()
    assert MoEAuxLossAutoScaler.main_loss_backward_scale.item() == 1.0
    MoEAuxLossAutoScaler.main_loss_backward_scale = None


def test_gating_linear_keeps_x_in_its_dtype_and_matches_float32_autograd():
    """bf16 x: logits and both gradients equal autograd through x.float() (same float32 math),
    and nothing of x's size is saved in float32 for the backward."""
    from megatron_mom.layer.router import _GatingLinear
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    d = torch.randn(3, 5, 4)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        logits = _GatingLinear.apply(x, w, torch.float32)
    assert logits.dtype == torch.float32
    assert not [t for t in saved if t.dtype == torch.float32 and t.numel() >= x.numel()]
    logits.backward(d)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = torch.nn.functional.linear(x2.float(), w2.float())
    ref.backward(d)
    torch.testing.assert_close(logits, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=0)
    torch.testing.assert_close(w.grad, w2.grad, rtol=0, atol=0)
    x64 = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    w64 = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _GatingLinear.apply(a, b, torch.float64),
                                    (x64, w64))
