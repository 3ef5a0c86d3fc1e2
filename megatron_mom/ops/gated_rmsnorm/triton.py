"""Triton gated RMSNorm: out = y / sqrt(mean(y^2) + eps) * weight * silu(gate), over the last
dimension (per head), weight shared by all rows; forward and backward.

Backward, with n = y * rstd, a = n * weight, s = silu(gate):
    dgate = dout * a * silu'(gate),   dweight = sum_rows dout * s * n,
    dy = rstd * (dn - n * mean(dn * n)),   dn = dout * s * weight.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from megatron_mom.ops.common import TRITON_DTYPES

MAX_DIM = 16384


def _rows_per_program(D: int) -> int:
    return max(1, min(16, 4096 // triton.next_power_of_2(D)))


@triton.jit(do_not_specialize=["R", "eps"])
def _grms_fwd_kernel(y, gate, weight, out, rstd, R, eps, D: tl.constexpr, HAS_GATE: tl.constexpr,
                     BD: tl.constexpr, BR: tl.constexpr):
    rows = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    cols = tl.arange(0, BD)
    mask = (rows < R)[:, None] & (cols < D)[None, :]
    offs = rows[:, None] * D + cols[None, :]
    y_t = tl.load(y + offs, mask=mask, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(y_t * y_t, axis=1) / D + eps)
    o = y_t * r[:, None] * tl.load(weight + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    if HAS_GATE:
        g = tl.load(gate + offs, mask=mask, other=0.0).to(tl.float32)
        o = o * g / (1.0 + tl.exp(-g))
    tl.store(out + offs, o.to(out.dtype.element_ty), mask=mask)
    tl.store(rstd + rows, r, mask=rows < R)


@triton.jit(do_not_specialize=["R"])
def _grms_bwd_kernel(y, gate, weight, rstd, dout, dy, dgate, dw_part, R, D: tl.constexpr,
                     HAS_GATE: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr):
    rows = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    cols = tl.arange(0, BD)
    mask = (rows < R)[:, None] & (cols < D)[None, :]
    offs = rows[:, None] * D + cols[None, :]
    n = tl.load(y + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(rstd + rows, mask=rows < R, other=0.0)
    n = n * r[:, None]
    w = tl.load(weight + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    da = tl.load(dout + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        g = tl.load(gate + offs, mask=mask, other=0.0).to(tl.float32)
        sig = 1.0 / (1.0 + tl.exp(-g))
        tl.store(dgate + offs, (da * n * w * sig * (1.0 + g * (1.0 - sig))).to(dgate.dtype.element_ty),
                 mask=mask)
        da = da * g * sig
    tl.store(dw_part + tl.program_id(0).to(tl.int64) * D + cols, tl.sum(da * n, axis=0), mask=cols < D)
    dn = da * w
    dy_t = r[:, None] * (dn - n * (tl.sum(dn * n, axis=1) / D)[:, None])
    tl.store(dy + offs, dy_t.to(dy.dtype.element_ty), mask=mask)


class _GatedRMSNorm(torch.autograd.Function):

    @staticmethod
    def forward(ctx, y2, gate2, weight, eps):
        R, D = y2.shape
        BR, BD = _rows_per_program(D), triton.next_power_of_2(D)
        out = torch.empty_like(y2)
        rstd = torch.empty(R, dtype=torch.float32, device=y2.device)
        if R:
            _grms_fwd_kernel[(triton.cdiv(R, BR),)](
                y2, gate2 if gate2 is not None else y2, weight, out, rstd, R, eps, D=D,
                HAS_GATE=gate2 is not None, BD=BD, BR=BR)
        ctx.save_for_backward(y2, gate2, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, dout):
        y2, gate2, weight, rstd = ctx.saved_tensors
        R, D = y2.shape
        BR, BD = _rows_per_program(D), triton.next_power_of_2(D)
        nprog = triton.cdiv(R, BR)
        dy = torch.empty_like(y2)
        dgate = torch.empty_like(gate2) if gate2 is not None else None
        dw_part = torch.zeros(max(nprog, 1), D, dtype=torch.float32, device=y2.device)
        if R:
            _grms_bwd_kernel[(nprog,)](
                y2, gate2 if gate2 is not None else y2, weight, rstd, dout.contiguous(), dy,
                dgate if dgate is not None else dy, dw_part, R, D=D, HAS_GATE=gate2 is not None,
                BD=BD, BR=BR)
        return dy, dgate, dw_part.sum(0).to(weight.dtype), None


def gated_rmsnorm(y: Tensor, gate: Optional[Tensor], weight: Tensor, eps: float = 1e-6) -> Tensor:
    """y, gate: [..., D]; weight: [D]. Returns rmsnorm(y) * weight * silu(gate) in y's dtype."""
    D = y.shape[-1]
    for name, t in (("y", y), ("gate", gate), ("weight", weight)):
        if t is not None and t.dtype not in TRITON_DTYPES:
            raise ValueError(f"gated_rmsnorm (triton): {name} has dtype {t.dtype}; use float32, "
                             f"bfloat16 or float16")
    if D > MAX_DIM:
        raise ValueError(f"gated_rmsnorm (triton): last dimension {D} is larger than {MAX_DIM}")
    y2 = y.reshape(-1, D).contiguous()                                # [R, D]
    gate2 = None if gate is None else gate.reshape(-1, D).contiguous()
    return _GatedRMSNorm.apply(y2, gate2, weight.contiguous(), float(eps)).view(y.shape)


__all__ = ["gated_rmsnorm"]
