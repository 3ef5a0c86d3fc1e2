"""The pieces the ops share (megatron_mom.ops.common): one dispatch, one error form, one
segment bookkeeping."""
import pytest
import torch

from megatron_mom.ops.common import (Segments, checker, compute_dtype, dispatch, need_device,
                                     need_triton_dtypes, resolve_backend)
from megatron_mom.ops.mix import sum_over_slots


def test_checker_and_dtype_checks_name_the_op_and_the_parameter():
    checker("an_op")(True, "never shown")
    with pytest.raises(ValueError, match=r"^an_op: x must be 1$"):
        checker("an_op")(False, "x must be 1")
    need_triton_dtypes("an_op", q=torch.ones(1), k=None)
    with pytest.raises(ValueError, match=r"an_op: k has dtype torch.float64.*backend='torch'"):
        need_triton_dtypes("an_op", q=torch.ones(1), k=torch.ones(1, dtype=torch.float64))
    need_device("an_op", torch.device("cpu"), cu_seqlens=torch.ones(1), h0=None)
    with pytest.raises(ValueError, match="an_op: cu_seqlens is on meta"):
        need_device("an_op", torch.device("cpu"), cu_seqlens=torch.ones(1, device="meta"))
    assert compute_dtype(torch.float64) == torch.float64
    assert {compute_dtype(d) for d in (torch.float32, torch.bfloat16, torch.float16)} == {
        torch.float32}


def test_one_dispatch_for_every_op(monkeypatch):
    """"auto" picks Triton only where the inputs suit it and the kernels import; "triton"
    without them is a clear error; unknown backends are refused by name."""
    assert resolve_backend("l2norm", "auto", suits=False) == "torch"
    assert resolve_backend("l2norm", "torch", suits=True) == "torch"
    with pytest.raises(ValueError, match=r"l2norm: backend must be one of \('auto', 'triton', "
                                         r"'torch'\), got 'cuda'"):
        resolve_backend("l2norm", "cuda", suits=True)
    assert resolve_backend("gated_delta_rule", "recurrent", False,
                           ("auto", "triton", "torch", "recurrent")) == "recurrent"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="l2norm: backend='triton' runs the kernels on CUDA "
                                           "tensors.*TRITON_INTERPRET=1"):
        resolve_backend("l2norm", "triton", suits=False)       # e.g. CPU tensors
    monkeypatch.setenv("TRITON_INTERPRET", "1")                 # the interpreter takes them
    assert resolve_backend("l2norm", "triton", suits=False) == "triton"

    def no_triton(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(dispatch.importlib, "import_module", no_triton)
    assert resolve_backend("mix", "auto", suits=True) == "torch"
    assert dispatch.triton_impl("mix", "mix", "auto", suits=True) is None
    with pytest.raises(RuntimeError, match="mix: backend='triton' needs the `triton` package.*"
                                           "use backend='torch'"):
        resolve_backend("mix", "triton", suits=True)


def test_segments_count_chunks_per_sequence():
    """Sequences of 5, 0, 70 and 16 tokens in 32-token chunks: 1, 0, 3 and 1 chunks."""
    cu = torch.tensor([0, 5, 5, 75, 91])
    seg = Segments(91, 2, 64, 32, cu, 32)
    assert seg.cu.dtype == torch.int32 and seg.N == 4 and seg.NTU == 91 // 32 + 4
    assert seg.offsets.tolist() == [0, 1, 1, 4, 5]
    one = seg.with_heads(1)
    assert (one.H, seg.H) == (1, 2) and one.offsets is seg.offsets
    dense = Segments.of(torch.empty(3, 10, 2, 16), torch.empty(3, 10, 2, 8), None, 16)
    assert dense.cu.tolist() == [0, 10, 20, 30] and (dense.TT, dense.K, dense.V) == (30, 16, 8)
    assert dense.offsets.tolist() == [0, 1, 2, 3]


def test_sum_over_slots_into_a_column_range():
    """`out` (a column range of a wider tensor) receives the sums in place; the other columns
    are untouched."""
    gen = torch.Generator().manual_seed(0)
    slot_row = torch.randperm(12, generator=gen).view(4, 3)
    packed = torch.randn(12, 5, generator=gen)
    wide = torch.zeros(4, 9)
    got = sum_over_slots(packed, slot_row, out=wide[:, 2:7], backend="torch")
    want = torch.stack([packed[slot_row[n]].sum(0) for n in range(4)])
    torch.testing.assert_close(wide[:, 2:7], want)
    assert got.data_ptr() == wide[:, 2:7].data_ptr() and not wide[:, :2].any()
    with pytest.raises(ValueError, match="out"):
        sum_over_slots(packed, slot_row, out=torch.zeros(4, 4))


@pytest.mark.parametrize("cu, problem", [
    ([0, 10], "must start at 0 and end at the number of packed tokens \\(20\\), got 0 ... 10"),
    ([2, 10, 20], "got 2 ... 20"),
    ([-4, 10, 20], "got -4 ... 20"),
    ([0, 10, 30], "got 0 ... 30"),
    ([0, 12, 8, 20], "must never decrease"),
    ([False, True], "1-D int32 or int64 tensor"),
    ([0.0, 20.0], "1-D int32 or int64 tensor"),
])
@pytest.mark.parametrize("op", ["gated_delta_rule", "short_conv"])
def test_bad_cu_seqlens_are_refused_on_the_cpu(op, cu, problem):
    """Values that would make the kernels read and write outside the sequences (the Triton
    interpreter on the CPU aborted the process on some) are refused by name where reading
    them costs nothing."""
    from megatron_mom.ops.gated_delta_rule import gated_delta_rule
    from megatron_mom.ops.short_conv import short_conv
    cu = torch.tensor(cu)
    with pytest.raises(ValueError, match=f"{op}: cu_seqlens .*{problem}"):
        if op == "gated_delta_rule":
            x = torch.randn(1, 20, 1, 16)
            gated_delta_rule(x, x, x, -torch.rand(1, 20, 1), torch.rand(1, 20, 1),
                             cu_seqlens=cu, backend="triton")
        else:
            short_conv(torch.randn(1, 20, 4), torch.randn(4, 3), cu_seqlens=cu, backend="triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_tokens_pass_the_state_through(backend):
    from megatron_mom.ops.gated_delta_rule import gated_delta_rule
    q = torch.randn(2, 0, 1, 16)
    h0 = torch.randn(2, 1, 16, 16)
    o, h = gated_delta_rule(q, q, q, q[..., 0], q[..., 0], initial_state=h0,
                            output_final_state=True, backend=backend)
    assert o.shape == (2, 0, 1, 16) and torch.equal(h.float(), h0)
