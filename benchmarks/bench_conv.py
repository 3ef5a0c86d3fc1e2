"""Time the Triton short convolution in every form the MoM layer calls it, against its memory
floor (the bytes it must move once / the HBM bandwidth).

    python benchmarks/bench_conv.py --out DIR [--tokens 4x4096 1x65536] [--configs all]
                                    [--bandwidth 4.3] [--quick]

Shapes are the layer's (hidden 1024: 4 heads x 256, M=4 top-2 + shared, width 4, SiLU): each
of B x T tokens lives in 3 packed memory rows, L = 3 B T rows in B x 5 (memory, sequence)
segments from `packing.pack` with random routing. The forms, each timed as the kernel call
the layer makes (`short_conv.triton` functions; backward = its kernels + dw partial sum):

- plain: x [L, 1024] contiguous (`short_conv(x, w, cu_seqlens=...)`);
- gather: q's token rows (a column slice of the [N, 2048] q | gate projection, row stride 2048)
  read through the packing's row index (`short_conv(..., gather=...)`); its backward writes
  one dx row per packed row (the sum over each token's slots is a separate op, timed apart);
- split: k (or v) as a column group of the [L, 2056] memory rows k | v | b | a, dx written
  into a column range of one [L, 2056] gradient (`short_conv_split`);
- l2norm: conv + SiLU + each 256-column head L2-normalised in one kernel
  (`conv_l2norm_forward`, the lean path's q and k), forward only;
- head: one 256-column head of the split form, forward and backward with the dw partial sums
  in a shared buffer (the lean path's per-head calls).

Floor bytes (bf16): forward x (or the gathered rows, L rows, + the int32 index) read once and y
written once (+ rstd for l2norm); backward x (or the gathered rows), dy read once and dx written
once, + weight and dw. `x floor` = measured / floor time; the target (issue 18) is <= 1.5.

--configs picks launch settings of `ops.short_conv.triton` (PRESETS below: module attributes
set for the run, then restored); a preset naming an attribute the module lacks is skipped.
Each config's outputs are checked against the torch reference (float32 on the same bf16
inputs) before its time counts. Writes results.json and results.md to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_mom.layer import packing  # noqa: E402
from megatron_mom.ops.short_conv import triton as conv  # noqa: E402
from megatron_mom.ops.short_conv.reference import short_conv_reference  # noqa: E402

HIDDEN, HEAD_DIM, MEMORIES, TOP_K, WIDTH = 1024, 256, 4, 2, 4
KVBA_COLS = 2 * HIDDEN + 2 * (HIDDEN // HEAD_DIM)                  # k | v | b | a = 2056
QG_COLS = 2 * HIDDEN                                                # q | gate = 2048
# "cuda"; "cpu" (with TRITON_INTERPRET=1 and tiny --tokens) only checks that the script runs.
DEV = "cuda"

# Launch settings to compare (module attributes of ops.short_conv.triton; configs are (R rows a
# step, BC channels, warps), see docs/kernels.md). "default" is the module as it is. Registers
# of offline sm_90 builds (W = 4, no spills): default backward 161 / forward 156 (3 programs
# an SM); *_wide the same per thread with twice the channels a program; bwd_r16 222 and
# fwd_r32 242 (2 programs an SM, twice the rows in flight each).
PRESETS = {
    "default": {},
    "fwd_small": {"FWD_CONFIG": (8, 256, 2)},
    "fwd_wide": {"FWD_CONFIG": (16, 1024, 8)},
    "fwd_r32": {"FWD_CONFIG": (32, 512, 4)},
    "bwd_small": {"BWD_CONFIG": (8, 256, 2)},
    "bwd_wide": {"BWD_CONFIG": (8, 1024, 8)},
    "bwd_r16": {"BWD_CONFIG": (16, 512, 4)},
    "bwd_tiles8": {"BWD_MAX_TILES": 8},
    "bwd_tiles64": {"BWD_MAX_TILES": 64},
}


def parse_tokens(spec: str):
    b, t = spec.lower().split("x")
    return int(b), int(t)


def layer_layout(B: int, T: int, seed: int = 0):
    """The packed layout of B x T tokens routed top-2 of 4 memories + the shared one."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    seq_id, num_seqs = packing.sequence_ids(B, T, None, DEV)
    N = B * T
    routed = torch.rand(N, MEMORIES, device=DEV, generator=gen).topk(TOP_K, dim=1).indices
    memory = torch.cat([routed.sort(1).values, torch.full((N, 1), MEMORIES, device=DEV)], 1)
    return packing.pack(memory, seq_id, num_seqs, MEMORIES + 1)


