"""Triton kernels against the torch references, on the CPU through Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU). float32 (and one float16
case), small shapes: the interpreter runs programs one after another."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_mom.ops.gated_delta_rule import gated_delta_rule
from megatron_mom.ops.gated_rmsnorm import gated_rmsnorm
from megatron_mom.ops.l2norm import l2norm
from megatron_mom.ops.mix import mix, sum_over_slots
from megatron_mom.ops.common import Segments
from megatron_mom.ops.options import KernelOptions
from megatron_mom.ops.short_conv import short_conv, short_conv_split

pytest.importorskip("triton")
gdr_triton = pytest.importorskip("megatron_mom.ops.gated_delta_rule.triton")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def gdr_inputs(lengths, H, K, V, *, batch=None, h0=True, dtype=torch.float32, raw_qk=False, seed=0):
    """Random inputs. lengths: packed sequence lengths (B = 1), or one length with `batch`."""
    gen = torch.Generator().manual_seed(seed)
    B, T = (batch, lengths[0]) if batch else (1, sum(lengths))
    N = batch or len(lengths)
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, H, K, generator=gen)
    if not raw_qk:
        k = F.normalize(k, dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen) + 2.0)
    beta = torch.rand(B, T, H, generator=gen)
    s0 = torch.randn(N, H, K, V, generator=gen) if h0 else None
    leaves = [x.to(dtype) for x in (q, k, v, g, beta)] + [s0]
    leaves = [x.requires_grad_() if x is not None else None for x in leaves]
    cu = None if batch else torch.tensor([0] + list(lengths)).cumsum(0)
    return leaves, cu


def run_gdr(backend, leaves, cu, *, chunk_size, l2=False, final=True, seed=1, options=None):
    q, k, v, g, beta, s0 = leaves
    o, ht = gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=final,
                             cu_seqlens=cu, use_qk_l2norm=l2, chunk_size=chunk_size,
                             backend=backend, options=options)
    gen = torch.Generator().manual_seed(seed)
    loss = (o.float() * torch.randn(o.shape, generator=gen)).sum()
    if final:
        loss = loss + (ht * torch.randn(ht.shape, generator=gen)).sum()
    wrt = [x for x in leaves if x is not None]
    return [o, ht] + list(torch.autograd.grad(loss, wrt))


def assert_gdr_close(leaves, cu, *, chunk_size, l2=False, final=True, tol=2e-5, options=None):
    got = run_gdr("triton", leaves, cu, chunk_size=chunk_size, l2=l2, final=final,
                  options=options)
    want = run_gdr("torch", leaves, cu, chunk_size=chunk_size, l2=l2, final=final)
    names = ["o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dh0"]
    for name, a, b in zip(names, got, want):
        if b is None:
            assert a is None, name
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype, b.dtype)
        assert torch.isfinite(a).all(), name
        err = rel_err(a, b)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


# (lengths, batch, H, K, V, chunk_size, initial state, l2norm)
GDR_CASES = {
    "dense_B2_T150_C64": ([150], 2, 1, 64, 64, 64, True, False),
    "dense_T40_C16": ([40], 1, 2, 64, 64, 16, True, False),
    "dense_K64_V128_C32": ([100], 1, 1, 64, 128, 32, True, False),
    "dense_K128_V64_C64": ([70], 1, 1, 128, 64, 64, False, False),
    "dense_K256_V256_few_tokens": ([33], 1, 1, 256, 256, 64, True, False),
    "dense_K128_V256_C16": ([20], 1, 1, 128, 256, 16, True, False),
    "varlen_ragged_with_empty_C32": ([5, 70, 0, 33, 16], None, 2, 64, 64, 32, True, False),
    "varlen_l2norm_C64": ([65, 64, 3], None, 2, 64, 64, 64, True, True),
    "varlen_all_shorter_than_chunk": ([3, 7, 1], None, 2, 64, 64, 64, True, False),
    "dense_l2norm_no_h0_C16": ([45], 1, 2, 64, 64, 16, False, True),
}


@pytest.mark.parametrize("case", list(GDR_CASES), ids=list(GDR_CASES))
def test_gated_delta_rule_matches_reference(case):
    lengths, batch, H, K, V, C, h0, l2 = GDR_CASES[case]
    leaves, cu = gdr_inputs(lengths, H, K, V, batch=batch, h0=h0, raw_qk=l2)
    assert_gdr_close(leaves, cu, chunk_size=C, l2=l2)


def w_from_t_options(**more) -> KernelOptions:
    """Every state kernel entry with launch setting w_from_t (T and beta read in place of W)."""
    options = KernelOptions(**more)
    for kernel in ("state_fwd", "state_fwd_o", "state_bwd", "state_fp32"):
        for bound in (128, 256):
            options = options.with_launch(kernel, bound, w_from_t=1)
    return options


@pytest.mark.parametrize("case, recompute", [
    ("varlen_ragged_with_empty_C32", False), ("varlen_l2norm_C64", False),
    ("dense_K128_V64_C64", True), ("dense_K256_V256_few_tokens", False),
    ("dense_l2norm_no_h0_C16", True)])
def test_gated_delta_rule_w_from_t(case, recompute):
    """The state kernels reading T and beta in place of W (W S = T (beta e^gam (k S)), W^T dU =
    k^T (beta e^gam (T^T dU))): the reference's outputs and gradients, states kept or rerun."""
    lengths, batch, H, K, V, C, h0, l2 = GDR_CASES[case]
    leaves, cu = gdr_inputs(lengths, H, K, V, batch=batch, h0=h0, raw_qk=l2)
    assert_gdr_close(leaves, cu, chunk_size=C, l2=l2,
                     options=w_from_t_options(recompute_states=recompute))


