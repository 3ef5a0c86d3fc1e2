"""Launch-setting sweep of the gated delta rule's Triton kernels at the MoM layer's shapes: packed
memory segments as routing makes them (per batch row: the shared memory's segment over every
token and M=4 memories sharing top-2 of them), H=4 heads of K=V=256, bf16; with `--k 128`,
plain batch rows of H=16 heads of K=V=128 (the kernel benchmark's B4 T4096 H16 D128).

    python benchmarks/tune_launch.py [--out DIR] [--quick] [--k 128|256] [--rounds N]

Each variant changes launch entries (KernelOptions.with_launch) of the tuned table;
its forward+backward time is reported next to the default's, with the largest relative
difference of its output and gradients from the default's (a wrong build shows up there:
Triton 3.6 on Hopper miscompiles some patterns). Every variant is built and checked first;
then `rounds` rounds time each variant in turn (`triton.testing.do_bench` median), so a drift of
the machine's speed reaches all variants alike; reported: the median over the rounds and its
spread (max - min over median). Writes tune_launch.md/json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_mom.ops import KernelOptions  # noqa: E402
from megatron_mom.ops.gated_delta_rule import gated_delta_rule  # noqa: E402

# K: (heads, [(name, tokens per batch row, batch rows, routed segments)])
SETUPS = {256: (4, [("B4 T4096", 4096, 4, True), ("B1 T16384", 16384, 1, True)]),
          128: (16, [("B4 T4096", 4096, 4, False), ("B1 T32768", 32768, 1, False)])}
# (name, kernel, K bound of a state kernel's entry ("K": the K being tuned), settings)
VARIANTS = [
    ("default", None, None, {}),
    ("chunk_bwd BK128", "chunk_bwd", None, {"BK": 128}),
    ("chunk_bwd BV128", "chunk_bwd", None, {"BV": 128}),
    ("chunk_bwd BK32 BV32", "chunk_bwd", None, {"BK": 32, "BV": 32}),
    # K = 256: the main kernel's build without the table's 168-byte spill, still 2 programs
    # per SM (kernel_resources.py --dense; docs/performance.md).
    ("chunk_bwd BV32", "chunk_bwd", None, {"BV": 32}),
    ("chunk_bwd_main w8", "chunk_bwd_main", "K", {"num_warps": 8}),
    ("chunk_bwd_main s2", "chunk_bwd_main", "K", {"num_stages": 2}),
    ("chunk_bwd_main w8 s2", "chunk_bwd_main", "K", {"num_warps": 8, "num_stages": 2}),
    ("chunk_bwd_main one pass", "chunk_bwd_main", "K", {"one_pass": 1}),
    ("chunk_bwd_main one pass w8", "chunk_bwd_main", "K", {"one_pass": 1, "num_warps": 8}),
    # A program per K block: each reads h and dh once, its chunk's siblings share dO, dU, U
    # in L2 (ncu: the unsplit kernel's loads stall its shared-memory stores, 2.75 GB from DRAM).
    ("chunk_bwd_main split K", "chunk_bwd_main", "K", {"split_k": 1}),
    ("chunk_bwd_main split K s2", "chunk_bwd_main", "K", {"split_k": 1, "num_stages": 2}),
    ("chunk_bwd_main split K one pass", "chunk_bwd_main", "K", {"split_k": 1, "one_pass": 1}),
    # dP and the value terms by a kernel of their own first: the split's K-block programs
    # read dP instead of each computing it (four times the dP dots at K = 256).
    ("chunk_bwd_main split K dP first", "chunk_bwd_main", "K", {"split_k": 1, "dp_first": 1}),
    ("chunk_bwd_main split K dP first s2", "chunk_bwd_main", "K",
     {"split_k": 1, "dp_first": 1, "num_stages": 2}),
    ("chunk_bwd_main dP first", "chunk_bwd_main", "K", {"dp_first": 1}),
    # The K = 256 entry before the split with dP first was adopted (2026-12-07).
    ("chunk_bwd_main whole s1", "chunk_bwd_main", "K",
     {"split_k": 0, "dp_first": 0, "num_stages": 1}),
    # Around the K = 256 entry (split, dP first, 2 stages): the K-block programs no longer
    # hold dP's two dots, which leaves room for more stages (or for "chunk_bwd_main w8" and
    # "chunk_bwd_main one pass" above, relative to this entry).
    ("chunk_bwd_main s3", "chunk_bwd_main", "K", {"num_stages": 3}),
    ("chunk_bwd_main BV32 s3", "multi", None, [("chunk_bwd", None, {"BV": 32}),
                                               ("chunk_bwd_main", "K", {"num_stages": 3})]),
    ("chunk_bwd BK128 w8 split K dP first", "multi", None, [
        ("chunk_bwd", None, {"BK": 128}),
        ("chunk_bwd_main", "K", {"num_warps": 8, "split_k": 1, "dp_first": 1}),
        ("chunk_bwd_wy", None, {"num_warps": 8})]),
    # K blocks of 128 on 8 warps (no spill at K = 256, kernel_resources.py): two K blocks per
    # chunk, so dO, dU and U are re-read twice instead of four times (the ncu finding), or
    # split over them with dP computed twice instead of four times.
    ("chunk_bwd BK128 w8", "multi", None, [("chunk_bwd", None, {"BK": 128}),
                                           ("chunk_bwd_main", "K", {"num_warps": 8}),
                                           ("chunk_bwd_wy", None, {"num_warps": 8})]),
    ("chunk_bwd BK128 w8 split K", "multi", None, [
        ("chunk_bwd", None, {"BK": 128}), ("chunk_bwd_main", "K", {"num_warps": 8, "split_k": 1}),
        ("chunk_bwd_wy", None, {"num_warps": 8})]),
    ("chunk_bwd BK128 BV32 w8 split K", "multi", None, [
        ("chunk_bwd", None, {"BK": 128, "BV": 32}),
        ("chunk_bwd_main", "K", {"num_warps": 8, "split_k": 1}),
        ("chunk_bwd_wy", None, {"num_warps": 8})]),
    ("chunk_bwd_wy w8", "chunk_bwd_wy", None, {"num_warps": 8}),
    # The state kernels reading T ([C, C]) and beta in place of W ([C, K]); prepare still
    # stores W (the split's per-piece transfers read it).
    ("w from T", "multi", None, [("state_fwd", "K", {"w_from_t": 1}),
                                 ("state_fwd_o", "K", {"w_from_t": 1}),
                                 ("state_bwd", "K", {"w_from_t": 1})]),
    ("state_fwd s2", "state_fwd", "K", {"num_stages": 2}),
    # K = 256 without prefetching: small enough for 3 (BV 32) or 4 (BV 16) programs per SM,
    # which hide each other's chunk-step latency instead (kernel_resources.py --variants).
    ("state_fwd s1", "state_fwd", "K", {"num_stages": 1}),
    ("state_fwd BV16 s1", "state_fwd", "K", {"BV": 16, "num_stages": 1}),
    ("state_fwd s3", "state_fwd", "K", {"num_stages": 3}),
    ("state_fwd BV16", "state_fwd", "K", {"BV": 16}),
    ("state_fwd BV32", "state_fwd", "K", {"BV": 32}),
    ("state_fwd BV64 s2", "state_fwd", "K", {"BV": 64, "num_stages": 2}),
    ("state_fwd w4", "state_fwd", "K", {"num_warps": 4}),
    ("state_fwd w8", "state_fwd", "K", {"num_warps": 8}),
    # Wider V blocks on 8 warps: half the programs re-reading each chunk's q, k and W.
    ("state_fwd BV64 w8 s2", "state_fwd", "K", {"BV": 64, "num_warps": 8, "num_stages": 2}),
    ("state_fwd BV64 w8 s1", "state_fwd", "K", {"BV": 64, "num_warps": 8, "num_stages": 1}),
    ("o in the chain", "chunk_out", None, {"min_k": 1 << 30}),
    ("o in the chain, one pass", "multi", None, [("chunk_out", None, {"min_k": 1 << 30}),
                                                 ("chunk_bwd_main", "K", {"one_pass": 1})]),
    ("state_fwd_o BV16", "state_fwd_o", "K", {"BV": 16}),
    ("state_fwd_o BV32", "state_fwd_o", "K", {"BV": 32}),
    ("chunk_out BV32", "chunk_out", None, {"BV": 32}),
    ("chunk_out BV128", "chunk_out", None, {"BV": 128}),
    ("chunk_out BK128", "chunk_out", None, {"BK": 128}),
    ("chunk_out w8", "chunk_out", None, {"num_warps": 8}),
    ("chunk_out s1", "chunk_out", None, {"num_stages": 1}),
    ("state kernels in index order", "state_order", None, {"longest_first": 0}),
    ("state_bwd BV16", "state_bwd", "K", {"BV": 16}),
    ("state_bwd BV32", "state_bwd", "K", {"BV": 32}),
    ("state_bwd w4", "state_bwd", "K", {"num_warps": 4}),
    ("state_bwd w8", "state_bwd", "K", {"num_warps": 8}),
    ("state_bwd s1", "state_bwd", "K", {"num_stages": 1}),
    ("state_bwd BV32 s1", "state_bwd", "K", {"BV": 32, "num_stages": 1}),
    ("state_bwd BV32 w8 s1", "state_bwd", "K", {"BV": 32, "num_warps": 8, "num_stages": 1}),
    ("state_bwd BV64 w8 s1", "state_bwd", "K", {"BV": 64, "num_warps": 8, "num_stages": 1}),
    # P^T dO before the chain (du0): two-stage BV 32 builds fit at K = 256, 8 programs per
    # (head, sequence) re-reading q, k, W each chunk step instead of 16.
    ("state_bwd du0", "state_bwd", "K", {"du0": 1}),
    ("state_bwd P in the chain BV16", "state_bwd", "K", {"du0": 0, "BV": 16}),
    ("state_bwd du0 BV32 s2", "state_bwd", "K", {"du0": 1, "BV": 32, "num_stages": 2}),
    ("state_bwd du0 BV32 w8 s2", "state_bwd", "K",
     {"du0": 1, "BV": 32, "num_warps": 8, "num_stages": 2}),
    # 4 programs per (head, sequence): 254 registers, no spill, 64 KB shared at K = 256.
    ("state_bwd du0 BV64 w8 s1", "state_bwd", "K",
     {"du0": 1, "BV": 64, "num_warps": 8, "num_stages": 1}),
    ("prepare BK128", "prepare", None, {"BK": 128}),
    ("prepare w8", "prepare", None, {"num_warps": 8}),
    ("prepare w2", "prepare", None, {"num_warps": 2}),
    ("prepare s2", "prepare", None, {"num_stages": 2}),
    ("chunk_bwd_wy s2", "chunk_bwd_wy", None, {"num_stages": 2}),
]


def segments(rows: int, seq: int, gen: torch.Generator, routed: bool = True):
    """cu_seqlens of the packed memory segments: per row, 4 memories taking top-2 of `seq`
    tokens (random split) and the shared memory's segment of all of them; not routed: the
    rows themselves."""
    lengths = [] if routed else [seq] * rows
    for _ in range(rows if routed else 0):
        share = torch.rand(4, generator=gen) + 0.5
        mem = (share / share.sum() * 2 * seq).long()
        mem[-1] = 2 * seq - mem[:-1].sum()
        lengths += mem.tolist() + [seq]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return cu.cuda()


def inputs(total: int, H: int, D: int, gen: torch.Generator):
    rand = lambda *s: torch.randn(*s, generator=gen).cuda()  # noqa: E731
    q = F.normalize(rand(1, total, H, D), dim=-1).bfloat16()
    k = F.normalize(rand(1, total, H, D), dim=-1).bfloat16()
    v = rand(1, total, H, D).bfloat16()
    g = F.logsigmoid(rand(1, total, H) + 3.0)
    beta = torch.rand(1, total, H, generator=gen).cuda()
    return [x.requires_grad_() for x in (q, k, v, g, beta)]


def run(options, xs, cu, do):
    for x in xs:
        x.grad = None
    o, _ = gated_delta_rule(*xs, cu_seqlens=cu, backend="triton", options=options)
    o.backward(do)
    return [o.detach()] + [x.grad.clone() for x in xs]


def rel(a, b):
    return max(float((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-30))
               for x, y in zip(a, b))


def changes_of(kernel, bound, settings) -> list:
    """A variant's launch-entry changes as (kernel, bound, settings) triples: one, or the list
    of a "multi" variant (several entries changed together); none for the default."""
    if kernel is None:
        return []
    return list(settings) if kernel == "multi" else [(kernel, bound, settings)]


def options_of(kernel, bound, settings, K: int) -> KernelOptions:
    """The tuned options with one variant's changes."""
    opts = KernelOptions()
    for name, at, changes in changes_of(kernel, bound, settings):
        opts = opts.with_launch(name, K if at == "K" else at, **changes)
    return opts


