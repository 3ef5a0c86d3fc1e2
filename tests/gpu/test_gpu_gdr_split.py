"""GPU checks of chunk-parallel state passing (`KernelOptions.state_split`, run:
`pytest -m gpu tests/gpu/test_gpu_gdr_split.py`).

At the long shapes where "auto" splits (B1 T16384 H4 D256, B1 T32768 H16 D128, MoM-like
packed segments), in bfloat16 and float32: the split path's outputs and gradients against the
chunked torch reference (float64 for float32 inputs, float32 without tf32 for bfloat16) within
the suite's tolerances (tests/gpu/test_gpu_kernels.py: 5e-3 fp32, 2e-2 bf16, 4e-2 for bf16
dg), and against the unsplit path; the split forward and backward in a CUDA graph. Measured
errors go to $OUT/gpu_split_errors.json when OUT is set.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu
torch.backends.cuda.matmul.allow_tf32 = False          # the float32 reference must be float32

from error_records import write_errors  # noqa: E402
from graph_capture import run_script  # noqa: E402
from megatron_mom.ops import KernelOptions  # noqa: E402
from megatron_mom.ops.gated_delta_rule import gated_delta_rule  # noqa: E402

TOL = {torch.float32: 5e-3, torch.bfloat16: 2e-2}
TOL_DG = {torch.float32: 5e-3, torch.bfloat16: 4e-2}
NAMES = ["o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dh0"]
SPLIT = KernelOptions(state_split="on")
UNSPLIT = KernelOptions(state_split="off")
ERRORS: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _write_errors():
    yield
    write_errors("gpu_split_errors", ERRORS)


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def make_inputs(T, H, K, V, N, dtype, *, seed=0, raw_qk=False):
    """B = 1 leaves (q, k, v, g, beta, initial state [N, H, K, V])."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, T, H, K, device="cuda", generator=gen)
    k = torch.randn(1, T, H, K, device="cuda", generator=gen)
    k = k if raw_qk else F.normalize(k, dim=-1)
    v = torch.randn(1, T, H, V, device="cuda", generator=gen)
    g = F.logsigmoid(torch.randn(1, T, H, device="cuda", generator=gen) + 2.0)
    beta = torch.rand(1, T, H, device="cuda", generator=gen)
    h0 = torch.randn(N, H, K, V, device="cuda", generator=gen) * 0.1
    return [x.to(dtype) for x in (q, k, v, g, beta)] + [h0]


def forward_backward(leaves, backend, *, cu=None, l2=False, options=None, seed=1):
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    q, k, v, g, beta, h0 = leaves
    o, ht = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                             cu_seqlens=cu, use_qk_l2norm=l2, backend=backend, options=options)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    do = torch.randn(o.shape, device="cuda", generator=gen)
    dht = torch.randn(ht.shape, device="cuda", generator=gen)
    torch.autograd.backward([o, ht], [do.to(o.dtype), dht.to(ht.dtype)])
    return [o.detach(), ht.detach()] + [x.grad for x in leaves]


def check_split(name, leaves, *, cu=None, l2=False):
    """Split against the reference and against unsplit; both paths within the tolerances."""
    dtype = leaves[0].dtype
    split = forward_backward(leaves, "triton", cu=cu, l2=l2, options=SPLIT)
    unsplit = forward_backward(leaves, "triton", cu=cu, l2=l2, options=UNSPLIT)
    ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    want = forward_backward([x.to(ref_dtype) for x in leaves], "torch", cu=cu, l2=l2)
    errs = {}
    for key, a, b, c in zip(NAMES, split, unsplit, want):
        assert torch.isfinite(a).all(), f"{name}: split {key} not finite"
        errs[key] = {"split_vs_ref": rel_err(a, c), "unsplit_vs_ref": rel_err(b, c),
                     "split_vs_unsplit": rel_err(a, b)}
    ERRORS[name] = {"dtype": str(dtype), **errs}
    print(name, {k: {n: f"{e:.1e}" for n, e in v.items()} for k, v in errs.items()})
    for key, err in errs.items():
        limit = (TOL_DG if key == "dg" else TOL)[dtype]
        assert err["split_vs_ref"] < limit, f"{name}: {key} {err}"
        assert err["split_vs_unsplit"] < limit, f"{name}: {key} {err}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", [(16384, 4, 256), (32768, 16, 128)],
                         ids=["B1_T16384_H4_D256", "B1_T32768_H16_D128"])
