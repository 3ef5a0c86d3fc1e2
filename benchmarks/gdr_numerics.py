"""Gated delta rule accuracy at the MQAR settings: forward and gradients of each backend
against a float64 token-by-token recurrence (issue 21: was the recorded MQAR run's single
memory held back by the torch kernels in float32 with TF32 matmuls?).

Inputs look like the MoM layer's at the `mqar --preset gpu` shape: H=2 heads, K=V=16,
64-token chunks, 128-token sequences (one segment per sequence for the single memory; ragged
segments as MoM's routing makes them), q and k L2-normalised inside the op, beta = sigmoid(b),
g = -exp(A_log) softplus(a + dt_bias) with the layer's initialisation ranges and wider ones
(b, a scaled up: beta -> 0/1, decays down to e^-100 per token), with and without initial states.

Backends:
  torch        the chunked torch reference in float32 (what the recorded run used)
  torch-tf32   the same with every matmul/convolution input rounded to TF32 (10-bit mantissa),
               what `allow_tf32` does on a GPU; the triangular solve in float32, or rounded too
               with --tf32-solve
  triton       the Triton kernels under TRITON_INTERPRET=1 on a CPU (full float32 dots) or on
               a GPU (TF32 dots, the kernels' default)
  torch-f64    the chunked form in float64 (separates the chunked algebra from rounding)

    TRITON_INTERPRET=1 python benchmarks/gdr_numerics.py            # CPU, ~1 minute
    python benchmarks/gdr_numerics.py --device cuda                   # on a GPU, real TF32
Prints, per case and backend, the relative error (Frobenius, against float64) of o, the final
state and the gradients of q, k, v, g, beta and the initial state.
"""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from megatron_mom.ops.gated_delta_rule import gated_delta_rule  # noqa: E402
from megatron_mom.ops.l2norm import l2norm  # noqa: E402

NAMES = ["o", "final", "dq", "dk", "dv", "dg", "dbeta", "dh0"]
aten = torch.ops.aten
_MATMULS = {aten.mm.default, aten.bmm.default, aten.addmm.default, aten.baddbmm.default,
            aten.convolution.default, aten.convolution_backward.default, aten.addmv.default,
            aten.mv.default, aten.dot.default}


def round_tf32(x: torch.Tensor, truncate: bool = False) -> torch.Tensor:
    """float32 values to TF32 (8-bit exponent, 10-bit mantissa): rounded to nearest (ties
    away), or with `truncate` the low 13 bits dropped (toward zero)."""
    if x.dtype != torch.float32:
        return x
    bits = x.contiguous().view(torch.int32)
    rounded = ((bits if truncate else bits + 0x1000) & ~0x1FFF).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x).view_as(x)


class TF32Matmuls(TorchDispatchMode):
    """Every float32 matmul and convolution (forward and autograd's backward) reads its tensor
    inputs rounded to TF32, as cuBLAS/cuDNN tensor cores do with allow_tf32. Accumulation stays
    float32 (so does the hardware's)."""

    def __init__(self, solve: bool = False, truncate: bool = False):
        super().__init__()
        self.truncate = truncate
        self.ops = set(_MATMULS)
        if solve:
            self.ops |= {aten.linalg_solve_triangular.default, aten.triangular_solve.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.ops:
            args = tuple(round_tf32(a, self.truncate) if isinstance(a, torch.Tensor) else a
                         for a in args)
        return func(*args, **kwargs)


def layer_like_inputs(lengths, H, K, V, *, b_scale, a_scale, h0, seed, device, few_keys=0):
    """float64 leaves (q, k, v, g, beta, h0) shaped like the MoM layer's packed rows.
    few_keys > 0: k drawn from that many distinct vectors (MQAR repeats its key tokens), which
    makes the chunk's (I + A) nearly singular when beta is near 1."""
    gen = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    # q, k, v after SiLU of a short convolution: non-negative-leaning, unit-ish scale.
    q, k, v = F.silu(rnd(1, T, H, K)), F.silu(rnd(1, T, H, K)), F.silu(rnd(1, T, H, V))
    if few_keys:
        pick = torch.randint(few_keys, (T,), generator=gen)
        k = F.silu(rnd(1, few_keys, H, K))[:, pick]
    # The layer's init: A ~ U(1, 16), dt ~ logU(1e-3, 1e-1) through softplus^-1.
    A = torch.empty(H, dtype=torch.float64).uniform_(1, 16, generator=gen)
    dt = torch.exp(torch.rand(H, generator=gen, dtype=torch.float64) * (
        torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3))).double()
        + torch.log(torch.tensor(1e-3)).double())
    dt_bias = dt + torch.log(-torch.expm1(-dt))
    beta = torch.sigmoid(b_scale * rnd(1, T, H))
    g = -A * F.softplus(a_scale * rnd(1, T, H) + dt_bias)
    s0 = rnd(len(lengths), H, K, V) if h0 else None
    cu = torch.tensor([0] + list(lengths)).cumsum(0)
    leaves = [x.to(device) if x is not None else None for x in (q, k, v, g, beta, s0)]
    return leaves, cu.to(device)


