"""A `gated_delta_rule` forward+backward at MoM's routed segments (tune_launch.py's packing:
per batch row four memories sharing top-2 of the tokens and the shared memory's segment over
all of them; H = 4, K = V = 256, bf16), run four times for Nsight Compute to profile one
launch of each kernel past the first builds:

    ncu --clock-control none --set full -k "regex:state_fwd_kernel|chunk_bwd_main_kernel" \\
        --launch-skip 3 --launch-count 2 -o prof python benchmarks/ncu_gdr.py 4 4096 \\
        [chunk_bwd_main.split_k=1 state_bwd.256.du0=1 ...]

Arguments: batch rows, tokens per row, then launch settings as bench_gpt.py's --launch takes
them (KERNEL.KEY=N or KERNEL.K.KEY=N). docs/performance.md has what it showed.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpt import launch_options  # noqa: E402
from tune_launch import inputs, run, segments  # noqa: E402


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    rows, seq = int(argv[0]), int(argv[1])
    options = launch_options(argv[2:])
    gen = torch.Generator().manual_seed(0)
    cu = segments(rows, seq, gen, True)
    xs = inputs(int(cu[-1]), 4, 256, gen)
    do = torch.randn(1, int(cu[-1]), 4, 256, generator=gen).cuda().bfloat16()
    for _ in range(4):
        run(options, xs, cu, do)
    torch.cuda.synchronize()
    print("done:", argv[2:], "segments", (cu[1:] - cu[:-1]).tolist())


if __name__ == "__main__":
    main()
