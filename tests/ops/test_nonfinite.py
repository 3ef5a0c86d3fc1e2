"""A NaN stays in its own sequence: planted in one packed sequence, it must leave the other
sequences finite, forward and backward (torch references, and the Triton kernels through the
interpreter on the CPU). float32, small shapes.

Inside its own sequence a non-finite k, v, g or beta reaches its own position and every later
one (the state carries it), never an earlier one, on every backend: the chunked forms zero such
a row for their dense products and mark the outputs from it on (docs/kernels.md)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_mom.ops.gated_delta_rule import gated_delta_rule
from megatron_mom.ops.short_conv import short_conv
from test_triton_kernels import w_from_t_options  # tests/ops

LENGTHS = (20, 12)                 # two packed sequences; chunk 16 splits the first at 16
CU = torch.tensor([0, 20, 32])
SEQ0, SEQ1 = slice(0, 20), slice(20, 32)
BACKENDS = ["torch", "triton"]


def finite_rows(t: torch.Tensor) -> torch.Tensor:
    """[T] bool: the rows of t [1, T, ...] with every entry finite."""
    return torch.isfinite(t[0].reshape(t.shape[1], -1)).all(-1)


def conv_case(backend, nan_at, *, with_state=False, W=4, C=16):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, sum(LENGTHS), C, generator=gen)
    x[0, nan_at, 3] = float("nan")
    x.requires_grad_()
    w = torch.randn(C, W, generator=gen)
    h0 = torch.randn(2, C, W - 1, generator=gen).requires_grad_() if with_state else None
    y, _ = short_conv(x, w, cu_seqlens=CU, initial_state=h0, backend=backend)
    y.sum().backward()
    return y, x.grad, None if h0 is None else h0.grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_short_conv_nan_at_end_of_first_sequence(backend):
    y, dx, _ = conv_case(backend, nan_at=19)
    ok = finite_rows(y)
    assert ok[:19].all() and not ok[19], ok          # earlier positions: finite
    assert ok[SEQ1].all(), ok                        # the next sequence's first rows too
    assert finite_rows(dx)[SEQ1].all(), finite_rows(dx)


@pytest.mark.parametrize("backend", BACKENDS)
def test_short_conv_nan_at_start_of_second_sequence(backend):
    # dz of the second sequence's first row is NaN; the first sequence's last rows must not
    # read it in the backward (their taps stop at the boundary).
    y, dx, _ = conv_case(backend, nan_at=20)
    assert finite_rows(y)[SEQ0].all()
    assert finite_rows(dx)[SEQ0].all(), finite_rows(dx)


@pytest.mark.parametrize("backend", BACKENDS)
def test_short_conv_initial_state_gradient_only_from_what_it_feeds(backend):
    # Slot j of a W = 4 history feeds positions 0..j; a NaN at position 2 reaches slot 2 only.
    _, _, dh0 = conv_case(backend, nan_at=2, with_state=True)
    assert torch.isfinite(dh0[0, :, :2]).all() and not torch.isfinite(dh0[0, :, 2]).all()
    assert torch.isfinite(dh0[1]).all()


def gdr_case(backend, which, nan_at, H=1, K=16, V=16):
    gen = torch.Generator().manual_seed(0)
    T = sum(LENGTHS)
    x = dict(q=torch.randn(1, T, H, K, generator=gen),
             k=F.normalize(torch.randn(1, T, H, K, generator=gen), dim=-1),
             v=torch.randn(1, T, H, V, generator=gen),
             g=F.logsigmoid(torch.randn(1, T, H, generator=gen) + 2.0),
             beta=torch.rand(1, T, H, generator=gen))
    if nan_at is not None:
        x[which][0, nan_at] = float("nan")
    for t in x.values():
        t.requires_grad_()
    options = None
    if backend == "triton, w_from_t":          # the state kernels reading T in place of W
        backend, options = "triton", w_from_t_options()
    o, state = gated_delta_rule(*x.values(), cu_seqlens=CU, chunk_size=16, backend=backend,
                                output_final_state=True, options=options)
    (o.sum() + state.sum()).backward()
    return o, state, {name: t.grad for name, t in x.items()}


@pytest.mark.parametrize("backend", ["recurrent", "torch", "triton", "triton, w_from_t"])
@pytest.mark.parametrize("which", ["k", "v", "g", "beta"])
@pytest.mark.parametrize("nan_at", [9, 19])         # inside the first chunk; last of the second
def test_gated_delta_rule_nan_stays_in_its_sequence(backend, which, nan_at):
    clean, _, _ = gdr_case(backend, which, None)
    o, state, grads = gdr_case(backend, which, nan_at)
    ok = finite_rows(o)
    assert ok[SEQ1].all() and not ok[nan_at:20].any(), ok
    # earlier positions, also those of its own chunk: finite and what they are without it
    assert ok[:nan_at].all(), ok
    torch.testing.assert_close(o[:, :nan_at], clean[:, :nan_at], rtol=1e-5, atol=1e-6)
    assert not torch.isfinite(state[0]).any() and torch.isfinite(state[1]).all()
    for name, d in grads.items():
        assert finite_rows(d)[SEQ1].all(), name
    # a NaN at the start of the second sequence: the first is untouched, gradients included
    o, state, grads = gdr_case(backend, which, nan_at=20)
    assert finite_rows(o)[SEQ0].all() and torch.isfinite(state[0]).all()
    for name, d in grads.items():
        assert finite_rows(d)[SEQ0].all(), name


@pytest.mark.parametrize("backend", ["recurrent", "torch", "triton"])
def test_gated_delta_rule_nan_in_q_reaches_only_its_own_output(backend):
    clean, _, _ = gdr_case(backend, "q", None)
    o, state, _ = gdr_case(backend, "q", 9)
    ok = finite_rows(o)
    assert not ok[9] and ok[:9].all() and ok[10:].all(), ok
    torch.testing.assert_close(o[0, ok], clean[0, ok],
                               rtol=1e-5, atol=1e-6)
    assert torch.isfinite(state).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_nan_in_one_batch_row_leaves_the_other_and_the_past_finite(megatron_single, backend):
    from megatron_mom import MoMConfig
    from test_mixer import build_layer
    mom = MoMConfig(num_memories=4, topk=2, num_heads=2, head_dim=16, chunk_size=16,
                    backend=backend)
    layer = build_layer(mom, hidden=32, dtype=torch.float32)
    x = torch.randn(40, 2, 32, generator=torch.Generator().manual_seed(0))   # [s, b, D]
    clean, _ = layer(x)
    x[25, 0, 0] = float("nan")
    x.requires_grad_()
    out, _ = layer(x)
    assert torch.isfinite(out[:, 1]).all() and not torch.isfinite(out[25, 0]).all()
    # the memories' segments hold routed tokens: a chunk spans far more than 16 positions
    torch.testing.assert_close(out[:25, 0], clean[:25, 0], rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert torch.isfinite(x.grad[:, 1]).all()