def test_gated_delta_rule_output_only_gradient():
    leaves, cu = gdr_inputs([9, 40], H=1, K=64, V=64)
    assert_gdr_close(leaves, cu, chunk_size=32, final=False)


def test_gated_delta_rule_recompute_states_mode():
    leaves, cu = gdr_inputs([30, 50], H=1, K=64, V=64)
    assert_gdr_close(leaves, cu, chunk_size=32, options=KernelOptions(recompute_states=True))


@pytest.mark.parametrize("groups", [2, 3, 4])
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("l2", [True, False])
def test_gated_delta_rule_backward_by_head_groups(groups, recompute, l2):
    """The backward over groups of heads (3 of 4 heads runs as 2 groups), whose kernels read
    and write head slices of the full tensors, gives the reference's gradients: kept and
    recomputed states, with the l2 norm (its backward writes the slices) and without (the
    kernels write them), initial state included."""
    options = KernelOptions(backward_head_groups=groups, recompute_states=recompute)
    leaves, cu = gdr_inputs([30, 50], H=4, K=64, V=64, raw_qk=l2)
    assert_gdr_close(leaves, cu, chunk_size=32, l2=l2, options=options)
    assert gdr_triton.head_groups(4, groups) == {2: 2, 3: 2, 4: 4}[groups]


def test_gated_delta_rule_lean_backward_argument():
    """`lean_backward=True` on one call: no states kept (only the inputs are saved), the
    backward head by head, the reference's results."""
    leaves, cu = gdr_inputs([30, 50], H=4, K=64, V=64, raw_qk=True)
    q, k, v, g, beta, s0 = leaves
    o, _ = gated_delta_rule(q, k, v, g, beta, initial_state=s0, cu_seqlens=cu, chunk_size=32,
                            use_qk_l2norm=True, backend="triton", lean_backward=True)
    assert len(o.grad_fn.saved_tensors) == 8                        # the inputs only
    o.sum().backward()
    got = [x.grad.clone() for x in leaves]
    for x in leaves:
        x.grad = None
    o, _ = gated_delta_rule(q, k, v, g, beta, initial_state=s0, cu_seqlens=cu, chunk_size=32,
                            use_qk_l2norm=True, backend="torch")
    o.sum().backward()
    for a, x in zip(got, leaves):
        assert rel_err(a, x.grad) < 2e-5


def test_gated_delta_rule_float16():
    leaves, cu = gdr_inputs([50], H=1, K=64, V=64, batch=1, dtype=torch.float16)
    got = run_gdr("triton", leaves, cu, chunk_size=32)
    want = run_gdr("torch", leaves, cu, chunk_size=32)
    assert got[0].dtype == torch.float16 and got[2].dtype == torch.float16
    for a, b in zip(got, want):
        assert rel_err(a, b) < 2e-2


def test_gated_delta_rule_solve_without_decay():
    """No decay, beta = 1 and nearly parallel keys: A's powers do not fade, so a solve that
    dropped high powers or summed a power series (terms of ~1e17 here) would show."""
    leaves, cu = gdr_inputs([64, 40], H=1, K=64, V=64, seed=5)
    with torch.no_grad():
        q, k, v, g, beta, s0 = leaves
        k.copy_(F.normalize(k[:, :1] + 0.1 * k, dim=-1))
        g.zero_()
        beta.fill_(1.0)
    assert_gdr_close(leaves, cu, chunk_size=64, tol=1e-4)


def test_gated_delta_rule_half_precision_storage():
    """T kept in the inputs' dtype (float16 here; the default) against T in float32: the same
    results within float16 rounding, and the reference's. (dk's partial sum stays float32 for
    float16 by design; its bf16 form runs in the GPU suite, bf16 being beyond the interpreter.)"""
    leaves, cu = gdr_inputs([50, 20], H=1, K=64, V=64, dtype=torch.float16)
    full = run_gdr("triton", leaves, cu, chunk_size=32,
                   options=KernelOptions(t_dtype="float32", dk_partial_fp32=True))
    half = run_gdr("triton", leaves, cu, chunk_size=32,
                   options=KernelOptions(t_dtype="input", dk_partial_fp32=False))
    want = run_gdr("torch", leaves, cu, chunk_size=32)
    diffs = []
    for a, b, c in zip(half, full, want):
        assert a.dtype == b.dtype
        diffs.append(rel_err(a, b))
        assert diffs[-1] < 5e-3 and rel_err(a, c) < 2e-2
    assert max(diffs) > 0, "the T storage switch changed nothing"


