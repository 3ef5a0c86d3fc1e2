"""`conv_gated_delta_rule`: the MoM layer's memory path over packed rows, as one op.

    q = silu(conv(q_tok rows picked by the packing)), k, v = silu(conv(k | v columns of kvba)),
    beta = sigmoid(b), g = -exp(A_log) softplus(a + dt_bias),
    o = gated delta rule(l2norm(q), l2norm(k), v, g, beta) per cu_seqlens segment.

By default it is the composition of the ops it is made of (`short_conv`, `short_conv_split`,
`gated_delta_rule`), each with its own autograd. With `lean_backward` on the Triton backend it
runs as one function that keeps its inputs (the pre-convolution rows) and the last head's
buffers for the backward, which goes one head at a time, that head first: for the others the
convolutions, L2 norms and the recurrence's states are recomputed, and each head's gradients
are taken back through the convolutions before the next head starts (`triton.py`). Same gradients as the composition, less memory, more time.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_mom.ops.common import checker, compute_dtype, resolve_backend
from megatron_mom.ops.gated_delta_rule import gated_delta_rule
from megatron_mom.ops.options import KernelOptions
from megatron_mom.ops.short_conv import short_conv, short_conv_split


def kvba_columns(H: int, K: int, V: int):
    """Column sizes of the packed k | v | b | a rows (the memories' projection output)."""
    return [H * K, H * V, H, H]


def beta_and_decay(b: Tensor, a: Tensor, A_log: Tensor, dt_bias: Tensor) -> Tuple[Tensor, Tensor]:
    """beta = sigmoid(b); g = -exp(A_log) * softplus(a + dt_bias), in float32 (float64 for
    float64 inputs). b, a: [..., H]; A_log, dt_bias: [H]."""
    ct = compute_dtype(b.dtype)
    return torch.sigmoid(b.to(ct)), -A_log.to(ct).exp() * F.softplus(a.to(ct) + dt_bias.to(ct))


def _check(q_tok, kvba, gather, conv_q, conv_k, conv_v, A_log, dt_bias, H):
    need = checker("conv_gated_delta_rule")
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


def conv_gated_delta_rule(
    q_tok: Tensor, kvba: Tensor, gather: Tuple[Tensor, Tensor], cu_seqlens: Tensor,
    conv_q: Tensor, conv_k: Tensor, conv_v: Tensor, A_log: Tensor, dt_bias: Tensor, *,
    num_heads: int, chunk_size: int = 64, lean_backward: bool = False, backend: str = "auto",
    scale: Optional[float] = None, options: Optional[KernelOptions] = None,
) -> Tensor:
    """q_tok [N, H*K] token rows; kvba [L, H*K + H*V + 2H] packed rows (k | v | b | a);
    gather = (x_row [L], slot_row [N, S]): the token of each packed row and its inverse
    (packing.PackedLayout.token, .slot_row); cu_seqlens [segments + 1] over the L rows;
    conv_q, conv_k [H*K, W], conv_v [H*V, W]; A_log, dt_bias [H]. Returns o [L, H, V] in
    kvba's dtype. `options`: how the recurrence's Triton kernels run (`KernelOptions`)."""
    H = num_heads
    _check(q_tok, kvba, gather, conv_q, conv_k, conv_v, A_log, dt_bias, H)
    K, V = conv_q.shape[0] // H, conv_v.shape[0] // H
    L = kvba.shape[0]
    if scale is None:
        scale = K ** -0.5
    if lean_backward and resolve_backend("conv_gated_delta_rule", backend,
                                         kvba.device.type == "cuda") == "triton":
        from megatron_mom.ops.conv_gated_delta_rule.triton import lean_conv_gated_delta_rule
        return lean_conv_gated_delta_rule(q_tok, kvba, gather, cu_seqlens, conv_q, conv_k, conv_v,
                                          A_log, dt_bias, H=H, chunk_size=chunk_size, scale=scale,
                                          options=options)
    q, _ = short_conv(q_tok[None], conv_q, cu_seqlens=cu_seqlens, activation="silu",
                      gather=gather, backend=backend)
    k, v, b, a = short_conv_split(kvba[None], [conv_k, conv_v, None, None], kvba_columns(H, K, V),
                                  cu_seqlens=cu_seqlens, activation="silu", backend=backend)
    beta, g = beta_and_decay(b, a, A_log, dt_bias)
    o, _ = gated_delta_rule(q.view(1, L, H, K), k.view(1, L, H, K), v.view(1, L, H, V),
                            g.view(1, L, H), beta.view(1, L, H), cu_seqlens=cu_seqlens,
                            use_qk_l2norm=True, chunk_size=chunk_size, backend=backend,
                            scale=scale, options=options)
    return o.view(L, H, V)


__all__ = ["conv_gated_delta_rule", "beta_and_decay", "kvba_columns"]
