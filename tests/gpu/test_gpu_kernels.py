"""GPU checks of the Triton kernels against the torch references (run: `pytest -m gpu`).

Outputs and all gradients are compared with the chunked torch reference evaluated on the same
(upcast) inputs, in float64 for float32 inputs and in float32 (no tf32) for bfloat16 inputs,
by ||ours - ref|| / ||ref||. Tolerances: float32 inputs (tf32
tensor-core dots) 5e-3; bfloat16 inputs (bf16 intermediates and dot operands) 2e-2, and 4e-2
for dg (a sum of many cancelling terms). Measured errors are written to
$OUT/gpu_kernel_errors.json when OUT is set. These runs are what proves the kernels right on
Hopper with Triton 3.4-3.7 (which miscompiles some transposed-dot patterns).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu
torch.backends.cuda.matmul.allow_tf32 = False          # the float32 reference must be float32

from error_records import write_errors  # noqa: E402
from graph_capture import capture_and_replay, run_script  # noqa: E402
from megatron_mom.ops.gated_delta_rule import gated_delta_rule  # noqa: E402
from megatron_mom.ops.gated_rmsnorm import gated_rmsnorm  # noqa: E402
from megatron_mom.ops.l2norm import l2norm  # noqa: E402
from megatron_mom.ops.mix import mix  # noqa: E402
from megatron_mom.ops.short_conv import short_conv  # noqa: E402

TOL = {torch.float32: 5e-3, torch.bfloat16: 2e-2}
TOL_DG = {torch.float32: 5e-3, torch.bfloat16: 4e-2}
GRAD_NAMES = ["dq", "dk", "dv", "dg", "dbeta", "dh0"]
ERRORS: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _write_errors():
    yield
    write_errors("gpu_kernel_errors", ERRORS)


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def make_inputs(B, T, H, K, V, dtype, *, N=None, seed=0, raw_qk=False):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    q = torch.randn(B, T, H, K, device=dev, generator=gen)
    k = torch.randn(B, T, H, K, device=dev, generator=gen)
    if not raw_qk:
        k = F.normalize(k, dim=-1)
    v = torch.randn(B, T, H, V, device=dev, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, device=dev, generator=gen) + 2.0)
    beta = torch.rand(B, T, H, device=dev, generator=gen)
    h0 = torch.randn(N or B, H, K, V, device=dev, generator=gen) * 0.1
    return [x.to(dtype) for x in (q, k, v, g, beta)] + [h0]


def forward_backward(leaves, backend, *, cu=None, l2=False, chunk_size=64, seed=1, options=None):
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    q, k, v, g, beta, h0 = leaves
    o, ht = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                             cu_seqlens=cu, use_qk_l2norm=l2, chunk_size=chunk_size,
                             backend=backend, options=options)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    do = torch.randn(o.shape, device="cuda", generator=gen)
    dht = torch.randn(ht.shape, device="cuda", generator=gen)
    torch.autograd.backward([o, ht], [do.to(o.dtype), dht.to(ht.dtype)])
    return [o.detach(), ht.detach()] + [x.grad for x in leaves]


def ragged_k256(dtype):
    """MoM's layer-sized heads (H = 4, K = V = 256) over ragged packed sequences, one of a
    single token: (leaves, cu_seqlens)."""
    lengths = [3000, 77, 1, 4096, 1018]
    leaves = make_inputs(1, sum(lengths), 4, 256, 256, dtype, N=len(lengths), raw_qk=True)
    return leaves, torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)


def rel_errs(got, want) -> dict:
    """rel_err per output of `forward_backward`, by name."""
    return {name: rel_err(a, b) for name, a, b in zip(["o", "final_state"] + GRAD_NAMES, got, want)}


def check(name, leaves, *, cu=None, l2=False, tol_scale=1.0, options=None):
    dtype = leaves[0].dtype
    got = forward_backward(leaves, "triton", cu=cu, l2=l2, options=options)
    ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    want = forward_backward([x.to(ref_dtype) for x in leaves], "torch", cu=cu, l2=l2)
    errs = {}
    for key, a, b in zip(["o", "final_state"] + GRAD_NAMES, got, want):
        assert a is not None and torch.isfinite(a).all(), f"{name}: {key} not finite"
        errs[key] = rel_err(a, b)
    ERRORS[name] = {"dtype": str(dtype), **errs}
    print(name, {k: f"{v:.2e}" for k, v in errs.items()})
    for key, err in errs.items():
        limit = (TOL_DG if key == "dg" else TOL)[dtype] * tol_scale
        assert err < limit, f"{name}: {key} relative error {err:.2e} >= {limit:.0e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", [(4, 4096, 16, 128), (4, 4096, 4, 256)],
                         ids=["B4_T4096_H16_D128", "B4_T4096_H4_D256"])
def test_training_shapes(shape, dtype):
    B, T, H, D = shape
    check(f"train_{B}x{T}x{H}x{D}_{str(dtype)[6:]}", make_inputs(B, T, H, D, D, dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_varlen_ragged_with_l2norm(dtype):
    lengths = [1000, 37, 4096, 1, 0, 2000, 63, 129]
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0)
    leaves = make_inputs(1, sum(lengths), 4, 128, 64, dtype, N=len(lengths), raw_qk=True)
    check(f"varlen_l2norm_K128_V64_{str(dtype)[6:]}", leaves, cu=cu, l2=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_state_kernels_reading_t_in_place_of_w(dtype):
    """Launch setting w_from_t (the state kernels read T and beta where they read W) at MoM's
    heads over ragged packed sequences with the L2 norm: the reference's tolerances, and how
    far from the W form (recorded)."""
    from test_triton_kernels import w_from_t_options     # tests/ops
    options = w_from_t_options()
    leaves, cu = ragged_k256(dtype)
    name = f"w_from_t_ragged_K256_{str(dtype)[6:]}"
    check(name, leaves, cu=cu, l2=True, options=options)
    errs = rel_errs(forward_backward(leaves, "triton", cu=cu, l2=True, options=options),
                    forward_backward(leaves, "triton", cu=cu, l2=True))
    ERRORS[name + "_vs_w"] = errs


@pytest.mark.parametrize("recompute", [False, True], ids=["kept", "recomputed"])
def test_backward_by_head_groups_is_exact(recompute):
    """The backward head by head (and with recomputed states) runs the same kernels on the same
    values per head: its gradients match the all-heads backward to float32 rounding at most
    (bf16, packed ragged sequences, l2 norm, initial state); whether bit for bit is recorded."""
    from megatron_mom.ops import KernelOptions
    leaves, cu = ragged_k256(torch.bfloat16)
    want = forward_backward(leaves, "triton", cu=cu, l2=True)
    got = forward_backward(leaves, "triton", cu=cu, l2=True, options=KernelOptions(
        recompute_states=recompute, backward_head_groups=4))
    errs = rel_errs(got, want)
    errs["bitwise_equal"] = float(all(torch.equal(a, b) for a, b in zip(got, want)))
    ERRORS[f"head_groups_{'recomputed' if recompute else 'kept'}"] = errs
    assert max(v for k, v in errs.items() if k != "bitwise_equal") < 1e-5, errs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_main_backward_split_over_k_blocks(dtype):
    """launch["chunk_bwd_main"]["split_k"] (a program per K block) at K = V = 256 over ragged
    segments with the l2 norm: against the reference, and against the unsplit kernel, which
    computes the same products (dgam summed in another order: `compare_backward_forms`)."""
    from megatron_mom.ops import KernelOptions
    leaves, cu = ragged_k256(dtype)
    unsplit = KernelOptions().with_launch("chunk_bwd_main", 256, split_k=0, dp_first=0,
                                          num_stages=1)
    split = unsplit.with_launch("chunk_bwd_main", 256, split_k=1)
    name = f"split_k_K256_{str(dtype)[6:]}"
    check(name, leaves, cu=cu, l2=True, options=split)
    compare_backward_forms(f"{name}_vs_unsplit", leaves, cu, split, unsplit, dtype)


def compare_backward_forms(key, leaves, cu, options, other, dtype):
    """Two forms of the backward on the same inputs: the forward bit for bit, every gradient
    within float32 rounding, or a bf16 rounding step for bf16 gradients (the two builds may
    round differently); whether they agree bit for bit is recorded under `key`."""
    got = forward_backward(leaves, "triton", cu=cu, l2=True, options=options)
    want = forward_backward(leaves, "triton", cu=cu, l2=True, options=other)
    errs = rel_errs(got, want)
    errs["bitwise_equal"] = float(all(torch.equal(a, b) for a, b in zip(got, want)))
    ERRORS[key] = errs
    assert errs["o"] == 0 and errs["final_state"] == 0, errs       # the forward is untouched
    assert max(v for k, v in errs.items() if k != "bitwise_equal") < (
        1e-5 if dtype == torch.float32 else 5e-3), errs


@pytest.mark.parametrize("split_k", [0, 1], ids=["whole", "split_k"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_main_backward_with_dp_first(dtype, split_k):
    """launch["chunk_bwd_main"]["dp_first"] (dP and the value terms in a kernel of their own
    first) at K = V = 256 over ragged segments with the l2 norm: against the reference, and
    against the main kernel computing them itself with the same split, which does the same
    products (`compare_backward_forms`)."""
    from megatron_mom.ops import KernelOptions
    leaves, cu = ragged_k256(dtype)
    base = KernelOptions().with_launch("chunk_bwd_main", 256, split_k=split_k, dp_first=0,
                                       num_stages=1)
    first = base.with_launch("chunk_bwd_main", 256, dp_first=1)
    name = f"dp_first_{'split_k_' if split_k else ''}K256_{str(dtype)[6:]}"
    check(name, leaves, cu=cu, l2=True, options=first)
    compare_backward_forms(f"{name}_vs_own_dp", leaves, cu, first, base, dtype)


@pytest.mark.parametrize("build", [(32, 4, 2), (32, 8, 2), (64, 8, 1)],
                         ids=["BV32_w4_s2", "BV32_w8_s2", "BV64_w8_s1"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_state_backward_with_p_t_do_first(dtype, build):
    """launch["state_bwd"]["du0"] (P^T dO before the chain; the K = 256 default, BV32_w4_s2)
    with the wider V blocks it makes room for (BV, warps, stages), over ragged segments with
    the l2 norm: against the reference, and near the chain that computes P^T dO itself at
    BV 16 (bf16: P^T dO rounded once more, to dU's dtype)."""
    from megatron_mom.ops import KernelOptions
    leaves, cu = ragged_k256(dtype)
    entry = "state_fp32" if dtype == torch.float32 else "state_bwd"
    bv, warps, stages = build
    first = KernelOptions().with_launch(entry, 256, du0=1, BV=bv, num_warps=warps,
                                        num_stages=stages)
    tag = f"K256_BV{bv}_w{warps}_s{stages}_{str(dtype)[6:]}"
    check(f"p_t_do_first_{tag}", leaves, cu=cu, l2=True, options=first)
    got = forward_backward(leaves, "triton", cu=cu, l2=True, options=first)
    in_chain = KernelOptions().with_launch(entry, 256, du0=0, **(
        {"BV": 16, "num_warps": 4, "num_stages": 2} if entry == "state_bwd" else {}))
    want = forward_backward(leaves, "triton", cu=cu, l2=True, options=in_chain)
    errs = rel_errs(got, want)
    ERRORS[f"p_t_do_first_vs_in_chain_{tag}"] = errs
    assert errs["o"] == 0 and errs["final_state"] == 0, errs       # the forward is untouched
    for name, err in errs.items():                 # bf16: dg sums many cancelling terms
        limit = 1e-5 if dtype == torch.float32 else (4e-2 if name == "dg" else 1e-2)
        assert err < limit, (name, errs)


def test_long_sequence_65536_bf16():
    """T = 65536 in one sequence: finite everywhere and close to the reference."""
    leaves = make_inputs(1, 65536, 4, 128, 128, torch.bfloat16)
    check("long_T65536_H4_D128_bf16", leaves)


def test_no_host_sync_cuda_graph_capture():
    """The varlen forward and backward can be captured in a CUDA graph (no host syncs)."""
    lengths = [300, 5, 700]
    cu = torch.tensor([0] + lengths, device="cuda", dtype=torch.int32).cumsum(0).to(torch.int32)
    leaves = [x.requires_grad_() for x in make_inputs(1, sum(lengths), 2, 64, 64, torch.bfloat16,
                                                      N=3)]
    do = torch.randn(1, sum(lengths), 2, 64, device="cuda", dtype=torch.bfloat16)

    def step():
        for x in leaves:
            x.grad = None
        o, _ = gated_delta_rule(*leaves[:5], initial_state=leaves[5], cu_seqlens=cu,
                                backend="triton")
        o.backward(do)
        return [o]

    graph, (o_graph,), (o_eager,) = capture_and_replay(step)  # keep graph: it owns o_graph
    assert rel_err(o_graph, o_eager) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_small_ops(dtype):
    gen = torch.Generator(device="cuda").manual_seed(5)
    errs = {}
    lengths = [3000, 1, 0, 5000, 192]
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0)
    x = torch.randn(1, sum(lengths), 1024, device="cuda", generator=gen).to(dtype).requires_grad_()
    w = torch.randn(1024, 4, device="cuda", generator=gen).to(dtype).requires_grad_()
    init = torch.randn(len(lengths), 1024, 3, device="cuda", generator=gen).to(dtype).requires_grad_()
    dy = torch.randn(x.shape, device="cuda", generator=gen).to(dtype)
    res = {}
    for backend in ("triton", "torch"):
        xs = [t.detach().double().requires_grad_() if backend == "torch" else t for t in (x, w, init)]
        y, _ = short_conv(xs[0], xs[1], cu_seqlens=cu, initial_state=xs[2], backend=backend)
        res[backend] = [y] + list(torch.autograd.grad((y * dy.to(y.dtype)).sum(), xs))
    for key, a, b in zip(["conv_y", "conv_dx", "conv_dw", "conv_dinit"], res["triton"], res["torch"]):
        errs[key] = rel_err(a, b)

    y = torch.randn(4, 4096, 16, 128, device="cuda", generator=gen).to(dtype).requires_grad_()
    gate = torch.randn(y.shape, device="cuda", generator=gen).to(dtype).requires_grad_()
    wt = torch.randn(128, device="cuda", generator=gen).to(dtype).requires_grad_()
    dout = torch.randn(y.shape, device="cuda", generator=gen).to(dtype)
    res = {}
    for backend in ("triton", "torch"):
        xs = [t.detach().double().requires_grad_() if backend == "torch" else t for t in (y, gate, wt)]
        out = gated_rmsnorm(xs[0], xs[1], xs[2], 1e-6, backend=backend)
        res[backend] = [out] + list(torch.autograd.grad((out * dout.to(out.dtype)).sum(), xs))
    for key, a, b in zip(["grms_out", "grms_dy", "grms_dgate", "grms_dw"], res["triton"], res["torch"]):
        errs[key] = rel_err(a, b)

    res = {}
    for backend in ("triton", "torch"):
        xs = y.detach().double().requires_grad_() if backend == "torch" else y
        out = l2norm(xs, backend=backend)
        res[backend] = [out, torch.autograd.grad((out * dout.to(out.dtype)).sum(), xs)[0]]
    errs["l2_out"], errs["l2_dx"] = (rel_err(a, b) for a, b in zip(res["triton"], res["torch"]))
    ERRORS[f"small_ops_{str(dtype)[6:]}"] = errs
    print(errs)
    limit = 1e-5 if dtype == torch.float32 else 1e-2
    for key, err in errs.items():
        assert err < limit, f"{key}: relative error {err:.2e} >= {limit:.0e}"