def test_gated_delta_rule_launch_falls_back_once_and_keeps_nothing(monkeypatch):
    """A build whose pipelined form does not fit in shared memory launches with one stage,
    tried once per build (not on every call), and the failed try's traceback keeps none of
    the launch's tensors alive."""
    import weakref
    from triton.runtime.errors import OutOfResources
    launcher = pytest.importorskip("megatron_mom.ops.common.launch")
    monkeypatch.setattr(launcher, "_ONE_STAGE", set())
    tries = []

    class Kernel:
        def __getitem__(self, grid):
            def run(*args, num_stages, **kwargs):
                tries.append(num_stages)
                if num_stages > 1 and kwargs["BV"] == 32:
                    # held by its own frame, as in Triton's launcher: a reference cycle
                    err = OutOfResources(300000, 232448, "shared memory")
                    raise err
            return run

    kernel = Kernel()
    x = torch.ones(4)
    ref = weakref.ref(x)
    launcher.launch(kernel, (1,), x, num_stages=2, BV=32)
    del x
    assert ref() is None, "the failed launch's frames keep its tensors"
    launcher.launch(kernel, (1,), torch.ones(4), num_stages=2, BV=32)
    launcher.launch(kernel, (1,), torch.ones(4), num_stages=2, BV=16)
    launcher.launch(kernel, (1,), torch.ones(4, dtype=torch.float64), num_stages=2, BV=32)
    assert tries == [2, 1, 1, 2, 2, 1]      # second BV=32 call: straight to one stage


def test_gated_delta_rule_launch_path_reads_nothing_back(monkeypatch, refuse_host_reads):
    """With cu_seqlens, neither the forward nor the backward reads a device value on the host."""
    leaves, cu = gdr_inputs([20, 13], H=1, K=64, V=64)
    q, k, v, g, beta, s0 = leaves
    o_ref, ht_ref = gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True,
                                     cu_seqlens=cu, chunk_size=16, backend="triton")

    P = Segments.of(k, v, cu, 16)                       # bookkeeping is built before patching
    refuse_host_reads()
    q3, k3, v3 = (x.detach().reshape(-1, 1, 64) for x in (q, k, v))
    g2, b2 = g.detach().reshape(-1, 1), beta.detach().reshape(-1, 1)
    gam, w, u0, t_mat, p_mat = gdr_triton.prepare(P, q3, k3, v3, g2, b2, 0.125)
    o, h, u, ht = gdr_triton.state_forward(P, q3, k3, w, u0, gam, p_mat, s0.detach(), 0.125,
                                           store_o=True, store_states=True, store_final=True)
    do = torch.ones_like(o)
    dh, du = gdr_triton.state_backward(P, q3, k3, w, gam, p_mat, do, ht, 0.125,
                                       torch.empty_like(ht))
    gdr_triton.chunk_backward(P, q3, k3, v3, b2, gam, t_mat, h, dh, u, du, do, 0.125,
                              torch.float32)
    monkeypatch.undo()
    assert rel_err(o.view_as(o_ref), o_ref) < 1e-6 and rel_err(ht, ht_ref) < 1e-6


@pytest.mark.parametrize("bad, message", [
    (dict(K=48), "key head dim K=48"),
    (dict(V=96), "value head dim V=96"),
    (dict(chunk_size=128), "chunk_size=128"),
    (dict(dtype=torch.float64), "float64"),
])
def test_gated_delta_rule_rejects_unsupported(bad, message):
    K, V = bad.get("K", 64), bad.get("V", 64)
    dtype = bad.get("dtype", torch.float32)
    q = torch.randn(1, 8, 1, K, dtype=dtype)
    v = torch.randn(1, 8, 1, V, dtype=dtype)
    g, beta = torch.zeros(1, 8, 1, dtype=dtype), torch.ones(1, 8, 1, dtype=dtype)
    with pytest.raises(ValueError, match=message):
        gated_delta_rule(q, q, v, g, beta, chunk_size=bad.get("chunk_size", 64), backend="triton")


# ----------------------------------------------------------------------------- short conv
def conv_final_state_oracle(x, cu, init, W):
    """Last W-1 inputs of each sequence (its history where the sequence is shorter)."""
    out = []
    for n in range(cu.numel() - 1):
        rows = x[0, cu[n]:cu[n + 1]]
        hist = init[n].T if init is not None else x.new_zeros(W - 1, x.shape[-1])
        out.append(torch.cat([hist, rows], 0)[-(W - 1):].T)
    return torch.stack(out)


