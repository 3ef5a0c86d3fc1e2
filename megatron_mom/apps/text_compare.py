"""Small byte-level LMs, one per mixer, on real text: validation loss curves (issue 21).

    python -m megatron_mom.apps.text_compare --out DIR [--preset h200|cpu] [--minutes-per-model 3]
                                        [--set key=value ...]

Corpus: Python source files, as bytes (vocabulary 256), from `sources`: "stdlib", the standard
library of the interpreter that runs this, its tests included where installed (sysconfig's
"stdlib" folder without site-packages; PSF License Agreement,
megatron_mom/data/LICENSE-PSF.txt), and "torch", the installed PyTorch package's own Python
sources (BSD-3-Clause, PyTorch's LICENSE). Text that every machine running this has, no
download; nothing of it is written to the outputs. Linux distributions ship the standard
library's tests separately (the H200's Python 3.12 has 9.7M bytes without them), hence the
second source. Files are split by a hash of their path inside their source: `val_fraction`
of them are validation, never trained on. The preset refuses fewer than `min_train_tokens` training
bytes.

Every mixer of the MQAR sweep (megatron_mom/apps/mqar_sweep.py) at one width: the same model
apart from the mixer, the same training windows in the same order (per seed), the same
number of steps (fitted to `minutes_per_model` from a timing of the slowest mixer), the same
validation windows, evaluated every `eval_every` steps (0: ten times a run). Outputs in DIR,
rewritten after every model: results.json (settings, environment, corpus, every curve),
results.md (final validation loss per mixer, mean and spread over seeds) and text_lm.png
(validation loss against training tokens, mean over seeds with a min-max band, one line per
mixer).

The folder is also where the comparison goes on: run again with the same settings and `--out`,
it keeps the finished runs, trains the missing (mixer, seed) pairs with the saved step count,
and refuses other settings or another corpus. `budget_minutes` stops it before a run that would
not finish in time (estimated from that mixer's timing), so a long comparison fits in several
short sessions of one GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

from megatron_mom.apps import mqar
from megatron_mom.apps.mqar_sweep import SWEEP_MIXERS, environment, write_results_json
from megatron_mom.train.config import ConfigError
from megatron_mom.train.plot import pyplot

# Installed third-party packages and generated or vendored parts; the library's own tests
# stay in (they are most of its Python text: ~50M of CPython 3.11's ~60M bytes).
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "ensurepip", "pydoc_data"}


@dataclass
class TextSettings:
    mixers: List[str] = field(default_factory=lambda: list(SWEEP_MIXERS))
    width: int = 512
    num_layers: int = 6
    num_heads: int = 4             # per memory and for attention; head size width // heads
    num_memories: int = 4
    topk: int = 2
    chunk_size: int = 64
    mom_backend: str = "auto"
    seq_len: int = 1024
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.1
    decay_1d: bool = False         # weight decay on 1-D parameters and biases too (mqar.adamw)
    warmup_fraction: float = 0.05
    seeds: int = 3
    train_steps: int = 0           # 0: fitted to minutes_per_model
    minutes_per_model: float = 3.0
    budget_minutes: float = 0.0    # this invocation; 0: no limit (runs left go on next time)
    eval_every: int = 0            # 0: CURVE_POINTS evaluations a run, whatever its steps
    val_windows: int = 64
    val_fraction: float = 0.02
    sources: List[str] = field(default_factory=lambda: ["stdlib", "torch"])
    max_corpus_bytes: int = 0      # 0: every file
    min_train_tokens: int = 20_000_000


PRESETS = {
    # One H200: 13M (attention) to 46M (single-state) parameters, MoM 27M; 7 mixers x 3
    # seeds x minutes_per_model.
    "h200": TextSettings(),
    # The pipeline at a tiny size on a CPU (tests).
    "cpu": TextSettings(width=32, num_layers=2, num_heads=2, chunk_size=16, seq_len=64,
                        batch_size=4, seeds=2, train_steps=4, eval_every=2, val_windows=4,
                        sources=["stdlib"], max_corpus_bytes=3_000_000,
                        min_train_tokens=100_000),
}


def settings_for(preset: str, overrides: Optional[dict] = None) -> TextSettings:
    s = mqar.preset_with_overrides(PRESETS, preset, overrides, "text_compare")
    for mixer in s.mixers:
        if mixer not in SWEEP_MIXERS:
            raise ConfigError(f"unknown mixer {mixer!r}; choose from {', '.join(SWEEP_MIXERS)}")
    if s.width % s.num_heads:
        raise ConfigError(f"width {s.width} is not a multiple of num_heads {s.num_heads}")
    unknown = [src for src in s.sources if src not in SOURCES]
    if unknown or not s.sources:
        raise ConfigError(f"sources must name some of {', '.join(SOURCES)}; got {s.sources}")
    if s.train_steps <= 0 and s.minutes_per_model <= 0:
        raise ConfigError("set train_steps or minutes_per_model (both are 0)")
    if s.budget_minutes < 0:
        raise ConfigError(f"budget_minutes must be >= 0 (0: no limit), got {s.budget_minutes}")
    if s.eval_every < 0:
        raise ConfigError(f"eval_every must be >= 0 (0: ten evaluations a run), got {s.eval_every}")
    return s


# ---------------------------------------------------------------------------------- corpus
# Where each source's Python files are, found when a corpus is loaded.
SOURCES = {"stdlib": lambda: Path(sysconfig.get_paths()["stdlib"]),
           "torch": lambda: Path(torch.__file__).parent}


def python_files(root: Path) -> List[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return files


def is_validation(relative: str, fraction: float) -> bool:
    """A file's split from a hash of its path: stable across machines and runs."""
    h = int(hashlib.sha256(relative.encode()).hexdigest()[:8], 16)
    return h < fraction * 16 ** 8