class Inputs:
    """The layer's tensors for one layout: q | gate token rows, k | v | b | a packed rows,
    weights, output gradients, and the gradient buffers the backward writes into."""

    def __init__(self, layout, seed: int = 1):
        gen = torch.Generator(device=DEV).manual_seed(seed)
        bf = dict(device=DEV, dtype=torch.bfloat16)
        self.layout = layout
        self.cu = layout.cu_seqlens.to(torch.int32)
        self.N = self.cu.numel() - 1
        self.L = layout.num_rows
        tokens = layout.slot_row.shape[0]
        self.qg = torch.randn(tokens, QG_COLS, generator=gen, device=DEV).to(torch.bfloat16)
        self.kvba = torch.randn(self.L, KVBA_COLS, generator=gen, device=DEV).to(torch.bfloat16)
        self.plain = torch.randn(self.L, HIDDEN, generator=gen, device=DEV).to(torch.bfloat16)
        self.w = (torch.randn(HIDDEN, WIDTH, generator=gen, device=DEV) / WIDTH).to(torch.bfloat16)
        self.dy = torch.randn(self.L, HIDDEN, generator=gen, device=DEV).to(torch.bfloat16)
        self.dx_rows = torch.empty(self.L, HIDDEN, **bf)
        self.d_kvba = torch.empty(self.L, KVBA_COLS, **bf)
        self.x_row = layout.token.contiguous()


class Form:
    """One call form: fwd() -> y (or (y, rstd)); bwd() runs the backward kernels (timed);
    grads() -> (dx, dw) after bwd() (for the check); ref_in = (x rows [L, C] as the kernel
    reads them, weight, dy or None); floor bytes of each pass."""

    def __init__(self, fwd, fwd_bytes, ref_in, bwd=None, grads=None, bwd_bytes=0, norm=False):
        self.fwd, self.fwd_bytes, self.ref_in = fwd, fwd_bytes, ref_in
        self.bwd, self.grads, self.bwd_bytes, self.norm = bwd, grads, bwd_bytes, norm


