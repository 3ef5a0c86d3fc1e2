"""`conv_gated_delta_rule`: the MoM layer's memory path over packed rows, as one op.

    q = silu(conv(q_tok rows picked by the packing)), k, v = silu(conv(k | v columns of kvba)),
    beta = sigmoid(b), g = -exp(A_log) softplus(a + dt_bias),
    o = gated delta rule(l2norm(q), l2norm(k), v, g, beta) per segment.

Training, prefill and decoding all run it, in one of three modes:
- "train": every cu_seqlens segment starts empty. On the Triton backend one autograd function
  (`triton.py`): the convolutions with the L2 norm in their kernel, then the recurrence,
  keeping what the composition keeps; with `lean_backward` it keeps its inputs (the
  pre-convolution rows) and the last head's buffers, and its backward goes one head at a time,
  recomputing the others' convolutions, L2 norms and states: same gradients, less memory, more
  time. Elsewhere, and for the recurrence's backward by head groups
  (`KernelOptions.backward_head_groups` > 1), the composition of the ops it is made of
  (`chunk.py`: `short_conv`, `short_conv_split`, `gated_delta_rule`, each with its own
  autograd).
- "prefill" (`chunk.py`): as train, but segment i continues from row i of a `MemoryState`
  (recurrent state and convolution histories), and its final memory is written back there.
- "step" (`step.py`): each packed row is the next token of its own segment (no cu_seqlens),
  whose memory is the matching row of the `MemoryState`, updated in place; static shapes, no
  host reads (CUDA-graph capturable).
Prefill and step are for inference: they write the memories in place and have no backward.
`reference.py` is the token-by-token oracle of all three.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from megatron_mom.ops.common import checker, need_cu_seqlens, resolve_backend
from megatron_mom.ops.conv_gated_delta_rule.chunk import chunk_conv_gated_delta_rule
from megatron_mom.ops.conv_gated_delta_rule.state import (MemoryState, beta_and_decay,
                                                          kvba_columns)
from megatron_mom.ops.conv_gated_delta_rule.step import step_conv_gated_delta_rule
from megatron_mom.ops.options import KernelOptions

MODES = ("train", "prefill", "step")


def _check(q_tok, kvba, gather, cu_seqlens, conv_q, conv_k, conv_v, A_log, dt_bias, H, mode,
           state, lean_backward):
    need = checker("conv_gated_delta_rule")
    need(mode in MODES, f"mode must be one of {MODES}, got {mode!r}")
    need(q_tok.dim() == 2 and kvba.dim() == 2, f"q_tok must be [N, H*K] and kvba [L, C]; got "
         f"{tuple(q_tok.shape)}, {tuple(kvba.shape)}")
    need(conv_q.shape[0] % H == 0 and conv_v.shape[0] % H == 0,
         f"conv weights' rows ({conv_q.shape[0]}, {conv_v.shape[0]}) must be num_heads={H} "
         f"times the head dims")
    HK, HV = conv_q.shape[0], conv_v.shape[0]
    need(conv_k.shape[0] == HK and q_tok.shape[1] == HK,
         f"q_tok {tuple(q_tok.shape)} and conv_k {tuple(conv_k.shape)} must have H*K={HK} rows/columns")
    need(kvba.shape[1] == HK + HV + 2 * H,
         f"kvba has {kvba.shape[1]} columns; k | v | b | a needs {HK + HV + 2 * H}")
    need(A_log.shape == (H,) and dt_bias.shape == (H,),
         f"A_log {tuple(A_log.shape)} and dt_bias {tuple(dt_bias.shape)} must be [{H}]")
    x_row, slot_row = gather
    need(x_row.numel() == kvba.shape[0], f"gather's row index has {x_row.numel()} rows, kvba "
         f"{kvba.shape[0]}")
    need(slot_row.shape[0] == q_tok.shape[0], f"gather's slot_row {tuple(slot_row.shape)} must "
         f"have q_tok's {q_tok.shape[0]} rows")
    if mode == "train":
        need(state is None, "mode='train' starts every segment empty; pass state with "
             "mode='prefill' to continue from it")
    else:
        need(isinstance(state, MemoryState), f"mode={mode!r} reads and writes the segments' "
             f"memories: pass state=MemoryState(...) (MemoryState.zeros for fresh ones), got "
             f"{type(state).__name__}")
        need(not lean_backward, f"lean_backward applies to mode='train' only, got mode={mode!r}")
    if mode == "step":
        need(cu_seqlens is None, "mode='step' makes each packed row its own segment; pass "
             "cu_seqlens=None")
        segments = kvba.shape[0]
    else:
        need(cu_seqlens is not None, f"mode={mode!r} needs cu_seqlens [segments + 1] over "
             f"kvba's rows")
        need_cu_seqlens("conv_gated_delta_rule", cu_seqlens, kvba.shape[0])
        segments = cu_seqlens.numel() - 1
    if state is not None:
        W1 = conv_q.shape[1] - 1
        want = {"recurrent": (segments, H, HK // H, HV // H), "conv_q": (segments, HK, W1),
                "conv_k": (segments, HK, W1), "conv_v": (segments, HV, W1)}
        for name, shape in want.items():
            got = tuple(getattr(state, name).shape)
            need(got == shape, f"state.{name} is {got}; {segments} segments need {shape}")


def _runs_fused(lean_backward: bool, backend: str, device: torch.device,
                options: Optional[KernelOptions]) -> bool:
    """Whether a "train" call with these settings runs the one Triton function (`triton.py`)
    instead of the composition: always with `lean_backward`, else unless the options ask for
    the recurrence's backward by head groups (the composition's form, which keeps every head's
    buffers). Elsewhere than on the Triton backend the composition runs."""
    if resolve_backend("conv_gated_delta_rule", backend, device.type == "cuda") != "triton":
        return False
    return lean_backward or options is None or options.backward_head_groups == 1


def conv_gated_delta_rule(
    q_tok: Tensor, kvba: Tensor, gather: Tuple[Tensor, Tensor], cu_seqlens: Optional[Tensor],
    conv_q: Tensor, conv_k: Tensor, conv_v: Tensor, A_log: Tensor, dt_bias: Tensor, *,
    num_heads: int, chunk_size: int = 64, lean_backward: bool = False, backend: str = "auto",
    scale: Optional[float] = None, options: Optional[KernelOptions] = None,
    mode: str = "train", state: Optional[MemoryState] = None,
) -> Tensor:
    """q_tok [N, H*K] token rows; kvba [L, H*K + H*V + 2H] packed rows (k | v | b | a);
    gather = (x_row [L], slot_row [N, S]): the token of each packed row and its inverse
    (packing.PackedLayout.token, .slot_row); cu_seqlens [segments + 1] over the L rows (None in
    step mode: L segments of one row); conv_q, conv_k [H*K, W], conv_v [H*V, W]; A_log,
    dt_bias [H]. Returns o [L, H, V] in kvba's dtype.
    mode: "train", "prefill" or "step" (module docstring); state: the segments' `MemoryState`
    for prefill and step, read as initial and overwritten with the final memories.
    `options`: how the recurrence's Triton kernels run (`KernelOptions`)."""
    H = num_heads
    _check(q_tok, kvba, gather, cu_seqlens, conv_q, conv_k, conv_v, A_log, dt_bias, H, mode,
           state, lean_backward)
    K = conv_q.shape[0] // H
    if scale is None:
        scale = K ** -0.5
    if mode == "step":
        return step_conv_gated_delta_rule(q_tok, kvba, gather, conv_q, conv_k, conv_v, A_log,
                                          dt_bias, state, H=H, scale=scale, backend=backend)
    if mode == "train" and _runs_fused(lean_backward, backend, kvba.device, options):
        from megatron_mom.ops.conv_gated_delta_rule.triton import triton_conv_gated_delta_rule
        return triton_conv_gated_delta_rule(q_tok, kvba, gather, cu_seqlens, conv_q, conv_k,
                                            conv_v, A_log, dt_bias, H=H, chunk_size=chunk_size,
                                            scale=scale, lean=lean_backward, options=options)
    return chunk_conv_gated_delta_rule(q_tok, kvba, gather, cu_seqlens, conv_q, conv_k, conv_v,
                                       A_log, dt_bias, H=H, chunk_size=chunk_size, scale=scale,
                                       backend=backend, options=options, state=state)


__all__ = ["conv_gated_delta_rule", "MemoryState", "beta_and_decay", "kvba_columns",
           "MODES"]
