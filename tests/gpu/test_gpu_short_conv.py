"""GPU checks of the streaming short-convolution kernels at the MoM layer's shapes (run:
`pytest -m gpu tests/gpu/test_gpu_short_conv.py`): every call form the layer uses (plain,
row-index GATHER, column group of the [L, 2056] memory rows, one 256-column head with a shared
dw partial buffer, conv + L2 norm), bf16 and fp32 inputs, against the float64 reference on the
same values: y, dx, dw. Also the preset launch settings of benchmarks/bench_conv.py (each must
give the default's numbers) and a NaN kept inside its own sequence."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

from megatron_mom.layer import packing  # noqa: E402
from megatron_mom.ops.short_conv import triton as conv  # noqa: E402
from megatron_mom.ops.short_conv.reference import short_conv_reference  # noqa: E402

C, HEAD, W = 1024, 256, 4
LIMIT = {torch.bfloat16: 1e-2, torch.float32: 1e-5}


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def layout(B=4, T=4096, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    seq_id, num_seqs = packing.sequence_ids(B, T, None, "cuda")
    N = B * T
    routed = torch.rand(N, 4, device="cuda", generator=gen).topk(2, dim=1).indices.sort(1).values
    memory = torch.cat([routed, torch.full((N, 1), 4, device="cuda")], dim=1)
    return packing.pack(memory, seq_id, num_seqs, 5)


def reference(x_rows, w, cu, dy):
    """float64 y, dx (per packed row), dw of the plain convolution of the rows as read."""
    x64 = x_rows.double().requires_grad_()
    w64 = w.double().requires_grad_()
    y, _ = short_conv_reference(x64[None], w64, cu_seqlens=cu.long())
    dx, dw = torch.autograd.grad(y[0], [x64, w64], dy.double())
    return y[0], dx, dw


def run_form(form, dtype, lay):
    """(y, dx per packed row, dw) of the Triton kernels and of the reference for one form."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    cu = lay.cu_seqlens.to(torch.int32)
    N, L = cu.numel() - 1, lay.num_rows
    tokens = lay.slot_row.shape[0]
    qg = torch.randn(tokens, 2 * C, device="cuda", generator=gen).to(dtype)
    kvba = torch.randn(L, 2 * C + 8, device="cuda", generator=gen).to(dtype)
    d_kvba = torch.zeros(L, 2 * C + 8, device="cuda", dtype=dtype)
    w = (torch.randn(C, W, device="cuda", generator=gen) / 2).to(dtype)
    dy = torch.randn(L, C, device="cuda", generator=gen).to(dtype)
    x_row = None
    if form == "plain":
        x = torch.randn(L, C, device="cuda", generator=gen).to(dtype)
        dx = torch.empty(L, C, device="cuda", dtype=dtype)
        rows = x
    elif form == "gather":
        x, x_row = qg[:, :C], lay.token
        dx = torch.empty(L, C, device="cuda", dtype=dtype)
        rows = x.index_select(0, x_row)
    elif form == "split":
        x, dx = kvba[:, :C], d_kvba[:, :C]
        rows = x
    else:                                                    # one head of v, shared dw buffer
        x, dx = kvba[:, C:C + HEAD], d_kvba[:, C:C + HEAD]
        w, dy = w[:HEAD], dy[:, :HEAD].contiguous()
        rows = x
    y = conv.conv_forward(x, x_row, w, cu, N, None, True)
    if form == "head":
        part = torch.empty(conv.conv_backward_programs(L, W), C, W, device="cuda",
                           dtype=torch.float32)[:, :HEAD]
        conv.conv_backward(x, None, w, None, dy, dx, cu, N, True, False, part)
        dw = part.sum(0)
    else:
        dw, _ = conv.conv_backward(x, x_row, w, None, dy, dx, cu, N, True, False)
    return (y, dx, dw), reference(rows, w, cu, dy), (d_kvba, form)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("form", ["plain", "gather", "split", "head"])