@pytest.mark.parametrize("W", [4, 2])
@pytest.mark.parametrize("with_init", [False, True])
def test_short_conv_matches_reference(W, with_init):
    gen = torch.Generator().manual_seed(W)
    lengths = [5, 0, 70, 1, 3]
    cu = torch.tensor([0] + lengths).cumsum(0)
    C = 24
    x = torch.randn(1, sum(lengths), C, generator=gen).requires_grad_()
    w = torch.randn(C, W, generator=gen).requires_grad_()
    init = torch.randn(len(lengths), C, W - 1, generator=gen).requires_grad_() if with_init else None
    leaves = [x, w] + ([init] if with_init else [])
    dy = torch.randn(x.shape, generator=gen)
    results = {}
    for backend in ("triton", "torch"):
        y, _ = short_conv(x, w, cu_seqlens=cu, initial_state=init, backend=backend)
        results[backend] = [y] + list(torch.autograd.grad((y * dy).sum(), leaves))
    for a, b in zip(results["triton"], results["torch"]):
        assert rel_err(a, b) < 1e-5
    _, final = short_conv(x, w, cu_seqlens=cu, initial_state=init, output_final_state=True,
                          backend="triton")
    assert torch.equal(final, conv_final_state_oracle(x.detach(), cu, init, W).to(final.dtype))


def conv_against_reference(lengths, C, W, *, with_init, activation="silu", row_pad=0, seed=0):
    """Triton against the float64 torch reference on packed `lengths`: y, the gradients of x
    (a view with row stride C + row_pad), w and the initial state, and the final state."""
    gen = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0] + lengths).cumsum(0)
    wide = torch.randn(1, sum(lengths), C + row_pad, generator=gen)
    w = torch.randn(C, W, generator=gen)
    init = torch.randn(len(lengths), C, W - 1, generator=gen) if with_init else None
    dy = torch.randn(1, sum(lengths), C, generator=gen)
    results = {}
    for backend, dtype in (("triton", torch.float32), ("torch", torch.float64)):
        leaves = [t.to(dtype).requires_grad_() for t in (wide, w, init) if t is not None]
        y, final = short_conv(leaves[0][..., :C], leaves[1], cu_seqlens=cu,
                              initial_state=leaves[2] if with_init else None,
                              output_final_state=True, activation=activation, backend=backend)
        grads = torch.autograd.grad((y * dy.to(dtype)).sum(), leaves)
        results[backend] = [y, final] + list(grads)
    for a, b in zip(results["triton"], results["torch"]):
        assert rel_err(a, b) < 1e-5
    return results["triton"]


@pytest.fixture
def multi_tile_backward(monkeypatch):
    """Backward programs that walk 3 token tiles even at test sizes."""
    sc_triton = pytest.importorskip("megatron_mom.ops.short_conv.triton")
    monkeypatch.setattr(sc_triton, "BWD_MIN_PROGRAMS", 1)
    monkeypatch.setattr(sc_triton, "BWD_MAX_TILES", 3)
    return sc_triton


# Empty sequences first, in between and last; runs of sequences shorter than the kernel inside
# one token tile; sequences across tile and program boundaries; 122 tokens, not a tile multiple.
RAGGED = [0, 2, 1, 0, 37, 3, 1, 1, 2, 70, 0, 5, 0]


@pytest.mark.parametrize("W", [1, 3, 4, 8])
@pytest.mark.parametrize("with_init", [False, True])
def test_short_conv_ragged_segments(multi_tile_backward, W, with_init):
    if W == 1 and with_init:
        pytest.skip("W = 1 keeps no state")
    conv_against_reference(RAGGED, C=40, W=W, with_init=with_init, row_pad=8)


@pytest.mark.parametrize("row_pad", [0, 3])
def test_short_conv_no_activation_odd_stride(multi_tile_backward, row_pad):
    conv_against_reference(RAGGED, C=24, W=4, with_init=True, activation=None, row_pad=row_pad)


@pytest.mark.parametrize("tiles", [1, 2, 5])
def test_short_conv_backward_tiles_per_program(monkeypatch, tiles):
    """dw from partial sums of 1, 2 or 5 tiles per program (the last program partly past the
    end): right, and bit-identical when run again."""
    sc_triton = pytest.importorskip("megatron_mom.ops.short_conv.triton")
    monkeypatch.setattr(sc_triton, "BWD_MIN_PROGRAMS", 1)
    monkeypatch.setattr(sc_triton, "BWD_MAX_TILES", tiles)
    lengths = [61, 0, 1, 100, 4]
    first = conv_against_reference(lengths, C=16, W=4, with_init=False, seed=tiles)
    again = conv_against_reference(lengths, C=16, W=4, with_init=False, seed=tiles)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("W", [4, 8])
