"""Train and prefill modes of `conv_gated_delta_rule`: the memory path over packed segments,
composed of the `short_conv` and `gated_delta_rule` ops (each with its own autograd)."""
from __future__ import annotations

import functools
from typing import Optional, Tuple

from torch import Tensor

from megatron_mom.ops.conv_gated_delta_rule.state import (MemoryState, beta_and_decay,
                                                          conv_continuing, kvba_columns)
from megatron_mom.ops.gated_delta_rule import gated_delta_rule
from megatron_mom.ops.options import KernelOptions
from megatron_mom.ops.short_conv import short_conv, short_conv_split


def _convolve(q_tok, kvba, gather, cu_seqlens, conv_q, conv_k, conv_v, H, backend):
    """Fresh segments: q convolved from its token rows through the row index; k and v column
    groups of the packed rows, b and a passed through (one input gradient for all four)."""
    K, V = conv_q.shape[0] // H, conv_v.shape[0] // H
    q, _ = short_conv(q_tok[None], conv_q, cu_seqlens=cu_seqlens, activation="silu",
                      gather=gather, backend=backend)
    k, v, b, a = short_conv_split(kvba[None], [conv_k, conv_v, None, None], kvba_columns(H, K, V),
                                  cu_seqlens=cu_seqlens, activation="silu", backend=backend)
    return q, k, v, b, a


def _convolve_continuing(q_tok, kvba, gather, cu_seqlens, conv_q, conv_k, conv_v, H, backend,
                         state: MemoryState):
    """Segments continuing from `state`'s histories, which then receive each segment's last
    W-1 inputs."""
    K, V = conv_q.shape[0] // H, conv_v.shape[0] // H
    k, v, b, a = kvba.split(kvba_columns(H, K, V), dim=-1)
    conv = functools.partial(conv_continuing, backend=backend, cu_seqlens=cu_seqlens)
    return (conv(q_tok, conv_q, state.conv_q, gather=gather), conv(k, conv_k, state.conv_k),
            conv(v, conv_v, state.conv_v), b, a)


def chunk_conv_gated_delta_rule(
    q_tok: Tensor, kvba: Tensor, gather: Tuple[Tensor, Tensor], cu_seqlens: Tensor,
    conv_q: Tensor, conv_k: Tensor, conv_v: Tensor, A_log: Tensor, dt_bias: Tensor, *, H: int,
    chunk_size: int, scale: float, backend: str, options: Optional[KernelOptions],
    state: Optional[MemoryState] = None,
) -> Tensor:
    """o [L, H, V] of the packed segments (shapes: `conv_gated_delta_rule`). Without `state`
    every segment starts empty (train); with it, segment i starts from row i of `state` and its
    final state is written there (prefill)."""
    L = kvba.shape[0]
    K, V = conv_q.shape[0] // H, conv_v.shape[0] // H
    if state is None:
        q, k, v, b, a = _convolve(q_tok, kvba, gather, cu_seqlens, conv_q, conv_k, conv_v, H,
                                  backend)
    else:
        q, k, v, b, a = _convolve_continuing(q_tok, kvba, gather, cu_seqlens, conv_q, conv_k,
                                             conv_v, H, backend, state)
    beta, g = beta_and_decay(b, a, A_log, dt_bias)
    o, final = gated_delta_rule(
        q.view(1, L, H, K), k.view(1, L, H, K), v.view(1, L, H, V), g.view(1, L, H),
        beta.view(1, L, H), cu_seqlens=cu_seqlens, use_qk_l2norm=True, chunk_size=chunk_size,
        backend=backend, scale=scale, options=options,
        initial_state=None if state is None else state.recurrent,
        output_final_state=state is not None)
    if state is not None:
        state.recurrent.copy_(final)
    return o.view(L, H, V)


__all__ = ["chunk_conv_gated_delta_rule"]
