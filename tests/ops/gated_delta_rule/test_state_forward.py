"""The forward chain's two forms (state_fwd_kernel with o computed in the chain, and storing
the per-chunk states with o from them afterwards by chunk_out_kernel) against the torch
reference: outputs, final states and every gradient, interpreted on a CPU (float32; K above
128 runs 16-token chunks there, as on the GPU). The state is held as one, two and four
64-row tiles at K = 64, 128, 256."""
from __future__ import annotations

import pytest
import torch

from test_triton_kernels import assert_gdr_close, gdr_inputs  # tests/ops

gdr_triton = pytest.importorskip("megatron_mom.ops.gated_delta_rule.triton")
from megatron_mom.ops import KernelOptions  # noqa: E402
from megatron_mom.ops.common import Segments  # noqa: E402

# (lengths, H, K, V, chunk_size): ragged segments (one empty), one/two/four state tiles
CASES = {
    "K64_ragged_C32": ([5, 70, 0, 33], 2, 64, 64, 32),
    "K128_V64_C64": ([70, 1, 64], 1, 128, 64, 64),
    "K256_C16": ([20, 13], 1, 256, 256, 16),
}
# The training forward stores the states, with o after the chain (K >= chunk_out's min_k) or
# in it; recompute_states' forward stores nothing (o in the chain) and its backward reruns the
# chain storing states only.
O_IN_CHAIN_STORING = KernelOptions().with_launch("chunk_out", min_k=1 << 30)
FORMS = {"o_after_chain": KernelOptions().with_launch("chunk_out", min_k=0),
         "o_in_chain_storing_states": O_IN_CHAIN_STORING,
         "o_in_chain": KernelOptions(recompute_states=True)}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_forward_forms_match_reference(case, form):
    lengths, H, K, V, C = CASES[case]
    leaves, cu = gdr_inputs(lengths, H, K, V, h0=True)
    assert_gdr_close(leaves, cu, chunk_size=C, options=FORMS[form])


def test_forms_give_the_same_o():
    """o from the chain and o from the stored states: the same products of the same rounded
    operands (the state in the inputs' dtype, U rounded once)."""
    lengths, H, K, V, C = [37, 64, 9], 2, 64, 64, 16
    (q, k, v, g, beta, _), cu = gdr_inputs(lengths, H, K, V, h0=False)
    P = Segments.of(k, v, cu.to(torch.int32), C)
    args = [x.detach().reshape(P.TT, H, -1).contiguous() for x in (q, k, v, g, beta)]
    q3, k3, v3, g2, b2 = args[0], args[1], args[2], args[3].view(P.TT, H), args[4].view(P.TT, H)
    gam, w, u0, _, p_mat = gdr_triton.prepare(P, q3, k3, v3, g2, b2, 0.125)
    o_chain, *_ = gdr_triton.state_forward(P, q3, k3, w, u0, gam, p_mat, None, 0.125,
                                           store_o=True, store_states=False, store_final=False)
    runs = {name: gdr_triton.state_forward(P, q3, k3, w, u0, gam, p_mat, None, 0.125,
                                           store_o=True, store_states=True, store_final=False,
                                           options=FORMS[name])
            for name in ("o_after_chain", "o_in_chain_storing_states")}
    (o_after, h, u, _), (o_both, h_both, u_both, _) = runs.values()
    assert h is not None and u is not None
    torch.testing.assert_close(o_after, o_chain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o_both, o_chain, rtol=0, atol=0)
    chunks = sum(-(-n // C) for n in lengths)          # h's rows past them are never written
    torch.testing.assert_close((h_both[:chunks], u_both), (h[:chunks], u), rtol=0, atol=0)
    assert o_after.abs().max() > 0.1


def test_launch_order_longest_first():
    from megatron_mom.ops.common.segments import longest_first
    cu = torch.tensor([0, 5, 75, 75, 108, 113], dtype=torch.int32)   # lengths 5 70 0 33 5
    assert longest_first(cu).tolist() == [1, 3, 0, 4, 2]              # ties keep their order
    assert longest_first(cu).dtype == torch.int32


@pytest.mark.parametrize("split", ["off", "on"])
def test_longest_first_launch_changes_nothing(split):
    """The state kernels' programs started longest sequence first compute what they compute in
    order: outputs, final states and every gradient bit for bit, over whole sequences and over
    pieces (with initial states and an empty sequence)."""
    from test_triton_kernels import run_gdr  # noqa: E402
    leaves, cu = gdr_inputs([5, 70, 0, 33, 16], 2, 64, 64, h0=True)
    base = KernelOptions(state_split=split, state_piece_chunks=1)
    runs = []
    for first in (0, 1):
        runs.append(run_gdr("triton", leaves, cu, chunk_size=16,
                            options=base.with_launch("state_order", longest_first=first)))
    for name, a, b in zip(["o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dh0"], *runs):
        assert torch.equal(a, b), name
    assert runs[0][0].abs().max() > 0.1


def test_state_kernels_walk_the_launch_order(monkeypatch):
    """The order is what the programs walk: an order naming sequence 0 for every program
    leaves the others' final states unwritten (so the test above compares two real orders)."""
    from test_triton_kernels import run_gdr  # noqa: E402
    leaves, cu = gdr_inputs([20, 30], 1, 64, 64, h0=False)
    ordered = KernelOptions().with_launch("state_order", longest_first=1)
    right = run_gdr("triton", leaves, cu, chunk_size=16, final=True, options=ordered)
    monkeypatch.setattr(Segments, "longest_first", lambda self, pieces=None: torch.zeros(
        self.N if pieces is None else pieces.NPU, dtype=torch.int32))
    wrong = run_gdr("triton", leaves, cu, chunk_size=16, final=True, options=ordered)
    assert torch.equal(wrong[1][0], right[1][0])
    assert not torch.equal(wrong[1][1], right[1][1])