def test_mix_paper_shape_bf16():
    """The mix at the paper shape (N = 16384 tokens, S = 3 slots, H*V = 1024) in bf16 with
    float32 weights against the torch reference on float32 rows; d_o must also equal the torch
    bf16 path bit for bit (both round w * dy once)."""
    N, S, H, V = 16384, 3, 4, 256
    gen = torch.Generator(device="cuda").manual_seed(7)
    o = torch.randn(N * S, H, V, device="cuda", generator=gen).bfloat16().requires_grad_()
    slot_row = torch.randperm(N * S, device="cuda", generator=gen).view(N, S)
    w = torch.rand(N, S, device="cuda", generator=gen).requires_grad_()
    dy = torch.randn(N, H, V, device="cuda", generator=gen).bfloat16()
    y = mix(o, slot_row, w, torch.bfloat16, backend="triton")
    d_o, d_w = torch.autograd.grad(y, (o, w), dy)
    o32 = o.detach().float().requires_grad_()
    y_ref = mix(o32, slot_row, w, torch.float32, backend="torch")
    d_o_ref, d_w_ref = torch.autograd.grad(y_ref, (o32, w), dy.float())
    errs = {"mix_y": rel_err(y, y_ref), "mix_do": rel_err(d_o, d_o_ref), "mix_dw": rel_err(d_w, d_w_ref)}
    ERRORS["mix_bf16"] = errs
    print(errs)
    for key, err in errs.items():
        assert err < 1e-2, f"{key}: relative error {err:.2e} >= 1e-02"
    y_bf = mix(o, slot_row, w, torch.bfloat16, backend="torch")
    assert torch.equal(d_o, torch.autograd.grad(y_bf, o, dy)[0])