def forms(inp: Inputs):
    """The layer's call forms at this layout (see the module docstring)."""
    L, C, cu, N, w = inp.L, HIDDEN, inp.cu, inp.N, inp.w
    e = 2                                                             # bf16 bytes
    rows, h_rows = L * C * e, L * HEAD_DIM * e
    wbytes, h_wbytes = C * WIDTH * e, HEAD_DIM * WIDTH * e
    index = L * 4
    rstd = L * (C // HEAD_DIM) * 4
    q_in = inp.qg[:, :C]                                              # row stride 2048
    k_in, dk = inp.kvba[:, :C], inp.d_kvba[:, :C]                     # row stride 2056
    head = slice(C, C + HEAD_DIM)                                     # v's first head
    h_in, h_dx = inp.kvba[:, head], inp.d_kvba[:, head]
    h_w, h_dy = w[:HEAD_DIM], inp.dy[:, :HEAD_DIM].contiguous()
    part = torch.empty(conv.conv_backward_programs(L, WIDTH), C, WIDTH, device=DEV,
                       dtype=torch.float32)[:, :HEAD_DIM]             # the lean path's buffer
    dws = {}

    def backward(key, x, x_row, weight, dy, dx, dw_part=None):
        def run():
            dws[key] = conv.conv_backward(x, x_row, weight, None, dy, dx, cu, N, True, False,
                                          dw_part)[0]

        def grads():
            return dx, (dw_part.sum(0) if dw_part is not None else dws[key])
        return dict(bwd=run, grads=grads)

    gathered = q_in.index_select(0, inp.x_row)            # the rows the gather form reads
    return {
        "plain": Form(lambda: conv.conv_forward(inp.plain, None, w, cu, N, None, True),
                      2 * rows + wbytes, (inp.plain, w, inp.dy), bwd_bytes=3 * rows + 2 * wbytes,
                      **backward("plain", inp.plain, None, w, inp.dy, inp.dx_rows)),
        # dx per packed row (summed over each token's slots afterwards, timed apart)
        "gather": Form(lambda: conv.conv_forward(q_in, inp.x_row, w, cu, N, None, True),
                       2 * rows + index + wbytes, (gathered, w, inp.dy),
                       bwd_bytes=3 * rows + index + 2 * wbytes,
                       **backward("gather", q_in, inp.x_row, w, inp.dy, inp.dx_rows)),
        "split": Form(lambda: conv.conv_forward(k_in, None, w, cu, N, None, True),
                      2 * rows + wbytes, (k_in, w, inp.dy), bwd_bytes=3 * rows + 2 * wbytes,
                      **backward("split", k_in, None, w, inp.dy, dk)),
        "l2norm_gather": Form(
            lambda: conv.conv_l2norm_forward(q_in, inp.x_row, w, cu, N, HEAD_DIM),
            2 * rows + index + rstd + wbytes, (gathered, w, None), norm=True),
        "l2norm_split": Form(lambda: conv.conv_l2norm_forward(k_in, None, w, cu, N, HEAD_DIM),
                             2 * rows + rstd + wbytes, (k_in, w, None), norm=True),
        "head": Form(lambda: conv.conv_forward(h_in, None, h_w, cu, N, None, True),
                     2 * h_rows + h_wbytes, (h_in, h_w, h_dy), bwd_bytes=3 * h_rows + 2 * h_wbytes,
                     **backward("head", h_in, None, h_w, h_dy, h_dx, part)),
    }


def reference(x, w, cu, dy, norm: bool):
    """float32 torch reference: y (L2-normalised per head with norm) and, with dy, (dx, dw)."""
    xf = x.float().detach().requires_grad_()
    wf = w.float().detach().requires_grad_()
    y, _ = short_conv_reference(xf[None], wf, cu_seqlens=cu.long())
    y = y[0]
    if norm:
        yh = y.view(y.shape[0], -1, HEAD_DIM)
        return (yh / (yh.square().sum(-1, keepdim=True) + 1e-6).sqrt()).view_as(y), None
    if dy is None:
        return y, None
    return y, torch.autograd.grad(y, [xf, wf], dy.float())


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check(form: Form, cu):
    """Relative errors of this config's outputs against the float32 reference."""
    x, w, dy = form.ref_in
    y_ref, grads = reference(x, w, cu, dy, form.norm)
    out = form.fwd()
    errs = {"y": rel(out[0] if isinstance(out, tuple) else out, y_ref)}
    if form.bwd is not None:
        form.bwd()
        dx, dw = form.grads()
        errs["dx"], errs["dw"] = rel(dx, grads[0]), rel(dw, grads[1])
    return errs


def bench(fn, quick):
    if DEV == "cpu":                                       # the smoke run: one wall-clock call
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench
    return do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 200,
                    return_mode="median")


def apply_preset(settings):
    """Set the preset's module attributes; returns the old values (None: preset not applicable)."""
    if any(not hasattr(conv, k) for k in settings):
        return None
    old = {k: getattr(conv, k) for k in settings}
    for k, v in settings.items():
        setattr(conv, k, v)
    return old


