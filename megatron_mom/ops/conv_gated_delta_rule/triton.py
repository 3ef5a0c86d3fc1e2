"""The lean form of `conv_gated_delta_rule`: one autograd function over the Triton kernels of
`short_conv`, `l2norm` and `gated_delta_rule` that keeps only its inputs.

Forward: convolutions -> L2 norms -> chunked recurrence (all heads at once), keeping nothing
it makes. Backward, one head at a time: rerun that head's convolutions, L2 norms, `prepare` and
state kernels; the recurrence's backward (`_backward_heads`, which reads the full dO and writes
the full dbeta and dg in place); then that head's convolution backward into its columns of the
one d(kvba) and d(q_tok). So at most one head's q, k, v, states and gradients exist at a time,
and none of the normalised q, k, v are kept between forward and backward (the composition keeps
them all, 3 x L x H x K values). The decay and beta gradients go through `beta_and_decay`
once for all heads at the end.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor

from megatron_mom.ops.conv_gated_delta_rule import beta_and_decay
from megatron_mom.ops.gated_delta_rule import triton as gdr
from megatron_mom.ops.l2norm.triton import l2norm_fwd
from megatron_mom.ops.mix.reference import sum_over_slots
from megatron_mom.ops.short_conv import triton as conv
from megatron_mom.ops.utils import as_int32


def _split_kvba(kvba: Tensor, H: int, K: int, V: int):
    """Column views k [L, H*K], v [L, H*V], b [L, H], a [L, H] of the packed rows."""
    return kvba.split([H * K, H * V, H, H], dim=1)


class _LeanConvGatedDeltaRule(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q_tok, kvba, conv_q, conv_k, conv_v, A_log, dt_bias, x_row, slot_row, cu,
                H, chunk_size, scale):
        L = kvba.shape[0]
        K, V = conv_q.shape[0] // H, conv_v.shape[0] // H
        N = cu.numel() - 1
        k_in, v_in, b, a = _split_kvba(kvba, H, K, V)
        q = conv._conv_forward(q_tok, x_row, conv_q, cu, N, None, True)           # [L, H*K]
        q3, _ = l2norm_fwd(q.view(L, H, K))
        del q
        k = conv._conv_forward(k_in, None, conv_k, cu, N, None, True)
        k3, _ = l2norm_fwd(k.view(L, H, K))
        del k
        v3 = conv._conv_forward(v_in, None, conv_v, cu, N, None, True).view(L, H, V)
        beta, g = beta_and_decay(b, a, A_log, dt_bias)                             # [L, H] f32
        P = gdr._Packed(k3.view(1, L, H, K), v3.view(1, L, H, V), cu, chunk_size)
        gam, w, u0, _, p_mat = gdr._prepare(P, q3, k3, v3, g, beta, scale)
        o, _, _, _ = gdr._state_forward(P, q3, k3, w, u0, gam, p_mat, None, scale, store_o=True,
                                        store_states=False, store_final=False)
        ctx.save_for_backward(q_tok, kvba, conv_q, conv_k, conv_v, A_log, dt_bias, x_row,
                              slot_row, cu)
        ctx.meta = (H, K, V, chunk_size, scale)
        return o                                                                   # [L, H, V]

    @staticmethod
    def backward(ctx, d_o):
        q_tok, kvba, conv_q, conv_k, conv_v, A_log, dt_bias, x_row, slot_row, cu = ctx.saved_tensors
        H, K, V, chunk_size, scale = ctx.meta
        L, N = kvba.shape[0], cu.numel() - 1
        dev, f32 = kvba.device, torch.float32
        k_in, v_in, b, a = _split_kvba(kvba, H, K, V)
        # beta and g with their small graph ([L, H] float32), for their gradients at the end.
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (b, a, A_log, dt_bias)]
            beta_g = beta_and_decay(*leaves)
        beta, g = (t.detach() for t in beta_g)
        do3 = d_o.reshape(L, H, V).to(kvba.dtype).contiguous()
        # Shapes of one head (meta tensors: _Packed reads only shapes when cu is given).
        P = gdr._Packed(torch.empty(1, L, 1, K, device="meta"),
                        torch.empty(1, L, 1, V, device="meta"), cu, chunk_size)
        dbeta = torch.empty(L, H, dtype=f32, device=dev)
        dg = torch.empty(L, H, dtype=f32, device=dev)
        d_kvba = torch.empty_like(kvba)
        dk_in, dv_in, db, da = _split_kvba(d_kvba, H, K, V)
        d_qtok = torch.empty(q_tok.shape, dtype=q_tok.dtype, device=dev)
        dw_q, dw_k, dw_v = (torch.empty_like(w) for w in (conv_q, conv_k, conv_v))
        opts = (scale, True, False, kvba.dtype)
        for j in range(H):
            ck, cv = slice(j * K, (j + 1) * K), slice(j * V, (j + 1) * V)
            q3, q_rstd = l2norm_fwd(
                conv._conv_forward(q_tok[:, ck], x_row, conv_q[ck], cu, N, None, True).view(L, 1, K))
            k3, k_rstd = l2norm_fwd(
                conv._conv_forward(k_in[:, ck], None, conv_k[ck], cu, N, None, True).view(L, 1, K))
            v3 = conv._conv_forward(v_in[:, cv], None, conv_v[cv], cu, N, None, True).view(L, 1, V)
            own = {"dbeta": dbeta[:, j:j + 1], "dg": dg[:, j:j + 1]}

            def out(name):  # this head's dq, dk, dv: made when first written (peak memory)
                if name not in own:
                    own[name] = torch.empty(L, 1, V if name == "dv" else K, dtype=kvba.dtype,
                                            device=dev)
                return own[name]

            inputs = (q3, k3, v3, g[:, j:j + 1], beta[:, j:j + 1], do3[:, j:j + 1], None, None,
                      q_rstd.view(L, 1), k_rstd.view(L, 1))
            gdr._backward_heads(P, inputs, None, opts, out)
            del q3, k3, v3, inputs
            d_rows = torch.empty(L, K, dtype=q_tok.dtype, device=dev)             # per packed row
            dw_q[ck] = conv._conv_backward(q_tok[:, ck], x_row, conv_q[ck], None,
                                           own["dq"].view(L, K), d_rows, cu, N, True, False)[0]
            d_qtok[:, ck] = sum_over_slots(d_rows, slot_row)
            del d_rows
            dw_k[ck] = conv._conv_backward(k_in[:, ck], None, conv_k[ck], None, own["dk"].view(L, K),
                                           dk_in[:, ck], cu, N, True, False)[0]
            dw_v[cv] = conv._conv_backward(v_in[:, cv], None, conv_v[cv], None, own["dv"].view(L, V),
                                           dv_in[:, cv], cu, N, True, False)[0]
            del own
        d_b, d_a, d_A, d_dt = torch.autograd.grad(beta_g, leaves, (dbeta, dg))
        db.copy_(d_b)
        da.copy_(d_a)
        return (d_qtok, d_kvba, dw_q, dw_k, dw_v, d_A.to(A_log.dtype), d_dt.to(dt_bias.dtype),
                None, None, None, None, None, None)


def lean_conv_gated_delta_rule(q_tok, kvba, gather, cu_seqlens, conv_q, conv_k, conv_v, A_log,
                               dt_bias, *, H: int, chunk_size: int, scale: float) -> Tensor:
    """Shapes checked by the dispatcher; returns o [L, H, V] in kvba's dtype."""
    K, V = conv_q.shape[0] // H, conv_v.shape[0] // H
    conv._check(kvba, [conv_q, conv_k, conv_v], cu_seqlens, "silu")
    if q_tok.dtype != kvba.dtype:
        raise ValueError(f"conv_gated_delta_rule: q_tok ({q_tok.dtype}) and kvba ({kvba.dtype}) "
                         f"dtypes differ")
    gdr.check_dims(K, V, chunk_size, "conv_gated_delta_rule")
    chunk_size = gdr.effective_chunk_size(int(chunk_size), kvba.dtype, K)
    x_row, slot_row = (t.contiguous() for t in gather)
    return _LeanConvGatedDeltaRule.apply(
        q_tok if q_tok.stride(1) == 1 else q_tok.contiguous(), kvba.contiguous(),
        conv_q.contiguous(), conv_k.contiguous(), conv_v.contiguous(), A_log, dt_bias, x_row,
        slot_row, as_int32(cu_seqlens), H, chunk_size, float(scale))


__all__ = ["lean_conv_gated_delta_rule"]
