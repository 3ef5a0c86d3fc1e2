"""Time megatron_mom's Triton gated delta rule against fla's `chunk_gated_delta_rule` and
PyTorch SDPA flash attention, in one run, at the shapes of /work/shared/baselines/peer_h100.json.

    python benchmarks/bench_kernels.py [--out DIR] [--no-fla] [--sweep] [--quick] [--conv]
                                       [--shapes B,T,H,D ...] [--no-scaling] [--fla-scaling]
    python benchmarks/bench_kernels.py --conv-only [--conv-sweep] [--out DIR]
    python benchmarks/bench_kernels.py --mix-only [--out DIR]

Forward and forward+backward medians from `triton.testing.do_bench` (bf16), a TFLOP/s estimate
(same formula as the peer probe: B*T*H*(2*C*D*4 + 2*D*D*6) per forward), the ratio to fla,
and the peak memory of one forward+backward above what the inputs take. Writes
bench_kernels.json and bench_kernels.md to --out (default $OUT, else the temp folder).
fla refuses its gated backward on Hopper with Triton 3.4-3.7.0 (wrong gradients); as in the
peer probe the guard is lifted for timing only.
--conv adds the Triton short convolution at the shape it has inside the layer (key "short_conv");
--conv-only times just that and writes bench_conv.json.
--mix-only times the Triton mix of the packed read-outs against its torch path at MIX_SHAPE and
writes bench_mix.json.
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
from megatron_mom.ops import KernelOptions  # noqa: E402

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


def ours(B, T, H, D, quick, options=None):
    q, k, v, g, beta = gdr_inputs(B, T, H, D)
    return timed(lambda: gated_delta_rule(q, k, v, g, beta, backend="triton",
                                          options=options)[0], quick)


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


def kernel_profile(run, iters=5, step=None):
    """Mean CUDA time (ms) per kernel name over `iters` forward+backward passes (of `run` with
    a ones gradient, or `step` when given)."""
    from torch.profiler import ProfilerActivity, profile

    def fwd_bwd():
        if step is not None:
            return step()
        out = run()
        out.backward(torch.ones_like(out))

    fwd_bwd()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fwd_bwd()
        torch.cuda.synchronize()
    times = {}
    for evt in prof.key_averages():
        dev_us = getattr(evt, "device_time_total", None)
        if dev_us is None:
            dev_us = getattr(evt, "cuda_time_total", 0)
        if dev_us:
            times[evt.key[:80]] = dev_us / iters / 1e3
    return dict(sorted(times.items(), key=lambda kv: -kv[1])[:16])


def outputs_of(B, T, H, D, options=None):
    """Output and all input gradients of one fwd+bwd of ours (fixed inputs and dO)."""
    leaves = gdr_inputs(B, T, H, D, seed=3)
    o, _ = gated_delta_rule(*leaves, backend="triton", options=options)
    o.backward(torch.ones_like(o))
    return [o.detach().float()] + [x.grad.float() for x in leaves]


# Alternative launch settings, tried one kernel at a time at the main D128 shape; each is
# checked against the default settings' outputs (which the GPU suite checks against the
# reference) before its time counts.
SWEEP = [("prepare", None, {"num_warps": 2}),
         ("prepare", None, {"BK": 128, "BV": 128, "num_warps": 8}),
         ("chunk_bwd_main", 128, {"num_warps": 8}),
         ("chunk_bwd", None, {"BK": 128}),
         ("chunk_bwd", None, {"BV": 32}),
         ("chunk_bwd_wy", None, {"num_warps": 8}),
         ("state_fwd", 128, {"BV": 32, "num_warps": 4, "num_stages": 2}),
         ("state_bwd", 128, {"BV": 32, "num_warps": 4, "num_stages": 2})]
# At D256 the sequential kernels dominate: wider V blocks halve how often each chunk's q, k, W
# are read (one program per V block), at one program per SM either way.
SWEEP_D256 = [("state_fwd", 256, {"BV": 32, "num_warps": 8, "num_stages": 1}),
              ("state_bwd", 256, {"BV": 32, "num_warps": 8, "num_stages": 1}),
              ("chunk_bwd_main", 128, {"num_warps": 8}),
              ("chunk_bwd", None, {"BK": 128}),
              ("prepare", None, {"num_warps": 8})]


def sweep(shape, quick, entries=SWEEP):
    q, k, v, g, beta = gdr_inputs(*shape)

    def fwd_bwd(options):
        out = gated_delta_rule(q, k, v, g, beta, backend="triton", options=options)[0]
        out.backward(torch.ones_like(out))

    ref_outputs = outputs_of(*shape)
    base = do_bench(lambda: fwd_bwd(None), quick)
    out = {"default_fwdbwd_ms": base, "tried": []}
    best = {}
    for kernel, bound, opt in entries:
        options = KernelOptions().with_launch(kernel, bound, **opt)
        rec = {"kernel": kernel, "settings": opt}
        try:
            errs = [((a - b).norm() / b.norm()).item()
                    for a, b in zip(outputs_of(*shape, options), ref_outputs)]
            rec["max_rel_diff_vs_default"] = max(errs)
            rec["fwdbwd_ms"] = do_bench(lambda: fwd_bwd(options), quick)
            rec["ok"] = max(errs) < 5e-3
            if rec["ok"] and rec["fwdbwd_ms"] < best.get(kernel, (base, None))[0] * 0.98:
                best[kernel] = (rec["fwdbwd_ms"], bound, dict(opt))
        except Exception as e:                                # noqa: BLE001
            rec["error"] = repr(e)[:200]
        out["tried"].append(rec)
        print("sweep", rec, flush=True)
    chosen = KernelOptions()
    for kernel, (_, bound, opt) in best.items():
        chosen = chosen.with_launch(kernel, bound, **opt)
    out["chosen"] = {k: v[2] for k, v in best.items()}
    if best:
        errs = [((a - b).norm() / b.norm()).item()
                for a, b in zip(outputs_of(*shape, chosen), ref_outputs)]
        out["chosen_max_rel_diff_vs_default"] = max(errs)
    return out


# Short convolution as inside the layer: E*Q = 20 ragged (memory, sequence) segments, one of
# them empty (a memory that got no token of a sequence), bf16, SiLU.
CONV_SHAPE = dict(tokens=49152, channels=1024, width=4, segments=20)
# Alternative launch settings (module attributes of ops.short_conv.triton), each checked
# against the default settings' outputs before its time counts.
CONV_SWEEP = [{"BWD_CONFIG": (32, 64, 8)}, {"BWD_CONFIG": (64, 32, 8)}, {"BWD_CONFIG": (32, 32, 8)},
              {"BWD_CONFIG": (16, 64, 4)},
              {"BWD_MAX_TILES": 4}, {"BWD_MAX_TILES": 16},
              {"FWD_CONFIG": (32, 64, 4)}, {"FWD_CONFIG": (64, 128, 8)},
              {"FWD_CONFIG": (128, 64, 8)}, {"FWD_CONFIG": (64, 64, 8)}]


def conv_lengths(tokens, segments, seed=0):
    """`segments` ragged lengths summing to `tokens`, the fourth of them 0."""
    gen = torch.Generator().manual_seed(seed)
    cuts = (torch.randperm(tokens - 1, generator=gen)[: segments - 2] + 1).sort().values.tolist()
    lengths = [b - a for a, b in zip([0] + cuts, cuts + [tokens])]
    return lengths[:3] + [0] + lengths[3:]


def conv_inputs(tokens, channels, width, segments):
    gen = torch.Generator(device="cuda").manual_seed(0)
    cu = torch.tensor([0] + conv_lengths(tokens, segments), device="cuda").cumsum(0).int()
    x = torch.randn(1, tokens, channels, device="cuda", generator=gen, dtype=torch.bfloat16)
    w = torch.randn(channels, width, device="cuda", generator=gen) / width
    dy = torch.randn(1, tokens, channels, device="cuda", generator=gen, dtype=torch.bfloat16)
    return x.requires_grad_(), w.bfloat16().requires_grad_(), cu, dy


def conv_outputs(x, w, cu, dy):
    """y, dx, dw of one forward+backward (autograd.grad: nothing accumulates into .grad)."""
    from megatron_mom.ops.short_conv import short_conv
    y, _ = short_conv(x, w, cu_seqlens=cu, activation="silu", backend="triton")
    return [y] + list(torch.autograd.grad(y, [x, w], dy))


def conv_timed(x, w, cu, dy, quick):
    """fwd and fwd+bwd ms; bwd_ms is their difference."""
    from megatron_mom.ops.short_conv import short_conv
    fwd_ms = do_bench(lambda: short_conv(x, w, cu_seqlens=cu, activation="silu", backend="triton"), quick)
    fb_ms = do_bench(lambda: conv_outputs(x, w, cu, dy), quick)
    return {"fwd_ms": fwd_ms, "fwdbwd_ms": fb_ms, "bwd_ms": fb_ms - fwd_ms}


def conv_sweep(inputs, quick):
    from megatron_mom.ops.short_conv import triton as conv_triton
    ref = [t.float() for t in conv_outputs(*inputs)]
    tried = []
    for setting in CONV_SWEEP:
        saved = {k: getattr(conv_triton, k) for k in setting}
        for k, v in setting.items():
            setattr(conv_triton, k, v)
        rec = {"settings": {k: list(v) if isinstance(v, tuple) else v for k, v in setting.items()}}
        try:
            got = conv_outputs(*inputs)
            rec["max_rel_diff_vs_default"] = max(((a.float() - b).norm() / b.norm()).item()
                                                 for a, b in zip(got, ref))
            if rec["max_rel_diff_vs_default"] < 1e-2:
                rec.update(conv_timed(*inputs, quick))
        except Exception as e:                                # noqa: BLE001
            rec["error"] = repr(e)[:200]
        for k, v in saved.items():
            setattr(conv_triton, k, v)
        print("conv sweep", rec, flush=True)
        tried.append(rec)
    return tried


def conv_bench(quick, sweep=False):
    """Short-conv timings at CONV_SHAPE, the per-kernel split, and the bandwidth that the
    unavoidable traffic (x read, y written; x, dy read, dx written) would take at that time."""
    inputs = conv_inputs(**CONV_SHAPE)
    x, w, cu, dy = inputs
    res = {"shape": dict(CONV_SHAPE), "dtype": "bfloat16", **conv_timed(*inputs, quick)}
    res["kernels_ms"] = kernel_profile(None, step=lambda: conv_outputs(x, w, cu, dy))
    tensor_bytes = x.numel() * x.element_size()
    res["fwd_GBps"] = 2 * tensor_bytes / (res["fwd_ms"] * 1e-3) / 1e9
    res["bwd_GBps"] = 3 * tensor_bytes / (res["bwd_ms"] * 1e-3) / 1e9
    if sweep:
        res["sweep"] = conv_sweep(inputs, quick)
    print("short_conv", json.dumps(res), flush=True)
    return res


MIX_SHAPE = dict(N=16384, S=3, H=4, V=256)


def mix_inputs(N, S, H, V):
    """bf16 rows o [N*S, H, V] and dy [N, H, V], float32 weights, a random slot permutation and
    its inverse (the layout keeps it, so the torch path does not pay for it)."""
    from megatron_mom.ops.mix import inverse_slots
    gen = torch.Generator(device="cuda").manual_seed(0)
    o = torch.randn(N * S, H, V, device="cuda", generator=gen, dtype=torch.bfloat16)
    slot_row = torch.randperm(N * S, device="cuda", generator=gen).view(N, S)
    w = torch.rand(N, S, device="cuda", generator=gen)
    dy = torch.randn(N, H, V, device="cuda", generator=gen, dtype=torch.bfloat16)
    token, slot = inverse_slots(slot_row)
    return o.requires_grad_(), slot_row, w.requires_grad_(), dy, token, slot


def mix_timed(backend, o, slot_row, w, dy, token, slot, quick):
    """fwd and fwd+bwd ms of one backend (autograd.grad: nothing accumulates into .grad)."""
    from megatron_mom.ops.mix import mix

    def fwd():
        return mix(o, slot_row, w, torch.bfloat16, token=token, slot=slot, backend=backend)

    fwd_ms = do_bench(fwd, quick)
    fb_ms = do_bench(lambda: torch.autograd.grad(fwd(), (o, w), dy), quick)
    return {"fwd_ms": fwd_ms, "fwdbwd_ms": fb_ms, "bwd_ms": fb_ms - fwd_ms}


def mix_step(o, slot_row, w, dy, token, slot):
    """One Triton forward+backward (for the per-kernel profile)."""
    from megatron_mom.ops.mix import mix
    y = mix(o, slot_row, w, torch.bfloat16, backend="triton")
    return torch.autograd.grad(y, (o, w), dy)


def mix_bench(quick):
    """Both backends, their largest output difference, and the bandwidth of the unavoidable
    traffic (fwd: S rows read per token, y written; bwd: dy and S rows read, S rows written)."""
    inputs = mix_inputs(**MIX_SHAPE)
    o, dy, S = inputs[0], inputs[3], MIX_SHAPE["S"]
    res = {"shape": dict(MIX_SHAPE), "dtype": "bfloat16"}
    for backend in ("triton", "torch"):
        res[backend] = mix_timed(backend, *inputs, quick)
        r = res[backend]
        r["fwd_GBps"] = (o.numel() + dy.numel()) * 2 / (r["fwd_ms"] * 1e-3) / 1e9
        r["bwd_GBps"] = (2 * o.numel() + dy.numel()) * 2 / (r["bwd_ms"] * 1e-3) / 1e9
    res["speedup_fwdbwd"] = res["torch"]["fwdbwd_ms"] / res["triton"]["fwdbwd_ms"]
    res["kernels_ms"] = kernel_profile(None, step=lambda: mix_step(*inputs))
    print("mix", json.dumps(res), flush=True)
    return res


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
    ap.add_argument("--sweep-only", action="store_true", help="only the launch-setting sweeps")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-scaling", action="store_true")
    ap.add_argument("--shapes", nargs="+", metavar="B,T,H,D",
                    help="time these shapes as the main ones (default: the two of the peer probe)")
    ap.add_argument("--fla-scaling", action="store_true", help="also time fla at the T sweep")
    ap.add_argument("--conv", action="store_true", help="also time the short convolution")
    ap.add_argument("--conv-only", action="store_true", help="time only the short convolution")
    ap.add_argument("--mix-only", action="store_true", help="time only the mix of read-outs")
    ap.add_argument("--conv-sweep", action="store_true", help="with the conv: other launch settings")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    main_shapes = ([tuple(int(x) for x in s.split(",")) for s in args.shapes] if args.shapes
                   else MAIN_SHAPES)
    import triton
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": triton.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), "shapes": {}}
    if args.conv_only:
        del res["shapes"]
        res["short_conv"] = conv_bench(args.quick, args.conv_sweep)
        json.dump(res, open(os.path.join(args.out, "bench_conv.json"), "w"), indent=1)
        return
    if args.mix_only:
        del res["shapes"]
        res["mix"] = mix_bench(args.quick)
        json.dump(res, open(os.path.join(args.out, "bench_mix.json"), "w"), indent=1)
        return
    fla_chunk = None if args.no_fla else fla_fn()
    if args.sweep_only:
        res["sweep"] = sweep(MAIN_SHAPES[0], args.quick)
        res["sweep_d256"] = sweep(MAIN_SHAPES[1], args.quick, SWEEP_D256)
        json.dump(res, open(os.path.join(args.out, "bench_sweep.json"), "w"), indent=1)
        return

    def save():
        json.dump(res, open(os.path.join(args.out, "bench_kernels.json"), "w"), indent=1)
        open(os.path.join(args.out, "bench_kernels.md"), "w").write(markdown(res) + "\n")

    def measure(B, T, H, D):
        key = f"B{B} T{T} H{H} D{D}"
        row = res["shapes"].setdefault(key, {})
        row["ours"] = ours(B, T, H, D, args.quick)
        row["ours"]["approx_fwd_tflops"] = fwd_flops(B, T, H, D) / (row["ours"]["fwd_ms"] * 1e-3) / 1e12
        if (B, T, H, D) in main_shapes:
            row["ours_recompute_states"] = ours(B, T, H, D, args.quick,
                                                KernelOptions(recompute_states=True))
            q, k, v, g, beta = gdr_inputs(B, T, H, D)
            row["ours_kernels_ms"] = kernel_profile(
                lambda: gated_delta_rule(q, k, v, g, beta, backend="triton")[0])
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
                if (B, T, H, D) in main_shapes:
                    qf, kf, vf, gf, bf = gdr_inputs(B, T, H, D)
                    row["fla_kernels_ms"] = kernel_profile(lambda: fla_chunk(qf, kf, vf, g=gf, beta=bf)[0])
            except Exception as e:                            # noqa: BLE001
                row["fla"] = {"error": repr(e)[:300]}
        print(time.strftime("%X"), key, json.dumps(row), flush=True)
        save()

    if args.conv:
        res["short_conv"] = conv_bench(args.quick, args.conv_sweep)
        save()
    measure(*main_shapes[0])
    if args.sweep:
        res["sweep"] = sweep(MAIN_SHAPES[0], args.quick)
        save()
        if res["sweep"]["chosen"]:                            # again, with the chosen settings
            res["shapes"]["B4 T4096 H16 D128 (swept settings)"] = {
                "ours": ours(*MAIN_SHAPES[0], args.quick), "settings": res["sweep"]["chosen"]}
            save()
    for shape in main_shapes[1:]:
        measure(*shape)
    if not args.no_scaling:
        fla_saved, fla_chunk = fla_chunk, (fla_chunk if args.fla_scaling else None)
        for shape in SCALING_SHAPES:
            measure(*shape)
        fla_chunk = fla_saved
    print(markdown(res))


if __name__ == "__main__":
    main()
