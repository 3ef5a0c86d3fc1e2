"""The memory path's three modes (`conv_gated_delta_rule(mode="train" | "prefill" | "step")`)
against the token-by-token reference (`ops/conv_gated_delta_rule/reference.py`): ragged
segments, segments shorter than the convolution's history, initial memories; a prefill
followed by steps equals one train call over the whole sequences; a NaN in one segment's step
stays there. The Triton backend runs under Triton's interpreter on the CPU."""
from __future__ import annotations

import pytest
import torch

from megatron_mom.ops.conv_gated_delta_rule import MemoryState, conv_gated_delta_rule
from megatron_mom.ops.conv_gated_delta_rule.reference import conv_gated_delta_rule_reference

H, K, V, W = 2, 32, 32, 4
# Segment lengths 0, 1 and 2 are shorter than the W-1 = 3 inputs of a convolution's history.
LENGTHS = [0, 1, 2, 3, 8, 0, 6]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-4, atol=2e-5)}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def weights(dtype, gen):
    return dict(conv_q=torch.randn(H * K, W, generator=gen, dtype=dtype) * 0.5,
                conv_k=torch.randn(H * K, W, generator=gen, dtype=dtype) * 0.5,
                conv_v=torch.randn(H * V, W, generator=gen, dtype=dtype) * 0.5,
                A_log=torch.rand(H, generator=gen, dtype=dtype) * 2,
                dt_bias=torch.randn(H, generator=gen, dtype=dtype))


def packed_rows(L, S, dtype, gen):
    """q_tok [L / S, H*K] token rows, kvba [L, C] packed rows and a random gather: each token's
    S packed rows scattered over the segments (x_row and its inverse slot_row)."""
    N = L // S
    perm = torch.randperm(L, generator=gen)
    x_row = torch.empty(L, dtype=torch.int64)
    x_row[perm] = torch.arange(N).repeat_interleave(S)
    q_tok = torch.randn(N, H * K, generator=gen, dtype=dtype)
    kvba = torch.randn(L, H * K + H * V + 2 * H, generator=gen, dtype=dtype)
    return q_tok, kvba, (x_row, perm.view(N, S))


def random_state(segments, dtype, gen):
    fresh = MemoryState.zeros(segments, H, K, V, W, dtype)
    return fresh.map(lambda t: (torch.randn(t.shape, generator=gen, dtype=torch.float64) * 0.3)
                     .to(t.dtype))


def call(q_tok, kvba, gather, cu, w, **kw):
    return conv_gated_delta_rule(q_tok, kvba, gather, cu, w["conv_q"], w["conv_k"], w["conv_v"],
                                 w["A_log"], w["dt_bias"], num_heads=H, chunk_size=16, **kw)


def reference(q_tok, kvba, gather, cu, w, state=None):
    return conv_gated_delta_rule_reference(
        q_tok[gather[0]], kvba, cu, w["conv_q"], w["conv_k"], w["conv_v"], w["A_log"],
        w["dt_bias"], num_heads=H, state=state)


def assert_state_close(got: MemoryState, want: MemoryState, tol):
    for name in ("recurrent", "conv_q", "conv_k", "conv_v"):
        a, b = getattr(got, name), getattr(want, name)
        torch.testing.assert_close(a.double(), b.double(), **tol, msg=lambda m: f"{name}: {m}")


def ragged_case(dtype, seed=0, S=2):
    gen = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0] + LENGTHS).cumsum(0)
    q_tok, kvba, gather = packed_rows(int(cu[-1]), S, dtype, gen)
    return q_tok, kvba, gather, cu, weights(dtype, gen), gen


# float64 and float32 on the torch backend; the Triton kernels (16- and 32-bit floats) under
# the interpreter.
CASES = [(torch.float64, "torch"), (torch.float32, "torch"), (torch.float32, "triton")]


def triton_or_skip(backend):
    if backend == "triton":
        pytest.importorskip("megatron_mom.ops.conv_gated_delta_rule.triton")


@pytest.mark.parametrize("dtype, backend", CASES)
def test_train_mode_matches_reference(dtype, backend):
    triton_or_skip(backend)
    q_tok, kvba, gather, cu, w, _ = ragged_case(dtype)
    o = call(q_tok, kvba, gather, cu, w, backend=backend)
    want, _ = reference(q_tok, kvba, gather, cu, w)
    assert o.shape == (kvba.shape[0], H, V) and o.dtype == dtype
    torch.testing.assert_close(o.double(), want, **TOL[dtype])


def test_lean_train_mode_matches_reference():
    triton_or_skip("triton")
    q_tok, kvba, gather, cu, w, _ = ragged_case(torch.float32)
    o = call(q_tok, kvba, gather, cu, w, backend="triton", lean_backward=True)
    want, _ = reference(q_tok, kvba, gather, cu, w)
    torch.testing.assert_close(o.double(), want, **TOL[torch.float32])


