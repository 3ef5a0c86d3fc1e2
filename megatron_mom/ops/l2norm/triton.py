"""Triton L2 normalisation over the last dimension: y = x / sqrt(sum x^2 + eps).

Backward: dx = rstd * (dy - y * (y . dy)), with rstd = 1 / sqrt(sum x^2 + eps) saved from the
forward (one float per row) next to y.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from megatron_mom.ops.common import TRITON_DTYPES

ROWS_PER_PROGRAM = 16


@triton.jit(do_not_specialize=["R", "eps"])
def _l2norm_fwd_kernel(x, y, rstd, R, eps, D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr):
    rows = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    cols = tl.arange(0, BD)
    mask = (rows < R)[:, None] & (cols < D)[None, :]
    x_t = tl.load(x + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x_t * x_t, axis=1) + eps)
    tl.store(y + rows[:, None] * D + cols[None, :], (x_t * r[:, None]).to(y.dtype.element_ty), mask=mask)
    tl.store(rstd + rows, r, mask=rows < R)


@triton.jit(do_not_specialize=["R"])
def _l2norm_bwd_kernel(y, rstd, dy, dx, R, SY, SR, SDY, SDX, HG: tl.constexpr, D: tl.constexpr,
                       BD: tl.constexpr, BR: tl.constexpr):
    """Rows r = (token r // HG, head r % HG) of [tokens, HG, D] head slices, each tensor with
    its own token-row stride (SY, SDY, SDX in elements; SR for rstd): the backward by head
    groups reads and writes slices of the full tensors in place. Contiguous rows: HG = 1."""
    rows = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    cols = tl.arange(0, BD)
    in_rows = rows < R
    mask = in_rows[:, None] & (cols < D)[None, :]
    tok, j = rows // HG, rows % HG
    y_t = tl.load(y + (tok * SY + j * D)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy_t = tl.load(dy + (tok * SDY + j * D)[:, None] + cols[None, :], mask=mask,
                   other=0.0).to(tl.float32)
    r = tl.load(rstd + tok * SR + j, mask=in_rows, other=0.0)
    dx_t = r[:, None] * (dy_t - y_t * tl.sum(y_t * dy_t, axis=1)[:, None])
    tl.store(dx + (tok * SDX + j * D)[:, None] + cols[None, :], dx_t.to(dx.dtype.element_ty),
             mask=mask)


def _grid(rows: int):
    return (triton.cdiv(rows, ROWS_PER_PROGRAM),)


def l2norm_fwd(x: Tensor, eps: float = 1e-6) -> Tuple[Tensor, Tensor]:
    """x [..., D] -> (y like x, rstd [...] float32)."""
    D = x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()
    y = torch.empty_like(x2)
    rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    if x2.shape[0]:
        _l2norm_fwd_kernel[_grid(x2.shape[0])](x2, y, rstd, x2.shape[0], eps, D=D,
                                               BD=triton.next_power_of_2(D), BR=ROWS_PER_PROGRAM)
    return y.view(x.shape), rstd.view(x.shape[:-1])


def l2norm_bwd(y: Tensor, rstd: Tensor, dy: Tensor, out_dtype: torch.dtype = None) -> Tensor:
    """Gradient of l2norm given its output y, rstd and dL/dy (any float dtype)."""
    D = y.shape[-1]
    y2 = y.reshape(-1, 1, D).contiguous()
    dx = torch.empty(y2.shape, dtype=out_dtype or y.dtype, device=y.device)
    l2norm_bwd_into(dx, y2, rstd.reshape(-1, 1).contiguous(), dy.reshape(-1, 1, D).contiguous())
    return dx.view(y.shape)


def l2norm_bwd_into(dx: Tensor, y: Tensor, rstd: Tensor, dy: Tensor) -> None:
    """l2norm's backward written into dx, all [tokens, heads, D] with unit strides over the
    last two dimensions (rstd [tokens, heads], unit stride over heads): head slices of wider
    tensors are read and written in place."""
    R, HG, D = y.shape
    for name, t in (("y", y), ("dy", dy), ("dx", dx)):
        if t.shape != y.shape or t.stride(-1) != 1 or t.stride(-2) != D:
            raise ValueError(f"l2norm_bwd_into: {name} {tuple(t.shape)} with strides "
                             f"{t.stride()} must be [{R}, {HG}, {D}] with rows of D contiguous")
    if rstd.shape != (R, HG) or rstd.stride(-1) != 1:
        raise ValueError(f"l2norm_bwd_into: rstd {tuple(rstd.shape)} must be [{R}, {HG}]")
    if R * HG:
        _l2norm_bwd_kernel[_grid(R * HG)](
            y, rstd, dy, dx, R * HG, y.stride(0), rstd.stride(0), dy.stride(0), dx.stride(0),
            HG=HG, D=D, BD=triton.next_power_of_2(D), BR=ROWS_PER_PROGRAM)


class _L2Norm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eps):
        y, rstd = l2norm_fwd(x, eps)
        ctx.save_for_backward(y, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        y, rstd = ctx.saved_tensors
        return l2norm_bwd(y, rstd, dy), None


def l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """L2-normalise the last dimension of x (float32 accumulation); differentiable."""
    if x.dtype not in TRITON_DTYPES:
        raise ValueError(f"l2norm (triton): x has dtype {x.dtype}; use float32, bfloat16 or float16")
    if x.shape[-1] > 65536:
        raise ValueError(f"l2norm (triton): last dimension {x.shape[-1]} is larger than 65536")
    return _L2Norm.apply(x, eps)


__all__ = ["l2norm", "l2norm_fwd", "l2norm_bwd", "l2norm_bwd_into"]
