#!/usr/bin/env python3
"""Turn benchmarks/scaling_run.sh's job logs into a table: tokens/s per GPU, scaling efficiency
against a one-GPU reference, peak memory, and loss parity over the first iterations.

    python benchmarks/scaling_report.py OUT_DIR --ref hybrid-tp4=hybrid-tp1 [--skip 5] [--parity 10]

Reads OUT_DIR/*.log (one per job; its first line names the layout), writes OUT_DIR/summary.md
and OUT_DIR/summary.json and prints the table. Time per iteration is Megatron's "elapsed time
per iteration" (log interval 1): the median over the iterations after the first --skip ones
(kernel compilation, allocator warm-up). tokens/s per GPU = global batch x sequence length /
time per iteration / processes. Efficiency = tokens/s per GPU over the reference's.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

HEAD = re.compile(r"scaling-run: job (\S+) model (\S+) TP=(\d+) CP=(\d+) PP=(\d+) processes (\d+)")
ITER = re.compile(r" iteration\s+(\d+)/\s*(\d+) \|(.*)")
FIELD = re.compile(r"([a-zA-Z_ /()\-]+):\s*([0-9.eE+\-]+)")
PEAK = re.compile(r"scaling-run: rank (\d+) (.*?) peak (allocated|cpu-rss) ([0-9.]+) GiB"
                  r"(?: reserved ([0-9.]+) GiB)?")
SEQ = re.compile(r"^\s*seq_length \.+ (\d+)", re.M)
EXIT = re.compile(r"scaling-run: end ([0-9.]+) exit (\d+)")
START = re.compile(r"scaling-run: start ([0-9.]+)")
ERROR = re.compile(r"^.*(Error|error:|Traceback|OutOfMemory|CUDA out of memory).*$", re.M)


def parse(path: Path) -> dict:
    text = path.read_text(errors="replace")
    head = HEAD.search(text)
    job = {"name": path.stem, "log": path.name}
    if not head:
        job["status"] = text.strip().splitlines()[0] if text.strip() else "empty log"
        return job
    _, model, tp, cp, pp, n = head.groups()
    job.update(model=model, tp=int(tp), cp=int(cp), pp=int(pp), procs=int(n))
    iters = {}
    for m in ITER.finditer(text):
        fields = {k.strip(): v for k, v in FIELD.findall(m.group(3))}
        it = int(m.group(1))
        iters[it] = {
            "ms": float(fields.get("elapsed time per iteration (ms)", "nan")),
            "loss": float(fields.get("lm loss", "nan")),
            "lb": float(fields["mom_load_balancing_loss"]) if "mom_load_balancing_loss" in fields else None,
            "batch": int(float(fields.get("global batch size", "0"))),
            "tflops": float(fields["throughput per GPU (TFLOP/s/GPU)"])
            if "throughput per GPU (TFLOP/s/GPU)" in fields else None,
        }
        job["train_iters"] = int(m.group(2))
    job["iters"] = dict(sorted(iters.items()))
    seq = SEQ.search(text)
    job["seq"] = int(seq.group(1)) if seq else None
    peaks = {}
    for rank, _, kind, val, res in PEAK.findall(text):
        r = int(rank)
        peaks[r] = (max(peaks.get(r, (0, 0))[0], float(val)),
                    max(peaks.get(r, (0, 0))[1], float(res or 0)))
    job["peak_kind"] = "gpu" if "peak allocated" in text else "cpu-rss" if peaks else None
    job["peak_alloc_gib"] = max((p[0] for p in peaks.values()), default=None)
    job["peak_reserved_gib"] = max((p[1] for p in peaks.values()), default=None)
    end, start = EXIT.search(text), START.search(text)
    job["exit"] = int(end.group(2)) if end else None
    job["wall_s"] = round(float(end.group(1)) - float(start.group(1)), 1) if end and start else None
    done = len(iters) and max(iters) == job.get("train_iters")
    if done and job["exit"] == 0:
        job["status"] = "completed"
    elif job["exit"] in (124, 137):
        job["status"] = f"cut at the time limit after {len(iters)} iterations"
    else:
        errors = [e.strip() for e in ERROR.findall(text) if "Warning" not in e][-1:]
        job["status"] = (f"exit {job['exit']} after {len(iters)} iterations"
                         + (f": {errors[0][:200]}" if errors else ""))
    return job


def timing(job: dict, skip: int) -> None:
    iters = job.get("iters") or {}
    steady = [v["ms"] for k, v in iters.items() if k > skip and v["ms"] == v["ms"]]
    if not steady or not job.get("seq"):
        return
    ms = statistics.median(steady)
    batch = next(iter(iters.values()))["batch"]
    job.update(measured_iters=len(steady), ms_per_iter=round(ms, 1),
               tokens_per_iter=batch * job["seq"],
               tok_s_gpu=round(batch * job["seq"] / (ms / 1000) / job["procs"], 1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--ref", action="append", default=[], metavar="JOB=REFJOB")
    p.add_argument("--skip", type=int, default=5, help="warm-up iterations left out of timing")
    p.add_argument("--parity", type=int, default=10, help="iterations compared for loss parity")
    a = p.parse_args(argv)
    jobs = {}
    for path in sorted(a.out.glob("*.log")):
        job = parse(path)
        timing(job, a.skip)
        jobs[job["name"]] = job
    refs = dict(r.split("=", 1) for r in a.ref)
    lines = ["| job | model | TP | CP | PP | GPUs | ms/iter | tokens/s/GPU | efficiency vs ref "
             "| peak alloc GiB (max rank) | peak reserved GiB | lm loss first -> last | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    parity_lines = []
    for name, j in jobs.items():
        if "model" not in j:
            lines.append(f"| {name} | | | | | | | | | | | | {j['status']} |")
            continue
        ref = jobs.get(refs.get(name, ""))
        eff = ""
        if ref and ref.get("tok_s_gpu") and j.get("tok_s_gpu"):
            j["efficiency"] = round(j["tok_s_gpu"] / ref["tok_s_gpu"], 3)
            eff = f"{j['efficiency']:.2f} (vs {ref['name']})"
        it = j["iters"]
        losses = f"{it[min(it)]['loss']:.3f} -> {it[max(it)]['loss']:.3f} (it {max(it)})" if it else ""
        fmt = lambda v: "" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)
        lines.append(
            f"| {name} | {j['model']} | {j['tp']} | {j['cp']} | {j['pp']} | {j['procs']} | "
            f"{fmt(j.get('ms_per_iter'))} | {fmt(j.get('tok_s_gpu'))} | {eff} | "
            f"{fmt(j.get('peak_alloc_gib'))}{'' if j['peak_kind'] != 'cpu-rss' else ' (CPU RSS)'} | "
            f"{fmt(j.get('peak_reserved_gib'))} | {losses} | {j['status']} |")
        if ref and ref.get("iters") and it:
            common = [k for k in sorted(it) if k in ref["iters"]][: a.parity]
            if common:
                diffs = [abs(it[k]["loss"] - ref["iters"][k]["loss"]) for k in common]
                j["parity"] = {"ref": ref["name"], "iterations": common,
                               "loss": [it[k]["loss"] for k in common],
                               "ref_loss": [ref["iters"][k]["loss"] for k in common],
                               "max_abs_diff": max(diffs), "first_abs_diff": diffs[0]}
                parity_lines.append(
                    f"| {name} vs {ref['name']} | {len(common)} | {diffs[0]:.4f} | {max(diffs):.4f} | "
                    + ", ".join(f"{it[k]['loss']:.4f}/{ref['iters'][k]['loss']:.4f}"
                                for k in common) + " |")
    md = "\n".join(lines)
    if parity_lines:
        md += ("\n\n| loss parity (lm loss, job/ref) | iterations | |diff| at 1 | max |diff| | "
               "per iteration |\n|---|---|---|---|---|\n" + "\n".join(parity_lines))
    (a.out / "summary.md").write_text(md + "\n")
    (a.out / "summary.json").write_text(json.dumps(jobs, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