def load_corpus(s: TextSettings) -> dict:
    """{"train": uint8 tensor, "val": uint8 tensor, "files": (train, val), "root": ...}."""
    roots = {src: SOURCES[src]() for src in s.sources}
    parts = {"train": [], "val": []}
    counts = {"train": 0, "val": 0}
    total = 0
    for root, path in ((root, path) for root in roots.values() for path in python_files(root)):
        data = path.read_bytes() + b"\n\n"
        split = "val" if is_validation(path.relative_to(root).as_posix(), s.val_fraction) \
            else "train"
        parts[split].append(data)
        counts[split] += 1
        total += len(data)
        if s.max_corpus_bytes and total >= s.max_corpus_bytes:
            break
    out = {k: torch.frombuffer(bytearray(b"".join(v)), dtype=torch.uint8) if v
           else torch.zeros(0, dtype=torch.uint8) for k, v in parts.items()}
    where = ", ".join(f"{src} ({root})" for src, root in roots.items())
    if out["train"].numel() < s.min_train_tokens:
        raise ConfigError(f"the sources {where} give {out['train'].numel():,} training bytes, "
                          f"fewer than min_train_tokens={s.min_train_tokens:,}; add a source "
                          f"(sources=stdlib,torch) or lower min_train_tokens")
    if out["val"].numel() < s.seq_len + 1:
        raise ConfigError(f"the validation split has {out['val'].numel()} bytes; raise "
                          f"val_fraction")
    return {**out, "files": counts, "root": where}


def windows(stream: torch.Tensor, starts: torch.Tensor, seq_len: int):
    """(inputs, labels) [b, seq_len] int64: next-byte prediction from each start."""
    idx = starts[:, None] + torch.arange(seq_len + 1)
    chunk = stream[idx].long()
    return chunk[:, :-1], chunk[:, 1:]


def validation_starts(s: TextSettings, val: torch.Tensor) -> torch.Tensor:
    """Evenly spaced windows over the validation stream (the same for every model)."""
    last = val.numel() - s.seq_len - 1
    return torch.linspace(0, last, s.val_windows).long()