def test_stream_kernels_paper_shape(form, dtype):
    """y, dx, dw of each call form at B4 T4096 (49152 packed rows in 20 segments)."""
    got, want, (d_kvba, _) = run_form(form, dtype, layout())
    errs = {n: rel_err(a, b) for n, a, b in zip(("y", "dx", "dw"), got, want)}
    print(form, dtype, errs)
    for name, err in errs.items():
        assert err < LIMIT[dtype], f"{form} {name}: {err:.2e}"
    if form in ("split", "head"):          # only the group's own columns of d(kvba) written
        cols = slice(0, C) if form == "split" else slice(C, C + HEAD)
        rest = torch.ones(d_kvba.shape[1], dtype=torch.bool, device="cuda")
        rest[cols] = False
        assert not d_kvba[:, rest].any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("gather", [False, True])
def test_conv_l2norm_paper_shape(gather, dtype):
    """conv + SiLU + per-head L2 norm (the lean path's q and k) at the layer's shape."""
    lay = layout()
    gen = torch.Generator(device="cuda").manual_seed(4)
    cu = lay.cu_seqlens.to(torch.int32)
    rows_in = lay.slot_row.shape[0] if gather else lay.num_rows
    wide = torch.randn(rows_in, 2 * C + 8, device="cuda", generator=gen).to(dtype)
    w = (torch.randn(C, W, device="cuda", generator=gen) / 2).to(dtype)
    x_row = lay.token if gather else None
    y, rstd = conv.conv_l2norm_forward(wide[:, :C], x_row, w, cu, cu.numel() - 1, HEAD)
    x = wide[:, :C].double()
    x = x[x_row] if gather else x
    z, _ = short_conv_reference(x[None], w.double(), cu_seqlens=cu.long())
    z = z[0].view(-1, C // HEAD, HEAD)
    want = z / (z.square().sum(-1, keepdim=True) + 1e-6).sqrt()
    assert rel_err(y, want.view(-1, C)) < LIMIT[dtype]


PRESETS = {"fwd_small": {"FWD_CONFIG": (8, 256, 2)}, "fwd_wide": {"FWD_CONFIG": (16, 1024, 8)},
           "bwd_small": {"BWD_CONFIG": (8, 256, 2)}, "bwd_wide": {"BWD_CONFIG": (8, 1024, 8)},
           "bwd_tiles1": {"BWD_MAX_TILES": 1}}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_launch_presets_agree(monkeypatch, preset):
    """Other launch settings (benchmarks/bench_conv.py offers them) give the reference's
    numbers at the layer's shape (gather form: the hardest one)."""
    for key, val in PRESETS[preset].items():
        monkeypatch.setattr(conv, key, val)
    got, want, _ = run_form("gather", torch.float32, layout())
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5


def test_nan_stays_in_its_sequence():
    """A NaN input row poisons its own sequence's outputs and gradients only."""
    lay = layout(B=2, T=2048)
    cu = lay.cu_seqlens.to(torch.int32)
    N, L = cu.numel() - 1, lay.num_rows
    gen = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(L, C, device="cuda", generator=gen).bfloat16()
    w = torch.randn(C, W, device="cuda", generator=gen).bfloat16()
    dy = torch.randn(L, C, device="cuda", generator=gen).bfloat16()
    seg = int(torch.nonzero(cu[1:] - cu[:-1] > 8)[1])         # a non-empty segment
    lo, hi = int(cu[seg]), int(cu[seg + 1])
    x[hi - 1] = float("nan")                                  # its last row
    y = conv.conv_forward(x, None, w, cu, N, None, True)
    dx = torch.empty_like(x)
    conv.conv_backward(x, None, w, None, dy, dx, cu, N, True, False)
    inside = torch.zeros(L, dtype=torch.bool, device="cuda")
    inside[lo:hi] = True
    assert torch.isfinite(y[~inside]).all() and torch.isfinite(dx[~inside]).all()
    assert torch.isnan(y[hi - 1]).all() and torch.isnan(dx[hi - 1]).all()