@pytest.mark.parametrize("dtype, backend", CASES)
def test_prefill_mode_continues_from_and_writes_the_state(dtype, backend):
    triton_or_skip(backend)
    q_tok, kvba, gather, cu, w, gen = ragged_case(dtype, seed=1)
    initial = random_state(len(LENGTHS), dtype, gen)
    state = initial.map(torch.clone)
    tensors = state.tensors()
    o = call(q_tok, kvba, gather, cu, w, backend=backend, mode="prefill", state=state)
    want_o, want_state = reference(q_tok, kvba, gather, cu, w, state=initial)
    torch.testing.assert_close(o.double(), want_o, **TOL[dtype])
    assert all(a is b for a, b in zip(state.tensors(), tensors)), "state written out of place"
    assert_state_close(state, want_state, TOL[dtype])
    # an empty segment keeps its memory as it was
    for i in (0, 5):
        assert all(torch.equal(a[i], b[i]) for a, b in zip(state.tensors(), initial.tensors()))


@pytest.mark.parametrize("dtype, backend", CASES)
def test_step_mode_one_token_per_segment(dtype, backend):
    triton_or_skip(backend)
    gen = torch.Generator().manual_seed(2)
    B, S = 3, 2
    L = B * S
    q_tok, kvba, _ = packed_rows(L, S, dtype, gen)
    rows = torch.arange(L)
    gather = (rows // S, rows.view(B, S))           # token-major (token, slot) rows, as decoding
    w = weights(dtype, gen)
    initial = random_state(L, dtype, gen)
    state = initial.map(torch.clone)
    o = call(q_tok, kvba, gather, None, w, backend=backend, mode="step", state=state)
    want_o, want_state = reference(q_tok, kvba, gather, torch.arange(L + 1), w, state=initial)
    torch.testing.assert_close(o.double(), want_o, **TOL[dtype])
    assert_state_close(state, want_state, TOL[dtype])


@pytest.mark.parametrize("dtype, backend", CASES)
def test_prefill_then_steps_equals_train(dtype, backend):
    """Segments with prompts of 0..5 tokens, then 4 steps each: the read-outs and final
    memories equal one train call (and the reference) over the whole segments."""
    triton_or_skip(backend)
    gen = torch.Generator().manual_seed(3)
    prompts, steps = [0, 1, 2, 5, 3], 4
    n = len(prompts)
    full = torch.tensor([0] + [p + steps for p in prompts]).cumsum(0)
    L = int(full[-1])
    q_rows = torch.randn(L, H * K, generator=gen, dtype=dtype)
    kvba = torch.randn(L, H * K + H * V + 2 * H, generator=gen, dtype=dtype)
    w = weights(dtype, gen)
    ident = lambda m: (torch.arange(m), torch.arange(m)[:, None])     # q row i for packed row i
    o_train = call(q_rows, kvba, ident(L), full, w, backend=backend)
    _, want_state = reference(q_rows, kvba, ident(L), full, w)

    prompt_rows = torch.cat([torch.arange(int(full[i]), int(full[i]) + p)
                             for i, p in enumerate(prompts)])
    state = MemoryState.zeros(n, H, K, V, W, dtype)
    o = torch.empty_like(o_train)
    o[prompt_rows] = call(q_rows[prompt_rows], kvba[prompt_rows], ident(len(prompt_rows)),
                          torch.tensor([0] + prompts).cumsum(0), w, backend=backend,
                          mode="prefill", state=state)
    for t in range(steps):
        step_rows = full[:-1] + torch.tensor(prompts) + t          # each segment's next token
        o[step_rows] = call(q_rows[step_rows], kvba[step_rows], ident(n), None, w,
                            backend=backend, mode="step", state=state)
    torch.testing.assert_close(o, o_train, **TOL[dtype])
    assert_state_close(state, want_state, TOL[dtype])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_step_nan_stays_in_its_segment(backend):
    triton_or_skip(backend)
    gen = torch.Generator().manual_seed(4)
    L = 4
    w = weights(torch.float32, gen)
    state = random_state(L, torch.float32, gen)
    ident = (torch.arange(L), torch.arange(L)[:, None])
    for t in range(3):
        q_tok, kvba, _ = packed_rows(L, 1, torch.float32, gen)
        if t == 0:
            kvba[1, 0] = float("nan")                               # segment 1's k
        o = call(q_tok, kvba, ident, None, w, backend=backend, mode="step", state=state)
        others = torch.tensor([0, 2, 3])
        assert torch.isfinite(o[others]).all(), t
        assert o[1].isnan().any(), t
        for name, x in zip(("recurrent", "conv_q", "conv_k", "conv_v"), state.tensors()):
            assert torch.isfinite(x[others]).all(), (t, name)
    assert state.recurrent[1].isnan().any() and state.conv_k[1].isnan().any()


def test_modes_reject_wrong_states():
    q_tok, kvba, gather, cu, w, gen = ragged_case(torch.float64)
    state = random_state(len(LENGTHS), torch.float64, gen)
    cases = [
        (dict(mode="decode"), "mode must be one of"),
        (dict(mode="prefill"), r"pass state=MemoryState\(\.\.\.\)"),
        (dict(state=state), "mode='train' starts every segment empty"),
        (dict(mode="prefill", state=state, lean_backward=True), "lean_backward applies to"),
        (dict(mode="prefill", state=state.map(lambda t: t[1:])),
         r"state.recurrent is \(6, 2, 32, 32\); 7 segments need \(7, 2, 32, 32\)"),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            call(q_tok, kvba, gather, cu, w, backend="torch", **kw)
    with pytest.raises(ValueError, match="pass cu_seqlens=None"):
        call(q_tok, kvba, gather, cu, w, backend="torch", mode="step",
             state=random_state(kvba.shape[0], torch.float64, gen))
