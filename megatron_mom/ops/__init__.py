"""Kernels of the MoM layer. Each op (a package here): a plain PyTorch reference (runs
anywhere, the test oracle) and, where it pays, Triton kernels, behind one entry point that
dispatches on `backend` ("auto", "triton", "torch"). How the Triton kernels run travels with
each call as `KernelOptions` (ops/options.py). What the ops share (dispatch, checks, dtypes,
packed-sequence bookkeeping, side streams, launch) lives in `ops.common`; an op package
imports another only through its public names. No Megatron imports."""
from megatron_mom.ops.gated_delta_rule import gated_delta_rule
from megatron_mom.ops.gated_rmsnorm import gated_rmsnorm
from megatron_mom.ops.l2norm import l2norm
from megatron_mom.ops.mix import mix
from megatron_mom.ops.short_conv import short_conv, short_conv_split
from megatron_mom.ops.conv_gated_delta_rule import MemoryState, conv_gated_delta_rule
from megatron_mom.ops.options import KernelOptions

__all__ = ["gated_delta_rule", "short_conv", "short_conv_split", "gated_rmsnorm", "l2norm",
           "mix", "conv_gated_delta_rule", "MemoryState", "KernelOptions"]
