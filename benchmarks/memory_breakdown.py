"""Where the peak extra memory of one forward+backward of our MoM layer goes (one GPU).

Two views at the paper configuration (hidden 2048, 4 heads x 256, M=4, top-2, shared memory,
bf16, B4 T4096 by default):
  saved:  every tensor kept for the backward (autograd's saved-tensor hooks), one entry per
          storage, by the megatron_mom line that saved it;
  peak:   the allocations alive at the peak of the caching allocator's trace, by the
          megatron_mom line that allocated them, and where the peak happened.

Usage: python benchmarks/memory_breakdown.py [--B 4] [--T 4096] [--out DIR]
Writes memory_breakdown.md to --out (default $OUT or the temp folder).
"""
import argparse
import collections
import os
import sys
import tempfile
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.bench_layer import (HIDDEN, add_lean_argument, our_layer,  # noqa: E402
                                    paper_mom, setup_megatron)

PKG = os.path.join("megatron_mom", "")


def _site(frames) -> str:
    """The innermost megatron_mom frame of a stack (innermost first), as file:line func."""
    for f in frames:
        name = f["filename"] if isinstance(f, dict) else f.filename
        if PKG in name and "memory_breakdown" not in name:
            line = f["line"] if isinstance(f, dict) else f.lineno
            func = f["name"] if isinstance(f, dict) else f.name
            return f"{name.split(PKG, 1)[1]}:{line} {func}"
    return "(outside megatron_mom)"


def saved_tensors(layer, x):
    """{site: bytes} of the distinct storages saved for backward, excluding parameters and x."""
    skip = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    skip.add(x.untyped_storage().data_ptr())
    seen, by_site = set(), collections.Counter()

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if t.is_cuda and ptr not in seen and ptr not in skip:
            seen.add(ptr)
            by_site[_site(reversed(traceback.extract_stack()))] += st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)[0]
    return out, by_site


def peak_allocations(step):
    """Replay the allocator trace of `step()`: the live blocks at the peak, by site."""
    torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    step()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    live, total, peak, at_peak, peak_site = {}, 0, 0, {}, ""
    for ev in snap["device_traces"][0]:
        if ev["action"] == "alloc":
            live[ev["addr"]] = (ev["size"], _site(ev["frames"]))
            total += ev["size"]
            if total > peak:
                peak, at_peak, peak_site = total, dict(live), _site(ev["frames"])
        elif ev["action"] in ("free_requested",) and ev["addr"] in live:
            total -= live.pop(ev["addr"])[0]
    by_site = collections.Counter()
    for size, site in at_peak.values():
        by_site[site] += size
    return peak, by_site, peak_site


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--out", default=os.environ.get("OUT") or tempfile.gettempdir())
    add_lean_argument(p)
    args = p.parse_args()
    if args.lean_backward:
        import benchmarks.bench_layer as bench_layer
        bench_layer.LEAN_BACKWARD = True
    setup_megatron()
    mom = paper_mom()
    layer = our_layer(mom).train()
    x = torch.randn(args.T, args.B, HIDDEN, device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)

    def step():
        out = layer(x)[0]
        out.backward(torch.ones_like(out))

    step()  # compile and autotune outside the measurement
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak_extra = torch.cuda.max_memory_allocated() - base
    out, saved = saved_tensors(layer, x)
    del out
    peak, live, where = peak_allocations(step)
    mib = 2**20
    lines = [f"# Memory of one forward+backward, B{args.B} T{args.T}, "
             f"{torch.cuda.get_device_name()}, torch {torch.__version__}", "",
             f"peak extra (max_memory_allocated - before): {peak_extra / mib:.0f} MiB", "",
             f"## Saved for backward: {sum(saved.values()) / mib:.0f} MiB", "",
             "| MiB | saved at |", "|---|---|"]
    lines += [f"| {n / mib:.1f} | {s} |" for s, n in saved.most_common()]
    lines += ["", f"## Alive at the trace's peak ({peak / mib:.0f} MiB incl. params, grads, "
              f"inputs), reached allocating at {where}", "", "| MiB | allocated at |",
              "|---|---|"]
    lines += [f"| {n / mib:.1f} | {s} |" for s, n in live.most_common(40)]
    md = "\n".join(lines) + "\n"
    open(os.path.join(args.out, "memory_breakdown.md"), "w").write(md)
    print(md)


if __name__ == "__main__":
    main()