def run_config(cfg_name, settings, inp, shape, bandwidth, quick):
    old = apply_preset(settings)
    if old is None:
        return [{"shape": shape, "config": cfg_name, "skipped": "attribute not in module"}]
    rows = []
    try:
        for name, form in forms(inp).items():
            rec = {"shape": shape, "config": cfg_name, "form": name}
            try:
                rec["errors"] = check(form, inp.cu)
                ok = all(v < 2e-2 for v in rec["errors"].values())
                rec["ok"] = ok
                for phase, fn, nbytes in (("fwd", form.fwd, form.fwd_bytes),
                                          ("bwd", form.bwd, form.bwd_bytes)):
                    if fn is None or not ok:
                        continue
                    ms = bench(fn, quick)
                    floor_ms = nbytes / (bandwidth * 1e12) * 1e3
                    rec[phase] = {"ms": ms, "GBps": nbytes / (ms * 1e-3) / 1e9,
                                  "floor_ms": floor_ms, "x_floor": ms / floor_ms,
                                  "bytes": nbytes}
            except Exception as exc:                                  # noqa: BLE001
                rec["error"] = repr(exc)[:300]
            print(json.dumps(rec), flush=True)
            rows.append(rec)
    finally:
        for k, v in old.items():
            setattr(conv, k, v)
    return rows


def kernel_split(inp, quick):
    """The gather form's backward also needs the sum over each token's slots (a separate op):
    its time, for the total the layer sees."""
    from megatron_mom.ops.mix import sum_over_slots
    return bench(lambda: sum_over_slots(inp.dx_rows, inp.layout.slot_row, backend="triton"), quick)


def markdown(results, meta) -> str:
    lines = [f"# Short convolution against its memory floor",
             "", f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, "
             f"{meta['date']}; floor = bytes / {meta['bandwidth_TBps']} TB/s; bf16, W={WIDTH}, "
             f"SiLU, hidden {HIDDEN} ({HIDDEN // HEAD_DIM} heads x {HEAD_DIM}), M={MEMORIES} "
             f"top-{TOP_K} + shared.", "",
             "| tokens | config | form | pass | ms | GB/s | floor ms | x floor | max rel err |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['shape']} | {r['config']} | - | - | skipped | | | | |")
            continue
        if "error" in r or not r.get("ok", False):
            why = r.get("error", f"wrong: {r.get('errors')}")
            lines.append(f"| {r['shape']} | {r['config']} | {r['form']} | - | {why} | | | | |")
            continue
        err = max(r["errors"].values())
        for phase in ("fwd", "bwd"):
            if phase in r:
                p = r[phase]
                lines.append(f"| {r['shape']} | {r['config']} | {r['form']} | {phase} | "
                             f"{p['ms']:.4f} | {p['GBps']:.0f} | {p['floor_ms']:.4f} | "
                             f"{p['x_floor']:.2f} | {err:.1e} |")
    for shape, ms in meta.get("sum_over_slots_ms", {}).items():
        lines.append("")
        lines.append(f"sum over slots (gather form's dx -> token rows), {shape}: {ms:.4f} ms")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tokens", nargs="+", default=["4x4096", "1x65536"],
                    help="B x T token shapes of the layer, e.g. 4x4096")
    ap.add_argument("--configs", default="all",
                    help=f"comma-separated presets of {sorted(PRESETS)}, or 'all'")
    ap.add_argument("--bandwidth", type=float, default=4.3, help="HBM TB/s for the floor")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run (TRITON_INTERPRET=1)")
    args = ap.parse_args()
    global DEV
    DEV = args.device
    names = list(PRESETS) if args.configs == "all" else args.configs.split(",")
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; choose from {sorted(PRESETS)}")
    import triton
    meta = {"device": torch.cuda.get_device_name() if DEV == "cuda" else DEV, "torch": torch.__version__,
            "triton": triton.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "bandwidth_TBps": args.bandwidth, "sum_over_slots_ms": {}}
    results = []
    for spec in args.tokens:
        B, T = parse_tokens(spec)
        inp = Inputs(layer_layout(B, T))
        shape = f"{B}x{T} (L={inp.L})"
        for cfg in names:
            results += run_config(cfg, PRESETS[cfg], inp, shape, args.bandwidth, args.quick)
        meta["sum_over_slots_ms"][shape] = kernel_split(inp, args.quick)
        del inp
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    md = markdown(results, meta)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
