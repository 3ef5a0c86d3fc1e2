"""Chunk-parallel state passing (`KernelOptions.state_split`) on the CPU through Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU): the split state kernels
give the unsplit kernels' and the torch reference's outputs, final states and every gradient.
float32, K/V 16/32 and pieces of one or two 16-token chunks, so that ragged packed sequences
hold many pieces, some sequences shorter than one piece, some empty."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_mom.ops.common import Segments
from megatron_mom.ops.gated_delta_rule import gated_delta_rule
from megatron_mom.ops.options import KernelOptions

pytest.importorskip("triton")
gdr_triton = pytest.importorskip("megatron_mom.ops.gated_delta_rule.triton")

SPLIT = KernelOptions(state_split="on", state_piece_chunks=2)
UNSPLIT = KernelOptions(state_split="off")
NAMES = ["o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dh0"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_inputs(lengths, H, K, V, *, batch=None, h0=True, raw_qk=False, seed=0):
    """Leaves (q, k, v, g, beta, initial state or None) and cu_seqlens (None with `batch`:
    `batch` dense rows of lengths[0] tokens)."""
    gen = torch.Generator().manual_seed(seed)
    B, T = (batch, lengths[0]) if batch else (1, sum(lengths))
    N = batch or len(lengths)
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, H, K, generator=gen)
    k = k if raw_qk else F.normalize(k, dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen) + 2.0)
    beta = torch.rand(B, T, H, generator=gen)
    s0 = torch.randn(N, H, K, V, generator=gen) if h0 else None
    leaves = [x.requires_grad_() if x is not None else None for x in (q, k, v, g, beta, s0)]
    cu = None if batch else torch.tensor([0] + list(lengths)).cumsum(0)
    return leaves, cu


def outputs_and_grads(backend, leaves, cu, *, l2=False, final=True, options=None):
    q, k, v, g, beta, s0 = leaves
    o, ht = gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=final,
                             cu_seqlens=cu, use_qk_l2norm=l2, chunk_size=16, backend=backend,
                             options=options)
    gen = torch.Generator().manual_seed(1)
    loss = (o * torch.randn(o.shape, generator=gen)).sum()
    if final:
        loss = loss + (ht * torch.randn(ht.shape, generator=gen)).sum()
    grads = torch.autograd.grad(loss, [x for x in leaves if x is not None])
    return [o, ht] + list(grads) + ([None] if s0 is None else [])


def assert_all_close(got, want, tol, what):
    for name, a, b in zip(NAMES, got, want):
        if b is None:
            assert a is None, (what, name)
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, (what, name)
        assert torch.isfinite(a).all(), (what, name)
        err = rel_err(a, b)
        assert err < tol, f"{what} {name}: relative error {err:.2e} >= {tol:.0e}"


def count_piece_launches(monkeypatch):
    """Records the kernels that `gdr_triton.launch` starts, by name."""
    names = []
    real = gdr_triton.launch

    def recording(kernel, grid, *args, **kwargs):
        names.append(kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__)
        return real(kernel, grid, *args, **kwargs)
    monkeypatch.setattr(gdr_triton, "launch", recording)
    return names


# (lengths, batch, H, K, V, initial state, l2norm, final state, pieces of L chunks)
CASES = {
    # 5 < one piece; 70 = 3 pieces (the last 6 tokens); 100 = 4 pieces (the last 4)
    "ragged_with_empty_L2": ([5, 70, 0, 33, 16, 100], None, 2, 16, 32, True, False, True, 2),
    "ragged_l2norm_no_h0_L2": ([40, 3, 77], None, 1, 32, 16, False, True, True, 2),
    "trailing_empty_L1": ([50, 31, 0, 0], None, 1, 16, 32, True, False, True, 1),
    "dense_B2_L3": ([90], 2, 2, 32, 32, True, False, True, 3),
    "output_only_L2": ([20, 64], None, 1, 16, 16, False, False, False, 2),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_split_matches_unsplit_and_reference(case, monkeypatch):
    lengths, batch, H, K, V, h0, l2, final, L = CASES[case]
    leaves, cu = make_inputs(lengths, H, K, V, batch=batch, h0=h0, raw_qk=l2)
    launched = count_piece_launches(monkeypatch)
    split = outputs_and_grads("triton", leaves, cu, l2=l2, final=final,
                              options=SPLIT.replace(state_piece_chunks=L))
    assert {"piece_fwd_kernel", "piece_bwd_kernel", "piece_scan_kernel"} <= set(launched)
    unsplit = outputs_and_grads("triton", leaves, cu, l2=l2, final=final, options=UNSPLIT)
    reference = outputs_and_grads("torch", leaves, cu, l2=l2, final=final)
    assert_all_close(split, unsplit, 1e-5, "split vs unsplit")
    assert_all_close(split, reference, 2e-5, "split vs reference")


@pytest.mark.parametrize("recompute", [False, True])
def test_split_with_head_groups_and_recompute(recompute):
    """The backward by head groups (head slices of the initial state and its gradient, HN != H
    in the scan) and the recompute mode (the state forward rerun inside the backward)."""
    leaves, cu = make_inputs([37, 60], 4, 16, 32)
    options = SPLIT.replace(backward_head_groups=2, recompute_states=recompute)
    split = outputs_and_grads("triton", leaves, cu, options=options)
    reference = outputs_and_grads("torch", leaves, cu)
    assert_all_close(split, reference, 2e-5, "split by head groups vs reference")


def test_split_state_kernels_keep_every_per_chunk_tensor_and_read_nothing_back(monkeypatch,
                                                                             refuse_host_reads):
    """`state_forward` / `state_backward` over pieces store the same per-chunk states h, U,
    dh, dU, output, final state and initial-state gradient as over whole sequences, and
    their launch path reads no device value on the host (CUDA-graph capturable)."""
    H, K, V, C, scale = 2, 16, 32, 16, 0.25
    leaves, cu = make_inputs([23, 0, 81, 16, 50], H, K, V)
    q, k, v, g, beta, s0 = (x.detach() for x in leaves)
    P = Segments.of(k, v, cu, C)
    q3, k3, v3 = (x.reshape(-1, H, x.shape[-1]) for x in (q, k, v))
    g2, b2 = g.reshape(-1, H), beta.reshape(-1, H)
    gam, w, u0, t_mat, p_mat = gdr_triton.prepare(P, q3, k3, v3, g2, b2, scale)
    do = torch.randn(P.TT, H, V, generator=torch.Generator().manual_seed(2))
    dht = torch.randn_like(s0)

    def run(options):
        o, h, u, ht = gdr_triton.state_forward(P, q3, k3, w, u0, gam, p_mat, s0, scale,
                                               store_o=True, store_states=True,
                                               store_final=True, options=options)
        dh0 = torch.empty_like(s0)
        dh, du = gdr_triton.state_backward(P, q3, k3, w, gam, p_mat, do, dht, scale, dh0,
                                           options=options)
        return o, h, u, ht, dh, du, dh0

    want = run(UNSPLIT)
    P.pieces(2)                                      # bookkeeping is built before patching

    refuse_host_reads()
    got = run(SPLIT)
    monkeypatch.undo()
    real_chunks = int(P.offsets[-1])                 # h, dh rows past the real chunks: unused
    for name, a, b in zip(["o", "h", "u", "ht", "dh", "du", "dh0"], got, want):
        if name in ("h", "dh"):
            a, b = a[:real_chunks], b[:real_chunks]
        assert rel_err(a, b) < 1e-5, name


def test_pieces_bookkeeping():
    """Piece starts, first chunks and running counts against a loop over the sequences, with
    empty sequences (leading, inner, trailing) and lengths that are not whole pieces."""
    lengths, C, L = [0, 5, 70, 0, 32, 33, 64, 0], 16, 2
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    P = Segments(int(cu[-1]), 1, 16, 16, cu, C)
    pieces = P.pieces(L)
    assert P.pieces(L) is pieces and P.with_heads(3).pieces(L) is pieces
    starts, chunks, counts = [], [], [0]
    first_chunk = 0
    for n, length in enumerate(lengths):
        bos = int(cu[n])
        for j in range(0, length, L * C):
            starts.append(bos + j)
            chunks.append(first_chunk + j // C)
        counts.append(counts[-1] + -(-length // (L * C)))
        first_chunk += -(-length // C)
    total = int(cu[-1])
    assert pieces.NPU == total // (L * C) + len(lengths) >= len(starts)
    pad = pieces.NPU + 1 - len(starts)
    assert pieces.cu.tolist() == starts + [total] * pad
    assert pieces.first_chunk.tolist()[:len(chunks)] == chunks
    assert pieces.offsets.tolist() == counts
    assert pieces.cu.dtype == pieces.first_chunk.dtype == pieces.offsets.dtype == torch.int32


def shapes(TT, N, H, K, V, C=64) -> Segments:
    cu = torch.linspace(0, TT, N + 1).to(torch.int32)
    return Segments(TT, H, K, V, cu, C)


def test_split_rule_is_a_function_of_shapes():
    """"auto" splits long sequences on few programs (B1 T16384 H4 D256: 32 programs; B1
    T32768 H16 D128), not B4 T4096 H16 D128 (128 programs of 64 chunks: the pieces' extra
    work would cost more than their shorter chains save) nor MoM's 20 segments at B4 T4096;
    with more programs at full rate per GPU (`slots`) the model splits MoM at T65536 too;
    "on" and "off" force it."""
    auto = KernelOptions()
    L = auto.state_piece_chunks
    split = lambda P, BV, options=auto: gdr_triton.split_pieces(P, options, BV)  # noqa: E731
    assert split(shapes(16384, 1, 4, 256, 256), 32) == L
    assert split(shapes(32768, 1, 16, 128, 128), 64) == L
    assert split(shapes(16384, 4, 16, 128, 128), 64) == 0
    assert split(shapes(49152, 20, 4, 256, 256), 32) == 0
    mom_64k = shapes(196608, 5, 4, 256, 256)
    assert split(mom_64k, 32) == 0
    assert split(mom_64k, 32, auto.with_launch("state_split", slots=1056)) == L
    assert split(shapes(2048, 4, 1, 128, 128), 64, auto.replace(state_split="on")) == L
    assert split(shapes(32768, 1, 16, 128, 128), 64, auto.replace(state_split="off")) == 0
    # the backward splits only up to backward_max_k (K = 256: measured slower split)
    bwd = lambda P, BV: gdr_triton.split_pieces(P, auto, BV, backward=True)  # noqa: E731
    assert bwd(shapes(16384, 1, 4, 256, 256), 16) == 0
    assert bwd(shapes(32768, 1, 16, 128, 128), 64) == L
    # a launch over a group of heads decides as the call (bit-identical head groups)
    assert split(shapes(16384, 4, 16, 128, 128).with_heads(1), 64) == 0
    # the model itself: B1 T32768 H16 D128, L = 16: 512 chunks on 32 programs (one wave)
    # against 16 x (8 waves of 2112 transfer programs + 4 of 1056) + 32 scan steps
    rule = auto.launch["state_split"]
    gain = gdr_triton.split_gain(shapes(32768, 1, 16, 128, 128), 16, 64, rule)
    assert gain == pytest.approx(512 / (16 * (8 + 4) + 32))


def test_split_keeps_a_nan_in_its_own_sequence():
    """A NaN in one packed sequence reaches none of the others' outputs or gradients over
    pieces (the pieces of one sequence combine only with each other)."""
    leaves, cu = make_inputs([40, 70, 33], 1, 16, 16)
    with torch.no_grad():
        leaves[2][0, 60] = float("nan")                  # v, sequence 1, its second piece
    o, ht, *grads = outputs_and_grads("triton", leaves, cu, options=SPLIT)
    others = torch.cat([torch.arange(0, 40), torch.arange(110, 143)])
    assert torch.isfinite(o[0, others]).all() and torch.isfinite(ht[[0, 2]]).all()
    for grad in grads[:5]:
        assert torch.isfinite(grad[0, others]).all()
    assert torch.isfinite(grads[5][[0, 2]]).all()
    assert not torch.isfinite(o[0, 60:110]).all()        # and does reach its own


@pytest.mark.parametrize("kwargs, match", [
    (dict(state_split="yes"), "state_split must be one of"),
    (dict(state_piece_chunks=0), "state_piece_chunks must be an integer >= 1"),
    (dict(state_piece_chunks=True), "state_piece_chunks must be an integer >= 1"),
])
def test_split_options_reject_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KernelOptions(**kwargs)


def test_documented_example_runs():
    """The example of docs/kernels.md's "Chunk-parallel state passing" runs as written."""
    import os
    import re
    path = os.path.join(os.path.dirname(__file__), "..", "..", "..", "docs", "kernels.md")
    text = open(path).read()
    section = text[text.index("### Chunk-parallel state passing"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "docs/kernels.md", "exec"), {})
