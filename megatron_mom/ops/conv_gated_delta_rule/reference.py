"""The whole memory path token by token in plain PyTorch, float64: the tests' oracle for every
mode of `conv_gated_delta_rule`. Written from the equations, not from the other modes' code:

    per segment, per token t (history: the W-1 inputs before t, from the initial state or zero)
    q_t = silu(sum_i w_q[:, i] window_q[:, i]), likewise k_t and v_t
    q_t, k_t <- x / sqrt(sum x^2 + 1e-6) per head
    beta_t = sigmoid(b_t), g_t = -exp(A_log) softplus(a_t + dt_bias)
    S <- exp(g_t) S;  S <- S + beta_t k_t (v_t - S^T k_t)^T;  o_t = scale S^T q_t
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_mom.ops.conv_gated_delta_rule.state import MemoryState


def conv_gated_delta_rule_reference(
    q_rows: Tensor, kvba: Tensor, cu_seqlens: Tensor, conv_q: Tensor, conv_k: Tensor,
    conv_v: Tensor, A_log: Tensor, dt_bias: Tensor, *, num_heads: int,
    scale: Optional[float] = None, state: Optional[MemoryState] = None,
) -> Tuple[Tensor, MemoryState]:
    """q_rows [L, H*K]: q's input of every packed row (the token rows read through the
    layout's index); kvba [L, H*K + H*V + 2H]; cu_seqlens [N + 1]; state: the N segments'
    initial memories (None: empty). Returns (o [L, H, V], the N final memories), float64."""
    H = num_heads
    HK, HV, W = conv_q.shape[0], conv_v.shape[0], conv_q.shape[1]
    K, V = HK // H, HV // H
    scale = K ** -0.5 if scale is None else scale
    f64 = lambda t: t.detach().to(torch.float64)
    q_rows, kvba, A_log, dt_bias = f64(q_rows), f64(kvba), f64(A_log), f64(dt_bias)
    weights = (f64(conv_q), f64(conv_k), f64(conv_v))
    bounds = [int(c) for c in cu_seqlens.tolist()]
    N = len(bounds) - 1
    if state is None:
        state = MemoryState.zeros(N, H, K, V, W, torch.float64)
    o = torch.zeros(kvba.shape[0], H, V, dtype=torch.float64)
    finals = []
    for n in range(N):
        histories = [f64(state.conv_q[n]), f64(state.conv_k[n]), f64(state.conv_v[n])]
        S = f64(state.recurrent[n]).clone()                                   # [H, K, V]
        for t in range(bounds[n], bounds[n + 1]):
            row = kvba[t]
            inputs = (q_rows[t], row[:HK], row[HK:HK + HV])
            outs = []
            for j in range(3):
                window = torch.cat([histories[j], inputs[j][:, None]], dim=1)  # [C, W]
                outs.append(F.silu((weights[j] * window).sum(1)))
                histories[j] = window[:, 1:]
            q, k, v = outs[0].view(H, K), outs[1].view(H, K), outs[2].view(H, V)
            q = q / (q.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt()
            k = k / (k.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt()
            beta = torch.sigmoid(row[HK + HV:HK + HV + H])
            g = -A_log.exp() * F.softplus(row[HK + HV + H:] + dt_bias)
            for h in range(H):
                S[h] = S[h] * g[h].exp()
                S[h] = S[h] + beta[h] * torch.outer(k[h], v[h] - S[h].T @ k[h])
                o[t, h] = scale * (S[h].T @ q[h])
        finals.append((S, *histories))
    final = MemoryState(*(torch.stack([f[i] for f in finals]) if finals else
                          t.new_zeros(0, *t.shape[1:]).double()
                          for i, t in enumerate(state.tensors())))
    return o, final


__all__ = ["conv_gated_delta_rule_reference"]