def test_short_conv_other_tile_shapes(monkeypatch, multi_tile_backward, W):
    """Small tiles: many tile and channel-block edges per sequence (the benchmark sweep tries
    other shapes on the GPU)."""
    monkeypatch.setattr(multi_tile_backward, "FWD_CONFIG", (16, 16, 4))
    monkeypatch.setattr(multi_tile_backward, "BWD_CONFIG", (16, 16, 4))
    conv_against_reference(RAGGED, C=40, W=W, with_init=True)


def test_short_conv_launch_path_reads_nothing_back(monkeypatch, refuse_host_reads):
    """Forward and backward with cu_seqlens read no device value on the host."""
    gen = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 5, 5, 40])
    x = torch.randn(1, 40, 16, generator=gen, requires_grad=True)
    w = torch.randn(16, 4, generator=gen, requires_grad=True)

    refuse_host_reads()
    y, _ = short_conv(x, w, cu_seqlens=cu, backend="triton")
    gx, gw = torch.autograd.grad(y.sum(), [x, w])
    monkeypatch.undo()
    y_ref, _ = short_conv(x, w, cu_seqlens=cu, backend="torch")
    gx_ref, gw_ref = torch.autograd.grad(y_ref.sum(), [x, w])
    assert rel_err(y, y_ref) < 1e-5 and rel_err(gx, gx_ref) < 1e-5 and rel_err(gw, gw_ref) < 1e-5


def test_short_conv_dense_no_activation():
    x = torch.randn(2, 33, 16, requires_grad=True)
    w = torch.randn(16, 4, requires_grad=True)
    y, f = short_conv(x, w, activation=None, output_final_state=True, backend="triton")
    y_ref, f_ref = short_conv(x, w, activation=None, output_final_state=True, backend="torch")
    assert rel_err(y, y_ref) < 1e-6 and torch.equal(f, f_ref)
    gx, gw = torch.autograd.grad(y.square().sum(), [x, w])
    gx_ref, gw_ref = torch.autograd.grad(y_ref.square().sum(), [x, w])
    assert rel_err(gx, gx_ref) < 1e-5 and rel_err(gw, gw_ref) < 1e-5


def test_short_conv_rejects_bad_width():
    with pytest.raises(ValueError, match="kernel width W=9"):
        short_conv(torch.randn(1, 4, 8), torch.randn(8, 9), backend="triton")


def grads_or_zeros(out, leaves):
    """Gradients of `out` w.r.t. leaves, zeros for a leaf that it does not reach."""
    grads = torch.autograd.grad(out, leaves, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]


# k | v | b | a of the layer: two convolved groups, two passed through; x a strided view.
SPLIT_SIZES = [16, 24, 3, 5]


@pytest.mark.parametrize("unused", [None, 1, 2])
@pytest.mark.parametrize("W", [4, 2])
def test_short_conv_split_matches_reference(multi_tile_backward, W, unused):
    """Column groups of one strided x, each with its own weight (or passed through), against
    split + the float64 reference per group: every output and the gradients of x and of each
    weight. `unused`: a group whose output gets no gradient (zeros in its columns of dx)."""
    gen = torch.Generator().manual_seed(W)
    cu = torch.tensor([0] + RAGGED).cumsum(0)
    C = sum(SPLIT_SIZES)
    wide = torch.randn(1, sum(RAGGED), C + 8, generator=gen)
    weights = [torch.randn(16, W, generator=gen), torch.randn(24, 3, generator=gen), None, None]
    dys = [torch.randn(1, sum(RAGGED), c, generator=gen) for c in SPLIT_SIZES]
    results = {}
    for backend, dtype in (("triton", torch.float32), ("torch", torch.float64)):
        leaves = [t.to(dtype).requires_grad_() for t in [wide] + weights[:2]]
        ys = short_conv_split(leaves[0][..., :C], leaves[1:] + [None, None], SPLIT_SIZES,
                              cu_seqlens=cu, backend=backend)
        loss = sum((y * dy.to(dtype)).sum() for i, (y, dy) in enumerate(zip(ys, dys)) if i != unused)
        results[backend] = list(ys) + grads_or_zeros(loss, leaves)
    for a, b in zip(results["triton"], results["torch"]):
        assert rel_err(a, b) < 1e-5
    assert all(y.is_contiguous() for y in results["triton"][:4])
    dx = results["triton"][4][0]
    assert torch.equal(dx[:, C:], torch.zeros_like(dx[:, C:]))   # the padding is not x's
    if unused is not None:
        start = sum(SPLIT_SIZES[:unused])
        assert not dx[:, start:start + SPLIT_SIZES[unused]].any()


