"""Triton causal depthwise short convolution (+ SiLU) over packed sequences, with backward.

Semantics are those of `short_conv_reference`: y_t = act(sum_i w[c, i] x_{t-(W-1)+i}); inputs
before a sequence's first token come from its `initial_state` [N, C, W-1] (oldest first) or are
zero; nothing crosses a `cu_seqlens` boundary. Each token finds its sequence by a binary search
on `cu_seqlens` inside the kernel (no host sync). The final state (last W-1 inputs of each
sequence) is returned for decoding and is not differentiable here.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from megatron_mom.ops.utils import as_int32, dense_cu_seqlens, search_steps, sequence_of

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK_T = 16                     # x 64 channels: no register spills in the sm_90 build
MAX_WIDTH = 8


@triton.jit
def _tap(x, init, seq, tok, pos, shift, cols, tmask, cmask, x_stride,
         C: tl.constexpr, W: tl.constexpr, HAS_INIT: tl.constexpr):
    """x_{t - shift} [BT, BC] for each token t, from its own sequence or its initial state."""
    inside = pos >= shift
    m = (tmask & inside)[:, None] & cmask[None, :]
    val = tl.load(x + (tok - shift).to(tl.int64)[:, None] * x_stride + cols[None, :], mask=m,
                  other=0.0).to(tl.float32)
    if HAS_INIT:
        slot = W - 1 + pos - shift                                   # >= 0 when not inside
        mh = (tmask & (pos < shift))[:, None] & cmask[None, :]
        val += tl.load(init + (seq.to(tl.int64) * C * (W - 1) + slot)[:, None] + cols[None, :] * (W - 1),
                       mask=mh, other=0.0).to(tl.float32)
    return val


@triton.jit
def _pre_activation(x, init, weight, seq, tok, pos, cols, tmask, cmask, x_stride,
                    C: tl.constexpr, W: tl.constexpr, HAS_INIT: tl.constexpr, BT: tl.constexpr,
                    BC: tl.constexpr):
    z = tl.zeros([BT, BC], dtype=tl.float32)
    for d in tl.static_range(W):
        w_d = tl.load(weight + cols * W + (W - 1 - d), mask=cmask, other=0.0).to(tl.float32)
        z += w_d[None, :] * _tap(x, init, seq, tok, pos, d, cols, tmask, cmask, x_stride, C, W, HAS_INIT)
    return z


@triton.jit(do_not_specialize=["TT", "N", "STEPS", "x_stride"])
def _conv_fwd_kernel(x, weight, init, y, cu_seqlens, TT, N, STEPS, x_stride,
                     C: tl.constexpr, W: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr,
                     BT: tl.constexpr, BC: tl.constexpr):
    tok = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    tmask = tok < TT
    cmask = cols < C
    seq = sequence_of(cu_seqlens, tok, N, STEPS)
    pos = tok - tl.load(cu_seqlens + seq)
    z = _pre_activation(x, init, weight, seq, tok, pos, cols, tmask, cmask, x_stride, C, W, HAS_INIT, BT, BC)
    if SILU:
        z = z / (1.0 + tl.exp(-z))
    tl.store(y + tok.to(tl.int64)[:, None] * C + cols[None, :], z.to(y.dtype.element_ty),
             mask=tmask[:, None] & cmask[None, :])


@triton.jit(do_not_specialize=["TT", "N", "STEPS", "x_stride"])
def _conv_bwd_kernel(x, weight, init, dy, dx, dw_part, cu_seqlens, TT, N, STEPS, x_stride,
                     C: tl.constexpr, W: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr,
                     BT: tl.constexpr, BC: tl.constexpr):
    """dx_s = sum_d w[c, W-1-d] dz_{s+d} (same sequence); dw partial sums of this token block."""
    tok = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    tmask = tok < TT
    cmask = cols < C
    seq = sequence_of(cu_seqlens, tok, N, STEPS)
    bos = tl.load(cu_seqlens + seq)
    length = tl.load(cu_seqlens + seq + 1) - bos
    pos = tok - bos
    dxs = tl.zeros([BT, BC], dtype=tl.float32)
    for d in tl.static_range(W):
        t_d = tok + d
        m_d = tmask & (pos + d < length)
        dz = _grad_pre_activation(x, init, weight, dy, seq, t_d, pos + d, cols, m_d, cmask, x_stride,
                                  C, W, HAS_INIT, SILU, BT, BC)
        w_d = tl.load(weight + cols * W + (W - 1 - d), mask=cmask, other=0.0).to(tl.float32)
        dxs += w_d[None, :] * dz
        if d == 0:
            part = dw_part + tl.program_id(0).to(tl.int64) * C * W + cols * W
            for e in tl.static_range(W):
                xe = _tap(x, init, seq, tok, pos, e, cols, tmask, cmask, x_stride, C, W, HAS_INIT)
                tl.store(part + (W - 1 - e), tl.sum(dz * xe, axis=0), mask=cmask)
    tl.store(dx + tok.to(tl.int64)[:, None] * C + cols[None, :], dxs.to(dx.dtype.element_ty),
             mask=tmask[:, None] & cmask[None, :])


@triton.jit
def _grad_pre_activation(x, init, weight, dy, seq, tok, pos, cols, tmask, cmask, x_stride,
                         C: tl.constexpr, W: tl.constexpr, HAS_INIT: tl.constexpr,
                         SILU: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """dL/dz [BT, BC] at tokens `tok` (zero where tmask is off)."""
    g = tl.load(dy + tok.to(tl.int64)[:, None] * C + cols[None, :],
                mask=tmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    if SILU:
        z = _pre_activation(x, init, weight, seq, tok, pos, cols, tmask, cmask, x_stride, C, W,
                            HAS_INIT, BT, BC)
        sig = 1.0 / (1.0 + tl.exp(-z))
        g = g * sig * (1.0 + z * (1.0 - sig))
    return g


@triton.jit(do_not_specialize=["N", "STEPS", "x_stride"])
def _conv_init_grad_kernel(x, weight, init, dy, dinit, cu_seqlens, N, STEPS, x_stride,
                           C: tl.constexpr, W: tl.constexpr, SILU: tl.constexpr,
                           BT: tl.constexpr, BC: tl.constexpr):
    """dL/dinitial_state [N, C, W-1]: slot W-1+p (p < 0) feeds z_t through tap t - p."""
    n = tl.program_id(0)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = cols < C
    bos = tl.load(cu_seqlens + n)
    length = tl.load(cu_seqlens + n + 1) - bos
    pos = tl.arange(0, BT)                                           # first W-1 positions
    tmask = pos < tl.minimum(length, W - 1)
    seq = pos * 0 + n
    dz = _grad_pre_activation(x, init, weight, dy, seq, bos + pos, pos, cols, tmask, cmask, x_stride,
                              C, W, True, SILU, BT, BC)
    for j in tl.static_range(W - 1):
        shift = pos - (j - (W - 1))                                  # tap index e = t - p
        w_e = tl.load(weight + cols[None, :] * W + (W - 1 - shift)[:, None],
                      mask=(tmask & (shift <= W - 1))[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        tl.store(dinit + (n.to(tl.int64) * C + cols) * (W - 1) + j, tl.sum(w_e * dz, axis=0), mask=cmask)


@triton.jit(do_not_specialize=["N", "x_stride"])
def _conv_final_state_kernel(x, init, final, cu_seqlens, N, x_stride, C: tl.constexpr, W: tl.constexpr,
                             HAS_INIT: tl.constexpr, BC: tl.constexpr):
    """final[n, c, j] = input at position len - (W-1) + j of sequence n (or its history)."""
    n = tl.program_id(0)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = cols < C
    bos = tl.load(cu_seqlens + n)
    length = tl.load(cu_seqlens + n + 1) - bos
    for j in tl.static_range(W - 1):
        p = cols * 0 + (length - (W - 1) + j)                         # [BC], all equal
        val = tl.load(x + (bos + p).to(tl.int64) * x_stride + cols, mask=cmask & (p >= 0), other=0.0)
        val = val.to(tl.float32)
        if HAS_INIT:
            val += tl.load(init + (n.to(tl.int64) * C + cols) * (W - 1) + (W - 1 + p),
                           mask=cmask & (p < 0), other=0.0).to(tl.float32)
        tl.store(final + (n.to(tl.int64) * C + cols) * (W - 1) + j, val.to(final.dtype.element_ty), mask=cmask)


def _block_c(C: int) -> int:
    return min(64, triton.next_power_of_2(C))


class _ShortConv(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x2, weight, cu, N, init, silu):
        TT, C = x2.shape
        W = weight.shape[1]
        BC = _block_c(C)
        y = torch.empty(TT, C, dtype=x2.dtype, device=x2.device)      # [TT, C]
        steps = search_steps(N)
        if TT:
            _conv_fwd_kernel[(triton.cdiv(TT, BLOCK_T), triton.cdiv(C, BC))](
                x2, weight, init if init is not None else x2, y, cu, TT, N, steps, x2.stride(0),
                C=C, W=W, HAS_INIT=init is not None, SILU=silu, BT=BLOCK_T, BC=BC)
        ctx.save_for_backward(x2, weight, cu, init)
        ctx.meta = (N, silu)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, cu, init = ctx.saved_tensors
        N, silu = ctx.meta
        TT, C = x2.shape
        W = weight.shape[1]
        BC = _block_c(C)
        dy = dy.contiguous()
        dx = torch.empty(TT, C, dtype=x2.dtype, device=x2.device)
        nblk = triton.cdiv(TT, BLOCK_T)
        dw_part = torch.zeros(max(nblk, 1), C, W, dtype=torch.float32, device=x2.device)
        steps = search_steps(N)
        if TT:
            _conv_bwd_kernel[(nblk, triton.cdiv(C, BC))](
                x2, weight, init if init is not None else x2, dy, dx, dw_part, cu, TT, N, steps,
                x2.stride(0), C=C, W=W, HAS_INIT=init is not None, SILU=silu, BT=BLOCK_T, BC=BC)
        dinit = None
        if init is not None and ctx.needs_input_grad[4]:
            dinit32 = torch.empty(N, C, W - 1, dtype=torch.float32, device=x2.device)
            _conv_init_grad_kernel[(N, triton.cdiv(C, BC))](
                x2, weight, init, dy, dinit32, cu, N, steps, x2.stride(0), C=C, W=W, SILU=silu,
                BT=max(2, triton.next_power_of_2(W - 1)), BC=BC)
            dinit = dinit32.to(init.dtype)
        return dx, dw_part.sum(0).to(weight.dtype), None, None, dinit, None


def _final_state(x2: Tensor, cu: Tensor, N: int, W: int, init: Optional[Tensor]) -> Tensor:
    C = x2.shape[1]
    final = torch.empty(N, C, W - 1, dtype=x2.dtype, device=x2.device)
    if N and W > 1:
        BC = _block_c(C)
        _conv_final_state_kernel[(N, triton.cdiv(C, BC))](
            x2, init if init is not None else x2, final, cu, N, x2.stride(0), C=C, W=W,
            HAS_INIT=init is not None, BC=BC)
    return final


def short_conv(
    x: Tensor, weight: Tensor, *, cu_seqlens: Optional[Tensor] = None,
    initial_state: Optional[Tensor] = None, output_final_state: bool = False,
    activation: Optional[str] = "silu",
) -> Tuple[Tensor, Optional[Tensor]]:
    """x: [B, T, C] (B == 1 with cu_seqlens), weight: [C, W], states [N, C, W-1].
    Returns (y like x, final state [N, C, W-1] in x's dtype or None)."""
    B, T, C = x.shape
    W = weight.shape[1]
    if activation not in ("silu", None):
        raise ValueError(f"short_conv: activation must be 'silu' or None, got {activation!r}")
    if x.dtype not in _DTYPES or weight.dtype not in _DTYPES:
        raise ValueError(f"short_conv (triton): x {x.dtype} and weight {weight.dtype} must be "
                         f"float32, bfloat16 or float16")
    if not 1 <= W <= MAX_WIDTH:
        raise ValueError(f"short_conv (triton): kernel width W={W} must be in 1..{MAX_WIDTH}")
    if cu_seqlens is not None and cu_seqlens.device != x.device:
        raise ValueError(f"short_conv (triton): cu_seqlens is on {cu_seqlens.device}, x on "
                         f"{x.device}; the kernels read it on the device")
    cu = dense_cu_seqlens(B, T, x.device) if cu_seqlens is None else as_int32(cu_seqlens)
    N = cu.numel() - 1
    if initial_state is not None and tuple(initial_state.shape) != (N, C, W - 1):
        raise ValueError(f"short_conv: initial_state {tuple(initial_state.shape)} must be "
                         f"[N={N}, C={C}, W-1={W - 1}]")
    x2 = x.reshape(B * T, C)                                          # [TT, C]
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    init = None if initial_state is None else initial_state.contiguous()
    y = _ShortConv.apply(x2, weight.contiguous(), cu, N, init, activation == "silu")
    final = _final_state(x2.detach(), cu, N, W, None if init is None else init.detach()) \
        if output_final_state else None
    return y.view(B, T, C), final


__all__ = ["short_conv"]
