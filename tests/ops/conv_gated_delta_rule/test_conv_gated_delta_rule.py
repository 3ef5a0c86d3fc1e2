"""The layer's memory path as one op (`conv_gated_delta_rule`): its Triton train form (one
autograd function; lean: backward head by head through recomputed convolutions) against the
composition of the torch references, on the CPU through Triton's interpreter (float32)."""
from __future__ import annotations

import weakref

import pytest
import torch

from megatron_mom.layer import packing
from megatron_mom.ops.conv_gated_delta_rule import conv_gated_delta_rule

from test_triton_kernels import w_from_t_options  # tests/ops

pytest.importorskip("triton")
pytest.importorskip("megatron_mom.ops.conv_gated_delta_rule.triton")


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_case(N=40, S=2, E=3, seqs=2, H=2, K=32, V=32, W=4, seed=0):
    """Random memory rows for N time-major tokens of `seqs` sequences, S memories each."""
    gen = torch.Generator().manual_seed(seed)
    memory = torch.stack([torch.randperm(E, generator=gen)[:S] for _ in range(N)])
    layout = packing.pack(memory, torch.arange(N) % seqs, seqs, E)
    L = layout.num_rows
    leaves = dict(
        q_tok=torch.randn(N, H * K, generator=gen),
        kvba=torch.randn(L, H * K + H * V + 2 * H, generator=gen),
        conv_q=torch.randn(H * K, W, generator=gen) * 0.5,
        conv_k=torch.randn(H * K, W, generator=gen) * 0.5,
        conv_v=torch.randn(H * V, W, generator=gen) * 0.5,
        A_log=torch.rand(H, generator=gen) * 2,
        dt_bias=torch.randn(H, generator=gen))
    for t in leaves.values():
        t.requires_grad_()
    return leaves, layout, H


def forward(leaves, layout, H, chunk_size=16, **kw):
    return conv_gated_delta_rule(
        leaves["q_tok"], leaves["kvba"], (layout.token, layout.slot_row), layout.cu_seqlens,
        leaves["conv_q"], leaves["conv_k"], leaves["conv_v"], leaves["A_log"], leaves["dt_bias"],
        num_heads=H, chunk_size=chunk_size, **kw)


def run(leaves, layout, H, chunk_size, **kw):
    o = forward(leaves, layout, H, chunk_size, **kw)
    weight = torch.randn(o.shape, generator=torch.Generator().manual_seed(7))
    return [o] + list(torch.autograd.grad((o * weight).sum(), list(leaves.values())))


# The default form (lean=False) at three heads: test_default_train_form_... below.
@pytest.mark.parametrize("seqs, chunk_size, H, lean", [
    (2, 16, 2, True), (1, 32, 2, True), (2, 16, 1, True), (2, 16, 3, True),
    (1, 32, 2, False), (2, 16, 1, False)])