def test_short_conv_split_rejects_mismatched_groups():
    x = torch.randn(1, 4, 10)
    with pytest.raises(ValueError, match="sum"):
        short_conv_split(x, [None, None], [4, 5], backend="triton")
    with pytest.raises(ValueError, match=r"\[6, W\]"):
        short_conv_split(x, [torch.randn(4, 4), torch.randn(5, 4)], [4, 6], backend="triton")


def routed_layout(batch, seqlen, S_routed=2, M=4, seed=0):
    """A packed layout as the layer builds it: time-major tokens of `batch` sequences, each
    token in S_routed of memories 0..M-2 plus the shared memory M; memory M-1 gets no token,
    and memory 2 only one token of sequence 0 (a segment shorter than the kernel)."""
    from megatron_mom.layer import packing
    gen = torch.Generator().manual_seed(seed)
    seq_id, num_seqs = packing.sequence_ids(batch, seqlen, None, "cpu")
    N = batch * seqlen
    routed = torch.stack([torch.randperm(M - 1, generator=gen)[:S_routed] for _ in range(N)])
    first = seq_id == 0
    routed[first] = torch.tensor([0, 1])
    routed[batch * 3] = torch.tensor([2, 0])                           # token t=3 of sequence 0
    memory = torch.cat([routed, torch.full((N, 1), M)], dim=1)         # [N, S]
    return packing.pack(memory, seq_id, num_seqs, M + 1)


@pytest.mark.parametrize("W", [4, 1])
@pytest.mark.parametrize("with_init", [False, True])
def test_short_conv_gather_matches_reference(multi_tile_backward, W, with_init):
    """Packed rows read through the layout's row index against the spread copy + the float64
    reference: y, the final state, and the gradients of the token rows (a strided view: summed
    over each token's S rows), of w and of the initial state."""
    if W == 1 and with_init:
        pytest.skip("W = 1 keeps no state")
    from megatron_mom.layer import packing
    layout = routed_layout(batch=3, seqlen=14)
    cu = layout.cu_seqlens
    N, C = layout.slot_row.shape[0], 24
    gen = torch.Generator().manual_seed(W)
    wide = torch.randn(N, C + 5, generator=gen)
    w = torch.randn(C, W, generator=gen)
    init = torch.randn(cu.numel() - 1, C, W - 1, generator=gen) if with_init else None
    dy = torch.randn(1, layout.num_rows, C, generator=gen)
    results = {}
    for backend, dtype in (("triton", torch.float32), ("torch", torch.float64)):
        leaves = [t.to(dtype).requires_grad_() for t in (wide, w, init) if t is not None]
        x_tok = leaves[0][:, :C]
        kw = dict(cu_seqlens=cu, initial_state=leaves[2] if with_init else None,
                  output_final_state=True)
        if backend == "triton":
            y, final = short_conv(x_tok[None], leaves[1], gather=(layout.token, layout.slot_row),
                                  backend="triton", **kw)
        else:
            y, final = short_conv(packing.spread(x_tok, layout)[None], leaves[1], backend="torch",
                                  **kw)
        grads = torch.autograd.grad((y * dy.to(dtype)).sum(), leaves)
        results[backend] = [y, final] + list(grads)
    for a, b in zip(results["triton"], results["torch"]):
        assert rel_err(a, b) < 1e-5
    assert not results["triton"][2][:, C:].any()


@pytest.mark.parametrize("gather, head_dim", [(False, 16), (True, 32), (False, 64)])
def test_conv_l2norm_forward_matches_reference(gather, head_dim):
    """The convolution with each head's L2 norm in its kernel (the lean memory path's q and k)
    against the float64 convolution reference and L2 norm: rows read in place from a wider
    tensor or through the layout's row index, several heads, ragged segments."""
    from megatron_mom.ops.l2norm.reference import l2norm_reference
    from megatron_mom.ops.short_conv.reference import short_conv_reference
    from megatron_mom.ops.short_conv.triton import conv_l2norm_forward
    layout = routed_layout(batch=3, seqlen=14)
    cu, L = layout.cu_seqlens, layout.num_rows
    H = 3
    C = H * head_dim
    gen = torch.Generator().manual_seed(head_dim)
    rows = layout.slot_row.shape[0] if gather else L
    wide = torch.randn(rows, C + 8, generator=gen)
    w = torch.randn(C, 4, generator=gen) * 0.5
    x_row = layout.token if gather else None
    y, rstd = conv_l2norm_forward(wide[:, :C], x_row, w, cu.to(torch.int32), cu.numel() - 1,
                                  head_dim)
    x = wide[:, :C].double()[layout.token] if gather else wide[:, :C].double()
    z, _ = short_conv_reference(x[None], w.double(), cu_seqlens=cu)
    z = z[0].view(L, H, head_dim)
    want = l2norm_reference(z).view(L, C)
    assert y.shape == (L, C) and rstd.shape == (L, H)
    assert rel_err(y, want) < 1e-5, rel_err(y, want)
    assert rel_err(rstd, 1 / (z.square().sum(-1) + 1e-6).sqrt()) < 1e-5
    with pytest.raises(ValueError, match="head_dim"):
        conv_l2norm_forward(wide[:, :C], x_row, w, cu.to(torch.int32), cu.numel() - 1, 24)


