"""Time megatron_mom's Triton gated delta rule against fla's `chunk_gated_delta_rule` and
PyTorch SDPA flash attention, in one run, at the shapes of /work/shared/baselines/peer_h100.json.

    python benchmarks/bench_kernels.py [--out DIR] [--no-fla] [--sweep] [--quick]

Forward and forward+backward medians from `triton.testing.do_bench` (bf16), a TFLOP/s estimate
(same formula as the peer probe: B*T*H*(2*C*D*4 + 2*D*D*6) per forward), the ratio to fla,
and the peak memory of one forward+backward above what the inputs take. Writes
bench_kernels.json and bench_kernels.md to --out (default $OUT, else the temp folder).
fla refuses its gated backward on Hopper with Triton 3.4-3.7.0 (wrong gradients); as in the
peer probe the guard is lifted for timing only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_mom.ops.gated_delta_rule import gated_delta_rule  # noqa: E402
from megatron_mom.ops.gated_delta_rule import triton as gdr_triton  # noqa: E402

MAIN_SHAPES = [(4, 4096, 16, 128), (4, 4096, 4, 256)]
SCALING_SHAPES = [(8, 2048, 16, 128), (2, 8192, 16, 128), (2, 32768, 16, 128),
                  (8, 2048, 4, 256), (2, 8192, 4, 256), (2, 32768, 4, 256)]
CHUNK = 64


def do_bench(fn, quick=False):
    from triton.testing import do_bench as bench
    return bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100, return_mode="median")


def fwd_flops(B, T, H, D):
    return B * T * H * (2 * CHUNK * D * 4 + 2 * D * D * 6)


def gdr_inputs(B, T, H, D, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, T, H, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    k = F.normalize(torch.randn(B, T, H, D, device="cuda", generator=gen), dim=-1).bfloat16()
    v = torch.randn(B, T, H, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    g = F.logsigmoid(torch.randn(B, T, H, device="cuda", generator=gen))
    beta = torch.rand(B, T, H, device="cuda", generator=gen)
    return [x.requires_grad_() for x in (q, k, v, g, beta)]


def timed(run, quick):
    """fwd ms, fwd+bwd ms, peak extra GiB of one fwd+bwd."""
    def fwd_bwd():
        out = run()
        out.backward(torch.ones_like(out))

    fwd_bwd()
    fwd_ms = do_bench(lambda: run(), quick)
    fb_ms = do_bench(fwd_bwd, quick)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return {"fwd_ms": fwd_ms, "fwdbwd_ms": fb_ms, "peak_extra_GiB": peak}


def ours(B, T, H, D, quick):
    q, k, v, g, beta = gdr_inputs(B, T, H, D)
    return timed(lambda: gated_delta_rule(q, k, v, g, beta, backend="triton")[0], quick)


def fla_fn():
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        import fla.ops.common.chunk_o as chunk_o
    except Exception as e:                                    # noqa: BLE001
        print("fla not importable:", repr(e)[:200])
        return None
    chunk_o.TRITON_ABOVE_3_7_1 = True                         # timing only, see module doc
    return chunk_gated_delta_rule


def fla(fn, B, T, H, D, quick):
    q, k, v, g, beta = gdr_inputs(B, T, H, D)
    return timed(lambda: fn(q, k, v, g=g, beta=beta)[0], quick)


def sdpa(B, T, H, D, quick):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, device="cuda", generator=gen, dtype=torch.bfloat16)
               .requires_grad_() for _ in range(3))
    r = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), quick)
    r["fwd_tflops"] = 4 * B * H * T * T * D / 2 / (r["fwd_ms"] * 1e-3) / 1e12
    return r


def kernel_breakdown(B, T, H, D, quick):
    """Median ms of each of our kernels at one shape (launches as in a fwd+bwd)."""
    q, k, v, g, beta = (x.detach() for x in gdr_inputs(B, T, H, D))
    P = gdr_triton._Packed(k, v, None, CHUNK)
    q3, k3, v3 = (x.reshape(P.TT, H, D) for x in (q, k, v))
    g2, b2 = g.reshape(P.TT, H), beta.reshape(P.TT, H)
    scale = D ** -0.5
    gam, w, u0, t_mat, p_mat = gdr_triton._prepare(P, q3, k3, v3, g2, b2, scale)
    o, h, u, _ = gdr_triton._state_forward(P, q3, k3, w, u0, gam, p_mat, None, scale, store_o=True,
                                           store_states=True, store_final=False)
    do = torch.randn_like(o)
    dh, du, _ = gdr_triton._state_backward(P, q3, k3, w, gam, p_mat, do, None, scale, False)
    return {
        "prepare": do_bench(lambda: gdr_triton._prepare(P, q3, k3, v3, g2, b2, scale), quick),
        "state_fwd": do_bench(lambda: gdr_triton._state_forward(
            P, q3, k3, w, u0, gam, p_mat, None, scale, store_o=True, store_states=True,
            store_final=False), quick),
        "state_bwd": do_bench(lambda: gdr_triton._state_backward(
            P, q3, k3, w, gam, p_mat, do, None, scale, False), quick),
        "chunk_bwd (3 kernels)": do_bench(lambda: gdr_triton._chunk_backward(
            P, q3, k3, v3, b2, gam, t_mat, h, dh, u, du, do, scale, q3.dtype), quick),
    }


SWEEP_STATE = [{"BV": 64, "num_warps": 8, "num_stages": 2}, {"BV": 32, "num_warps": 4, "num_stages": 2},
               {"BV": 32, "num_warps": 8, "num_stages": 2}, {"BV": 64, "num_warps": 4, "num_stages": 2}]
SWEEP_STATE_256 = [{"BV": 16, "num_warps": 4, "num_stages": 2}, {"BV": 32, "num_warps": 8, "num_stages": 1},
                   {"BV": 16, "num_warps": 8, "num_stages": 2}]


def sweep(quick):
    """fwd+bwd ms of a few launch settings of the sequential kernels at the main shapes."""
    out = {}
    for shape, options, bound in [(MAIN_SHAPES[0], SWEEP_STATE, 128), (MAIN_SHAPES[1], SWEEP_STATE_256, 256)]:
        saved = {kn: dict(gdr_triton.CONFIG[kn][bound]) for kn in ("state_fwd", "state_bwd")}
        for opt in options:
            for kn in ("state_fwd", "state_bwd"):
                gdr_triton.CONFIG[kn][bound] = dict(opt)
            try:
                bd = kernel_breakdown(*shape, quick)
                out[f"{shape} {opt}"] = {"state_fwd": bd["state_fwd"], "state_bwd": bd["state_bwd"]}
            except Exception as e:                            # noqa: BLE001
                out[f"{shape} {opt}"] = {"error": repr(e)[:200]}
            print("sweep", shape, opt, out[f"{shape} {opt}"], flush=True)
        for kn in ("state_fwd", "state_bwd"):
            gdr_triton.CONFIG[kn][bound] = saved[kn]
    return out


def markdown(res):
    lines = ["| shape (bf16) | impl | fwd ms | fwd+bwd ms | fwd TFLOP/s (est.) | fwd+bwd vs fla | peak extra GiB |",
             "|---|---|---|---|---|---|---|"]
    for key, row in res["shapes"].items():
        fla_fb = row.get("fla", {}).get("fwdbwd_ms")
        for impl in ("ours", "fla", "sdpa"):
            r = row.get(impl)
            if not r or "fwd_ms" not in r:
                continue
            ratio = f"{fla_fb / r['fwdbwd_ms']:.2f}x" if fla_fb and impl != "fla" else ""
            tf = r.get("fwd_tflops", r.get("approx_fwd_tflops", float("nan")))
            lines.append(f"| {key} | {impl} | {r['fwd_ms']:.3f} | {r['fwdbwd_ms']:.3f} | {tf:.0f} | "
                         f"{ratio} | {r['peak_extra_GiB']:.2f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT") or tempfile.gettempdir())
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-scaling", action="store_true")
    args = ap.parse_args()
    import triton
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), "shapes": {}}
    fla_chunk = None if args.no_fla else fla_fn()

    def save():
        json.dump(res, open(os.path.join(args.out, "bench_kernels.json"), "w"), indent=1)
        open(os.path.join(args.out, "bench_kernels.md"), "w").write(markdown(res) + "\n")

    def measure(B, T, H, D):
        key = f"B{B} T{T} H{H} D{D}"
        row = res["shapes"].setdefault(key, {})
        row["ours"] = ours(B, T, H, D, args.quick)
        row["ours"]["approx_fwd_tflops"] = fwd_flops(B, T, H, D) / (row["ours"]["fwd_ms"] * 1e-3) / 1e12
        if (B, T, H, D) in MAIN_SHAPES:
            gdr_triton.set_recompute_states(True)
            row["ours_recompute_states"] = ours(B, T, H, D, args.quick)
            gdr_triton.set_recompute_states(False)
            row["ours_kernels_ms"] = kernel_breakdown(B, T, H, D, args.quick)
        try:
            row["sdpa"] = sdpa(B, T, H, D, args.quick)
        except Exception as e:                                # noqa: BLE001
            row["sdpa"] = {"error": repr(e)[:300]}
        if fla_chunk is not None:
            try:
                row["fla"] = fla(fla_chunk, B, T, H, D, args.quick)
                row["fla"]["approx_fwd_tflops"] = fwd_flops(B, T, H, D) / (row["fla"]["fwd_ms"] * 1e-3) / 1e12
                row["speedup_fwdbwd_vs_fla"] = row["fla"]["fwdbwd_ms"] / row["ours"]["fwdbwd_ms"]
                row["speedup_fwd_vs_fla"] = row["fla"]["fwd_ms"] / row["ours"]["fwd_ms"]
            except Exception as e:                            # noqa: BLE001
                row["fla"] = {"error": repr(e)[:300]}
        print(time.strftime("%X"), key, json.dumps(row), flush=True)
        save()

    for shape in MAIN_SHAPES:
        measure(*shape)
    if args.sweep:
        res["sweep"] = sweep(args.quick)
        save()
    if not args.no_scaling:
        for shape in SCALING_SHAPES:
            measure(*shape)
    print(markdown(res))


if __name__ == "__main__":
    main()
