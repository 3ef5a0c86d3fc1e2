"""How the Triton kernels run: a frozen options object passed with each call, and the tuned
launch table it reads by default.

`KernelOptions` changes speed, memory and the rounding of intermediates, never the math: every
setting gives the reference's results within the tolerances of tests/ops/test_triton_kernels.py.
Nothing here is process-wide: two calls with different options in one process do not affect
each other.

    from megatron_mom.ops import KernelOptions, gated_delta_rule
    lean = KernelOptions(recompute_states=True, backward_head_groups=4)
    o, _ = gated_delta_rule(q, k, v, g, beta, backend="triton", options=lean)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Optional

from megatron_mom.ops.common.checks import checker

PRECISIONS = ("tf32", "tf32x3", "ieee")
T_DTYPES = ("input", "float32")
STATE_SPLITS = ("auto", "on", "off")


def _frozen(table: Mapping) -> Mapping:
    """A read-only copy of a nested mapping."""
    return MappingProxyType({key: _frozen(val) if isinstance(val, Mapping) else val
                             for key, val in table.items()})


# Launch settings of the gated delta rule's kernels, timed in docs/performance.md. The
# sequential state kernels are keyed by the largest K they serve. A build that needs more
# shared memory than a block may have runs with one stage (ops.common.launch);
# benchmarks/kernel_resources.py prints what each build uses.
TUNED_LAUNCH: Mapping[str, Any] = _frozen({
    "prepare": {"BK": 64, "BV": 64, "num_warps": 4, "num_stages": 1},
    # The forward chain where the states are stored and o comes after it (training). K = 256:
    # without q and P in the loop three stages fit (226 KB) and prefetch each chunk's k and W.
    # w_from_t (this entry, "state_fwd_o", "state_bwd", "state_fp32"): the chain reads T
    # ([C, C]) and beta in place of W ([C, K]): W S = T (beta e^gam (k S)) and W^T dU =
    # k^T (beta e^gam (T^T dU)), with one load of k a step serving both of its k products;
    # fewer bytes a step, one more dot on the chain (docs/performance.md).
    "state_fwd": {128: {"BV": 64, "num_warps": 8, "num_stages": 2, "w_from_t": 0},
                  256: {"BV": 32, "num_warps": 4, "num_stages": 3, "w_from_t": 0}},
    # The chain computing o itself (no states stored: inference, recompute_states' forward).
    "state_fwd_o": {128: {"BV": 64, "num_warps": 8, "num_stages": 2, "w_from_t": 0},
                    256: {"BV": 16, "num_warps": 4, "num_stages": 2, "w_from_t": 0}},
    # o from the stored states after the chain when K >= min_k; below it the chain computes o
    # while it stores the states ("state_fwd_o" settings).
    "chunk_out": {"BK": 64, "BV": 64, "num_warps": 4, "num_stages": 2, "min_k": 0},
    # du0: P^T dO computed chunk-parallel first ("p_t_do") and read by the chain instead of
    # P. The chain waits on its per-step q, k and W loads, which every V block re-reads; the
    # shared memory P no longer takes lets a two-stage BV 32 build fit at K = 256: half the
    # programs re-reading them. K = 128 keeps P in the chain (du0 not timed there).
    "state_bwd": {128: {"BV": 64, "num_warps": 8, "num_stages": 2, "du0": 0, "w_from_t": 0},
                  256: {"BV": 32, "num_warps": 4, "num_stages": 2, "du0": 1, "w_from_t": 0}},
    "p_t_do": {"BV": 64, "num_warps": 4, "num_stages": 1},
    # float32 operands take twice the registers and shared memory (and K > 128 runs 16-token
    # chunks: gated_delta_rule.triton.FP32_WIDE_CHUNK). du0: the backward's, as in state_bwd.
    "state_fp32": {128: {"BV": 32, "num_warps": 8, "num_stages": 1, "du0": 0, "w_from_t": 0},
                   256: {"BV": 32, "num_warps": 8, "num_stages": 2, "du0": 0, "w_from_t": 0}},
    "chunk_bwd": {"BK": 64, "BV": 64},
    # 4 warps: two programs share an SM (benchmarks/kernel_resources.py --dense lists what
    # each build uses). one_pass: its dq, dW and dk products over V in one loop (three
    # accumulators) instead of two (h read twice). split_k: a program per (chunk, head, K
    # block) instead of per (chunk, head): each reads its blocks of h and dh once and the
    # chunk's sibling programs, adjacent in launch order, share dO, dU and U through L2, where
    # one program per chunk re-reads those per K block. dp_first: dP (dO U^T, over all of V)
    # and the value terms in a kernel of their own first, one program per (chunk, head), which
    # the split's K-block programs read instead of each computing dP again (its num_warps
    # and num_stages are this entry's). Keyed by the largest K served: at K = 256 the split
    # with dP first and two stages is 2-3% faster fwd+bwd; at K = 128 every split form was
    # slower (docs/performance.md, 2026-12-07 evening).
    "chunk_bwd_main": {128: {"num_warps": 4, "num_stages": 1, "one_pass": 0, "split_k": 0,
                             "dp_first": 0},
                       256: {"num_warps": 4, "num_stages": 2, "one_pass": 0, "split_k": 1,
                             "dp_first": 1}},
    "chunk_bwd_wy": {"num_warps": 4, "num_stages": 1},
    # The sequential state kernels' programs start longest sequence first (1) or in order
    # (0). A launch's programs start in index order, so a long chain started last is its
    # tail; at MoM's packed segments the shared memory's chain is twice the others'. The
    # order changes no result.
    "state_order": {"longest_first": 1},
    # Chunk-parallel state passing, "auto" (gated_delta_rule.triton.split_pieces): a cost
    # model in chunk steps. A launch of n programs takes ceil(n / slots) waves of its chain;
    # `slots` is how many state-kernel programs the GPU runs at once at full step rate (132
    # SMs x 2 here), `scan_step` the cost of one scan step in chunk steps; split when the
    # model predicts at least `gain` x. The split backward pays at K <= `backward_max_k` only:
    # each piece's transfer is a [K, K + V] product, and at K = 256 it runs on few,
    # register-heavy programs (bench_state_split.py; docs/performance.md has the timings).
    "state_split": {"slots": 264, "scan_step": 1.0, "gain": 1.25, "backward_max_k": 128},
    # The pass that combines the pieces' transfers in order (A_p [K, BK] tiles times the
    # state's [BK, BV] tiles, fp32); its per-piece passes take the state kernels' settings.
    "state_scan": {"BK": 32, "BV": 32, "num_warps": 4, "num_stages": 1},
})


@dataclass(frozen=True)
class KernelOptions:
    """Execution choices of the Triton kernels, for one call.

    precision:            `tl.dot` input precision for float32 operands: "tf32", "tf32x3" or
                          "ieee".
    t_dtype:              storage of the chunk solve T between the kernels: "input" (the
                          16-bit inputs' dtype; the backward upcasts it) or "float32".
    dk_partial_fp32:      the main backward kernel's part of dk in a float32 buffer; off, it
                          goes into dk itself when dk is bfloat16 (one more rounding of a
                          partial sum; float16 keeps float32 for range).
    recompute_states:     the forward keeps only its inputs and the backward reruns the forward
                          kernels first (no per-chunk states, U or W between the two).
    backward_head_groups: the backward runs over this many groups of heads one after another
                          (the largest divisor of H not above it): its per-chunk buffers take
                          1/groups of the memory (the MoM layer's memory path then runs as the
                          composition of its ops, see conv_gated_delta_rule).
    side_streams:         on CUDA, sequential kernels run beside independent work on side
                          CUDA streams; off: one stream.
    state_split:          the sequential state kernels over pieces of `state_piece_chunks`
                          chunks, computed in parallel and then combined ("on"), over whole
                          sequences ("off"), or by a cost model on the launch's shapes
                          ("auto": few programs, long chains; launch["state_split"]).
                          The same math, other rounding (docs/kernels.md).
    state_piece_chunks:   chunks per piece of the split state kernels.
    launch:               launch settings per kernel (default the tuned `TUNED_LAUNCH`; see
                          `with_launch`).
    """

    precision: str = "tf32"
    t_dtype: str = "input"
    dk_partial_fp32: bool = False
    recompute_states: bool = False
    backward_head_groups: int = 1
    side_streams: bool = True
    state_split: str = "auto"
    state_piece_chunks: int = 32
    launch: Mapping[str, Any] = field(default_factory=lambda: TUNED_LAUNCH, hash=False, repr=False)

    def __post_init__(self):
        need = checker("KernelOptions")

        need(self.precision in PRECISIONS,
             f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        need(self.t_dtype in T_DTYPES, f"t_dtype must be one of {T_DTYPES}, got {self.t_dtype!r}")
        for name in ("dk_partial_fp32", "recompute_states", "side_streams"):
            need(isinstance(getattr(self, name), bool),
                 f"{name} must be True or False, got {getattr(self, name)!r}")
        need(self.state_split in STATE_SPLITS,
             f"state_split must be one of {STATE_SPLITS}, got {self.state_split!r}")
        pieces = self.state_piece_chunks
        need(isinstance(pieces, int) and not isinstance(pieces, bool) and pieces >= 1,
             f"state_piece_chunks must be an integer >= 1, got {pieces!r}")
        groups = self.backward_head_groups
        need(isinstance(groups, int) and not isinstance(groups, bool) and groups >= 1,
             f"backward_head_groups must be an integer >= 1, got {groups!r}")
        need(isinstance(self.launch, Mapping) and set(self.launch) == set(TUNED_LAUNCH),
             f"launch must map every kernel of TUNED_LAUNCH ({', '.join(TUNED_LAUNCH)}); "
             f"build one with with_launch()")
        object.__setattr__(self, "launch", _frozen(self.launch))

    def replace(self, **changes) -> "KernelOptions":
        return dataclasses.replace(self, **changes)

    def entry(self, kernel: str, K: int) -> dict:
        """The launch settings `kernel` runs with at head size K: of an entry keyed by K
        bounds, the one of the least bound >= K."""
        by_k = self.launch[kernel]
        return dict(by_k[min(bound for bound in by_k if bound >= K)])

    def with_launch(self, kernel: str, bound: Optional[int] = None, **settings) -> "KernelOptions":
        """These options with `settings` changed in one launch entry (`bound`: the K bound of a
        state kernel's entry), e.g. `with_launch("state_fwd", 256, BV=16)`."""
        if kernel not in self.launch:
            raise ValueError(f"KernelOptions.with_launch: unknown kernel {kernel!r}; use one of "
                             f"{', '.join(self.launch)}")
        table = {key: dict(val) for key, val in self.launch.items()}
        per_k = all(isinstance(b, int) for b in table[kernel])
        if per_k != (bound is not None):
            raise ValueError(f"KernelOptions.with_launch: {kernel!r} " + (
                f"has entries per K bound {sorted(table[kernel])}: name one, e.g. "
                f"with_launch({kernel!r}, {max(table[kernel])}, ...)" if per_k else
                "has one entry for every K: give no bound"))
        if bound is not None and bound not in table[kernel]:
            raise ValueError(f"KernelOptions.with_launch: {kernel!r} has entries for K "
                             f"<= {sorted(table[kernel])}, not {bound!r}")
        entry = table[kernel] if bound is None else table[kernel][bound]
        unknown = sorted(set(settings) - set(entry))
        if unknown:
            raise ValueError(f"KernelOptions.with_launch: {kernel!r} has no setting "
                             f"{', '.join(map(repr, unknown))}; its settings are "
                             f"{', '.join(sorted(entry))}")
        for key, val in settings.items():
            problem = _launch_value_problem(key, val, entry[key])
            if problem:
                raise ValueError(f"KernelOptions.with_launch: {kernel}.{key} {problem}, got "
                                 f"{val!r}")
        if bound is None:
            table[kernel].update(settings)
        else:
            table[kernel][bound] = {**entry, **settings}
        return dataclasses.replace(self, launch=table)


_LAUNCH_FLAGS = ("du0", "one_pass", "split_k", "dp_first", "longest_first")
_LAUNCH_POWERS_OF_TWO = {"BK": 16, "BV": 16, "num_warps": 1}   # and their least values


def _launch_value_problem(key: str, val: Any, tuned: Any) -> Optional[str]:
    """What is wrong with launch setting `key` = `val` (`tuned`: the table's value), or None."""
    is_int = isinstance(val, int) and not isinstance(val, bool)
    if key in _LAUNCH_FLAGS:
        return None if val in (0, 1) and not isinstance(val, float) else "must be 0 or 1"
    if key in _LAUNCH_POWERS_OF_TWO:
        least = _LAUNCH_POWERS_OF_TWO[key]
        ok = is_int and val >= least and val & (val - 1) == 0
        return None if ok else f"must be a power of two >= {least} (Triton's block shapes)"
    if isinstance(tuned, int):
        least = 1 if key in ("num_stages", "slots") else 0
        return None if is_int and val >= least else f"must be an integer >= {least}"
    ok = isinstance(val, (int, float)) and not isinstance(val, bool) and 0 < val < float("inf")
    return None if ok else "must be a positive number"


DEFAULT_OPTIONS = KernelOptions()

__all__ = ["KernelOptions", "DEFAULT_OPTIONS", "TUNED_LAUNCH", "PRECISIONS", "T_DTYPES",
           "STATE_SPLITS"]