def main(argv=None):
    from triton.testing import do_bench
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", tempfile.gettempdir()))
    parser.add_argument("--quick", action="store_true", help="the first shape only, shorter")
    parser.add_argument("--k", type=int, choices=sorted(SETUPS), default=256,
                        help="head size K = V (the state kernels' entries for this K)")
    parser.add_argument("--rounds", type=int, default=0, help="timing rounds (default 5, quick 3)")
    parser.add_argument("--only", default="", help="comma-separated kernel names: vary only "
                        "these (e.g. state_fwd,state_bwd); the default is always measured")
    parser.add_argument("--variants", default="", help="comma-separated variant names (as "
                        "listed in VARIANTS): time only these and the default")
    args = parser.parse_args(argv)
    H, shapes = SETUPS[args.k]
    shapes = shapes[:1] if args.quick else shapes
    rounds = args.rounds or (3 if args.quick else 5)
    only = set(filter(None, args.only.split(",")))
    names = set(filter(None, args.variants.split(",")))
    unknown = names - {v[0] for v in VARIANTS}
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)}; "
                     f"the names are {[v[0] for v in VARIANTS]}")
    chosen = [v for v in VARIANTS if v[1] is None
              or ((not only or any(c[0] in only for c in changes_of(*v[1:])))
                  and (not names or v[0] in names))]
    results = []
    for name, seq, rows, routed in shapes:
        gen = torch.Generator().manual_seed(0)
        cu = segments(rows, seq, gen, routed)
        total = int(cu[-1])
        xs = inputs(total, H, args.k, gen)
        do = torch.randn(1, total, H, args.k, generator=gen).cuda().bfloat16()
        built, base_out = [], None
        for label, kernel, bound, settings in chosen:      # build and check each variant
            try:
                opts = options_of(kernel, bound, settings, args.k)
                out = run(opts, xs, cu, do)
            except Exception as err:  # noqa: BLE001 - a build that fails is a result here
                results.append(dict(shape=name, variant=label,
                                    error=f"{type(err).__name__}: {err}"[:200]))
                print(name, label, "failed:", results[-1]["error"], flush=True)
                continue
            base_out = base_out if base_out is not None else out
            built.append((label, opts, rel(out, base_out)))
        times = {label: [] for label, _, _ in built}
        for _ in range(rounds):
            for label, opts, _ in built:
                times[label].append(do_bench(lambda: run(opts, xs, cu, do), warmup=5,
                                             rep=15 if args.quick else 30, return_mode="median"))
        base_ms = statistics.median(times[built[0][0]])
        for label, _, diff in built:
            ms = statistics.median(times[label])
            spread = (max(times[label]) - min(times[label])) / ms
            results.append(dict(shape=name, variant=label, ms=ms, vs_default=ms / base_ms,
                                spread=spread, rounds=times[label], rel_diff=diff))
            print(name, label, f"{ms:.3f} ms", f"x{ms / base_ms:.3f}", f"spread {spread:.0%}",
                  f"diff {diff:.1e}", flush=True)
    lines = [f"K = V = {args.k}, H = {H}, {rounds} rounds", "",
             "| shape | variant | fwd+bwd ms | vs default | spread | max rel diff |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['shape']} | {r['variant']} | " + (
            f"{r['ms']:.3f} | {r['vs_default']:.3f} | {r['spread']:.0%} | {r['rel_diff']:.1e} |"
            if "ms" in r else f"{r['error']} | | | |"))
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"tune_launch_k{args.k}.md"), "w") as f:
        f.write(f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n\n{text}\n")
    with open(os.path.join(args.out, f"tune_launch_k{args.k}.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
