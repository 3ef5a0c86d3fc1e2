"""The main backward kernel's one-pass form (launch["chunk_bwd_main"]["one_pass"]: its dq,
dW and dk products over V in one loop) and its narrower blocks (launch["chunk_bwd"]) against
the torch reference, interpreted on a CPU: every gradient, ragged segments, one to eight K or
V blocks."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from test_triton_kernels import assert_gdr_close, gdr_inputs  # noqa: E402  (tests/ops)

pytest.importorskip("megatron_mom.ops.gated_delta_rule.triton")
from megatron_mom.ops import KernelOptions  # noqa: E402

CASES = {
    "K64_ragged_C32": ([5, 70, 0, 33], 2, 64, 64, 32),
    "K128_V256_C16": ([20, 13], 1, 128, 256, 16),
    "K256_C16": ([17, 9], 1, 256, 256, 16),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_one_pass_main_backward_matches_reference(case):
    lengths, H, K, V, C = CASES[case]
    leaves, cu = gdr_inputs(lengths, H, K, V, h0=True)
    one_pass = KernelOptions().with_launch("chunk_bwd_main", one_pass=1)
    assert_gdr_close(leaves, cu, chunk_size=C, options=one_pass)


@pytest.mark.parametrize("blocks", [{"BV": 32}, {"BK": 32, "BV": 32}], ids=["BV32", "BK32_BV32"])
def test_narrow_blocks_match_reference(blocks):
    """The builds without the K = 256 table build's spill (docs/performance.md) loop over more
    V (and K) blocks: two to eight here, at K = V = 256 and ragged segments."""
    leaves, cu = gdr_inputs([17, 9], 1, 256, 256, h0=True)
    assert_gdr_close(leaves, cu, chunk_size=16,
                     options=KernelOptions().with_launch("chunk_bwd", **blocks))