def test_short_conv_gather_torch_backend_and_one_sequence():
    """The reference path takes the gather too (same numbers as the spread copy), and without
    cu_seqlens the L packed rows are one sequence on both backends."""
    from megatron_mom.layer import packing
    layout = routed_layout(batch=2, seqlen=6)
    x = torch.randn(1, layout.slot_row.shape[0], 8, requires_grad=True)
    w = torch.randn(8, 4, requires_grad=True)
    gather = (layout.token, layout.slot_row)
    for cu in (layout.cu_seqlens, None):
        ref, _ = short_conv(packing.spread(x[0], layout)[None], w, cu_seqlens=cu, backend="torch")
        g_ref = torch.autograd.grad(ref.square().sum(), [x, w])
        for backend in ("torch", "triton"):
            y, _ = short_conv(x, w, cu_seqlens=cu, gather=gather, backend=backend)
            g = torch.autograd.grad(y.square().sum(), [x, w])
            assert rel_err(y, ref) < 1e-6
            assert all(rel_err(a, b) < 1e-5 for a, b in zip(g, g_ref))


def test_short_conv_split_and_gather_read_nothing_back(monkeypatch, refuse_host_reads):
    """Forward and backward of the split and the gathered convolution read no device value on
    the host (CUDA-graph capturable, as the plain one)."""
    layout = routed_layout(batch=2, seqlen=5)
    L, N = layout.num_rows, layout.slot_row.shape[0]
    kvba = torch.randn(1, L, 14, requires_grad=True)
    q_tok = torch.randn(1, N, 6, requires_grad=True)
    w = torch.randn(6, 4, requires_grad=True)

    refuse_host_reads()
    q, _ = short_conv(q_tok, w, cu_seqlens=layout.cu_seqlens,
                      gather=(layout.token, layout.slot_row), backend="triton")
    k, v, b = short_conv_split(kvba, [w, w, None], [6, 6, 2], cu_seqlens=layout.cu_seqlens,
                               backend="triton")
    torch.autograd.grad(q.sum() + k.sum() + b.sum(), [q_tok, kvba, w])


def test_short_conv_gather_rejects_bad_index():
    x = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="gather"):
        short_conv(x, torch.randn(8, 4), gather=(torch.arange(8), torch.arange(6).view(3, 2)))


# --------------------------------------------------------------- gated RMSNorm, L2 norm
@pytest.mark.parametrize("with_gate", [True, False])
def test_gated_rmsnorm_matches_reference(with_gate):
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(3, 37, 4, 64, generator=gen).requires_grad_()
    gate = torch.randn(3, 37, 4, 64, generator=gen).requires_grad_() if with_gate else None
    w = torch.randn(64, generator=gen).requires_grad_()
    dout = torch.randn(y.shape, generator=gen)
    leaves = [y, w] + ([gate] if with_gate else [])
    res = {}
    for backend in ("triton", "torch"):
        out = gated_rmsnorm(y, gate, w, 1e-6, backend=backend)
        res[backend] = [out] + list(torch.autograd.grad((out * dout).sum(), leaves))
    for a, b in zip(res["triton"], res["torch"]):
        assert rel_err(a, b) < 1e-5


def test_l2norm_matches_reference():
    x = torch.randn(50, 3, 128, requires_grad=True)
    dout = torch.randn(x.shape)
    res = {}
    for backend in ("triton", "torch"):
        out = l2norm(x, backend=backend)
        res[backend] = [out, torch.autograd.grad((out * dout).sum(), x)[0]]
    for a, b in zip(res["triton"], res["torch"]):
        assert rel_err(a, b) < 1e-5


# --------------------------------------------------------------- mix of packed read-outs
def mix_inputs(N, S, H, V, seed=0, dtype=torch.float32):
    """o [N*S, H, V], slot_row [N, S] (a random permutation of the rows), weight [N, S], dy."""
    gen = torch.Generator().manual_seed(seed)
    o = torch.randn(N * S, H, V, generator=gen).to(dtype).requires_grad_()
    slot_row = torch.randperm(N * S, generator=gen).view(N, S)
    w = torch.rand(N, S, generator=gen).requires_grad_()
    dy = torch.randn(N, H, V, generator=gen).to(dtype)
    return o, slot_row, w, dy


def mix_both(o, slot_row, w, dy, out_dtype=torch.float32):
    """{backend: [y, d_o, d_w]} for the Triton kernels and the torch reference."""
    res = {}
    for backend in ("triton", "torch"):
        y = mix(o, slot_row, w, out_dtype, backend=backend)
        res[backend] = [y] + list(torch.autograd.grad(y, (o, w), dy.to(y.dtype)))
    return res


