"""The candidate state kernels of benchmarks/state_candidates.py (K-blocked state tiles, o in
its own chunk-parallel kernel) swapped into the Triton gated delta rule: outputs, final
states and every gradient against the torch reference, interpreted on a CPU (float32; K above
128 runs 16-token chunks there, as on the GPU)."""
from __future__ import annotations

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(HERE, "..", "..", "..", "benchmarks")]
from test_triton_kernels import assert_gdr_close, gdr_inputs  # noqa: E402  (tests/ops)

gdr_triton = pytest.importorskip("megatron_mom.ops.gated_delta_rule.triton")
state_candidates = pytest.importorskip("state_candidates")

# (lengths, H, K, V, chunk_size): one, two and four 64-row state tiles, ragged segments
CASES = {
    "K64_ragged_C32": ([5, 70, 0, 33], 2, 64, 64, 32),
    "K128_V64_C64": ([70, 1, 64], 1, 128, 64, 64),
    "K256_C16": ([20, 13], 1, 256, 256, 16),
}


@pytest.fixture(params=["blocked", "blocked_separate_o"])
def candidates(request):
    undo = state_candidates.install(gdr_triton, blocked_fwd=True, blocked_bwd=True,
                                    separate_o=request.param == "blocked_separate_o")
    yield
    undo()


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_candidates_match_reference(candidates, case):
    lengths, H, K, V, C = CASES[case]
    leaves, cu = gdr_inputs(lengths, H, K, V, h0=True)
    assert_gdr_close(leaves, cu, chunk_size=C)
