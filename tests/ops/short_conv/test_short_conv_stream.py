"""The streaming short-convolution kernels (runs of rows per program, R rows a step, the last
W-1 inputs and open dx rows kept in registers) on the Triton interpreter at small shapes:
runs that start and end inside sequences, sequences shorter than the kernel (and than the
window a run starts with), empty ones, initial states, widths 2..8, the row-index and
column-group forms, against the float64 reference; and a NaN kept inside its sequence."""
from __future__ import annotations

import pytest
import torch

sc = pytest.importorskip("megatron_mom.ops.short_conv.triton")
from megatron_mom.ops.short_conv import short_conv, short_conv_split  # noqa: E402

# Runs of 2 steps x 4 rows = 8 rows: boundaries at every offset of a run, sequences of 1..3
# rows (shorter than W-1 for W >= 4) across run edges, empty sequences first, between, last.
LENGTHS = [0, 3, 1, 9, 2, 0, 1, 13, 5, 0, 2, 7, 0]


@pytest.fixture
def short_runs(monkeypatch):
    monkeypatch.setattr(sc, "FWD_CONFIG", (4, 16, 1))
    monkeypatch.setattr(sc, "BWD_CONFIG", (4, 16, 1))
    for name in ("FWD_MAX_TILES", "BWD_MAX_TILES"):
        monkeypatch.setattr(sc, name, 2)
    for name in ("FWD_MIN_PROGRAMS", "BWD_MIN_PROGRAMS"):
        monkeypatch.setattr(sc, name, 1)


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def check(lengths, C, W, *, with_init, seed=0):
    """Triton (float32) against the float64 reference on packed `lengths`, x a strided view:
    y, the final state and every gradient."""
    gen = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0] + lengths).cumsum(0)
    L = sum(lengths)
    wide = torch.randn(L, C + 3, generator=gen)
    w = torch.randn(C, W, generator=gen)
    init = torch.randn(len(lengths), C, W - 1, generator=gen) if with_init else None
    dy = torch.randn(1, L, C, generator=gen)
    dfinal = torch.randn(len(lengths), C, W - 1, generator=gen)   # the final state in the loss
    results = {}
    for backend, dtype in (("triton", torch.float32), ("torch", torch.float64)):
        leaves = [t.to(dtype).requires_grad_() for t in (wide, w, init) if t is not None]
        y, final = short_conv(leaves[0][None, :, :C], leaves[1], cu_seqlens=cu,
                              initial_state=leaves[2] if with_init else None,
                              output_final_state=True, backend=backend)
        loss = (y * dy.to(dtype)).sum() + (final * dfinal.to(dtype)).sum()
        grads = torch.autograd.grad(loss, leaves)
        results[backend] = [y, final] + list(grads)
    for name, a, b in zip(["y", "final", "dx", "dw", "dinit"], results["triton"],
                          results["torch"]):
        assert rel_err(a, b) < 1e-5, name


@pytest.mark.parametrize("W", [2, 3, 4, 8])
@pytest.mark.parametrize("with_init", [False, True])
def test_runs_across_sequence_edges(short_runs, W, with_init):
    check(LENGTHS, C=24, W=W, with_init=with_init, seed=W)


def test_run_longer_than_all_rows(monkeypatch):
    """One program holding every row (a run past the end), several channel blocks."""
    monkeypatch.setattr(sc, "BWD_MIN_PROGRAMS", 1)
    monkeypatch.setattr(sc, "FWD_MIN_PROGRAMS", 1)
    monkeypatch.setattr(sc, "BWD_CONFIG", (8, 16, 1))
    monkeypatch.setattr(sc, "FWD_CONFIG", (8, 16, 1))
    check([5, 0, 12, 2], C=40, W=4, with_init=True)


def test_gather_and_split_forms(short_runs):
    """The layer's two forms with short runs: rows through the layout's index (dx summed over
    each token's slots; the final state too, in the loss) and column groups of one strided
    input with their own weights."""
    from megatron_mom.layer import packing
    gen = torch.Generator().manual_seed(1)
    seq_id, num_seqs = packing.sequence_ids(2, 11, None, "cpu")
    memory = torch.stack([torch.randperm(3, generator=gen)[:2] for _ in range(22)])
    memory = torch.cat([memory.sort(1).values, torch.full((22, 1), 3)], 1)
    lay = packing.pack(memory, seq_id, num_seqs, 4)
    cu = lay.cu_seqlens
    x_tok = torch.randn(22, 20, generator=gen)
    kv = torch.randn(lay.num_rows, 36, generator=gen)
    wq, wk = torch.randn(16, 4, generator=gen), torch.randn(12, 3, generator=gen)
    dq = torch.randn(1, lay.num_rows, 16, generator=gen)
    dk = torch.randn(1, lay.num_rows, 12, generator=gen)
    dfinal = torch.randn(cu.numel() - 1, 16, 3, generator=gen)
    res = {}
    for backend, dtype in (("triton", torch.float32), ("torch", torch.float64)):
        leaves = [t.to(dtype).requires_grad_() for t in (x_tok, kv, wq, wk)]
        q, final = short_conv(leaves[0][None, :, :16], leaves[2], cu_seqlens=cu,
                              gather=(lay.token, lay.slot_row), output_final_state=True,
                              backend=backend)
        k, rest = short_conv_split(leaves[1][None, :, :32], [leaves[3], None], [12, 20],
                                   cu_seqlens=cu, backend=backend)
        loss = ((q * dq.to(dtype)).sum() + (k * dk.to(dtype)).sum() + rest.sum()
                + (final * dfinal.to(dtype)).sum())
        res[backend] = [q, k, final] + list(torch.autograd.grad(loss, leaves))
    for a, b in zip(res["triton"], res["torch"]):
        assert rel_err(a, b) < 1e-5


def test_nan_stays_in_its_sequence(short_runs):
    """A NaN input poisons its own sequence only (forward and both gradients), also where the
    next sequence starts inside the same run."""
    cu = torch.tensor([0] + LENGTHS).cumsum(0)
    L, C = sum(LENGTHS), 16
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, L, C, generator=gen)
    seq = 7                                                 # 13 rows; the next has 5
    lo, hi = int(cu[seq]), int(cu[seq + 1])
    x[0, hi - 1, 3] = float("nan")
    x.requires_grad_()
    w = torch.randn(C, 4, generator=gen, requires_grad=True)
    y, _ = short_conv(x, w, cu_seqlens=cu, backend="triton")
    dx, = torch.autograd.grad((y * torch.randn(y.shape, generator=gen)).sum(), [x])
    outside = torch.ones(L, dtype=torch.bool)
    outside[lo:hi] = False
    assert torch.isfinite(y[0, outside]).all() and torch.isfinite(dx[0, outside]).all()
    assert torch.isnan(y[0, hi - 1, 3]) and torch.isnan(dx[0, hi - 1, 3])
