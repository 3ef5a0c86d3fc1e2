"""The Triton form of `conv_gated_delta_rule`'s train mode: one autograd function over the
Triton kernels of `short_conv` (with the L2 norm in its forward kernel) and `gated_delta_rule`
that keeps its inputs and the buffers of one group of heads, the last: all heads (the
default) or one (`lean_backward`).

Forward: convolutions -> L2 norms -> chunked recurrence, for the heads before the last group at
once keeping nothing they make, then for the last group keeping what its backward needs.
Backward, one group at a time, the last first: (except for the last group) rerun that group's
convolutions, L2 norms, `prepare` and state kernels; the recurrence's backward
(`backward_heads`, which reads the full dO and writes the full dbeta and dg in place); then
that group's convolution backward into its columns of the one d(kvba) and d(q_tok). With one
group this is the composition of the ops without the L2 norm's own forward pass and without
the unnormalised q and k rows between them; with one head a group at most one head's q, k, v,
states and gradients exist at a time (the composition keeps them all, 3 x L x H x K values).
beta and the decay (`beta_and_decay`) are one kernel each way, their gradients taken once for
all heads at the end. On CUDA the sequential state kernels run beside independent work on side
streams (`ops.common.beside`): a group's state forward beside its state backward, a group's
convolution backward beside the next group's state kernels, and in the forward the earlier
heads' recurrence beside the last group's.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from megatron_mom.ops.common import Segments, as_int32, beside, checker
from megatron_mom.ops.conv_gated_delta_rule.state import kvba_columns
from megatron_mom.ops.gated_delta_rule import triton as gdr
from megatron_mom.ops.mix import sum_over_slots
from megatron_mom.ops.options import DEFAULT_OPTIONS
from megatron_mom.ops.short_conv import triton as conv


# beta and the decay of every packed row and head in one kernel each way (torch's ops take
# about twenty launches a layer on these [L, H] tensors).
GATE_ROWS = 256


@triton.jit
def _softplus_sigmoid(x):
    """(softplus(x), sigmoid(x)), stable for large |x|."""
    e = tl.exp(-tl.abs(x))
    sig = tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return tl.maximum(x, 0.0) + tl.log(1.0 + e), sig


@triton.jit(do_not_specialize=["L"])
def _gates_fwd_kernel(b, a, A_log, dt_bias, beta, g, L, SROW: tl.constexpr, H: tl.constexpr,
                      BH: tl.constexpr, BR: tl.constexpr):
    """beta = sigmoid(b), g = -exp(A_log) softplus(a + dt_bias): [L, H] float32 from the b and a
    columns of the packed rows (row stride SROW)."""
    rows = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)[:, None]
    heads = tl.arange(0, BH)[None, :]
    mask = (rows < L) & (heads < H)
    b_t = tl.load(b + rows * SROW + heads, mask=mask, other=0.0).to(tl.float32)
    x = (tl.load(a + rows * SROW + heads, mask=mask, other=0.0).to(tl.float32)
         + tl.load(dt_bias + heads, mask=heads < H, other=0.0).to(tl.float32))
    sp, _ = _softplus_sigmoid(x)
    _, beta_t = _softplus_sigmoid(b_t)
    A = tl.exp(tl.load(A_log + heads, mask=heads < H, other=0.0).to(tl.float32))
    tl.store(beta + rows * H + heads, beta_t, mask=mask)
    tl.store(g + rows * H + heads, -A * sp, mask=mask)


@triton.jit(do_not_specialize=["L"])
def _gates_bwd_kernel(b, a, A_log, dt_bias, dbeta, dg, db, da, part, L, SROW: tl.constexpr,
                      SDROW: tl.constexpr, H: tl.constexpr, BH: tl.constexpr, BR: tl.constexpr):
    """db, da (row stride SDROW) from dbeta, dg [L, H] float32, and this program's sums over its
    rows of dA_log and d dt_bias into part [programs, 2, H]."""
    rows = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)[:, None]
    heads = tl.arange(0, BH)[None, :]
    mask = (rows < L) & (heads < H)
    _, beta_t = _softplus_sigmoid(tl.load(b + rows * SROW + heads, mask=mask,
                                          other=0.0).to(tl.float32))
    x = (tl.load(a + rows * SROW + heads, mask=mask, other=0.0).to(tl.float32)
         + tl.load(dt_bias + heads, mask=heads < H, other=0.0).to(tl.float32))
    sp, sig = _softplus_sigmoid(x)
    A = tl.exp(tl.load(A_log + heads, mask=heads < H, other=0.0).to(tl.float32))
    d_beta = tl.load(dbeta + rows * H + heads, mask=mask, other=0.0)
    d_g = tl.load(dg + rows * H + heads, mask=mask, other=0.0)
    d_x = -A * sig * d_g
    tl.store(db + rows * SDROW + heads, (d_beta * beta_t * (1.0 - beta_t)).to(db.dtype.element_ty),
             mask=mask)
    tl.store(da + rows * SDROW + heads, d_x.to(da.dtype.element_ty), mask=mask)
    out = part + tl.program_id(0) * 2 * H + tl.arange(0, BH)
    tl.store(out, tl.sum(-A * sp * d_g, axis=0), mask=tl.arange(0, BH) < H)
    tl.store(out + H, tl.sum(d_x, axis=0), mask=tl.arange(0, BH) < H)


def _gates_forward(b: Tensor, a: Tensor, A_log: Tensor, dt_bias: Tensor):
    """`beta_and_decay` of the packed rows' b, a columns [L, H] (a row stride, unit column
    stride): (beta, g) [L, H] float32."""
    L, H = b.shape
    beta, g = (torch.empty(L, H, dtype=torch.float32, device=b.device) for _ in range(2))
    if L:
        _gates_fwd_kernel[(triton.cdiv(L, GATE_ROWS),)](
            b, a, A_log, dt_bias, beta, g, L, SROW=b.stride(0), H=H,
            BH=triton.next_power_of_2(H), BR=GATE_ROWS)
    return beta, g


def _gates_backward(b, a, A_log, dt_bias, dbeta, dg, db, da):
    """Writes db, da (columns of the packed rows' gradient) from dbeta, dg [L, H] float32;
    returns (dA_log, d dt_bias) in their parameters' dtypes."""
    L, H = b.shape
    programs = triton.cdiv(L, GATE_ROWS)
    part = torch.empty(programs, 2, H, dtype=torch.float32, device=b.device)   # [P, 2, H]
    if L:
        _gates_bwd_kernel[(programs,)](
            b, a, A_log, dt_bias, dbeta, dg, db, da, part, L, SROW=b.stride(0),
            SDROW=db.stride(0), H=H, BH=triton.next_power_of_2(H), BR=GATE_ROWS)
    d_A, d_dt = part.sum(0) if L else torch.zeros(2, H, device=b.device)
    return d_A.to(A_log.dtype), d_dt.to(dt_bias.dtype)


def _saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks (`torch.autograd.graph.saved_tensors_hooks`: activation
    checkpointing, offloading) would see what the forward saves. torch has no public query;
    without its private one, answer yes (saving every buffer is always correct)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return True if top is None else top(False) is not None


def _split_kvba(kvba: Tensor, H: int, K: int, V: int):
    """Column views k [L, H*K], v [L, H*V], b [L, H], a [L, H] of the packed rows."""
    return kvba.split(kvba_columns(H, K, V), dim=1)


def _normalised(q_tok, x_row, k_in, v_in, conv_q, conv_k, conv_v, cu, heads: slice, K: int,
                V: int):
    """Heads `heads`' q, k (L2-normalised, with their rstd) [L, h, K] and v [L, h, V] from the
    pre-convolution rows (column slices read in place)."""
    N, L = cu.numel() - 1, k_in.shape[0]
    ck, cv = slice(heads.start * K, heads.stop * K), slice(heads.start * V, heads.stop * V)
    h = heads.stop - heads.start
    q3, q_rstd = conv.conv_l2norm_forward(q_tok[:, ck], x_row, conv_q[ck], cu, N, K)
    k3, k_rstd = conv.conv_l2norm_forward(k_in[:, ck], None, conv_k[ck], cu, N, K)
    v3 = conv.conv_forward(v_in[:, cv], None, conv_v[cv], cu, N, None, True)
    return q3.view(L, h, K), q_rstd, k3.view(L, h, K), k_rstd, v3.view(L, h, V)


def _conv_backward_heads(inputs, weights, grads, d_inputs, dw_parts, d_rows, x_row, slot_row,
                         cu):
    """A group of heads' q, k, v convolution backward: from its gradients [L, h, D] into its
    columns of the inputs' gradients and of the dw partial sums (q's through d_rows [L, h*D],
    per packed row, then summed over each token's slots)."""
    (q_in, k_in, v_in), (w_q, w_k, w_v), (dq, dk, dv) = inputs, weights, grads
    (d_q, d_k, d_v), (part_q, part_k, part_v) = d_inputs, dw_parts
    L, N = dq.shape[0], cu.numel() - 1
    conv.conv_backward(q_in, x_row, w_q, None, dq.view(L, -1), d_rows, cu, N, True, False, part_q)
    sum_over_slots(d_rows, slot_row, out=d_q, backend="triton")
    conv.conv_backward(k_in, None, w_k, None, dk.view(L, -1), d_k, cu, N, True, False, part_k)
    conv.conv_backward(v_in, None, w_v, None, dv.view(L, -1), d_v, cu, N, True, False, part_v)


class _ConvGatedDeltaRule(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q_tok, kvba, conv_q, conv_k, conv_v, A_log, dt_bias, x_row, slot_row, cu,
                H, G, chunk_size, scale, options):
        L = kvba.shape[0]
        K, V = conv_q.shape[0] // H, conv_v.shape[0] // H
        k_in, v_in, b, a = _split_kvba(kvba, H, K, V)
        beta, g = _gates_forward(b, a, A_log, dt_bias)                             # [L, H] f32
        weights = (conv_q, conv_k, conv_v)
        o = torch.empty(L, H, V, dtype=kvba.dtype, device=kvba.device)
        # The heads before the last group keep nothing; the last group keeps what its backward
        # needs (normalised q, k, v, and unless options.recompute_states the recurrence's
        # per-chunk states, W, U, T, P), since the backward starts with it and frees them before
        # the next group: no other group's buffers exist then, so keeping them adds nothing to
        # the backward's peak and saves one group's recompute.
        rest, last = slice(0, H - G), slice(H - G, H)
        P = Segments(L, G, K, V, cu, chunk_size)                                  # one group
        rest_bufs, join = (), lambda: None
        if H > G:
            q3, _, k3, _, v3 = _normalised(q_tok, x_row, k_in, v_in, *weights, cu, rest, K, V)
            Pr = P.with_heads(H - G)
            gam, w, u0, t_mat, p_mat = gdr.prepare(Pr, q3, k3, v3, g[:, rest], beta[:, rest],
                                                   scale, options)
            rest_bufs = (q3, k3, w, u0, gam, t_mat, p_mat)
            # Its recurrence (sequential over chunks, too few programs to fill the GPU) runs
            # beside the last group's convolutions, `prepare` and recurrence.
            with beside(kvba.device, 0, options.side_streams) as join:
                gdr.state_forward(Pr, q3, k3, w, u0, gam, p_mat, None, scale, store_o=True,
                                  store_states=False, store_final=False, o=o[:, rest],
                                  t_beta=(t_mat, beta[:, rest]), options=options)
            del q3, k3, v3, gam, w, u0, t_mat, p_mat
        q3, q_rstd, k3, k_rstd, v3 = _normalised(q_tok, x_row, k_in, v_in, *weights, cu, last, K, V)
        gam, w, u0, t_mat, p_mat = gdr.prepare(P, q3, k3, v3, g[:, last], beta[:, last], scale,
                                               options)
        keep = not options.recompute_states
        _, h, u, _ = gdr.state_forward(P, q3, k3, w, u0, gam, p_mat, None, scale, store_o=True,
                                       store_states=keep, store_final=False, o=o[:, last],
                                       t_beta=(t_mat, beta[:, last]), options=options)
        states = (gam, w, t_mat, p_mat, h, u) if keep else None
        join()
        del rest_bufs
        inputs = (q_tok, kvba, conv_q, conv_k, conv_v, A_log, dt_bias, x_row, slot_row, cu)
        kept = ((q3, k3, v3, q_rstd, k_rstd), states)
        if _saved_tensor_hooks_active():
            # Activation checkpointing and offloading act through these hooks and see only
            # saved tensors: an attribute would stay in memory from here to the backward
            # under Megatron's selective recompute (its whole point being not to).
            ctx.save_for_backward(*inputs, *kept[0], *(states or ()))
            ctx.kept = None
        else:
            # An attribute, not a saved tensor: the backward drops it after the last group,
            # which a saved tensor would outlive (its storage is released only when the
            # backward returns). A second backward through the graph (retain_graph)
            # recomputes that group instead.
            ctx.save_for_backward(*inputs)
            ctx.kept = kept
        ctx.meta = (H, G, K, V, chunk_size, scale)
        ctx.options = options
        return o                                                                   # [L, H, V]

    @staticmethod
    def backward(ctx, d_o):
        (q_tok, kvba, conv_q, conv_k, conv_v, A_log, dt_bias, x_row, slot_row, cu,
         *saved_kept) = ctx.saved_tensors
        H, G, K, V, chunk_size, scale = ctx.meta
        L, N = kvba.shape[0], cu.numel() - 1
        dev, f32 = kvba.device, torch.float32
        k_in, v_in, b, a = _split_kvba(kvba, H, K, V)
        beta, g = _gates_forward(b, a, A_log, dt_bias)                             # [L, H] f32
        do3 = d_o.reshape(L, H, V).to(kvba.dtype).contiguous()
        P = Segments(L, G, K, V, cu, chunk_size)                                  # one group
        dbeta = torch.empty(L, H, dtype=f32, device=dev)
        dg = torch.empty(L, H, dtype=f32, device=dev)
        d_kvba = torch.empty_like(kvba)
        dk_in, dv_in, db, da = _split_kvba(d_kvba, H, K, V)
        d_qtok = torch.empty(q_tok.shape, dtype=q_tok.dtype, device=dev)
        # Each group's convolution backward writes its columns of one dw partial-sum buffer
        # per weight, summed once at the end (not three reductions and copies per group).
        rows = conv.conv_backward_programs(L, conv_q.shape[1])
        dw_parts = [torch.empty(rows, w.shape[0], w.shape[1], dtype=f32, device=dev)
                    for w in (conv_q, conv_k, conv_v)]                       # [rows, H*K, W]
        meta = (scale, True, False, kvba.dtype)
        kept, ctx.kept = ctx.kept, None
        if saved_kept:
            kept = (tuple(saved_kept[:5]), tuple(saved_kept[5:]) or None)
        del saved_kept
        # A group's convolution backward (memory-bound, many programs) runs beside the next
        # group's sequential state kernels (latency-bound, few programs). Its gradients then
        # outlive its own backward by those kernels, which stays under the peak of a group's
        # chunk backward (the recomputed and gradient states, 2 x 98.5 MiB a head at the paper
        # shape).
        pending = []
        for j in reversed(range(H // G)):        # the last group first: its buffers are kept
            heads = slice(j * G, (j + 1) * G)
            if kept is not None:
                (q3, k3, v3, q_rstd, k_rstd), states = kept
                kept = None
            else:
                q3, q_rstd, k3, k_rstd, v3 = _normalised(q_tok, x_row, k_in, v_in, conv_q, conv_k,
                                                         conv_v, cu, heads, K, V)
                states = None
            own = {"dbeta": dbeta[:, heads], "dg": dg[:, heads]}

            def out(name):  # this group's dq, dk, dv: made when first written (peak memory)
                if name not in own:
                    own[name] = torch.empty(L, G, V if name == "dv" else K, dtype=kvba.dtype,
                                            device=dev)
                return own[name]

            inputs = (q3, k3, v3, g[:, heads], beta[:, heads], do3[:, heads], None, None,
                      q_rstd.view(L, G), k_rstd.view(L, G))
            gdr.backward_heads(P, inputs, states, meta, out, pending, options=ctx.options)
            del q3, k3, v3, inputs, states
            ck, cv = slice(j * G * K, (j + 1) * G * K), slice(j * G * V, (j + 1) * G * V)
            pending.append(functools.partial(
                _conv_backward_heads, (q_tok[:, ck], k_in[:, ck], v_in[:, cv]),
                (conv_q[ck], conv_k[ck], conv_v[cv]), (own["dq"], own["dk"], own["dv"]),
                (d_qtok[:, ck], dk_in[:, ck], dv_in[:, cv]),
                tuple(p[:, c] for p, c in zip(dw_parts, (ck, ck, cv))),
                torch.empty(L, G * K, dtype=q_tok.dtype, device=dev), x_row, slot_row, cu))
            del own
        while pending:                                  # the last group's, on this stream
            pending.pop()()
        dw_q, dw_k, dw_v = (p.sum(0).to(w.dtype) for p, w in zip(dw_parts, (conv_q, conv_k,
                                                                          conv_v)))
        d_A, d_dt = _gates_backward(b, a, A_log, dt_bias, dbeta, dg, db, da)
        return (d_qtok, d_kvba, dw_q, dw_k, dw_v, d_A, d_dt,
                None, None, None, None, None, None, None, None)


def triton_conv_gated_delta_rule(q_tok, kvba, gather, cu_seqlens, conv_q, conv_k, conv_v, A_log,
                                 dt_bias, *, H: int, chunk_size: int, scale: float, lean: bool,
                                 options=None) -> Tensor:
    """Shapes checked by the dispatcher; returns o [L, H, V] in kvba's dtype. `lean`: the
    backward goes one head at a time, rerunning all but the last head's forward; else it keeps
    every head's buffers as the composition does. `options` (KernelOptions): precision,
    storage, side streams and launch settings of the recurrence's kernels (its
    backward_head_groups aside: the groups are one head or all of them, as `lean` says)."""
    K, V = conv_q.shape[0] // H, conv_v.shape[0] // H
    conv.check_inputs(kvba, [conv_q, conv_k, conv_v], cu_seqlens, "silu")
    checker("conv_gated_delta_rule")(q_tok.dtype == kvba.dtype, f"q_tok ({q_tok.dtype}) and "
                                     f"kvba ({kvba.dtype}) dtypes differ")
    gdr.check_dims(K, V, chunk_size, "conv_gated_delta_rule")
    chunk_size = gdr.effective_chunk_size(int(chunk_size), kvba.dtype, K)
    x_row, slot_row = (t.contiguous() for t in gather)
    return _ConvGatedDeltaRule.apply(
        q_tok if q_tok.stride(1) == 1 else q_tok.contiguous(), kvba.contiguous(),
        conv_q.contiguous(), conv_k.contiguous(), conv_v.contiguous(), A_log, dt_bias, x_row,
        slot_row, as_int32(cu_seqlens), H, 1 if lean else H, chunk_size, float(scale),
        DEFAULT_OPTIONS if options is None else options)


__all__ = ["triton_conv_gated_delta_rule"]
