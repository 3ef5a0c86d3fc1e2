"""Registers, spill stack and shared memory of the gated delta rule's sm_90 builds (the
sequential state kernels, and with --dense the largest chunk-parallel one, the backward's
`chunk_bwd_main_kernel`), for the launch table's settings and variants, compiled ahead of time:
no GPU needed (Triton's own ptxas and cuobjdump do the work), so launch settings can be checked
on any machine.

    python benchmarks/kernel_resources.py [--k 256] [--variants] [--dense]

A build whose shared memory exceeds what one block may use (227 KB on the H100 and H200) is
refused at launch, and `ops.common.launch` then runs it with one stage: the table then shows
that build's resources.
Resident programs per SM are bounded by registers (65,536 per SM) and shared memory; a spill
stack above a few bytes means local-memory traffic on every chunk step. Triton's version
decides the numbers: compare them only for the Triton that runs the kernels.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from megatron_mom.ops.gated_delta_rule.chunk_bwd import chunk_bwd_main_kernel, state_bwd_kernel
from megatron_mom.ops.gated_delta_rule.chunk_fwd import state_fwd_kernel
from megatron_mom.ops.options import TUNED_LAUNCH, KernelOptions

SMEM_PER_BLOCK = 232448          # bytes a block may use on sm_90 (227 KB)
SMEM_PER_SM, REGS_PER_SM = 233472, 65536
BF16, F32, I32 = "*bf16", "*fp32", "*i32"


def build(fn, pointers: dict, consts: dict, num_warps: int, num_stages: int,
          scalars: dict = None) -> dict:
    """Compile fn for sm_90 with 16-byte aligned pointers (as the launches specialise them).
    `wgmma`: Hopper's warpgroup MMA instructions in the build; `mma`: the older per-warp MMA
    (a dot that Triton could not give to warpgroups runs there, at a fraction of the rate)."""
    sig = dict(pointers, **(scalars or {"scale": "fp32"}), **{c: "constexpr" for c in consts})
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]]
             for n, t in sig.items() if t.startswith("*")}
    kernel = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages))
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    shared = kernel.metadata.shared
    resident = min(REGS_PER_SM // (regs * 32 * num_warps), SMEM_PER_SM // max(shared, 1))
    return dict(regs=regs, stack=stack, shared=shared, fits=shared <= SMEM_PER_BLOCK,
                programs_per_sm=resident, wgmma=len(re.findall(r"\bHGMMA\.", sass)),
                mma=len(re.findall(r"\bHMMA\.", sass)))


def state_kernel(name: str, K: int, BV: int, num_warps: int, num_stages: int, H: int = 4,
                 C: int = 64, du0: bool = False) -> dict:
    """A bf16 training build: state_fwd_kernel storing the per-chunk states ("state_fwd", o
    after the chain) or computing o itself ("state_fwd_o", nothing stored), or
    state_bwd_kernel (no initial or final state; du0: P^T dO read, not computed)."""
    shape = dict(H=H, K=K, V=K, C=C, BV=BV, PREC="tf32", SQK=H * K, HN=H, ORDERED=False)
    if name.startswith("state_fwd"):
        pointers = dict(q=BF16, k=BF16, w=BF16, u0=BF16, gam=F32, p_mat=BF16, h0=BF16, o=BF16,
                        h_out=BF16, u_out=BF16, ht=F32, order=I32, cu_seqlens=I32,
                        chunk_offsets=I32)
        chain_o = name == "state_fwd_o"
        consts = dict(shape, HAS_H0=False, STORE_O=chain_o, STORE_STATES=not chain_o,
                      STORE_FINAL=False, SO=H * K)
        return build(state_fwd_kernel, pointers, consts, num_warps, num_stages)
    pointers = dict(q=BF16, k=BF16, w=BF16, gam=F32, p_mat=BF16, do=BF16, dht=BF16,
                    dh_out=BF16, du_out=BF16, dh0=BF16, order=I32, cu_seqlens=I32,
                    chunk_offsets=I32)
    consts = dict(shape, HAS_DHT=False, STORE_DH0=False, SDO=H * K, DU0=du0)
    return build(state_bwd_kernel, pointers, consts, num_warps, num_stages)


def chunk_bwd_main(K: int, BK: int, BV: int, num_warps: int, num_stages: int, one_pass: bool,
                   H: int = 4, C: int = 64, split_k: bool = False, dp_first: bool = False) -> dict:
    """The backward's main chunk-parallel kernel, bf16 inputs, dk partials in float32 (the
    fused L2 norm's case)."""
    pointers = dict(q=BF16, k=BF16, v=BF16, beta=F32, gam=F32, t_mat=BF16, h=BF16, dh=BF16,
                    u=BF16, du=BF16, do=BF16, dq=BF16, dv=BF16, dbeta=F32, dgam=F32,
                    scratch_cc=F32, scratch_dw=BF16, scratch_dk=F32, scratch_dp=BF16,
                    cu_seqlens=I32, chunk_offsets=I32)
    consts = dict(H=H, K=K, V=K, C=C, BK=min(BK, K), BV=min(BV, K), PREC="tf32",
                  ONE_PASS=one_pass, SPLIT_K=split_k, DP_FIRST=dp_first, SQK=H * K, SV=H * K,
                  SGB=H, SDO=H * K,
                  SDQK=H * K, SDV=H * K, SDB=H, SSK=H * K)
    return build(chunk_bwd_main_kernel, pointers, consts, num_warps, num_stages,
                 scalars=dict(N="i32", STEPS="i32", scale="fp32", GAM_PART="i32"))


