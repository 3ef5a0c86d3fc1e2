"""`gated_delta_rule`: the one entry point of the recurrence, whatever the backend."""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from megatron_mom.ops.common import (FLOAT_DTYPES, checker, need_cu_seqlens, resolve_backend,
                                     triton_module)
from megatron_mom.ops.gated_delta_rule import reference
from megatron_mom.ops.l2norm import l2norm
from megatron_mom.ops.options import KernelOptions

BACKENDS = ("auto", "triton", "torch", "recurrent")


def _check_inputs(q, k, v, g, beta, initial_state, cu_seqlens):
    need = checker("gated_delta_rule")
    need(q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
         f"q, k, v must be [B, T, H, K|V]; got q {tuple(q.shape)}, k {tuple(k.shape)}, "
         f"v {tuple(v.shape)}")
    need(q.shape == k.shape, f"q {tuple(q.shape)} and k {tuple(k.shape)} must match")
    B, T, H, K = k.shape
    need(v.shape[:3] == (B, T, H), f"v {tuple(v.shape)} must be [B={B}, T={T}, H={H}, V]")
    need(g.shape == (B, T, H) and beta.shape == (B, T, H),
         f"g {tuple(g.shape)} and beta {tuple(beta.shape)} must be [B={B}, T={T}, H={H}]")
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        need(x.dtype in FLOAT_DTYPES, f"{name} has unsupported dtype {x.dtype}; use one of "
             f"float32, float64, bfloat16, float16")
        need(x.device == v.device, f"{name} is on {x.device}, v on {v.device}")
    need(q.dtype == k.dtype == v.dtype, f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if cu_seqlens is not None:
        need(B == 1, f"with cu_seqlens the batch must be 1 (packed sequences), got B={B}")
        need_cu_seqlens("gated_delta_rule", cu_seqlens, T)
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None:
        need(initial_state.shape == (N, H, K, v.shape[-1]),
             f"initial_state {tuple(initial_state.shape)} must be [N={N}, H={H}, K={K}, "
             f"V={v.shape[-1]}] (N = batch, or number of sequences with cu_seqlens)")


def gated_delta_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *,
    scale: Optional[float] = None,
    initial_state: Optional[Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[Tensor] = None,
    use_qk_l2norm: bool = False,
    chunk_size: int = 64,
    backend: str = "auto",
    lean_backward: bool = False,
    options: Optional[KernelOptions] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Gated delta rule over [B, T, H, *] inputs (or packed sequences with `cu_seqlens`).

    q, k: [B, T, H, K]; v: [B, T, H, V]; g (log-decay, <= 0), beta: [B, T, H].
    initial_state / final state: [N, H, K, V] with N = B, or N = len(cu_seqlens) - 1
    (then B must be 1). scale defaults to K ** -0.5. With `use_qk_l2norm`, q and k are
    L2-normalised per head first (z / sqrt(sum z^2 + 1e-6)).
    Returns (o [B, T, H, V] in v's dtype, final state in float32/float64 or None).
    Differentiable in q, k, v, g, beta and initial_state.
    lean_backward (Triton backend; the others ignore it): keep only the inputs for the
    backward, which reruns the forward kernels and runs head by head (less memory, more time;
    the same gradients bit for bit).
    options: how the Triton kernels run (`KernelOptions`: precision, storage, memory of the
    backward, side streams, launch settings; default `KernelOptions()`); the other backends
    ignore them.
    """
    _check_inputs(q, k, v, g, beta, initial_state, cu_seqlens)
    if scale is None:
        scale = k.shape[-1] ** -0.5
    backend = resolve_backend("gated_delta_rule", backend, v.device.type == "cuda", BACKENDS)
    if backend == "triton":
        return triton_module("gated_delta_rule").chunk_gated_delta_rule(
            q, k, v, g, beta, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens,
            use_qk_l2norm=use_qk_l2norm, chunk_size=chunk_size, lean_backward=lean_backward,
            options=options)

    if use_qk_l2norm:
        q, k = l2norm(q, backend="torch"), l2norm(k, backend="torch")
    run = (reference.recurrent_gated_delta_rule if backend == "recurrent"
           else lambda *a, **kw: reference.chunk_gated_delta_rule(*a, **kw, chunk_size=chunk_size))
    if cu_seqlens is None:
        o, state = run(q, k, v, g, beta, scale, initial_state=initial_state)
    else:
        (qp, seq, pos), kp, vp, gp, bp = (
            reference.varlen_to_padded(q, cu_seqlens),
            *(reference.varlen_to_padded(x, cu_seqlens)[0] for x in (k, v, g, beta)))
        o, state = run(qp, kp, vp, gp, bp, scale, initial_state=initial_state)
        o = o[seq, pos].unsqueeze(0)
    return o.to(v.dtype), (state if output_final_state else None)


__all__ = ["gated_delta_rule", "BACKENDS"]
