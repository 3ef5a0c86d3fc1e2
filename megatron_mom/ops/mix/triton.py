"""Triton mix of each token's S packed read-outs: y[n] = sum_j w[n, j] * o[slot_row[n, j]].

Semantics are those of `mix_reference`. `slot_row` [N, S] is a permutation of the L = N * S
packed rows, so the backward is a pure permuted store, d_o[slot_row[n, j]] = w[n, j] * dy[n]
(each row written once: no zero fill, no atomics), and d_w[n, j] = <o[slot_row[n, j]], dy[n]>
is reduced inside one program (deterministic). fp32 accumulation; y in out_dtype, d_o in o's
dtype, d_w in weight's dtype. Shapes only on the host: no syncs, CUDA-graph capturable.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from megatron_mom.ops.common import TRITON_DTYPES

# (elements per tile, largest column block, warps). The forward tiles a 2D grid of (token
# block, column block); the backward walks a token block's whole row in column blocks so that
# d_w needs no cross-program reduction. 4096 elements: 32 per thread and tensor at 4 warps,
# and still ~4k programs at the paper shape (N = 16384, D = 1024).
FWD_CONFIG = (4096, 1024, 4)
BWD_CONFIG = (4096, 1024, 4)


@triton.jit(do_not_specialize=["N"])
def _mix_fwd_kernel(o, weight, slot_row, y, N, D: tl.constexpr, S: tl.constexpr,
                    BN: tl.constexpr, BD: tl.constexpr, WEIGHTED: tl.constexpr = True,
                    SY: tl.constexpr = 0):
    """y rows SY apart (0: D apart); WEIGHTED off sums the S rows as they are."""
    tok = (tl.program_id(0) * BN + tl.arange(0, BN)).to(tl.int64)[:, None]   # [BN, 1]
    cols = tl.program_id(1) * BD + tl.arange(0, BD)[None, :]                  # [1, BD]
    tmask = tok < N
    mask = tmask & (cols < D)
    acc = tl.zeros([BN, BD], dtype=tl.float32)
    for j in tl.static_range(S):
        row = tl.load(slot_row + tok * S + j, mask=tmask, other=0).to(tl.int64)
        x = tl.load(o + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        if WEIGHTED:
            x *= tl.load(weight + tok * S + j, mask=tmask, other=0.0).to(tl.float32)
        acc += x
    tl.store(y + tok * (D if SY == 0 else SY) + cols, acc.to(y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["N"])
def _mix_bwd_kernel(o, weight, slot_row, dy, d_o, d_w, N, D: tl.constexpr, S: tl.constexpr,
                    BS: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                    STORE_DO: tl.constexpr, STORE_DW: tl.constexpr):
    tok = (tl.program_id(0) * BN + tl.arange(0, BN)).to(tl.int64)[:, None]   # [BN, 1]
    tmask = tok < N
    js = tl.arange(0, BS)[None, :]                                           # [1, BS]
    rows = ()                                                                # S x [BN, 1]
    ws = ()
    for j in tl.static_range(S):
        rows = rows + (tl.load(slot_row + tok * S + j, mask=tmask, other=0).to(tl.int64),)
        ws = ws + (tl.load(weight + tok * S + j, mask=tmask, other=0.0).to(tl.float32),)
    dw = tl.zeros([BN, BS], dtype=tl.float32)
    for c0 in range(0, D, BD):
        cols = c0 + tl.arange(0, BD)[None, :]                                # [1, BD]
        mask = tmask & (cols < D)
        g = tl.load(dy + tok * D + cols, mask=mask, other=0.0).to(tl.float32)
        for j in tl.static_range(S):
            if STORE_DO:
                tl.store(d_o + rows[j] * D + cols, (ws[j] * g).to(d_o.dtype.element_ty), mask=mask)
            if STORE_DW:
                x = tl.load(o + rows[j] * D + cols, mask=mask, other=0.0).to(tl.float32)
                dw += tl.where(js == j, tl.sum(x * g, axis=1)[:, None], 0.0)
    if STORE_DW:
        tl.store(d_w + tok * S + js, dw.to(d_w.dtype.element_ty), mask=tmask & (js < S))


def _blocks(config, D: int):
    """(BN tokens, BD columns, warps) of `config` for rows of D elements."""
    elems, cap, warps = config
    BD = min(cap, triton.next_power_of_2(D))
    return max(1, elems // BD), BD, warps


class _Mix(torch.autograd.Function):

    @staticmethod
    def forward(ctx, o2, weight, slot_row, out_dtype):
        D = o2.shape[1]
        N, S = slot_row.shape
        y = torch.empty(N, D, dtype=out_dtype, device=o2.device)             # [N, D]
        BN, BD, warps = _blocks(FWD_CONFIG, D)
        if N and D:
            _mix_fwd_kernel[(triton.cdiv(N, BN), triton.cdiv(D, BD))](
                o2, weight, slot_row, y, N, D=D, S=S, BN=BN, BD=BD, num_warps=warps)
        ctx.save_for_backward(o2, weight, slot_row)
        return y

    @staticmethod
    def backward(ctx, dy):
        o2, weight, slot_row = ctx.saved_tensors
        D = o2.shape[1]
        N, S = slot_row.shape
        store_do, store_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        d_o = torch.empty_like(o2) if store_do else None  # [L, D], each row once
        d_w = torch.empty_like(weight) if store_dw else None                 # [N, S]
        BN, BD, warps = _blocks(BWD_CONFIG, D)
        if N and (store_do or store_dw):
            _mix_bwd_kernel[(triton.cdiv(N, BN),)](
                o2, weight, slot_row, dy.contiguous(), o2 if d_o is None else d_o,
                weight if d_w is None else d_w, N, D=D, S=S, BS=triton.next_power_of_2(S),
                BN=BN, BD=BD, STORE_DO=store_do, STORE_DW=store_dw, num_warps=warps)
        if d_w is not None and D == 0:
            d_w.zero_()                                                      # an empty sum
        return d_o, d_w, None, None


def mix(o: Tensor, slot_row: Tensor, weight: Tensor, out_dtype=None) -> Tensor:
    """o [L, ...] packed rows, slot_row [N, S] (a permutation of 0..L-1), weight [N, S] ->
    y [N, ...] in out_dtype (default weight's dtype)."""
    out_dtype = out_dtype or weight.dtype
    for name, dt in (("o", o.dtype), ("weight", weight.dtype), ("out_dtype", out_dtype)):
        if dt not in TRITON_DTYPES:
            raise ValueError(f"mix (triton): {name} has dtype {dt}; use float32, bfloat16 or "
                             f"float16 (float64 runs on backend='torch')")
    N = slot_row.shape[0]
    o2 = o.reshape(o.shape[0], -1).contiguous()                             # [L, D]
    y = _Mix.apply(o2, weight.contiguous(), slot_row.contiguous(), out_dtype)
    return y.view(N, *o.shape[1:])


def sum_over_slots(packed: Tensor, slot_row: Tensor, out: Tensor = None) -> Tensor:
    """Packed rows [L, D] -> per token [N, D] (the sum of each token's S rows, float32
    accumulation, in packed's dtype), written into `out` when given: [N, D] with unit column
    stride and any row stride, e.g. a column range of a wider gradient. One kernel reading
    each packed row once, where the torch path gathers a copy of them and sums it."""
    if packed.dtype not in TRITON_DTYPES:
        raise ValueError(f"sum_over_slots (triton): packed has dtype {packed.dtype}; use float32, "
                         f"bfloat16 or float16 (float64 runs on backend='torch')")
    N, S = slot_row.shape
    packed = packed.contiguous()
    D = packed.shape[1]
    if out is None:
        out = torch.empty(N, D, dtype=packed.dtype, device=packed.device)    # [N, D]
    elif out.shape != (N, D) or out.stride(1) != 1 or out.dtype != packed.dtype:
        raise ValueError(f"sum_over_slots (triton): out {tuple(out.shape)} / {out.stride()} "
                         f"{out.dtype} must be [{N}, {D}] {packed.dtype} with unit column stride")
    BN, BD, warps = _blocks(FWD_CONFIG, D)
    if N and D:
        _mix_fwd_kernel[(triton.cdiv(N, BN), triton.cdiv(D, BD))](
            packed, packed, slot_row.contiguous(), out, N, D=D, S=S, BN=BN, BD=BD,
            WEIGHTED=False, SY=out.stride(0), num_warps=warps)
    return out


__all__ = ["mix", "sum_over_slots"]
