"""The main backward kernel's one-pass form (launch["chunk_bwd_main"]["one_pass"]: its dq,
dW and dk products over V in one loop), its split over K blocks ("split_k": a program per K
block, dgam in per-block parts), dP computed by a kernel of its own first ("dp_first") and its
narrower blocks (launch["chunk_bwd"]) against the torch reference, interpreted on a CPU: every
gradient, ragged segments, one to eight K or V blocks."""
from __future__ import annotations

import pytest
import torch

from test_triton_kernels import assert_gdr_close, gdr_inputs, run_gdr  # tests/ops

pytest.importorskip("megatron_mom.ops.gated_delta_rule.triton")
from megatron_mom.ops import KernelOptions  # noqa: E402

def with_main(options, **settings):
    """`options` with the main backward kernel's launch `settings` at every K bound."""
    for bound in options.launch["chunk_bwd_main"]:
        options = options.with_launch("chunk_bwd_main", bound, **settings)
    return options


CASES = {
    "K64_ragged_C32": ([5, 70, 0, 33], 2, 64, 64, 32),
    "K128_V256_C16": ([20, 13], 1, 128, 256, 16),
    "K256_C16": ([17, 9], 1, 256, 256, 16),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_one_pass_main_backward_matches_reference(case):
    lengths, H, K, V, C = CASES[case]
    leaves, cu = gdr_inputs(lengths, H, K, V, h0=True)
    one_pass = with_main(KernelOptions(), one_pass=1)
    assert_gdr_close(leaves, cu, chunk_size=C, options=one_pass)


@pytest.mark.parametrize("blocks", [{"BV": 32}, {"BK": 32, "BV": 32}], ids=["BV32", "BK32_BV32"])
def test_narrow_blocks_match_reference(blocks):
    """The builds without the K = 256 table build's spill (docs/performance.md) loop over more
    V (and K) blocks: two to eight here, at K = V = 256 and ragged segments."""
    leaves, cu = gdr_inputs([17, 9], 1, 256, 256, h0=True)
    assert_gdr_close(leaves, cu, chunk_size=16,
                     options=KernelOptions().with_launch("chunk_bwd", **blocks))


SPLIT_CASES = {   # (lengths, H, K, V, C, chunk_bwd blocks): 1, 2, 4 and 8 K blocks
    "K64_ragged_C32_one_block": ([5, 70, 0, 33], 2, 64, 64, 32, {}),
    "K128_V64_C16_two_blocks": ([20, 13], 1, 128, 64, 16, {}),
    "K256_C16_four_blocks": ([17, 9], 1, 256, 256, 16, {}),
    "K256_BK128_C16_two_blocks": ([17, 9], 1, 256, 256, 16, {"BK": 128}),
    "K256_BK32_C16_eight_blocks": ([17, 9], 1, 256, 256, 16, {"BK": 32, "BV": 32}),
}


@pytest.mark.parametrize("one_pass", [0, 1], ids=["two_pass", "one_pass"])
@pytest.mark.parametrize("case", list(SPLIT_CASES), ids=list(SPLIT_CASES))
def test_split_k_main_backward_matches_reference(case, one_pass):
    """A program per (chunk, head, K block): the first K block's program alone writes dv,
    dbeta's v part and dL/dT's U0 part; dgam's parts are summed by the WY kernel. Every
    gradient against the reference, and against the unsplit kernel to float32 rounding
    (the split changes only the order of dgam's sum)."""
    blocks = SPLIT_CASES[case][-1]
    base = with_main(KernelOptions().with_launch("chunk_bwd", **blocks), one_pass=one_pass,
                     split_k=0, dp_first=0)
    # dgam summed in K-block parts: dg (its in-chunk cumsum) float32 rounding apart
    check_form(case, with_main(base, split_k=1), base, rounded=("dg",))


def check_form(case, options, other, rounded=()):
    """A form of the main backward (`options`) on SPLIT_CASES[case]: every gradient against
    the reference, and against the form `other` bit for bit, but for the outputs named in
    `rounded`, which may differ by float32 rounding."""
    lengths, H, K, V, C, _ = SPLIT_CASES[case]
    leaves, cu = gdr_inputs(lengths, H, K, V, h0=True)
    assert_gdr_close(leaves, cu, chunk_size=C, options=options)
    got = run_gdr("triton", leaves, cu, chunk_size=C, options=options)
    want = run_gdr("triton", leaves, cu, chunk_size=C, options=other)
    for name, a, b in zip(["o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dh0"],
                          got, want):
        if name in rounded:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
        else:
            assert torch.equal(a, b), name


@pytest.mark.parametrize("split_k", [0, 1], ids=["whole", "split_k"])
@pytest.mark.parametrize("case", ["K64_ragged_C32_one_block", "K256_BK32_C16_eight_blocks"])
def test_dp_first_matches_reference(case, split_k):
    """launch["chunk_bwd_main"]["dp_first"]: dP, its transpose and the value terms (dv, dbeta's
    v part, dL/dT's U0 part) in `chunk_bwd_dp_kernel` first, read by the main kernel's
    programs. Every gradient against the reference, and bit for bit the main kernel computing
    them itself with the same split (the same products in the same order)."""
    blocks = SPLIT_CASES[case][-1]
    base = with_main(KernelOptions().with_launch("chunk_bwd", **blocks), split_k=split_k,
                     dp_first=0)
    check_form(case, with_main(base, dp_first=1), base)


@pytest.mark.parametrize("case, bv", [("K64_ragged_C32", 32), ("K128_V256_C16", 64),
                                      ("K256_C16", 32)])
def test_state_backward_with_p_t_do_first_matches_reference(case, bv):
    """launch["state_bwd"]["du0"] (state_fp32 for float32 inputs): P^T dO computed chunk-parallel
    by p_t_do_kernel into dU, which the chain completes. Every gradient against the reference,
    over whole sequences and over pieces (the split backward), and the chain that computes
    P^T dO itself at the same V blocks: the forward bit for bit, the gradients to float32
    rounding (the same products; whether a dot added to an accumulator rounds like the dot
    then the sum is the backend's choice: bit for bit in earlier CI runs, not with Triton
    3.9.0 and numpy 2.4.6 under the interpreter)."""
    lengths, H, K, V, C = CASES[case]
    leaves, cu = gdr_inputs(lengths, H, K, V, h0=True)
    for split in ("off", "on"):
        base = KernelOptions(state_split=split, state_piece_chunks=1).with_launch(
            "state_fp32", max(K, 128), BV=bv)
        first = base.with_launch("state_fp32", max(K, 128), du0=1)
        assert_gdr_close(leaves, cu, chunk_size=C, options=first)
        got = run_gdr("triton", leaves, cu, chunk_size=C, options=first)
        want = run_gdr("triton", leaves, cu, chunk_size=C, options=base)
        for name, a, b in zip(["o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dh0"],
                              got, want):
            if name in ("o", "final_state"):
                assert torch.equal(a, b), (split, name)
            else:
                err = float((a - b).abs().max() / b.abs().max())
                assert err <= 1e-6, (split, name, err)


@pytest.mark.parametrize("groups", [2, 4])
def test_split_k_and_p_t_do_first_by_head_groups(groups):
    """Both backward forms on the backward by head groups, whose kernels read and write head
    slices of the full tensors (dgam's parts and P^T dO per group), with the l2 norm and the
    recomputed states: the reference's gradients."""
    leaves, cu = gdr_inputs([30, 50], 4, 128, 64, h0=True, raw_qk=True)
    options = with_main(KernelOptions(backward_head_groups=groups, recompute_states=True),
                        split_k=1).with_launch("state_fp32", 128, du0=1)
    assert_gdr_close(leaves, cu, chunk_size=32, l2=True, options=options)