def test_split_long_sequence(shape, dtype):
    T, H, D = shape
    check_split(f"split_B1_T{T}_H{H}_D{D}_{str(dtype)[6:]}", make_inputs(T, H, D, D, 1, dtype))


def mom_lengths(T, memories=4, top_k=2, seed=0):
    """Segment lengths of one MoM row: the shared memory's T tokens, then each memory's count
    when every token picks `top_k` of `memories` at random (ragged, summing to top_k * T)."""
    gen = torch.Generator().manual_seed(seed)
    picks = torch.rand(T, memories, generator=gen).topk(top_k, dim=1).indices
    return [T] + torch.bincount(picks.flatten(), minlength=memories).tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_split_mom_segments_with_l2norm(dtype):
    """Packed segments as routing makes them (B1 T16384: a 16384-token shared segment and four
    ragged memory segments), plus short ones, with the L2 norm."""
    lengths = mom_lengths(16384) + [1, 70, 0]
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    leaves = make_inputs(sum(lengths), 4, 256, 256, len(lengths), dtype, raw_qk=True)
    check_split(f"split_mom_T16384_H4_D256_l2_{str(dtype)[6:]}", leaves, cu=cu, l2=True)


@pytest.mark.parametrize("piece_chunks", [1, 4, 64])
def test_split_piece_lengths_agree(piece_chunks):
    """Other piece lengths (one chunk; a few; longer than most segments) give the unsplit
    path's results to bf16 rounding."""
    lengths = [5000, 64, 1, 3000, 8192]
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    leaves = make_inputs(sum(lengths), 2, 128, 128, len(lengths), torch.bfloat16)
    got = forward_backward(leaves, "triton", cu=cu,
                           options=SPLIT.replace(state_piece_chunks=piece_chunks))
    want = forward_backward(leaves, "triton", cu=cu, options=UNSPLIT)
    errs = {key: rel_err(a, b) for key, a, b in zip(NAMES, got, want)}
    ERRORS[f"split_pieces_{piece_chunks}"] = errs
    assert all(err < TOL_DG[torch.bfloat16] if key == "dg" else err < TOL[torch.bfloat16]
               for key, err in errs.items()), errs


_SPLIT_CAPTURE = """
import torch
from graph_capture import capture_and_replay
from megatron_mom.ops import KernelOptions
from megatron_mom.ops.gated_delta_rule import gated_delta_rule
lengths = [3000, 5, 1700]
cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
T, H, D = sum(lengths), 2, 128
gen = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(1, T, H, D, device="cuda", generator=gen) for _ in range(3))
k = torch.nn.functional.normalize(k, dim=-1)
g = torch.nn.functional.logsigmoid(torch.randn(1, T, H, device="cuda", generator=gen) + 2.0)
beta = torch.rand(1, T, H, device="cuda", generator=gen)
h0 = torch.randn(3, H, D, D, device="cuda", generator=gen) * 0.1
leaves = [x.bfloat16().requires_grad_() for x in (q, k, v, g, beta)] + [h0.requires_grad_()]
do = torch.randn(1, T, H, D, device="cuda", generator=gen).bfloat16()
options = KernelOptions(state_split="on", state_piece_chunks=4)
def step():
    for x in leaves:
        x.grad = None
    o, _ = gated_delta_rule(*leaves[:5], initial_state=leaves[5], cu_seqlens=cu,
                            backend="triton", options=options)
    o.backward(do)
    return [o, leaves[0].grad, leaves[5].grad]
graph, captured, eager = capture_and_replay(step)
err = max(((a.double() - b.double()).norm() / b.double().norm()).item()
          for a, b in zip(captured, eager))
assert err < 1e-6, err
"""


def test_split_cuda_graph_capture():
    """The split forward and backward (piece tables built on the device) capture in a CUDA
    graph and replay to the eager result. In a subprocess: a failed capture leaves the CUDA
    context unusable for later tests."""
    run = run_script(_SPLIT_CAPTURE, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
