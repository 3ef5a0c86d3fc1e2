"""The memory path's modes on the GPU (run: `pytest -m gpu tests/gpu/test_gpu_memory_modes.py`):
`conv_gated_delta_rule(mode="train" | "prefill" | "step")` in bf16 on the Triton backend at the
layer's head size (H=4, K=V=128, W=4) against the token-by-token float64 reference on the
same values (on the CPU); prefill then steps against one train call; a NaN kept in its
segment's step; the step, alone and as the layer's decode step, captured in a CUDA graph.

Tolerance: relative L2 error 3e-2 (bf16 operands, inputs and outputs), as the layer's test."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

from graph_capture import run_script  # noqa: E402
from megatron_mom.ops.conv_gated_delta_rule import MemoryState, conv_gated_delta_rule  # noqa: E402
from megatron_mom.ops.conv_gated_delta_rule.reference import (  # noqa: E402
    conv_gated_delta_rule_reference)

H, K, V, W = 4, 128, 128, 4
DTYPE = torch.bfloat16
TOL = 3e-2
LENGTHS = [0, 1, 2, 3, 200, 77, 131]        # 0..2: shorter than the W-1 = 3 history inputs


def rel_err(a, b) -> float:
    return ((a.double().cpu() - b.double().cpu()).norm()
            / b.double().cpu().norm().clamp_min(1e-300)).item()


def weights(gen):
    r = lambda *shape: torch.randn(*shape, device="cuda", generator=gen)
    return dict(conv_q=(r(H * K, W) * 0.5).to(DTYPE), conv_k=(r(H * K, W) * 0.5).to(DTYPE),
                conv_v=(r(H * V, W) * 0.5).to(DTYPE),
                A_log=(torch.rand(H, device="cuda", generator=gen) * 2).to(DTYPE),
                dt_bias=r(H).to(DTYPE))


def packed_rows(L, S, gen):
    """q_tok [L / S, H*K], kvba [L, C] and a random gather (x_row, its inverse slot_row)."""
    N = L // S
    perm = torch.randperm(L, device="cuda", generator=gen)
    x_row = torch.empty(L, dtype=torch.int64, device="cuda")
    x_row[perm] = torch.arange(N, device="cuda").repeat_interleave(S)
    q_tok = torch.randn(N, H * K, device="cuda", generator=gen).to(DTYPE)
    kvba = torch.randn(L, H * K + H * V + 2 * H, device="cuda", generator=gen).to(DTYPE)
    return q_tok, kvba, (x_row, perm.view(N, S))


def random_state(segments, gen):
    fresh = MemoryState.zeros(segments, H, K, V, W, DTYPE, "cuda")
    return fresh.map(lambda t: (torch.randn(t.shape, device="cuda", generator=gen) * 0.3)
                     .to(t.dtype))


def call(q_tok, kvba, gather, cu, w, **kw):
    return conv_gated_delta_rule(q_tok, kvba, gather, cu, w["conv_q"], w["conv_k"], w["conv_v"],
                                 w["A_log"], w["dt_bias"], num_heads=H, backend="triton", **kw)


def reference(q_tok, kvba, gather, cu, w, state=None):
    cpu = lambda t: t.cpu()
    return conv_gated_delta_rule_reference(
        q_tok[gather[0]].cpu(), kvba.cpu(), cu.cpu(), *(cpu(w[n]) for n in
                                                        ("conv_q", "conv_k", "conv_v", "A_log",
                                                         "dt_bias")),
        num_heads=H, state=None if state is None else state.map(cpu))


def state_errors(got: MemoryState, want: MemoryState) -> dict:
    return {name: rel_err(a, b) for name, a, b in
            zip(("recurrent", "conv_q", "conv_k", "conv_v"), got.tensors(), want.tensors())}


def ragged(seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    cu = torch.tensor([0] + LENGTHS, device="cuda").cumsum(0)
    return (*packed_rows(int(cu[-1]), 2, gen), cu, weights(gen), gen)


@pytest.mark.parametrize("lean", [False, True], ids=["default", "lean"])
def test_train_mode_bf16(lean):
    q_tok, kvba, gather, cu, w, _ = ragged(0)
    o = call(q_tok, kvba, gather, cu, w, lean_backward=lean)
    want, _ = reference(q_tok, kvba, gather, cu, w)
    assert o.dtype == DTYPE and torch.isfinite(o).all()
    assert rel_err(o, want) < TOL, rel_err(o, want)


def test_prefill_mode_bf16():
    q_tok, kvba, gather, cu, w, gen = ragged(1)
    initial = random_state(len(LENGTHS), gen)
    state = initial.map(torch.clone)
    o = call(q_tok, kvba, gather, cu, w, mode="prefill", state=state)
    want_o, want_state = reference(q_tok, kvba, gather, cu, w, state=initial)
    errs = {"o": rel_err(o, want_o), **state_errors(state, want_state)}
    assert max(errs.values()) < TOL, errs
    assert all(torch.equal(a[0], b[0]) for a, b in zip(state.tensors(), initial.tensors()))


def test_step_mode_bf16():
    gen = torch.Generator(device="cuda").manual_seed(2)
    B, S = 8, 3
    L = B * S
    q_tok, kvba, _ = packed_rows(L, S, gen)
    rows = torch.arange(L, device="cuda")
    gather = (rows // S, rows.view(B, S))
    w = weights(gen)
    initial = random_state(L, gen)
    state = initial.map(torch.clone)
    o = call(q_tok, kvba, gather, None, w, mode="step", state=state)
    want_o, want_state = reference(q_tok, kvba, gather, torch.arange(L + 1), w, state=initial)
    errs = {"o": rel_err(o, want_o), **state_errors(state, want_state)}
    assert max(errs.values()) < TOL, errs


def test_prefill_then_steps_equals_train_bf16():
    gen = torch.Generator(device="cuda").manual_seed(3)
    prompts, steps = [0, 1, 2, 300, 57], 6
    n = len(prompts)
    full = torch.tensor([0] + [p + steps for p in prompts]).cumsum(0)
    L = int(full[-1])
    q_rows = torch.randn(L, H * K, device="cuda", generator=gen).to(DTYPE)
    kvba = torch.randn(L, H * K + H * V + 2 * H, device="cuda", generator=gen).to(DTYPE)
    w = weights(gen)
    ident = lambda m: (torch.arange(m, device="cuda"), torch.arange(m, device="cuda")[:, None])
    o_train = call(q_rows, kvba, ident(L), full.cuda(), w)
    prompt_rows = torch.cat([torch.arange(int(full[i]), int(full[i]) + p)
                             for i, p in enumerate(prompts)]).cuda()
    state = MemoryState.zeros(n, H, K, V, W, DTYPE, "cuda")
    o = torch.empty_like(o_train)
    o[prompt_rows] = call(q_rows[prompt_rows], kvba[prompt_rows], ident(len(prompt_rows)),
                          torch.tensor([0] + prompts, device="cuda").cumsum(0), w,
                          mode="prefill", state=state)
    for t in range(steps):
        step_rows = (full[:-1] + torch.tensor(prompts) + t).cuda()
        o[step_rows] = call(q_rows[step_rows], kvba[step_rows], ident(n), None, w, mode="step",
                            state=state)
    assert rel_err(o, o_train) < TOL, rel_err(o, o_train)
    _, want_state = reference(q_rows, kvba, ident(L), full, w)
    errs = state_errors(state, want_state)
    assert max(errs.values()) < TOL, errs


def test_step_nan_stays_in_its_segment_bf16():
    gen = torch.Generator(device="cuda").manual_seed(4)
    L = 16
    w = weights(gen)
    state = random_state(L, gen)
    ident = (torch.arange(L, device="cuda"), torch.arange(L, device="cuda")[:, None])
    others = torch.arange(L, device="cuda") != 5
    for t in range(3):
        q_tok, kvba, _ = packed_rows(L, 1, gen)
        if t == 0:
            kvba[5, 0] = float("nan")
        o = call(q_tok, kvba, ident, None, w, mode="step", state=state)
        assert torch.isfinite(o[others]).all() and o[5].isnan().any(), t
        assert all(torch.isfinite(x[others]).all() for x in state.tensors()), t


_STEP_CAPTURE = """
import torch
from graph_capture import capture_and_replay
from megatron_mom.ops.conv_gated_delta_rule import MemoryState, conv_gated_delta_rule
H, K, V, W, B, S = 4, 128, 128, 4, 64, 3
L = B * S
gen = torch.Generator(device="cuda").manual_seed(0)
r = lambda *shape: torch.randn(*shape, device="cuda", generator=gen).bfloat16()
conv_q, conv_k, conv_v = r(H * K, W), r(H * K, W), r(H * V, W)
A_log, dt_bias = r(H).abs(), r(H)
q_tok, kvba = r(B, H * K), r(L, H * K + H * V + 2 * H)
rows = torch.arange(L, device="cuda")
gather = (rows // S, rows.view(B, S))
initial = MemoryState.zeros(L, H, K, V, W, torch.bfloat16, "cuda").map(
    lambda t: torch.randn(t.shape, device="cuda", generator=gen).to(t.dtype))
state = initial.map(torch.clone)

def step():
    state.copy_(initial)          # every replay starts from the same memories
    o = conv_gated_delta_rule(q_tok, kvba, gather, None, conv_q, conv_k, conv_v, A_log, dt_bias,
                              num_heads=H, mode="step", state=state)
    return [o, *state.tensors()]

graph, captured, eager = capture_and_replay(step, warmups=2)
assert all(torch.equal(a, b) for a, b in zip(captured, eager))
print("step captured")
"""

_DECODE_CAPTURE = """
import torch
from graph_capture import capture_and_replay
from megatron_mom import MoMConfig
from megatron_mom.train.build import init_process_groups
init_process_groups(tp=1, pp=1, seed=1234)
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import build_module
from megatron_mom.layer.specs import get_mom_module_spec
mom = MoMConfig(num_memories=4, topk=2, shared_memory=True, num_heads=4, head_dim=128)
config = TransformerConfig(num_layers=1, hidden_size=512, num_attention_heads=4,
                           params_dtype=torch.bfloat16, bf16=True,
                           gradient_accumulation_fusion=False)
layer = build_module(get_mom_module_spec(mom, backend="local"), config=config,
                     layer_number=1).cuda().eval()
B, T0 = 8, 300
ctx = StaticInferenceContext(max_batch_size=B, max_sequence_length=T0 + 8)
prompt = torch.randn(T0, B, 512, device="cuda", dtype=torch.bfloat16)
token = torch.randn(1, B, 512, device="cuda", dtype=torch.bfloat16)
with torch.no_grad():
    layer(prompt, inference_context=ctx)
ctx.sequence_len_offset = T0
cache = ctx.key_value_memory_dict[1]
after_prompt = [t.clone() for t in cache.memories.tensors()]

def step():
    for t, saved in zip(cache.memories.tensors(), after_prompt):
        t.copy_(saved)
    with torch.no_grad():
        out, _ = layer(token, inference_context=ctx)
    return [out, *cache.memories.tensors()]

graph, captured, eager = capture_and_replay(step, warmups=2)
assert all(torch.equal(a, b) for a, b in zip(captured, eager))
assert torch.isfinite(captured[0]).all()
print("decode step captured")
"""


@pytest.mark.parametrize("script", [_STEP_CAPTURE, _DECODE_CAPTURE], ids=["op", "layer"])
def test_step_cuda_graph_capture(script):
    """The step mode alone, and the layer's whole decode step (routing, gather of the routed
    memories, step, scatter back, mix, norm), captured in a CUDA graph and replayed give the
    eager bits. In a subprocess: a failed capture leaves the CUDA context unusable."""
    run = run_script(script, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
