"""The candidate state kernels (benchmarks/state_candidates.py) against the package's, at the
MoM layer's shapes (tune_launch.py's packed segments, H=4, K=V=256, bf16): forward and
forward+backward medians of `gated_delta_rule`, and the largest relative difference of the
output and gradients from the default's.

    python benchmarks/bench_state_candidates.py [--out DIR]
"""
import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import state_candidates  # noqa: E402
import tune_launch  # noqa: E402
from megatron_mom.ops import KernelOptions  # noqa: E402
from megatron_mom.ops.gated_delta_rule import gated_delta_rule  # noqa: E402
from megatron_mom.ops.gated_delta_rule import triton as T  # noqa: E402

# (label, candidates to install, state_fwd launch changes, state_bwd launch changes)
VARIANTS = [
    ("default", {}, {}, {}),
    ("blocked, same launch", dict(blocked_fwd=True, blocked_bwd=True), {}, {}),
    ("blocked fwd BV16 s2", dict(blocked_fwd=True), dict(BV=16, num_stages=2), {}),
    ("blocked fwd BV16 s1", dict(blocked_fwd=True), dict(BV=16, num_stages=1), {}),
    ("blocked + separate o, BV32 s2", dict(blocked_fwd=True, separate_o=True), {}, {}),
    ("blocked + separate o, BV32 s3", dict(blocked_fwd=True, separate_o=True),
     dict(num_stages=3), {}),
    ("blocked + separate o, BV16 s3", dict(blocked_fwd=True, separate_o=True),
     dict(BV=16, num_stages=3), {}),
    ("blocked + separate o, BV32 w8 s2", dict(blocked_fwd=True, separate_o=True),
     dict(num_warps=8), {}),
    ("blocked bwd BV16 s1", dict(blocked_bwd=True), {}, dict(BV=16, num_stages=1)),
    ("blocked bwd BV32 s1", dict(blocked_bwd=True), {}, dict(BV=32, num_stages=1)),
    ("blocked bwd BV32 w8 s1", dict(blocked_bwd=True), {},
     dict(BV=32, num_warps=8, num_stages=1)),
]


def main(argv=None):
    from triton.testing import do_bench
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", tempfile.gettempdir()))
    args = parser.parse_args(argv)
    results = []
    for shape, seq, rows in tune_launch.SHAPES:
        gen = torch.Generator().manual_seed(0)
        cu = tune_launch.segments(rows, seq, gen)
        total = int(cu[-1])
        xs = tune_launch.inputs(total, gen)
        do = torch.randn(1, total, tune_launch.H, tune_launch.D, generator=gen).cuda().bfloat16()
        base = None
        for label, candidates, fwd_launch, bwd_launch in VARIANTS:
            opts = KernelOptions()
            if fwd_launch:
                opts = opts.with_launch("state_fwd", 256, **fwd_launch)
            if bwd_launch:
                opts = opts.with_launch("state_bwd", 256, **bwd_launch)
            undo = state_candidates.install(T, **{"blocked_fwd": False, "blocked_bwd": False,
                                                  **candidates})

            def forward():
                with torch.no_grad():
                    gated_delta_rule(*xs, cu_seqlens=cu, backend="triton", options=opts)
            try:
                out = tune_launch.run(opts, xs, cu, do)
                fwd_ms = do_bench(forward, warmup=5, rep=30, return_mode="median")
                both_ms = do_bench(lambda: tune_launch.run(opts, xs, cu, do), warmup=5, rep=30,
                                   return_mode="median")
            except Exception as err:  # noqa: BLE001 - a build that fails is a result here
                print(shape, label, "failed:", f"{type(err).__name__}: {err}"[:300], flush=True)
                continue
            finally:
                undo()
            base = base or (out, fwd_ms, both_ms)
            results.append(dict(shape=shape, variant=label, fwd_ms=fwd_ms, fwd_bwd_ms=both_ms,
                                fwd_x=base[1] / fwd_ms, fwd_bwd_x=base[2] / both_ms,
                                rel_diff=tune_launch.rel(out, base[0])))
            print(json.dumps(results[-1]), flush=True)
    lines = ["| shape | variant | fwd ms | speedup | fwd+bwd ms | speedup | max rel diff |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['variant']} | {r['fwd_ms']:.3f} | {r['fwd_x']:.2f} | "
              f"{r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_x']:.2f} | {r['rel_diff']:.1e} |"
              for r in results]
    text = f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n\n" + "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_state_candidates.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "bench_state_candidates.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