def test_sum_over_slots_paper_shape_bf16():
    """The Triton sum over slots (the packed rows' backward: grouped projection's dx, q's
    convolution) against the torch gather-and-sum at the paper shape, bf16: both sum three
    values in float32 and round once (in their own order: at most one bf16 step apart); also
    into a column range."""
    from megatron_mom.ops.mix import sum_over_slots
    from megatron_mom.ops.mix.triton import sum_over_slots as sum_into
    N, S, D = 16384, 3, 2048
    gen = torch.Generator(device="cuda").manual_seed(3)
    rows = torch.randn(N * S, D, device="cuda", generator=gen).bfloat16()
    slot_row = torch.randperm(N * S, device="cuda", generator=gen).view(N, S)
    want = sum_over_slots(rows, slot_row, backend="torch").float()
    exact = rows.float()[slot_row].sum(1)

    def close(got):
        step = exact.abs()[:, :got.shape[1]] * 2.0 ** -7                 # one bf16 step
        return ((got.float() - exact[:, :got.shape[1]]).abs() <= step).all()

    got = sum_over_slots(rows, slot_row, backend="triton")
    assert got.dtype == torch.bfloat16 and close(got) and close(want)
    assert rel_err(got, want) < 1e-4
    wide = torch.zeros(N, 4 * 256, device="cuda", dtype=torch.bfloat16)
    sum_into(rows[:, :256].contiguous(), slot_row, out=wide[:, 512:768])
    assert close(wide[:, 512:768]) and not wide[:, :512].any() and not wide[:, 768:].any()


