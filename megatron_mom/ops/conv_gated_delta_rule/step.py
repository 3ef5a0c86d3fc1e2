"""Step mode of `conv_gated_delta_rule`: one new token for each of L segments (a decode step).

Shapes depend only on L, nothing is read on the host and the state is updated in place, so a
step can be captured in a CUDA graph. A fused recurrent step kernel would replace this body."""
from __future__ import annotations

from typing import Tuple

from torch import Tensor

from megatron_mom.ops.conv_gated_delta_rule.state import (MemoryState, beta_and_decay,
                                                          conv_continuing, kvba_columns)
from megatron_mom.ops.gated_delta_rule import gated_delta_rule


def step_conv_gated_delta_rule(
    q_tok: Tensor, kvba: Tensor, gather: Tuple[Tensor, Tensor], conv_q: Tensor, conv_k: Tensor,
    conv_v: Tensor, A_log: Tensor, dt_bias: Tensor, state: MemoryState, *, H: int, scale: float,
    backend: str,
) -> Tensor:
    """Row r of kvba [L, C] (and q_tok's row gather[0][r]) is the next token of segment r, whose
    memory is row r of `state`. Returns o [L, H, V]; `state` receives the new memories."""
    L = kvba.shape[0]
    K, V = conv_q.shape[0] // H, conv_v.shape[0] // H
    k, v, b, a = kvba.split(kvba_columns(H, K, V), dim=-1)
    q = q_tok.index_select(0, gather[0])                                # [L, H*K]

    q = conv_continuing(q, conv_q, state.conv_q, backend=backend)
    k = conv_continuing(k, conv_k, state.conv_k, backend=backend)
    v = conv_continuing(v, conv_v, state.conv_v, backend=backend)
    beta, g = beta_and_decay(b, a, A_log, dt_bias)
    # The token-by-token recurrence: one step is what it computes, with no chunk padding.
    o, final = gated_delta_rule(
        q.view(L, 1, H, K), k.view(L, 1, H, K), v.view(L, 1, H, V), g.view(L, 1, H),
        beta.view(L, 1, H), initial_state=state.recurrent, output_final_state=True,
        use_qk_l2norm=True, scale=scale, backend="recurrent")
    state.recurrent.copy_(final)
    return o.view(L, H, V)


__all__ = ["step_conv_gated_delta_rule"]
