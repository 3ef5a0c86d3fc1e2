"""Launch-setting sweep of the gated delta rule's Triton kernels at the MoM layer's shapes: packed
memory segments as routing makes them (per batch row: the shared memory's segment over every
token and M=4 memories sharing top-2 of them), H=4 heads of K=V=256, bf16.

    python benchmarks/tune_launch.py [--out DIR] [--quick]

Each variant changes one kernel's launch entry (KernelOptions.with_launch) from the tuned table;
its forward+backward median (`triton.testing.do_bench`) is reported next to the default's, with
the largest relative difference of its output and gradients from the default's (a wrong build
shows up there: Triton 3.6 on Hopper miscompiles some patterns). Writes tune_launch.md/json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_mom.ops import KernelOptions  # noqa: E402
from megatron_mom.ops.gated_delta_rule import gated_delta_rule  # noqa: E402

H, D = 4, 256
# (name, tokens per batch row, batch rows)
SHAPES = [("B4 T4096", 4096, 4), ("B1 T16384", 16384, 1)]
VARIANTS = [
    ("default", None, None, {}),
    ("chunk_bwd BK128", "chunk_bwd", None, {"BK": 128}),
    ("chunk_bwd BV128", "chunk_bwd", None, {"BV": 128}),
    ("chunk_bwd BK32 BV32", "chunk_bwd", None, {"BK": 32, "BV": 32}),
    ("chunk_bwd_main w8", "chunk_bwd_main", None, {"num_warps": 8}),
    ("chunk_bwd_main s2", "chunk_bwd_main", None, {"num_stages": 2}),
    ("chunk_bwd_main w8 s2", "chunk_bwd_main", None, {"num_warps": 8, "num_stages": 2}),
    ("chunk_bwd_main one pass", "chunk_bwd_main", None, {"one_pass": 1}),
    ("chunk_bwd_main one pass w8", "chunk_bwd_main", None, {"one_pass": 1, "num_warps": 8}),
    ("chunk_bwd_wy w8", "chunk_bwd_wy", None, {"num_warps": 8}),
    ("state_fwd s2", "state_fwd", 256, {"num_stages": 2}),
    ("state_fwd BV16 s3", "state_fwd", 256, {"BV": 16}),
    ("state_fwd BV64 s2", "state_fwd", 256, {"BV": 64, "num_stages": 2}),
    ("state_fwd w8", "state_fwd", 256, {"num_warps": 8}),
    ("chunk_out BV32", "chunk_out", None, {"BV": 32}),
    ("chunk_out BV128", "chunk_out", None, {"BV": 128}),
    ("chunk_out BK128", "chunk_out", None, {"BK": 128}),
    ("chunk_out w8", "chunk_out", None, {"num_warps": 8}),
    ("chunk_out s1", "chunk_out", None, {"num_stages": 1}),
    ("state_bwd BV32", "state_bwd", 256, {"BV": 32}),
    ("state_bwd w8", "state_bwd", 256, {"num_warps": 8}),
    ("state_bwd s1", "state_bwd", 256, {"num_stages": 1}),
    ("state_bwd BV32 s1", "state_bwd", 256, {"BV": 32, "num_stages": 1}),
    ("prepare BK128", "prepare", None, {"BK": 128}),
    ("prepare w8", "prepare", None, {"num_warps": 8}),
]


def segments(rows: int, seq: int, gen: torch.Generator):
    """cu_seqlens of the packed memory segments: per row, 4 memories taking top-2 of `seq`
    tokens (random split) and the shared memory's segment of all of them."""
    lengths = []
    for _ in range(rows):
        share = torch.rand(4, generator=gen) + 0.5
        mem = (share / share.sum() * 2 * seq).long()
        mem[-1] = 2 * seq - mem[:-1].sum()
        lengths += mem.tolist() + [seq]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return cu.cuda()


def inputs(total: int, gen: torch.Generator):
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


def main(argv=None):
    from triton.testing import do_bench
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", tempfile.gettempdir()))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated kernel names: vary only "
                        "these (e.g. state_fwd,state_bwd); the default is always measured")
    args = parser.parse_args(argv)
    results = []
    for name, seq, rows in SHAPES:
        gen = torch.Generator().manual_seed(0)
        cu = segments(rows, seq, gen)
        total = int(cu[-1])
        xs = inputs(total, gen)
        do = torch.randn(1, total, H, D, generator=gen).cuda().bfloat16()
        base = None
        only = set(filter(None, args.only.split(",")))
        for label, kernel, bound, settings in VARIANTS:
            if only and kernel is not None and kernel not in only:
                continue
            opts = KernelOptions() if kernel is None else KernelOptions().with_launch(
                kernel, bound, **settings)
            try:
                out = run(opts, xs, cu, do)
                ms = do_bench(lambda: run(opts, xs, cu, do), warmup=5 if args.quick else 20,
                              rep=20 if args.quick else 60, return_mode="median")
            except Exception as err:  # noqa: BLE001 - a build that fails is a result here
                results.append(dict(shape=name, variant=label, error=f"{type(err).__name__}: {err}"[:200]))
                print(name, label, "failed:", results[-1]["error"], flush=True)
                continue
            base = base or (out, ms)
            results.append(dict(shape=name, variant=label, ms=ms, vs_default=ms / base[1],
                                rel_diff=rel(out, base[0])))
            print(name, label, f"{ms:.3f} ms", f"x{ms / base[1]:.3f}",
                  f"diff {results[-1]['rel_diff']:.1e}", flush=True)
    lines = ["| shape | variant | fwd+bwd ms | vs default | max rel diff |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['shape']} | {r['variant']} | " + (
            f"{r['ms']:.3f} | {r['vs_default']:.3f} | {r['rel_diff']:.1e} |" if "ms" in r
            else f"{r['error']} | | |"))
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tune_launch.md"), "w") as f:
        f.write(f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n\n{text}\n")
    with open(os.path.join(args.out, "tune_launch.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