_MIX_CAPTURE = """
import torch
from graph_capture import capture_and_replay
from megatron_mom.ops.mix import mix
N, S, H, V = 1024, 3, 4, 256
o = torch.randn(N * S, H, V, device="cuda").bfloat16().requires_grad_()
slot_row = torch.randperm(N * S, device="cuda").view(N, S)
w = torch.rand(N, S, device="cuda").requires_grad_()
dy = torch.randn(N, H, V, device="cuda").bfloat16()
def step():
    o.grad = w.grad = None
    out = mix(o, slot_row, w, torch.bfloat16, backend="triton")
    out.backward(dy)
    return out, o.grad, w.grad
graph, captured, eager = capture_and_replay(step)
assert all(torch.equal(a, b) for a, b in zip(captured, eager))
"""


def test_mix_cuda_graph_capture():
    """The Triton mix forward+backward captured in a CUDA graph and replayed gives the eager
    bits. Fresh leaves, first used on a side stream (autograd caches the stream a leaf's
    gradient node first ran on, and a capture must not wait on the default stream). In a
    subprocess: a failed capture leaves the CUDA context unusable for later tests."""
    run = run_script(_MIX_CAPTURE, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


def test_router_gating_bf16_reads():
    """The router GEMMs that read bf16 x directly (float32 accumulation, hi/lo split of the
    logit gradient for the weight gradient) against float64, at the paper's token count."""
    from megatron_mom.layer.router import _GatingLinear, _reads_bf16, _split_weight_grad
    torch.manual_seed(0)
    x = torch.randn(16384, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (0.02 * torch.randn(4, 2048, device="cuda")).to(torch.bfloat16).requires_grad_()
    assert _reads_bf16(x, w, torch.float32)
    d = torch.randn(16384, 4, device="cuda")
    logits = _GatingLinear.apply(x, w, torch.float32)
    logits.backward(d)
    x64, w64 = x.detach().double(), w.detach().double()
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
    errs = {"logits": rel(logits, x64 @ w64.t()), "dx": rel(x.grad, d.double() @ w64),
            "dw": rel(w.grad.float(), d.double().t() @ x64),
            # the float32 path it replaces (x and w cast to float32): its own float32 error
            "logits_f32_path": rel(x.detach().float() @ w.detach().float().t(), x64 @ w64.t())}
    ERRORS["router_gating"] = errs
    # float32 accumulation: cuBLAS's bf16-in/float32-out GEMM measured 2.1e-6 against float64
    # (the float32 GEMM 2.6e-7; rounding the logits to bf16 would give ~2e-3)
    assert errs["logits"] < 1e-5, errs
    assert errs["dw"] < 4e-3 and errs["dx"] < 4e-3, errs                # bf16 outputs
    # dw before its bf16 rounding (the backward's own helper): the split keeps near-float32
    # accuracy
    errs["dw_f32_split"] = rel(_split_weight_grad(d, x.detach()), d.double().t() @ x64)
    assert errs["dw_f32_split"] < 3e-5, errs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_conv_layer_forms_paper_shape(dtype):
    """The layer's two convolution forms at its shapes and strides (B4 T4096, M=4 top-2 +
    shared: 49152 packed rows, H*K = H*V = 1024): q read from its token rows (a column slice of
    the [N, 2048] q | gate projection) through the packing index, and k | v | b | a as column
    groups of the [L, 2056] memory rows (row stride 2056: the compile-time-stride loads).
    Outputs and every gradient against the float64 reference (spread / split + short_conv)."""
    from megatron_mom.layer import packing
    from megatron_mom.ops.short_conv import short_conv_split
    gen = torch.Generator(device="cuda").manual_seed(6)
    B, T, M, C = 4, 4096, 4, 1024
    seq_id, num_seqs = packing.sequence_ids(B, T, None, "cuda")
    N = B * T
    routed = torch.rand(N, M, device="cuda", generator=gen).topk(2, dim=1).indices.sort(1).values
    memory = torch.cat([routed, torch.full((N, 1), M, device="cuda")], dim=1)
    layout = packing.pack(memory, seq_id, num_seqs, M + 1)
    cu, L = layout.cu_seqlens, layout.num_rows
    qg = torch.randn(N, 2 * C, device="cuda", generator=gen).to(dtype)
    kvba = torch.randn(L, 2 * C + 8, device="cuda", generator=gen).to(dtype)
    wq, wk, wv = (torch.randn(C, 4, device="cuda", generator=gen).to(dtype) for _ in range(3))
    dyq, dyk, dyv = (torch.randn(L, C, device="cuda", generator=gen).to(dtype) for _ in range(3))
    dyb = torch.randn(L, 8, device="cuda", generator=gen).to(dtype)
    sizes = [C, C, 4, 4]
    res = {}
    for backend in ("triton", "torch"):
        leaves = [t.detach().clone() if backend == "triton" else t.detach().double()
                  for t in (qg, kvba, wq, wk, wv)]
        for t in leaves:
            t.requires_grad_()
        qg_, kvba_, wq_, wk_, wv_ = leaves
        if backend == "triton":
            q, _ = short_conv(qg_[None, :, :C], wq_, cu_seqlens=cu,
                              gather=(layout.token, layout.slot_row), backend="triton")
        else:
            q, _ = short_conv(packing.spread(qg_[:, :C], layout)[None], wq_, cu_seqlens=cu,
                              backend="torch")
        k, v, b, a = short_conv_split(kvba_[None], [wk_, wv_, None, None], sizes, cu_seqlens=cu,
                                      backend=backend)
        ba = torch.cat([b, a], dim=-1)
        loss = sum((y[0] * dy.to(y.dtype)).sum() for y, dy in
                   ((q, dyq), (k, dyk), (v, dyv), (ba, dyb)))
        res[backend] = [q, k, v, ba] + list(torch.autograd.grad(loss, leaves))
    names = ["q", "k", "v", "ba", "d_qg", "d_kvba", "d_wq", "d_wk", "d_wv"]
    errs = {n: rel_err(a, b) for n, a, b in zip(names, res["triton"], res["torch"])}
    ERRORS[f"conv_layer_forms_{str(dtype)[6:]}"] = errs
    print(errs)
    assert not res["triton"][4][:, C:].any()          # the gate columns get no gradient here
    limit = 1e-5 if dtype == torch.float32 else 1e-2
    for key, err in errs.items():
        assert err < limit, f"{key}: relative error {err:.2e} >= {limit:.0e}"


def test_lean_op_side_streams_change_nothing():
    """The lean op at the layer's packed layout (B4 T4096, M=4 top-2 + shared, H=4, D=256,
    bf16) with its sequential kernels beside other work on side CUDA streams
    (`KernelOptions.side_streams`) gives bit-identical output and gradients to one stream:
    each kernel reads and writes the same tensors, only the order across streams changes."""
    from megatron_mom.layer import packing
    from megatron_mom.ops.conv_gated_delta_rule import conv_gated_delta_rule
    from megatron_mom.ops import KernelOptions
    gen = torch.Generator(device="cuda").manual_seed(8)
    B, T, M, H, D = 4, 4096, 4, 4, 256
    seq_id, num_seqs = packing.sequence_ids(B, T, None, "cuda")
    N = B * T
    routed = torch.rand(N, M, device="cuda", generator=gen).topk(2, dim=1).indices.sort(1).values
    memory = torch.cat([routed, torch.full((N, 1), M, device="cuda")], dim=1)
    layout = packing.pack(memory, seq_id, num_seqs, M + 1)
    bf = torch.bfloat16
    leaves = [torch.randn(N, H * D, device="cuda", generator=gen).to(bf),
              torch.randn(layout.num_rows, 2 * H * D + 2 * H, device="cuda", generator=gen).to(bf)]
    leaves += [(torch.randn(H * D, 4, device="cuda", generator=gen) * 0.5).to(bf) for _ in range(3)]
    leaves += [torch.rand(H, device="cuda", generator=gen) * 2, torch.randn(H, device="cuda",
                                                                          generator=gen)]
    dy = torch.randn(layout.num_rows, H, D, device="cuda", generator=gen).to(bf)
    runs = []
    for side_streams in (False, True):
        xs = [t.detach().clone().requires_grad_() for t in leaves]
        o = conv_gated_delta_rule(xs[0], xs[1], (layout.token, layout.slot_row),
                                  layout.cu_seqlens, *xs[2:], num_heads=H, chunk_size=64,
                                  lean_backward=True, backend="triton",
                                  options=KernelOptions(side_streams=side_streams))
        runs.append([o] + list(torch.autograd.grad((o * dy).sum(), xs)))
    names = ["o", "q_tok", "kvba", "conv_q", "conv_k", "conv_v", "A_log", "dt_bias"]
    for name, a, b in zip(names, *runs):
        assert a.abs().sum() > 0, name
        assert torch.equal(a, b), name


@pytest.mark.parametrize("which", ["k", "v", "g", "beta"])
def test_nan_reaches_no_earlier_position_bf16(which):
    """The compiled kernels (not only the interpreter) keep a NaN out of the earlier rows of
    its chunk and out of the other sequences, and leave the earlier rows as they were."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    cu = torch.tensor([0, 200, 456], dtype=torch.int32, device="cuda")
    T, H, D = 456, 4, 128

    def case(nan_at):
        x = dict(q=torch.randn(1, T, H, D, device="cuda", generator=gen),
                 k=F.normalize(torch.randn(1, T, H, D, device="cuda", generator=gen), dim=-1),
                 v=torch.randn(1, T, H, D, device="cuda", generator=gen),
                 g=F.logsigmoid(torch.randn(1, T, H, device="cuda", generator=gen) + 2.0),
                 beta=torch.rand(1, T, H, device="cuda", generator=gen))
        x = {n: t.bfloat16() if n in ("q", "k", "v") else t for n, t in x.items()}
        if nan_at is not None:
            x[which][0, nan_at] = float("nan")
        for t in x.values():
            t.requires_grad_()
        o, state = gated_delta_rule(*x.values(), cu_seqlens=cu, backend="triton",
                                    output_final_state=True)
        (o.float().sum() + state.sum()).backward()
        return o, state, {n: t.grad for n, t in x.items()}

    gen.manual_seed(0)
    clean, _, _ = case(None)
    gen.manual_seed(0)
    o, state, grads = case(150)                      # the middle of the third 64-token chunk
    ok = torch.isfinite(o[0].float()).flatten(1).all(-1)
    assert ok[:150].all() and not ok[150:200].any() and ok[200:].all()
    torch.testing.assert_close(o[:, :150].float(), clean[:, :150].float(), rtol=1e-3, atol=1e-3)
    assert not torch.isfinite(state[0]).any() and torch.isfinite(state[1]).all()
    for name, d in grads.items():
        assert torch.isfinite(d[0, 200:]).all(), name