def _dense_rows(K: int, variants: bool) -> list:
    blocks, main = TUNED_LAUNCH["chunk_bwd"], KernelOptions().entry("chunk_bwd_main", K)
    dp_first = bool(main["dp_first"])
    table = (blocks["BK"], blocks["BV"], main["num_warps"], main["num_stages"],
             bool(main["one_pass"]), bool(main["split_k"]))
    configs = [table + ("table",)]
    if variants:
        configs += [(bk, bv, w, st, op, split, "") for bk in (32, 64) for bv in (32, 64)
                    for w in (4, 8) for st in (1, 2) for op in (False, True)
                    for split in (False, True) if (bk, bv, w, st, op, split) != table]
    rows = []
    for bk, bv, w, st, op, split, note in configs:
        r = chunk_bwd_main(K, bk, bv, w, st, op, split_k=split, dp_first=dp_first)
        rows.append(f"| chunk_bwd_main | {bk} | {bv} | {w} | {st} | {int(op)} | {int(split)} | "
                    f"{r['regs']} | {r['stack']} | {r['shared']} | {r['programs_per_sm']} | "
                    f"{r['wgmma']} | {r['mma']} | {note} |")
        print(rows[-1], flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=256, help="head size K (= V)")
    parser.add_argument("--variants", action="store_true",
                        help="also BV 16/32/64 x 4/8 warps x 1/2/3 stages (state kernels), "
                        "BK, BV 32/64 x 4/8 warps x 1/2 stages x one pass or two x split "
                        "over K blocks or not (--dense)")
    parser.add_argument("--dense", action="store_true",
                        help="also chunk_bwd_main_kernel (launch entries chunk_bwd, chunk_bwd_main)")
    args = parser.parse_args(argv)
    rows = []
    for name in ("state_fwd", "state_fwd_o", "state_bwd"):
        table = KernelOptions().entry(name, args.k)
        configs = [(table["BV"], table["num_warps"], table["num_stages"], "table")]
        if args.variants:
            configs += [(bv, w, s, "") for bv in (16, 32, 64) for w in (4, 8) for s in (1, 2, 3)
                        if (bv, w, s) != configs[0][:3]]
        du0 = bool(table.get("du0", 0))                 # the table's form of the backward chain
        for bv, w, s, note in configs:
            r = state_kernel(name, args.k, min(bv, args.k), w, s, du0=du0)
            fits = "yes"
            if not r["fits"]:      # what runs instead: the one-stage build (ops.common.launch)
                fits = f"no ({r['shared']} B): the 1-stage build runs"
                r = state_kernel(name, args.k, min(bv, args.k), w, 1, du0=du0)
            rows.append(f"| {name} | {bv} | {w} | {s} | {fits} | {r['regs']} | {r['stack']} | "
                        f"{r['shared']} | {r['programs_per_sm']} | {r['wgmma']} | {r['mma']} | "
                        f"{note} |")
            print(rows[-1], flush=True)
    print(f"\nTriton {triton.__version__}, sm_90, K = V = {args.k}, bf16\n\n"
          "| kernel | BV | warps | stages | fits | registers | stack B | shared B | programs/SM "
          "| wgmma | mma | |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))
    if args.dense:
        dense = _dense_rows(args.k, args.variants)
        print("\n| kernel | BK | BV | warps | stages | one pass | split K | registers | stack B "
              "| shared B | programs/SM | wgmma | mma | |\n" + "|---" * 14 + "|\n"
              + "\n".join(dense))


if __name__ == "__main__":
    main()
