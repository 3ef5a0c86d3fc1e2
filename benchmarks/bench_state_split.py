"""Time the gated delta rule's sequential state kernels over whole sequences against the
chunk-parallel split (`KernelOptions.state_split`), forward (`state_forward`: o, per-chunk
states, final state) and backward (`state_backward`: dh, dU, initial-state gradient), bf16.

    python benchmarks/bench_state_split.py [--pieces 8,16,32] [--shapes NAME ...] [--out DIR]
                                           [--tiny]

Shapes: B4 T4096 H4 D256 with MoM-like segments (each row: a shared segment of T tokens and
four memories' ragged segments, every token routed to 2 of 4), B1 T16384 H4 D256,
B1 T65536 H4 D256 (one sequence each, and with MoM-like segments), B1 T32768 H16 D128.
Each row: the unsplit grid's programs, whether "auto" splits there and the speedup its cost
model predicts (`split_gain`), median times
(`triton.testing.do_bench`), the speedup, and the split's largest relative difference from the
unsplit results (o, final state, dh, dU, initial-state gradient). Prints a markdown table and
writes bench_state_split.{md,json} to --out (default $OUT when set). --tiny: small shapes for
a smoke run (also on the CPU under TRITON_INTERPRET=1, timed by the wall clock).
Piece length and the auto rule are tuned from this table: KernelOptions.state_piece_chunks
and KernelOptions().launch["state_split"] (megatron_mom/ops/options.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_mom.ops import KernelOptions  # noqa: E402
from megatron_mom.ops.common import Segments  # noqa: E402
from megatron_mom.ops.gated_delta_rule import triton as gdr  # noqa: E402

# name: (B, T, H, D, MoM-like segments)
SHAPES = {
    "B4_T4096_H4_D256_mom": (4, 4096, 4, 256, True),
    "B1_T16384_H4_D256": (1, 16384, 4, 256, False),
    "B1_T16384_H4_D256_mom": (1, 16384, 4, 256, True),
    "B1_T65536_H4_D256": (1, 65536, 4, 256, False),
    "B1_T65536_H4_D256_mom": (1, 65536, 4, 256, True),
    "B1_T32768_H16_D128": (1, 32768, 16, 128, False),
}
TINY = {"tiny_B2_T256_H2_D64_mom": (2, 256, 2, 64, True), "tiny_B1_T512_H1_D64": (1, 512, 1, 64, False)}
CHUNK = 64


def mom_lengths(B, T, memories=4, top_k=2, seed=0):
    """Per row: the shared memory's T tokens, then each memory's token count when every token
    picks `top_k` of `memories` at random."""
    gen = torch.Generator().manual_seed(seed)
    lengths = []
    for _ in range(B):
        picks = torch.rand(T, memories, generator=gen).topk(top_k, dim=1).indices
        lengths += [T] + torch.bincount(picks.flatten(), minlength=memories).tolist()
    return lengths


def state_inputs(B, T, H, D, mom, device):
    """Segments and the state kernels' inputs (from `prepare`) of one shape, bf16."""
    lengths = mom_lengths(B, T) if mom else [T] * B
    cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    TT, N = sum(lengths), len(lengths)
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = torch.randn(TT, H, D, device=device, generator=gen).to(dtype)
    k = F.normalize(torch.randn(TT, H, D, device=device, generator=gen), dim=-1).to(dtype)
    v = torch.randn(TT, H, D, device=device, generator=gen).to(dtype)
    g = F.logsigmoid(torch.randn(TT, H, device=device, generator=gen) + 2.0)
    beta = torch.rand(TT, H, device=device, generator=gen)
    P = Segments(TT, H, D, D, cu, CHUNK)
    scale = D ** -0.5
    gam, w, u0, _, p_mat = gdr.prepare(P, q, k, v, g, beta, scale)
    h0 = 0.1 * torch.randn(N, H, D, D, device=device, generator=gen)
    do = torch.randn(TT, H, D, device=device, generator=gen).to(dtype)
    dht = torch.randn(N, H, D, D, device=device, generator=gen)
    return P, (q, k, w, u0, gam, p_mat, h0, do, dht, scale)


def runners(P, inputs, options):
    q, k, w, u0, gam, p_mat, h0, do, dht, scale = inputs
    dh0 = torch.empty_like(dht)

    def forward():
        return gdr.state_forward(P, q, k, w, u0, gam, p_mat, h0, scale, store_o=True,
                                 store_states=True, store_final=True, options=options)

    def backward():
        return gdr.state_backward(P, q, k, w, gam, p_mat, do, dht, scale, dh0, options) + (dh0,)
    return forward, backward


