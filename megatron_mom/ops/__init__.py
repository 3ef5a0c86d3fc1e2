"""Kernels of the MoM layer. Each op: a plain PyTorch reference (runs anywhere, the test
oracle) and, where it pays, Triton kernels, behind one entry point. No Megatron imports."""
from megatron_mom.ops.gated_delta_rule import gated_delta_rule
from megatron_mom.ops.gated_rmsnorm import gated_rmsnorm
from megatron_mom.ops.l2norm import l2norm
from megatron_mom.ops.mix import mix
from megatron_mom.ops.short_conv import short_conv, short_conv_split
from megatron_mom.ops.conv_gated_delta_rule import conv_gated_delta_rule
from megatron_mom.ops.options import KernelOptions

__all__ = ["gated_delta_rule", "short_conv", "short_conv_split", "gated_rmsnorm", "l2norm",
           "mix", "conv_gated_delta_rule", "KernelOptions"]