def test_triton_conv_gated_delta_rule_matches_composition(seqs, chunk_size, H, lean):
    leaves, layout, H = make_case(seqs=seqs, H=H)
    got = run(leaves, layout, H, chunk_size, lean_backward=lean, backend="triton")
    want = run(leaves, layout, H, chunk_size, backend="torch")
    # dA_log and d dt_bias are per-head sums over every row of terms that mostly cancel: the
    # composition of the Triton ops is off from the torch one by the same ~1.5e-4 there.
    tol = {"A_log": 1e-3, "dt_bias": 1e-3}
    for name, a, b in zip(["o"] + list(leaves), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert rel_err(a, b) < tol.get(name, 2e-5), (name, rel_err(a, b))


def test_lean_op_with_the_other_backward_forms():
    """The lean op's backward (head by head, states recomputed) with the main backward kernel
    split over K blocks and P^T dO computed before the chain: the composition's results."""
    from megatron_mom.ops import KernelOptions
    leaves, layout, H = make_case(seqs=2, H=2, K=128, V=64)        # K = 128: 2 K blocks
    options = KernelOptions().with_launch("chunk_bwd_main", 128, split_k=1).with_launch(
        "state_fp32", 128, du0=1)
    got = run(leaves, layout, H, 16, lean_backward=True, backend="triton", options=options)
    want = run(leaves, layout, H, 16, backend="torch")
    tol = {"A_log": 1e-3, "dt_bias": 1e-3}
    for name, a, b in zip(["o"] + list(leaves), got, want):
        assert rel_err(a, b) < tol.get(name, 2e-5), (name, rel_err(a, b))


def test_conv_op_with_the_state_kernels_reading_t():
    """Launch setting w_from_t (the state kernels read T and beta in place of W) in the one
    function's every path (lean has them all): the rest group's forward, the kept group, the
    recomputed heads."""
    options = w_from_t_options()
    leaves, layout, H = make_case(seqs=2, H=3)
    got = run(leaves, layout, H, 16, lean_backward=True, backend="triton", options=options)
    want = run(leaves, layout, H, 16, backend="torch")
    tol = {"A_log": 1e-3, "dt_bias": 1e-3}
    for name, a, b in zip(["o"] + list(leaves), got, want):
        assert rel_err(a, b) < tol.get(name, 2e-5), (name, rel_err(a, b))


def lean_forward(leaves, layout, H, lean=True):
    return forward(leaves, layout, H, lean_backward=lean, backend="triton")


def test_lean_conv_gated_delta_rule_keeps_its_inputs_and_one_head():
    """The saved tensors are the inputs (and the layout); besides them the forward keeps one
    head's buffers, which the backward drops."""
    leaves, layout, H = make_case(H=3)
    o = lean_forward(leaves, layout, H)
    inputs = {t.data_ptr() for t in leaves.values()} | {
        t.data_ptr() for t in (layout.token, layout.slot_row)}
    saved = o.grad_fn.saved_tensors
    assert len(saved) == 10
    assert all(t.data_ptr() in inputs for t in saved[:9]), "a tensor made in the forward is kept"
    per_token, states = o.grad_fn.kept
    L = layout.num_rows
    for t in per_token + states[:3]:                 # q, k, v, rstd; gam, W, T (chunk-major)
        assert t.shape[1] == 1 or t.shape == (L,), tuple(t.shape)
    assert states[4].shape[1] == 1 and states[5].shape == (L, 1, 32)      # h, U of one head
    o.sum().backward()
    assert o.grad_fn.kept is None


def test_lean_conv_gated_delta_rule_frees_a_heads_gradients_before_the_next_chunk_backward(
        monkeypatch):
    """A head's convolution backward is deferred to run beside the next head's state kernels;
    its gradient buffers must be gone by the next head's chunk backward (the backward's peak),
    or the lean mode's peak grows by one head's dq, dk, dv (96 MiB at the paper shape)."""
    from megatron_mom.ops.gated_delta_rule import triton as gdr
    from megatron_mom.ops.short_conv import triton as conv
    grads, alive, calls = [], [], []
    conv_backward, chunk_backward = conv.conv_backward, gdr.chunk_backward

    def conv_spy(x2, x_row, weight, init, dy, *args):
        grads.append(weakref.ref(dy if dy._base is None else dy._base))
        return conv_backward(x2, x_row, weight, init, dy, *args)

    def chunk_spy(*args, **kwargs):
        alive.append(sum(ref() is not None for ref in grads))
        return chunk_backward(*args, **kwargs)

    monkeypatch.setattr(conv, "conv_backward", conv_spy)
    monkeypatch.setattr(gdr, "chunk_backward", chunk_spy)
    leaves, layout, H = make_case(H=3)
    o = lean_forward(leaves, layout, H)
    o.sum().backward()
    assert len(alive) == 3 and len(grads) == 9
    assert alive == [0, 0, 0], alive


@pytest.mark.parametrize("lean", [True, False])
def test_triton_conv_gated_delta_rule_second_backward_recomputes(lean):
    """retain_graph: the second backward (kept buffers gone) gives the same gradients."""
    leaves, layout, H = make_case(H=2)
    o = lean_forward(leaves, layout, H, lean)
    weight = torch.randn(o.shape, generator=torch.Generator().manual_seed(3))
    first = torch.autograd.grad((o * weight).sum(), list(leaves.values()), retain_graph=True)
    second = torch.autograd.grad((o * weight).sum(), list(leaves.values()))
    for name, a, b in zip(leaves, first, second):
        assert rel_err(a, b) < 1e-6, (name, rel_err(a, b))


def test_under_saved_tensor_hooks_the_kept_buffers_are_saved_tensors():
    """Under activation checkpointing (and offloading: saved-tensor hooks) what the forward
    keeps for the backward goes through the hooks as saved tensors: an attribute would stay in
    memory until the backward, which the checkpoint is there to avoid. The checkpointed
    gradients are the plain ones. (The default form; lean keeps one head's buffers through the
    same lines.)"""
    from torch.utils.checkpoint import checkpoint
    leaves, layout, H = make_case(H=2)
    L, heads = layout.num_rows, H
    weight = torch.randn(L, H, 32, generator=torch.Generator().manual_seed(3))

    def loss():
        return (lean_forward(leaves, layout, H, lean=False) * weight).sum()

    want = torch.autograd.grad(loss(), list(leaves.values()))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        o = lean_forward(leaves, layout, H, lean=False)
    saved = o.grad_fn.saved_tensors
    assert o.grad_fn.kept is None and len(saved) == 10 + 5 + 6     # inputs, q k v rstd, states
    assert [tuple(t.shape) for t in saved[10:13]] == [(L, heads, 32)] * 3
    got = torch.autograd.grad(checkpoint(loss, use_reentrant=False), list(leaves.values()))
    for name, a, b in zip(leaves, got, want):
        assert rel_err(a, b) < 1e-6, (name, rel_err(a, b))


def test_conv_gated_delta_rule_rejects_bad_shapes():
    leaves, layout, H = make_case()
    with pytest.raises(ValueError, match="kvba has"):
        conv_gated_delta_rule(
            leaves["q_tok"], leaves["kvba"][:, 1:], (layout.token, layout.slot_row),
            layout.cu_seqlens, leaves["conv_q"], leaves["conv_k"], leaves["conv_v"],
            leaves["A_log"], leaves["dt_bias"], num_heads=H)


def test_default_train_form_keeps_every_heads_buffers_and_matches_the_other_forms():
    """Without lean_backward the Triton train form keeps every head's normalised q, k, v and
    states (no recompute) and drops them in the backward; with recompute_states it keeps no
    states; with the recurrence's backward by head groups the composition runs. All give the
    torch composition's results."""
    from megatron_mom.ops import KernelOptions
    from megatron_mom.ops.conv_gated_delta_rule.triton import _ConvGatedDeltaRule
    leaves, layout, H = make_case(H=3)
    L = layout.num_rows
    want = run(leaves, layout, H, 16, backend="torch")
    o = forward(leaves, layout, H, backend="triton")
    assert o.grad_fn.name() == _ConvGatedDeltaRule.__name__ + "Backward"
    per_token, states = o.grad_fn.kept
    assert [tuple(t.shape) for t in per_token] == [(L, H, 32)] * 3 + [(L, H)] * 2
    assert states[4].shape[1] == H and states[5].shape == (L, H, 32)      # h, U of every head
    o.sum().backward()
    assert o.grad_fn.kept is None
    tol = {"A_log": 1e-3, "dt_bias": 1e-3}
    for options, form in ((KernelOptions(recompute_states=True), _ConvGatedDeltaRule.__name__),
                          (KernelOptions(backward_head_groups=3), None)):
        o = forward(leaves, layout, H, backend="triton", options=options)
        if form is None:                            # the composition: its last op's autograd
            assert o.grad_fn.name() != _ConvGatedDeltaRule.__name__ + "Backward"
        else:
            assert o.grad_fn.name() == form + "Backward" and o.grad_fn.kept[1] is None
        got = run(leaves, layout, H, 16, backend="triton", options=options)
        for name, a, b in zip(["o"] + list(leaves), got, want):
            assert rel_err(a, b) < tol.get(name, 2e-5), (options, name, rel_err(a, b))