def median_ms(fn, quick):
    if torch.cuda.is_available():
        from triton.testing import do_bench
        return do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100,
                        return_mode="median")
    fn()
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def largest_difference(P, split, unsplit) -> float:
    """Largest relative difference over o, U, final state, dU, dh0 and the real chunks' h, dh."""
    real = int(P.offsets[-1])
    errs = []
    for a, b in zip(split, unsplit):
        if a.shape[0] == P.NTU:
            a, b = a[:real], b[:real]
        errs.append(rel_err(a, b))
    return max(errs)


def bench_shape(name, shape, pieces, quick, device):
    B, T, H, D, mom = shape
    P, inputs = state_inputs(B, T, H, D, mom, device)
    BV = gdr._state_config(KernelOptions(), "state_fwd", D, D, inputs[1].dtype)["BV"]
    fwd, bwd = runners(P, inputs, KernelOptions(state_split="off"))
    base = {"fwd": median_ms(fwd, quick), "bwd": median_ms(bwd, quick)}
    reference = [t for t in fwd() + bwd() if t is not None]
    rows = []
    for L in pieces:
        options = KernelOptions(state_split="on", state_piece_chunks=L)
        s_fwd, s_bwd = runners(P, inputs, options)
        got = [t for t in s_fwd() + s_bwd() if t is not None]
        timing = {"fwd": median_ms(s_fwd, quick), "bwd": median_ms(s_bwd, quick)}
        rows.append({
            "shape": name, "N": P.N, "tokens": P.TT, "programs": P.V // BV * P.H * P.N,
            "piece_chunks": L, "pieces": P.pieces(L).NPU,
            "auto_splits": gdr.split_pieces(P, KernelOptions(state_piece_chunks=L), BV) == L,
            "model_gain": gdr.split_gain(P, L, BV, KernelOptions().launch["state_split"]),
            "fwd_unsplit_ms": base["fwd"], "fwd_split_ms": timing["fwd"],
            "bwd_unsplit_ms": base["bwd"], "bwd_split_ms": timing["bwd"],
            "max_rel_diff": largest_difference(P, got, reference)})
        print(json.dumps(rows[-1]), flush=True)
    del inputs, reference
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def markdown(rows, header):
    lines = [header, "",
             "| shape | N | programs | L (chunks) | pieces | auto (model x) | fwd unsplit | "
             "fwd split | fwd x | bwd unsplit | bwd split | bwd x | max rel diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['N']} | {r['programs']} | {r['piece_chunks']} | {r['pieces']} "
            f"| {'split' if r['auto_splits'] else '-'} ({r['model_gain']:.2f}) | "
            f"{r['fwd_unsplit_ms']:.3f} | "
            f"{r['fwd_split_ms']:.3f} | {r['fwd_unsplit_ms'] / r['fwd_split_ms']:.2f} | "
            f"{r['bwd_unsplit_ms']:.3f} | {r['bwd_split_ms']:.3f} | "
            f"{r['bwd_unsplit_ms'] / r['bwd_split_ms']:.2f} | {r['max_rel_diff']:.1e} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pieces", default="8,16,32", help="piece lengths in chunks, comma "
                        "separated")
    parser.add_argument("--shapes", nargs="*", help=f"a subset of {', '.join(SHAPES)}")
    parser.add_argument("--tiny", action="store_true", help="small shapes (smoke run)")
    parser.add_argument("--quick", action="store_true", help="fewer timing repetitions")
    parser.add_argument("--out", default=os.environ.get("OUT"))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    table = TINY if args.tiny else SHAPES
    names = args.shapes or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        parser.error(f"--shapes: unknown {unknown}; use some of {', '.join(table)}")
    pieces = [int(x) for x in args.pieces.split(",")]
    rows = []
    for name in names:
        rows += bench_shape(name, table[name], pieces, args.quick, device)
    env = (f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu (interpreter)'}, "
           f"torch {torch.__version__}, triton {__import__('triton').__version__}, "
           f"{time.strftime('%Y-%m-%d', time.gmtime())}")
    text = markdown(rows, f"State kernels, whole sequences vs pieces (ms, median; {env})")
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_state_split.md"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(args.out, "bench_state_split.json"), "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