@pytest.fixture(params=["default", "small"])
def mix_config(request, monkeypatch):
    """Default tiles (one column block, N < BN) and 4 x 16 tiles (several column and token
    blocks, ragged at both ends)."""
    mix_triton = pytest.importorskip("megatron_mom.ops.mix.triton")
    if request.param == "small":
        monkeypatch.setattr(mix_triton, "FWD_CONFIG", (64, 16, 4))
        monkeypatch.setattr(mix_triton, "BWD_CONFIG", (64, 16, 4))
    return mix_triton


@pytest.mark.parametrize("S", [1, 2, 3])
def test_mix_matches_reference(mix_config, S):
    res = mix_both(*mix_inputs(N=11, S=S, H=3, V=13, seed=S))     # H*V = 39, N = 11
    names = ("y", "d_o", "d_w")
    for name, a, b in zip(names, res["triton"], res["torch"]):
        assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape, name
        assert b.abs().max() > 0.1, name                           # real numbers compared
        assert rel_err(a, b) < 1e-6, f"{name}: {rel_err(a, b):.2e}"
    torch.testing.assert_close(res["triton"][1], res["torch"][1], rtol=0, atol=0)  # w * dy, once


def test_mix_one_gradient_at_a_time(mix_config):
    """d_o alone and d_w alone (the other input frozen) give the same numbers."""
    o, slot_row, w, dy = mix_inputs(N=9, S=3, H=2, V=20)
    ref = mix_both(o, slot_row, w, dy)["torch"]
    (d_o,) = torch.autograd.grad(mix(o, slot_row, w.detach(), backend="triton"), o, dy)
    (d_w,) = torch.autograd.grad(mix(o.detach(), slot_row, w, backend="triton"), w, dy)
    assert rel_err(d_o, ref[1]) < 1e-6 and rel_err(d_w, ref[2]) < 1e-6


def test_mix_bf16_rows_float32_weights():
    """The layer's case: bf16 rows and output, float32 weights; d_o is w * dy (float32) rounded
    once, d_w stays float32. The interpreter's float32 -> bf16 cast truncates where the GPU
    rounds to nearest, so d_o may sit one bf16 step off the reference here (the GPU test asks
    for equality)."""
    res = mix_both(*mix_inputs(N=7, S=3, H=2, V=24, dtype=torch.bfloat16), out_dtype=torch.bfloat16)
    (y, d_o, d_w), (y_ref, d_o_ref, d_w_ref) = res["triton"], res["torch"]
    assert y.dtype == d_o.dtype == torch.bfloat16 and d_w.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-2 and rel_err(d_w, d_w_ref) < 1e-5
    step = d_o_ref.float().abs() * 2.0 ** -7                         # one bf16 step
    assert ((d_o.float() - d_o_ref.float()).abs() <= step).all() and rel_err(d_o, d_o_ref) < 1e-2


def test_mix_launch_path_reads_nothing_back(monkeypatch, refuse_host_reads):
    o, slot_row, w, dy = mix_inputs(N=5, S=2, H=2, V=8)

    refuse_host_reads()
    y = mix(o, slot_row, w, backend="triton")
    grads = torch.autograd.grad(y, (o, w), dy)
    monkeypatch.undo()
    ref = mix_both(o, slot_row, w, dy)["torch"]
    for a, b in zip([y, *grads], ref):
        assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("S", [1, 3])
def test_sum_over_slots_matches_reference(mix_config, S):
    """The unweighted sum of each token's rows (the backward of copying tokens to their packed
    rows), also written into a column range of a wider tensor."""
    o, slot_row, _, _ = mix_inputs(N=11, S=S, H=3, V=13, seed=S)
    rows = o.detach().reshape(11 * S, 39)
    want = sum_over_slots(rows, slot_row, backend="torch")
    got = sum_over_slots(rows, slot_row, backend="triton")
    assert got.shape == want.shape == (11, 39) and want.abs().max() > 0.1
    assert rel_err(got, want) < 1e-6
    wide = torch.full((11, 50), 7.0)
    mix_config.sum_over_slots(rows, slot_row, out=wide[:, 5:44])
    assert (wide[:, :5] == 7).all() and (wide[:, 44:] == 7).all()      # nothing else written
    assert rel_err(wide[:, 5:44], want) < 1e-6
    with pytest.raises(ValueError, match="unit column stride"):
        mix_config.sum_over_slots(rows, slot_row, out=torch.empty(39, 11).t())


def test_mix_rejects_float64_and_bad_shapes():
    o, slot_row, w, _ = mix_inputs(N=4, S=2, H=1, V=4)
    with pytest.raises(ValueError, match="float64"):
        mix(o.double(), slot_row, w.double(), backend="triton")
    with pytest.raises(ValueError, match="must be"):
        mix(o[1:], slot_row, w, backend="triton")