# ---------------------------------------------------------------------------------- models
def model_settings(s: TextSettings, steps: int) -> mqar.MQARSettings:
    return mqar.MQARSettings(
        vocab_size=256, seq_lens=[s.seq_len], num_pairs=[1], hidden_size=s.width,
        num_layers=s.num_layers, num_heads=s.num_heads, head_dim=s.width // s.num_heads,
        num_memories=s.num_memories, topk=s.topk, chunk_size=s.chunk_size,
        mom_backend=s.mom_backend, train_steps=steps, lr=s.lr, weight_decay=s.weight_decay,
        decay_1d=s.decay_1d, warmup_steps=max(1, int(s.warmup_fraction * steps)))


def _build(mixer: str, s: TextSettings, steps: int, seed: int, device):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron_mom.layer import metrics
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    ms = model_settings(s, steps)
    model = mqar.build_model(mixer, ms, device)
    metrics.set_router_loss_scale(device=device)
    opt = mqar.adamw(model, s.lr, s.weight_decay, s.decay_1d, betas=(0.9, 0.95))
    return ms, model, opt


@torch.no_grad()
def validation_loss(model, val: torch.Tensor, starts: torch.Tensor, s: TextSettings,
                    device) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, starts.numel(), s.batch_size):
        x, y = windows(val, starts[i:i + s.batch_size], s.seq_len)
        logits = mqar._logits(model, x.to(device)).float()
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.to(device).reshape(-1),
            reduction="sum").item()
        count += y.numel()
    model.train()
    return total / count


# Points of a validation curve when eval_every is 0, so that a step count fitted to a short
# budget still draws a curve.
CURVE_POINTS = 10