def run(backend, leaves, cu, dtype, chunk_size, seed=1, mode=None):
    """Outputs and gradients of a fixed random projection of (o, final state)."""
    xs = [x.detach().to(dtype).requires_grad_() if x is not None else None for x in leaves]
    q, k, v, g, beta, s0 = xs
    with mode or nullcontext():
        o, ht = gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True,
                                 cu_seqlens=cu, use_qk_l2norm=True, chunk_size=chunk_size,
                                 backend=backend)
        gen = torch.Generator().manual_seed(seed)
        r_o = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)
        r_h = torch.randn(ht.shape, generator=gen, dtype=torch.float64).to(o.device)
        loss = (o.double() * r_o).sum() + (ht.double() * r_h).sum()
        wrt = [x for x in xs if x is not None]
        grads = torch.autograd.grad(loss, wrt)
    return [o, ht] + list(grads) + ([None] if s0 is None else [])


def rel_err(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


CASES = {
    # name: (segment lengths, b_scale, a_scale, initial state, distinct keys or 0)
    "single 8x128, init ranges": ([128] * 8, 1.0, 1.0, False, 0),
    "single 8x128, h0": ([128] * 8, 1.0, 1.0, True, 0),
    "single 8x128, beta->0/1, deep decay": ([128] * 8, 8.0, 8.0, True, 0),
    "single 8x128, beta->1, no decay": ([128] * 8, 30.0, -30.0, False, 0),
    "single 8x128, 4 keys, beta->1": ([128] * 8, 30.0, -30.0, True, 4),
    "mom ragged segments": ([70, 58, 1, 127, 0, 64, 65, 33, 95], 2.0, 2.0, True, 0),
    "long 1x1024": ([1024], 2.0, 2.0, True, 0),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--tf32-solve", action="store_true",
                   help="round the triangular solve's inputs to TF32 too")
    p.add_argument("--tf32-truncate", action="store_true",
                   help="TF32 by dropping the low mantissa bits instead of rounding")
    p.add_argument("--backends", default="torch,torch-tf32,triton,torch-f64")
    args = p.parse_args(argv)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True   # as `megatron-mom mqar` runs
        torch.backends.cudnn.allow_tf32 = True
    H, K = args.heads, args.head_dim
    backends = args.backends.split(",")
    print(f"H={H} K=V={K} chunk={args.chunk_size} device={args.device}; relative errors "
          f"against the float64 recurrence")
    print(f"{'case':<38} {'backend':<11} " + " ".join(f"{n:>8}" for n in NAMES))
    worst = {}
    for case, (lengths, b_scale, a_scale, h0, few_keys) in CASES.items():
        leaves, cu = layer_like_inputs(lengths, H, K, K, b_scale=b_scale, a_scale=a_scale,
                                       h0=h0, seed=0, device=args.device, few_keys=few_keys)
        truth = run("recurrent", leaves, cu, torch.float64, args.chunk_size)
        for backend in backends:
            kind, dtype, mode = {
                "torch": ("torch", torch.float32, None),
                "torch-tf32": ("torch", torch.float32, "tf32"),
                "triton": ("triton", torch.float32, None),
                "torch-f64": ("torch", torch.float64, None),
            }[backend]
            if kind == "triton" and K > 256:
                continue
            got = run(kind, leaves, cu, dtype, args.chunk_size,
                      mode=TF32Matmuls(args.tf32_solve, args.tf32_truncate) if mode else None)
            errs = [rel_err(a, b) if b is not None else None for a, b in zip(got, truth)]
            worst[backend] = max([worst.get(backend, 0.0)] + [e for e in errs if e is not None])
            print(f"{case:<38} {backend:<11} " + " ".join(
                f"{'-':>8}" if e is None else f"{e:8.1e}" for e in errs))
    print("worst: " + ", ".join(f"{b} {e:.1e}" for b, e in worst.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
