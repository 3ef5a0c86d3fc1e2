"""`mix`: weighted sum of each token's S packed rows back into token order."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from megatron_mom.ops.common import triton_impl
from megatron_mom.ops.mix.reference import inverse_slots, mix_reference
from megatron_mom.ops.mix.reference import sum_over_slots as sum_over_slots_reference


def mix(o: Tensor, slot_row: Tensor, weight: Tensor, out_dtype=None, *,
        token: Optional[Tensor] = None, slot: Optional[Tensor] = None,
        backend: str = "auto") -> Tensor:
    """y[n] = sum_j weight[n, j] * o[slot_row[n, j]], accumulated in float32 (float64 for float64
    weights), returned in out_dtype (default weight's dtype).

    o: [L, ...] packed rows; slot_row: [N, S] int, a permutation of 0..L-1 (L = N * S);
    weight: [N, S]. `token`, `slot` [L] (the inverse permutation) spare the torch backend
    recomputing it. "auto": Triton for CUDA tensors, torch for float64 and elsewhere."""
    if slot_row.dim() != 2 or weight.shape != slot_row.shape or o.shape[0] != slot_row.numel():
        raise ValueError(f"mix: o {tuple(o.shape)} must be [N * S, ...], slot_row "
                         f"{tuple(slot_row.shape)} and weight {tuple(weight.shape)} [N, S]")
    f64 = torch.float64 in (o.dtype, weight.dtype, out_dtype)
    impl = triton_impl("mix", "mix", backend, o.device.type == "cuda" and not f64)
    if impl is not None:
        return impl(o, slot_row, weight, out_dtype)
    return mix_reference(o, slot_row, weight, out_dtype, token=token, slot=slot)


def sum_over_slots(packed: Tensor, slot_row: Tensor, *, out: Optional[Tensor] = None,
                   backend: str = "auto") -> Tensor:
    """Packed rows [L, ...] -> per token [N, ...]: the sum of each token's S rows (the backward
    of copying every token to its S packed rows), in packed's dtype. `out` [N, D] (2-D packed
    rows only; any row stride, unit column stride, e.g. a column range of a wider gradient):
    written in place and returned. "auto": one Triton kernel for CUDA tensors, the torch
    gather-and-sum elsewhere and for float64."""
    if slot_row.dim() != 2 or packed.shape[0] != slot_row.numel():
        raise ValueError(f"sum_over_slots: packed {tuple(packed.shape)} must be [N * S, ...] for "
                         f"slot_row {tuple(slot_row.shape)} [N, S]")
    N = slot_row.shape[0]
    if out is not None and (packed.dim() != 2 or out.shape != (N, packed.shape[1])):
        raise ValueError(f"sum_over_slots: out {tuple(out.shape)} must be [{N}, D] for 2-D "
                         f"packed rows {tuple(packed.shape)}")
    impl = triton_impl("mix", "sum_over_slots", backend,
                       packed.device.type == "cuda" and packed.dtype != torch.float64)
    if impl is None:
        summed = sum_over_slots_reference(packed, slot_row)
        return summed if out is None else out.copy_(summed)
    return impl(packed.reshape(packed.shape[0], -1), slot_row, out=out).view(N, *packed.shape[1:])


__all__ = ["mix", "mix_reference", "inverse_slots", "sum_over_slots", "sum_over_slots_reference"]