def eval_steps(s: TextSettings, steps: int) -> List[int]:
    """The steps (1-based) after which validation runs: every eval_every, and the last."""
    every = s.eval_every or max(1, steps // CURVE_POINTS)
    return sorted(set(range(every, steps + 1, every)) | {steps})


def train_one(mixer: str, seed: int, steps: int, s: TextSettings, corpus: dict, device,
              log=print) -> dict:
    ms, model, opt = _build(mixer, s, steps, seed, device)
    gen = torch.Generator().manual_seed(10_007 * (seed + 1))     # the same windows per seed
    last = corpus["train"].numel() - s.seq_len - 1
    val_starts = validation_starts(s, corpus["val"])
    curve, start, digest = [], time.time(), hashlib.sha256()
    evals = set(eval_steps(s, steps))
    for step in range(steps):
        starts = torch.randint(last, (s.batch_size,), generator=gen)
        digest.update(starts.numpy().tobytes())       # shows that every mixer saw these
        x, y = windows(corpus["train"], starts, s.seq_len)
        for group in opt.param_groups:
            group["lr"] = mqar._lr(step, ms)
        loss = mqar._train_batch(model, opt, x.to(device), y.to(device), every_position=True)
        if step + 1 in evals:
            val = validation_loss(model, corpus["val"], val_starts, s, device)
            curve.append({"step": step + 1, "tokens": (step + 1) * s.batch_size * s.seq_len,
                          "train_loss": loss.item(), "val_loss": val})
            log(f"    {mixer} seed {seed} step {step + 1}/{steps}: train {loss.item():.3f} "
                f"val {val:.3f} nats/byte")
    return {"mixer": mixer, "seed": seed, "steps": steps, "seconds": time.time() - start,
            "parameters": sum(p.numel() for p in model.parameters()), "curve": curve,
            "training_windows_sha256": digest.hexdigest()}


def seconds_per_step(mixer: str, s: TextSettings, corpus: dict, device, steps: int = 5) -> float:
    _, model, opt = _build(mixer, s, 10, 0, device)
    x, y = windows(corpus["train"], torch.arange(s.batch_size) * s.seq_len, s.seq_len)
    x, y = x.to(device), y.to(device)
    for _ in range(2):
        mqar._train_batch(model, opt, x, y, every_position=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.time()
    for _ in range(steps):
        mqar._train_batch(model, opt, x, y, every_position=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.time() - t) / steps


# ---------------------------------------------------------------------------------- outputs
def summary(runs: List[dict]) -> Dict[str, dict]:
    out = {}
    for mixer in dict.fromkeys(r["mixer"] for r in runs):
        finals = [r["curve"][-1]["val_loss"] for r in runs if r["mixer"] == mixer and r["curve"]]
        mean = sum(finals) / len(finals)
        std = (sum((v - mean) ** 2 for v in finals) / max(len(finals) - 1, 1)) ** 0.5
        params = next(r["parameters"] for r in runs if r["mixer"] == mixer)
        out[mixer] = {"final_val_loss": {"mean": mean, "std": std, "min": min(finals),
                                         "max": max(finals), "n": len(finals)},
                      "parameters": params}
    return out


def table(agg: Dict[str, dict]) -> str:
    lines = ["| mixer | parameters | final validation loss (nats/byte), mean ± std | min | max "
             "| seeds |", "|---|---|---|---|---|---|"]
    for mixer, e in sorted(agg.items(), key=lambda kv: kv[1]["final_val_loss"]["mean"]):
        v = e["final_val_loss"]
        lines.append(f"| {mixer} | {e['parameters']:,} | {v['mean']:.4f} ± {v['std']:.4f} | "
                     f"{v['min']:.4f} | {v['max']:.4f} | {v['n']} |")
    return "\n".join(lines)


def plot(runs: List[dict], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mixer in dict.fromkeys(r["mixer"] for r in runs):
        curves = [r["curve"] for r in runs if r["mixer"] == mixer and r["curve"]]
        n = min(len(c) for c in curves)
        tokens = [c["tokens"] for c in curves[0][:n]]
        vals = [[c[i]["val_loss"] for c in curves] for i in range(n)]
        line, = ax.plot(tokens, [sum(v) / len(v) for v in vals], label=mixer)
        ax.fill_between(tokens, [min(v) for v in vals], [max(v) for v in vals],
                        color=line.get_color(), alpha=0.2)
    ax.set_xlabel("training tokens (bytes)")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("Byte-level LMs on the Python standard library's sources")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    from megatron_mom.train.plot import save_figure
    save_figure(fig, path)
    return True


def write_outputs(out: Path, s: TextSettings, plan: dict, runs: List[dict], env: dict) -> str:
    agg = summary(runs)
    text = table(agg)
    (out / "results.md").write_text(
        f"{plan['steps']} steps of {s.batch_size} x {s.seq_len} bytes per model, "
        f"width {s.width}, {s.num_layers} layers:\n\n{text}\n")
    write_results_json(out, {"settings": dataclasses.asdict(s), "environment": env,
                             "plan": plan, "summary": agg, "runs": runs})
    plot(runs, out / "text_lm.png")
    return text


# Settings that a comparison going on in its folder may change: which runs this invocation
# adds and how long it may take. Every other setting binds the runs together.
RESUME_FREE = ("mixers", "seeds", "train_steps", "minutes_per_model", "budget_minutes")
CORPUS_KEYS = ("train_bytes", "val_bytes", "files")


def saved_comparison(out_dir: Path, s: TextSettings, plan: dict) -> Optional[dict]:
    """The results.json of a comparison in out_dir, checked against these settings and this
    corpus; None where there is none."""
    path = out_dir / "results.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    now = dataclasses.asdict(s)
    differing = [f"{k} (saved {saved['settings'].get(k)!r}, now {now[k]!r})" for k in now
                 if k not in RESUME_FREE and saved["settings"].get(k) != now[k]]
    differing += [f"corpus {k} (saved {saved['plan'].get(k)!r}, now {plan[k]!r})"
                  for k in CORPUS_KEYS if saved["plan"].get(k) != plan[k]]
    if s.train_steps and s.train_steps != saved["plan"]["steps"]:
        differing.append(f"train_steps (saved {saved['plan']['steps']}, now {s.train_steps})")
    if differing:
        raise ConfigError(f"{out_dir} holds a comparison with other settings: "
                          f"{'; '.join(differing)}. Run with its settings to go on with it, "
                          f"or give another --out")
    return saved


def estimated_seconds(mixer: str, runs: List[dict], plan: dict) -> Optional[float]:
    """How long a run of this mixer takes: as its longest finished run did, else from the
    timing the step count was fitted to (10% added for validation); None if neither exists."""
    done = [r["seconds"] for r in runs if r["mixer"] == mixer]
    if done:
        return max(done)
    per_step = plan.get("seconds_per_step", {}).get(mixer)
    return 1.1 * per_step * plan["steps"] if per_step else None


def run(preset: str = "h200", out: str = "runs/text_compare", overrides: Optional[dict] = None,
        device: Optional[str] = None, log=print) -> Dict[str, dict]:
    from megatron_mom.train.build import init_process_groups
    started = time.time()
    s = settings_for(preset, overrides)
    init_process_groups(1, 1, 0)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    corpus = load_corpus(s)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = {"corpus_root": corpus["root"], "files": corpus["files"],
            "train_bytes": corpus["train"].numel(), "val_bytes": corpus["val"].numel()}
    log(f"text_compare: {plan['train_bytes']:,} training and {plan['val_bytes']:,} validation "
        f"bytes from {corpus['root']} ({corpus['files']['train']} + {corpus['files']['val']} "
        f"files)")
    saved = saved_comparison(out_dir, s, plan)
    here = environment(dev)
    env, runs = here, []
    if saved:
        plan, runs, env = saved["plan"], saved["runs"], saved["environment"]
        log(f"text_compare: going on with {len(runs)} finished runs in {out_dir}, "
            f"{plan['steps']} steps each")
    elif s.train_steps:
        plan["steps"] = s.train_steps
    else:
        timing = {m: seconds_per_step(m, s, corpus, dev) for m in s.mixers}
        plan["steps"] = max(1, int(60 * s.minutes_per_model / max(timing.values())))
        plan["seconds_per_step"] = timing
        log("text_compare: seconds per step " + ", ".join(f"{m} {t:.3f}" for m, t in
                                                          timing.items()))
    steps = plan["steps"]
    plan["tokens_per_model"] = steps * s.batch_size * s.seq_len
    done = {(r["mixer"], r["seed"]) for r in runs}
    todo = [(m, seed) for seed in range(s.seeds) for m in s.mixers if (m, seed) not in done]
    for mixer, seed in todo:
        need = estimated_seconds(mixer, runs, plan)
        if s.budget_minutes and need and time.time() - started + need > 60 * s.budget_minutes:
            log(f"text_compare: the budget leaves too little for {mixer}, seed {seed} "
                f"(~{need:.0f} s); the same command goes on with it")
            break
        log(f"text_compare: {mixer}, seed {seed}, {steps} steps")
        r = train_one(mixer, seed, steps, s, corpus, dev, log)
        runs.append({**r, "device": here["device"],
                     "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())})
        write_outputs(out_dir, s, plan, runs, env)
    if not runs:
        log("text_compare: no run finished")
        return {}
    text = write_outputs(out_dir, s, plan, runs, env)
    log("\n" + text + f"\n\nwritten: {out_dir / 'results.md'}, {out_dir / 'text_lm.png'}, "
        f"{out_dir / 'results.json'}")
    return summary(runs)


def main(argv=None) -> int:
    from megatron_mom.train.config import parse_override
    p = argparse.ArgumentParser(prog="python -m megatron_mom.apps.text_compare",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="h200", help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--out", default="runs/text_compare")
    p.add_argument("--minutes-per-model", type=float)
    p.add_argument("--budget-minutes", type=float, help="stop before a run that would not "
                   "finish in this many minutes; the same command goes on with the rest")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--device")
    args = p.parse_args(argv)
    overrides = dict(parse_override(t) for t in args.set)
    if args.minutes_per_model is not None:
        overrides["minutes_per_model"] = args.minutes_per_model
    if args.budget_minutes is not None:
        overrides["budget_minutes"] = args.budget_minutes
    try:
        run(args.preset, args.out, overrides, args.device)
    except ConfigError as err:
        print(f"text_compare: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
