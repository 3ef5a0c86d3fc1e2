"""Zoology-style MQAR sweep: `megatron-mom mqar --preset zoology --budget-minutes 8 --out DIR`.

The task as Zoology (arXiv:2312.04927) runs it: vocabulary 8192, sequence lengths
{64, 128, 256, 512} with N = min(L/4, 64) key-value pairs at test time, queries at power-law
offsets. One model per (mixer, width, learning rate, seed) trains on fresh random batches of
every length in turn (each batch draws N from {N/4, N/2, N} of its length) and is tested on all
query answers of a held-out test set per length. Training rows that equal a validation or test
sequence are masked out of the loss (counted in the results).

Sweep: 2-layer models of every mixer at every width; first every learning rate at seed 0, the
best by validation accuracy (a separate held-out set, not the test set) kept per (mixer, width);
then the other seeds at that learning rate. Reported per (mixer, width): the test accuracy per
length over the seeds (mean, standard deviation, min, max).

On a GPU the runs go to `workers` processes sharing it (tiny models leave a GPU mostly idle in
one process). Without CUDA MPS the processes take turns on the GPU (time slicing); under MPS
(`nvidia-cuda-mps-control -d` before the sweep) their small kernels run side by side, which is
how the sweep is meant to run (docs/results.md). Each process replays its training step from
CUDA graphs (`cuda_graphs`, mqar.TrainStep: the same kernels and results as eagerly, without
the host launching a few hundred kernels a step). With `train_steps` 0 the step count, the
same for every run, is fitted to the budget from a timing of every mixer in all workers at once; the whole sweep stops at the budget
whatever happens (runs still training then are cut and marked; runs not started are listed).

A run cut by the budget keeps its training state in the output folder's partial/ (weights,
optimizer, data generators, step); the sweep run again into that folder with the same
settings goes on from it bit for bit, and from results.json's finished runs.

Outputs in the output folder, rewritten after every run: results.json (settings, environment,
every run, the aggregates), results.md (the tables) and mqar_zoology.png (accuracy against
width, one panel per sequence length, one line per mixer, min-max bars over seeds).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from megatron_mom.apps import mqar
from megatron_mom.train.config import ConfigError
from megatron_mom.train.plot import pyplot

SWEEP_MIXERS = ("attention", "single", "single-state", "single-params", "mom", "mom-noshared",
                "hybrid")


@dataclass
class SweepSettings:
    vocab_size: int = 8192
    seq_lens: List[int] = field(default_factory=lambda: [64, 128, 256, 512])
    max_pairs: int = 64              # test pairs N = min(L // 4, max_pairs)
    power_a: float = 0.01
    widths: List[int] = field(default_factory=lambda: [64, 128, 256])
    num_layers: int = 2
    num_heads: int = 2               # heads of one memory and of attention; head size
                                     # width // num_heads (keys = values)
    num_memories: int = 4
    topk: int = 2
    chunk_size: int = 64
    mom_backend: str = "auto"
    mixers: List[str] = field(default_factory=lambda: list(SWEEP_MIXERS))
    # At width 128 the recurrent mixers left the loss plateau at 3e-4 and at none of 1e-3,
    # 3e-3, 1e-2 within 4,000-6,000 steps (docs/results.md, the learnability probe).
    lrs: List[float] = field(default_factory=lambda: [1e-4, 3e-4, 1e-3])
    seeds: int = 3                   # seed 0 runs the learning-rate sweep
    edge_lrs: int = 0                # >0: where a (mixer, width)'s best rate is the lowest or
                                     # highest tried, try the next one past it (the grid's
                                     # ratio), up to this many more; its seeds wait for them
    train_steps: int = 0             # 0: fitted to budget_minutes (same for every run)
    min_steps: int = 100             # the fitted count's floor (with a warning)
    max_steps: int = 20000           # and its ceiling
    tokens_per_step: int = 16384     # batch = tokens_per_step // L sequences (also for eval)
    warmup_fraction: float = 0.1
    weight_decay: float = 0.1
    decay_1d: bool = False           # weight decay on 1-D parameters and biases too (mqar.adamw)
    val_examples: int = 256          # per length, picks the learning rate
    test_examples: int = 1000        # per length, the reported accuracy
    budget_minutes: float = 8.0      # the whole sweep, start to end; 0: no limit
    workers: int = 0                 # 0: min(8, CPUs - 2) on a GPU, 1 on the CPU
    timing_seconds: float = 10.0     # the step timing's window, every worker stepping at once
    log_every: int = 0               # >0: log the loss every this many steps
    max_runs: int = 0                # >0: start at most this many runs now, the rest in the
                                     # next sweep into the same folder (needs train_steps)
    cuda_graphs: bool = True         # GPU: each step replayed from a CUDA graph (mqar.TrainStep;
                                     # the same kernels and results as eagerly)


PRESETS = {
    # One H200: the full sweep (7 mixers x 3 widths x (3 learning rates + 2 seeds) = 105
    # runs) with the step count fitted to the budget (see docs/results.md for what it fits).
    "zoology": SweepSettings(),
    # CI: every mixer at a tiny size for a few steps; checks the pipeline, not the numbers.
    "zoology-cpu": SweepSettings(vocab_size=64, seq_lens=[16, 32], max_pairs=8,
                                 widths=[32, 64], lrs=[1e-3, 1e-2], seeds=2, train_steps=4,
                                 tokens_per_step=256, chunk_size=16, val_examples=16,
                                 test_examples=32, budget_minutes=0.0, workers=1),
}


# ---------------------------------------------------------------------------------- settings
def settings_for(preset: str, overrides: Optional[dict] = None) -> SweepSettings:
    s = mqar.preset_with_overrides(PRESETS, preset, overrides, "MQAR sweep")
    check(s)
    return s


def check(s: SweepSettings) -> None:
    def need(ok: bool, msg: str):
        if not ok:
            raise ConfigError(f"MQAR sweep: {msg}")

    need(s.seq_lens and all(L >= 4 for L in s.seq_lens), f"seq_lens must be >= 4, got {s.seq_lens}")
    need(s.max_pairs >= 1, f"max_pairs must be >= 1, got {s.max_pairs}")
    need(max(test_pairs(L, s) for L in s.seq_lens) <= s.vocab_size // 2 - 1,
         f"vocab_size {s.vocab_size} has too few keys for {s.max_pairs} distinct pairs")
    need(s.tokens_per_step >= max(s.seq_lens),
         f"tokens_per_step {s.tokens_per_step} must hold one sequence of the longest length "
         f"{max(s.seq_lens)}")
    need(s.lrs and all(lr > 0 for lr in s.lrs), f"lrs must be positive, got {s.lrs}")
    need(s.seeds >= 1, f"seeds must be >= 1, got {s.seeds}")
    need(s.num_layers >= 2 or "hybrid" not in s.mixers,
         "the hybrid mixer needs num_layers >= 2 (MoM layers, then attention)")
    need(s.train_steps >= 0 and 1 <= s.min_steps <= s.max_steps,
         f"train_steps must be >= 0 (0: fit to the budget) and 1 <= min_steps <= max_steps; "
         f"got {s.train_steps}, {s.min_steps}, {s.max_steps}")
    need(s.train_steps > 0 or s.budget_minutes > 0,
         "train_steps 0 fits the steps to budget_minutes, which is 0: set one of them")
    need(s.val_examples >= 1 and s.test_examples >= 1, "val_examples and test_examples must be >= 1")
    need(s.max_runs >= 0 and (s.max_runs == 0 or s.train_steps > 0),
         f"max_runs must be >= 0 and needs a fixed train_steps (every part of a sweep trains "
         f"the same steps); got max_runs={s.max_runs}, train_steps={s.train_steps}")
    need(s.timing_seconds > 0, f"timing_seconds must be > 0 (the step timing's window), got "
         f"{s.timing_seconds}")
    for mixer in s.mixers:
        need(mixer in SWEEP_MIXERS, f"unknown mixer {mixer!r}; choose from {', '.join(SWEEP_MIXERS)}")
    for width in s.widths:
        need(width % s.num_heads == 0,
             f"width {width} is not a multiple of num_heads {s.num_heads}")
        for mixer in s.mixers:
            try:
                mqar.mixer_pattern_and_mom(mixer, model_settings(s, width))
            except ValueError as err:
                raise ConfigError(f"MQAR sweep, {mixer} at width {width}: {err}") from None


def test_pairs(seq_len: int, s: SweepSettings) -> int:
    return min(seq_len // 4, s.max_pairs)


def train_pairs(seq_len: int, s: SweepSettings) -> List[int]:
    """The pair counts a training batch of this length draws from: N/4, N/2, N."""
    n = test_pairs(seq_len, s)
    return sorted({max(1, n // 4), max(1, n // 2), n})


def model_settings(s: SweepSettings, width: int, lr: float = 1e-3, steps: int = 1):
    """The MQARSettings that `mqar.build_model` and its schedule read for one run."""
    return mqar.MQARSettings(
        vocab_size=s.vocab_size, seq_lens=[max(s.seq_lens)], num_pairs=[1], power_a=s.power_a,
        hidden_size=width, num_layers=s.num_layers, num_heads=s.num_heads,
        head_dim=width // s.num_heads, num_memories=s.num_memories, topk=s.topk,
        chunk_size=s.chunk_size, mom_backend=s.mom_backend, train_steps=steps, lr=lr,
        weight_decay=s.weight_decay, decay_1d=s.decay_1d,
        warmup_steps=max(1, int(s.warmup_fraction * steps)))


def describe(mixer: str, s: SweepSettings, width: int) -> dict:
    """Layer pattern, memories, heads and recurrent state of a mixer at a width."""
    pattern, mom = mqar.mixer_pattern_and_mom(mixer, model_settings(s, width))
    out = {"pattern": pattern}
    if "M" in pattern:
        per_memory = mom.num_heads * mom.key_dim * mom.value_dim
        out.update(memories=mom.num_memory_weights, active=mom.num_slots, heads=mom.num_heads,
                   head_dim=mom.head_dim, state_per_mom_layer=mom.num_memory_weights * per_memory,
                   state_read_per_token=mom.num_slots * per_memory)
    return out


# ---------------------------------------------------------------------------------- data
_HASH_MULT: Dict[str, torch.Tensor] = {}   # device -> odd random int64 multipliers


def row_hashes(inputs: torch.Tensor) -> torch.Tensor:
    """One int64 per sequence (a wrapping polynomial hash): equal sequences hash equal."""
    L, key = inputs.shape[1], str(inputs.device)
    if key not in _HASH_MULT or _HASH_MULT[key].shape[0] < L:
        gen = torch.Generator().manual_seed(2024)
        mult = torch.randint(1, 2 ** 62, (max(L, 4096),), generator=gen) | 1
        _HASH_MULT[key] = mult.to(inputs.device)
    return ((inputs + 1) * _HASH_MULT[key][:L]).sum(dim=1)


def held_out_sets(s: SweepSettings, device) -> Dict[str, Dict[int, tuple]]:
    """{"val"|"test": {L: (inputs, labels)}} at N = test_pairs(L), the same in every run and
    process (CPU generators with fixed seeds, apart from the training streams)."""
    sets = {}
    for name, count, base in (("val", s.val_examples, 7_000_000), ("test", s.test_examples,
                                                                     9_000_000)):
        sets[name] = {}
        for L in s.seq_lens:
            gen = torch.Generator().manual_seed(base + L)
            x, y = mqar.make_batch(count, L, test_pairs(L, s), s.vocab_size, s.power_a, gen)
            sets[name][L] = (x.to(device), y.to(device))
    return sets


def held_out_hashes(sets) -> torch.Tensor:
    return torch.cat([row_hashes(x) for per_len in sets.values() for x, _ in per_len.values()])


def max_answers(seq_len: int, s: SweepSettings) -> int:
    """The most labelled positions a training batch of this length has (sequences x most
    pairs): the fixed number of answer rows its step computes (`mqar._answer_logits`)."""
    return max(1, s.tokens_per_step // seq_len) * max(train_pairs(seq_len, s))


def training_batch(s: SweepSettings, step: int, gen: torch.Generator, pick: torch.Generator,
                   exclude: torch.Tensor, device):
    """Fresh batch number `step`: lengths in turn, N drawn from train_pairs; labels of rows
    equal to a held-out sequence set to -100. Returns (inputs, labels, masked rows as a
    0-dim tensor: no host sync)."""
    L = s.seq_lens[step % len(s.seq_lens)]
    choices = train_pairs(L, s)
    N = choices[int(torch.randint(len(choices), (1,), generator=pick))]
    inputs, labels = mqar.make_batch(max(1, s.tokens_per_step // L), L, N, s.vocab_size,
                                     s.power_a, gen, device)
    seen = torch.isin(row_hashes(inputs), exclude)
    labels = labels.masked_fill(seen[:, None], -100)
    return inputs, labels, seen.sum()


@torch.no_grad()
def accuracy(model, inputs: torch.Tensor, labels: torch.Tensor, tokens_per_batch: int) -> dict:
    """Exact-match accuracy over every query answer of a fixed set."""
    model.eval()
    b = max(1, tokens_per_batch // inputs.shape[1])
    correct = torch.zeros((), dtype=torch.long, device=inputs.device)
    for i in range(0, inputs.shape[0], b):
        logits, targets = mqar._answer_logits(model, inputs[i:i + b], labels[i:i + b])
        correct += (logits.argmax(dim=-1) == targets).sum()
    model.train()
    answers = int((labels != -100).sum())
    return {"accuracy": int(correct) / answers, "answers": answers,
            "sequences": int(inputs.shape[0])}


# ---------------------------------------------------------------------------------- one run
@dataclass(frozen=True)
class Job:
    kind: str          # "lr" (the sweep at seed 0), "seed" (the best lr, another seed), "time"
    mixer: str
    width: int
    lr: float
    seed: int
    steps: int
    deadline: float = 0.0   # time.time() after which training stops (0: none)

    @property
    def key(self) -> str:
        return f"{self.mixer}/w{self.width}/lr{self.lr:g}/seed{self.seed}"


_STATE: dict = {}   # per process: settings, device, held-out sets and their hashes


def init_worker(settings: dict, device: str, threads: int = 0, partial_dir: str = "") -> None:
    """Set up a process for runs: parallel state, TF32 as `mqar` uses it, held-out sets.
    `partial_dir`: where a run cut by the budget keeps its training state, and where a run
    looks for one to go on from ("": runs start from scratch and keep nothing)."""
    from megatron_mom.train.build import init_process_groups
    if threads:
        torch.set_num_threads(threads)
    init_process_groups(1, 1, 0)
    _STATE.pop("init_error", None)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    s = SweepSettings(**settings)
    sets = held_out_sets(s, dev)
    _STATE.update(settings=s, device=dev, sets=sets, exclude=held_out_hashes(sets),
                  partial_dir=partial_dir)


def _init_pool_worker(settings: dict, device: str, threads: int, partial_dir: str) -> None:
    """init_worker in a pool process: a failure is kept and returned by every job (a raising
    initializer would make the pool start replacement workers forever)."""
    try:
        init_worker(settings, device, threads, partial_dir)
    except Exception as err:  # noqa: BLE001
        _STATE["init_error"] = f"worker setup failed: {type(err).__name__}: {err}\n" + \
            traceback.format_exc(limit=6)


def _seed_everything(seed: int) -> None:
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_job(job: Job, barrier=None) -> dict:
    """Train and evaluate one model in this process (`init_worker` first). Never raises: an
    error comes back as the result's "error". `barrier`: a timing job's start line, shared with
    the other timing jobs running at the same time."""
    out = {"job": dataclasses.asdict(job), "pid": os.getpid()}
    if "init_error" in _STATE:
        return {**out, "error": _STATE["init_error"]}
    s, dev = _STATE["settings"], _STATE["device"]
    if job.deadline and time.time() > job.deadline:
        return {**out, "skipped": "the budget ran out before this run started"}
    try:
        out.update(_train_and_test(job, s, dev) if job.kind != "time"
                   else _time_job(job, s, dev, barrier))
    except Exception as err:  # noqa: BLE001 - reported with the run, the sweep goes on
        out["error"] = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=6)}"
    return out


def _build(job: Job, s: SweepSettings, dev):
    from megatron_mom.layer import metrics
    ms = model_settings(s, job.width, job.lr, job.steps)
    _seed_everything(job.seed)
    model = mqar.build_model(job.mixer, ms, dev)
    metrics.set_router_loss_scale(device=dev)     # one micro-batch, no loss scaling
    # fused: one kernel for the whole update on a GPU instead of a dozen per parameter group
    # capturable: its step counts live on the GPU, so mqar.TrainStep can capture the update
    cuda = dev.type == "cuda"
    opt = mqar.adamw(model, job.lr, s.weight_decay, s.decay_1d, betas=(0.9, 0.98), fused=cuda,
                     capturable=cuda)
    return ms, model, opt


def _train_and_test(job: Job, s: SweepSettings, dev) -> dict:
    start = time.time()
    ms, model, opt = _build(job, s, dev)
    gen = torch.Generator(device=dev).manual_seed(1_000_003 * (job.seed + 1))
    pick = torch.Generator().manual_seed(17 + job.seed)
    masked = torch.zeros((), dtype=torch.long, device=dev)
    run = {"losses": {}, "first_loss": None, "train_seconds": 0.0}
    partial = _partial_path(job)
    resumed = _load_partial(partial, job, s, model, opt, gen, pick) if partial else None
    begin = 0
    if resumed is not None:
        begin, run = resumed["step"], resumed["run"]
        masked += resumed["masked"]
    train_step = mqar.TrainStep(model, opt, graphs=s.cuda_graphs)
    losses, step, loss = run["losses"], begin, None
    for step in range(begin, job.steps):
        if job.deadline and time.time() > job.deadline:
            break
        inputs, labels, seen = training_batch(s, step, gen, pick, _STATE["exclude"], dev)
        masked += seen
        loss = train_step(inputs, labels, mqar._lr(step, ms),
                          max_answers(inputs.shape[1], s))
        if step == 0:
            run["first_loss"] = loss.item()
        if s.log_every and step % s.log_every == 0:
            losses[step] = loss.item()
    else:
        step = job.steps
    final = loss.item() if loss is not None else run.get("final_loss")
    train_seconds = run["train_seconds"] + time.time() - start
    cut = step < job.steps
    if partial and cut:
        run.update(final_loss=final, train_seconds=train_seconds)
        _save_partial(partial, job, s, step, run, int(masked), model, opt, gen, pick)
    evals = {name: {str(L): accuracy(model, x, y, s.tokens_per_step)
                    for L, (x, y) in _STATE["sets"][name].items()}
             for name in ("val", "test")}
    if partial and not cut and partial.exists():
        partial.unlink()                         # finished: results.json holds the run now
    return {"steps": step, "cut": cut, "train_seconds": train_seconds,
            "seconds": time.time() - start, "first_loss": run["first_loss"],
            "final_loss": final, "losses": losses, "masked_training_rows": int(masked),
            **({"resumed_from_step": begin} if resumed is not None else {}),
            "parameters": sum(p.numel() for p in model.parameters()),
            "val": {L: r["accuracy"] for L, r in evals["val"].items()},
            "test": {L: r["accuracy"] for L, r in evals["test"].items()},
            "test_answers": {L: r["answers"] for L, r in evals["test"].items()}}


# A run cut by the budget keeps what it needs to go on bit for bit (weights, optimizer,
# generators, step) in partial_dir; run again in the same sweep, it continues from there.
def _partial_path(job: Job) -> Optional[Path]:
    folder = _STATE.get("partial_dir")
    return Path(folder) / (job.key.replace("/", "_") + ".pt") if folder else None


def _save_partial(path: Path, job: Job, s: SweepSettings, step: int, run: dict, masked: int,
                  model, opt, gen, pick) -> None:
    """Written through a temporary file: a run killed mid-write leaves the previous state."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"key": job.key, "steps": job.steps, "settings": _identity(s), "step": step,
                "run": run, "masked": masked, "model": model.state_dict(),
                "optimizer": opt.state_dict(), "gen": gen.get_state(),
                "pick": pick.get_state()}, tmp)
    tmp.replace(path)


def _load_partial(path: Path, job: Job, s: SweepSettings, model, opt, gen, pick):
    """The saved state restored into model, opt, gen, pick; None when there is none for this
    run (its key, step count and settings are checked). weights_only: tensors and plain
    values, no code from the file."""
    if not path.exists():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if (saved["key"], saved["steps"]) != (job.key, job.steps) or _differing(saved["settings"], s):
        raise ConfigError(f"MQAR sweep: {path} holds a cut run of other settings than "
                          f"{job.key} at {job.steps} steps; remove it to start that run anew")
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    gen.set_state(saved["gen"])
    pick.set_state(saved["pick"])
    return saved


# Settings added after sweeps were written without them, and the value those sweeps ran with.
_BEFORE_THE_SETTING = {"decay_1d": True}


def _as_written(settings: dict) -> dict:
    """A saved sweep's settings with the values it ran with for settings it predates."""
    return {**_BEFORE_THE_SETTING, **settings}


def _differing(saved: dict, s: SweepSettings) -> List[str]:
    """The settings that change what a run computes and differ between a saved sweep's and s
    (settings that stopped binding a sweep since it was saved are not compared)."""
    saved = _as_written(saved)
    return [k for k, v in _identity(s).items() if saved.get(k) != v]


def _identity(s: SweepSettings) -> dict:
    """The settings that change what a run computes (those a continued sweep must share)."""
    return {k: v for k, v in dataclasses.asdict(s).items() if k not in RESUME_FREE}


def _time_job(job: Job, s: SweepSettings, dev, barrier=None) -> dict:
    """Seconds per training step with every worker training (averaged over every length) and
    the fixed cost of a run (build and evaluation). The jobs of one timing wave compile their
    kernels, meet at `barrier` and then all step for the same `timing_seconds` of wall time,
    so each step is timed with the GPU as shared as in the sweep, not beside workers still
    compiling."""
    t0 = time.time()
    ms, model, opt = _build(job, s, dev)
    build = time.time() - t0
    gen = torch.Generator(device=dev).manual_seed(1)
    pick = torch.Generator().manual_seed(1)
    n = len(s.seq_lens)
    batches = [training_batch(s, i, gen, pick, _STATE["exclude"], dev) for i in range(n)]
    train_step = mqar.TrainStep(model, opt, graphs=s.cuda_graphs)

    def step(x, y):
        train_step(x, y, job.lr, max_answers(x.shape[1], s))

    for _ in range(train_step.warmup + 1):       # compiles every length's kernels (and graph)
        for x, y, _ in batches:
            step(x, y)
    _sync(dev)
    met = _meet(barrier, job.deadline - s.timing_seconds if job.deadline else 0.0)
    window = s.timing_seconds if barrier is not None else 0.0    # alone: one round suffices
    t1 = time.time()
    steps = 0
    while steps < n or time.time() - t1 < window:
        for x, y, _ in batches:
            step(x, y)
        steps += n
        _sync(dev)                               # the clock reads finished steps
    per_step = (time.time() - t1) / steps
    t2 = time.time()
    for L, (x, y) in _STATE["sets"]["val"].items():
        accuracy(model, x, y, s.tokens_per_step)
    for L, (x, y) in _STATE["sets"]["test"].items():
        accuracy(model, x, y, s.tokens_per_step)
    evaluate = time.time() - t2
    return {"seconds_per_step": per_step, "overhead_seconds": build + evaluate,
            "met_others": met}


def _meet(barrier, until: float) -> Optional[bool]:
    """Wait at `barrier` until the others come or `until` passes (0: no limit); whether they
    all came (None: no barrier, nothing ran beside). A wave whose job failed before the
    barrier times what it has."""
    if barrier is None:
        return None
    try:
        barrier.wait(timeout=max(0.1, until - time.time()) if until else None)
        return True
    except threading.BrokenBarrierError:
        return False


# ---------------------------------------------------------------------------------- runners
class _InProcess:
    """Runs jobs one after another in this process."""

    def __init__(self, settings: SweepSettings, device: str, partial_dir: str = ""):
        init_worker(dataclasses.asdict(settings), device, partial_dir=partial_dir)
        self.pending: List[dict] = []

    def submit(self, job: Job, barrier=None) -> None:
        self.pending.append(run_job(job, barrier))

    def barrier(self, parties: int):
        return None                              # one job at a time: nothing runs beside it

    def results(self, until: float):
        while self.pending:
            yield self.pending.pop(0)

    def close(self) -> None:
        pass


class _Pool:
    """Runs jobs in worker processes (spawned: CUDA cannot be forked) sharing the device."""

    def __init__(self, settings: SweepSettings, device: str, workers: int,
                 partial_dir: str = ""):
        import multiprocessing as mp
        ctx = mp.get_context("spawn")
        self.ctx = ctx
        self.pool = ctx.Pool(workers, initializer=_init_pool_worker,
                             initargs=(dataclasses.asdict(settings), device, 1, partial_dir))
        self.manager = None
        self.waiting: list = []

    def submit(self, job: Job, barrier=None) -> None:
        self.waiting.append((job, self.pool.apply_async(run_job, (job, barrier))))

    def barrier(self, parties: int):
        """A barrier the pool's jobs can share (a manager's proxy: a pool's task queue cannot
        carry a plain multiprocessing barrier)."""
        if self.manager is None:
            self.manager = self.ctx.Manager()
        return self.manager.Barrier(parties)

    def results(self, until: float):
        """Results as they finish; at `until` (0: never) the unfinished ones come back as
        lost (a worker that died takes its job with it)."""
        while self.waiting:
            done = [w for w in self.waiting if w[1].ready()]
            for item in done:
                self.waiting.remove(item)
                yield item[1].get()
            if not done:
                if until and time.time() > until:
                    lost = self.waiting
                    self.waiting = []
                    for job, _ in lost:
                        yield {"job": dataclasses.asdict(job),
                               "skipped": "unfinished when the sweep's time was up"}
                    return
                time.sleep(0.05)

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()
        if self.manager is not None:
            self.manager.shutdown()


def mps_running() -> bool:
    """Whether a CUDA MPS control daemon is listening where this process's CUDA looks for one."""
    pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    return os.path.exists(os.path.join(pipe, "control"))


def default_workers(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return max(1, min(8, (os.cpu_count() or 4) - 2))


def fit_steps(s: SweepSettings, timing: Dict[str, dict], runs_per_mixer: Dict[str, int],
              workers: int, seconds_left: float) -> int:
    """The step count that fits every run into `seconds_left` over `workers` processes, with
    a fifth kept back for uneven finishing. timing: mixer -> seconds_per_step,
    overhead_seconds (measured with all workers busy)."""
    per_step = sum(runs_per_mixer[m] * timing[m]["seconds_per_step"] for m in runs_per_mixer)
    fixed = sum(runs_per_mixer[m] * timing[m]["overhead_seconds"] for m in runs_per_mixer)
    steps = int((0.8 * seconds_left * workers - fixed) / per_step)
    return max(s.min_steps, min(s.max_steps, steps))


def _timing(runner, s: SweepSettings, workers: int, deadline: float, log) -> Dict[str, dict]:
    """Time every mixer at the largest width with all workers busy: waves of `workers` jobs
    (mixers in turn, every mixer at least once), each wave stepping at once (`_time_job`)."""
    width = max(s.widths)
    waves = -(-len(s.mixers) // workers)
    for w in range(waves):
        barrier = runner.barrier(workers)
        for i in range(w * workers, (w + 1) * workers):
            runner.submit(Job("time", s.mixers[i % len(s.mixers)], width, s.lrs[0], 0, 0,
                              deadline), barrier)
    samples: Dict[str, list] = {}
    for r in runner.results(deadline):
        if "error" in r or "skipped" in r:
            raise RuntimeError(f"MQAR sweep: timing {r['job']['mixer']} failed: "
                               f"{r.get('error') or r.get('skipped')}")
        samples.setdefault(r["job"]["mixer"], []).append(r)
    timing = {m: {**{k: sum(x[k] for x in rs) / len(rs)
                     for k in ("seconds_per_step", "overhead_seconds")},
                  # True: timed beside the others of its wave; None: ran alone
                  "together": None if rs[0]["met_others"] is None
                  else all(x["met_others"] for x in rs)}
              for m, rs in samples.items()}
    if any(t["together"] is False for t in timing.values()):
        log("mqar sweep: WARNING: a timing job stepped without the others of its wave (one "
            "failed or compiled past the time limit); its step time may be too short")
    log("mqar sweep: seconds per step at width %d with %d workers busy: %s" % (
        width, workers, ", ".join(f"{m} {t['seconds_per_step']:.4f}" for m, t in timing.items())))
    return timing


# ---------------------------------------------------------------------------------- the sweep
def best_lr(runs: List[dict]) -> Optional[float]:
    """The learning rate of the finished run with the best mean validation accuracy (ties: the
    lower final loss)."""
    ok = [r for r in runs if "val" in r]
    if not ok:
        return None
    score = lambda r: (sum(r["val"].values()) / len(r["val"]), -_finite(r["final_loss"]))
    return max(ok, key=score)["job"]["lr"]


def _finite(x) -> float:
    return x if x is not None and math.isfinite(x) else float("inf")


def aggregate(s: SweepSettings, runs: List[dict]) -> Dict[str, Dict[str, dict]]:
    """mixer -> width -> best lr, and per length the test accuracy over the seeds at it.
    Only finished runs count: a run cut by the budget (kept in results.json, continued by the
    next sweep) trained fewer steps than the others."""
    out: Dict[str, Dict[str, dict]] = {}
    for mixer in s.mixers:
        for width in s.widths:
            group = [r for r in runs if r["job"]["mixer"] == mixer and r["job"]["width"] == width
                     and not r.get("cut")]
            lr = best_lr([r for r in group if r["job"]["kind"] == "lr"])
            entry = {"best_lr": lr, "describe": describe(mixer, s, width),
                     "lr_sweep": {f"{r['job']['lr']:g}": (sum(r["val"].values()) / len(r["val"])
                                                          if "val" in r else None)
                                  for r in group if r["job"]["kind"] == "lr"}}
            finals = [r for r in group if "test" in r and r["job"]["lr"] == lr]
            entry["seeds"] = sorted(r["job"]["seed"] for r in finals)
            entry["parameters"] = finals[0]["parameters"] if finals else None
            entry["steps"] = sorted({r["steps"] for r in finals})
            entry["test"] = {}
            for L in s.seq_lens:
                accs = [r["test"][str(L)] for r in finals]
                if accs:
                    mean = sum(accs) / len(accs)
                    std = (sum((a - mean) ** 2 for a in accs) / max(len(accs) - 1, 1)) ** 0.5
                    entry["test"][str(L)] = {"mean": mean, "std": std, "min": min(accs),
                                             "max": max(accs), "n": len(accs)}
            out.setdefault(mixer, {})[str(width)] = entry
    return out


def table(s: SweepSettings, agg: dict) -> str:
    cols = [f"L={L} N={test_pairs(L, s)}" for L in s.seq_lens]
    lines = ["| mixer | width | parameters | state per MoM layer (floats) | best lr | steps | "
             "seeds | " + " | ".join(cols) + " |", "|" + "---|" * (6 + len(cols))]
    for mixer, per_width in agg.items():
        for width, e in per_width.items():
            d = e["describe"]
            state = d.get("state_per_mom_layer", "-")
            if "A" in d["pattern"]:
                state = "KV cache" if state == "-" else f"{state} + KV cache"
            cells = []
            for L in s.seq_lens:
                t = e["test"].get(str(L))
                cells.append("-" if t is None else
                             f"{t['mean']:.3f} ± {t['std']:.3f}" if t["n"] > 1 else f"{t['mean']:.3f}")
            lr = "-" if e["best_lr"] is None else f"{e['best_lr']:g}"
            steps = "/".join(str(x) for x in e["steps"]) or "-"
            lines.append(f"| {mixer} | {width} | {e['parameters'] or '-'} | {state} | {lr} | "
                         f"{steps} | {len(e['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lr_table(s: SweepSettings, agg: dict) -> str:
    """Mean validation accuracy of every learning rate tried (the grid and any past its edges,
    `edge_lrs`), per mixer and width."""
    tried = {float(lr) for per_width in agg.values() for e in per_width.values()
             for lr in e["lr_sweep"]}
    lrs = sorted(tried | set(s.lrs))
    head = "| mixer | width | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |"
    lines = [head, "|" + "---|" * (2 + len(lrs))]
    for mixer, per_width in agg.items():
        for width, e in per_width.items():
            vals = [e["lr_sweep"].get(f"{lr:g}") for lr in lrs]
            lines.append(f"| {mixer} | {width} | " + " | ".join(
                "-" if v is None else f"{v:.3f}" for v in vals) + " |")
    return "\n".join(lines)


def plot(s: SweepSettings, agg: dict, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, len(s.seq_lens), figsize=(4.2 * len(s.seq_lens), 3.8),
                             squeeze=False, sharey=True)
    for ax, L in zip(axes[0], s.seq_lens):
        for mixer, per_width in agg.items():
            pts = [(int(w), e["test"][str(L)]) for w, e in per_width.items() if str(L) in e["test"]]
            if not pts:
                continue
            xs = [w for w, _ in pts]
            ys = [t["mean"] for _, t in pts]
            err = [[t["mean"] - t["min"] for _, t in pts], [t["max"] - t["mean"] for _, t in pts]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=mixer)
        ax.set_xscale("log", base=2)
        ax.set_xticks(s.widths, [str(w) for w in s.widths])
        ax.set_xlabel("model width")
        ax.set_title(f"L={L}, N={test_pairs(L, s)}")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (mean, min-max over seeds)")
    axes[0][-1].legend(fontsize=8)
    from megatron_mom.train.plot import save_figure
    save_figure(fig, path)
    return True


def environment(device: torch.device) -> dict:
    import platform
    env = {"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
           "python": platform.python_version(), "torch": torch.__version__,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
           f"cpu ({os.cpu_count()} cores)", "command": " ".join(sys.argv)}
    for name in ("triton", "megatron.core"):
        try:
            module = __import__(name, fromlist=["__version__"])
            env[name] = getattr(module, "__version__", "?")
        except ImportError:
            env[name] = None
    return env


def write_results_json(out: Path, results: dict) -> None:
    """out/results.json through a temporary file: a reader (or a run cut off mid-write) never
    sees half of it."""
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out / "results.json")


def write_outputs(out: Path, s: SweepSettings, plan: dict, runs: List[dict], env: dict,
                  with_plot: bool = True) -> str:
    agg = aggregate(s, runs)
    text = table(s, agg)
    (out / "results.md").write_text(
        f"Test accuracy (mean ± std over seeds at the best learning rate by validation "
        f"accuracy), {plan.get('steps')} steps per run:\n\n{text}\n\n"
        f"Validation accuracy (mean over lengths) of the learning-rate sweep at seed 0:\n\n"
        f"{lr_table(s, agg)}\n")
    write_results_json(out, {"settings": dataclasses.asdict(s), "environment": env,
                             "plan": plan, "aggregate": agg, "runs": runs})
    if with_plot:
        plot(s, agg, out / "mqar_zoology.png")
    return text


# Settings that do not change what a run computes: a sweep continued with other values of
# these goes on with the same runs. The widths and mixers only choose which runs a call
# makes, so a sweep can be completed part by part (its tables show the parts asked for;
# results.json keeps every finished run).
RESUME_FREE = ("budget_minutes", "workers", "log_every", "train_steps", "timing_seconds",
               "cuda_graphs", "widths", "mixers", "max_runs", "edge_lrs")


def finished_runs(out_dir: Path, s: SweepSettings) -> tuple:
    """(the finished runs, their step count) of the sweep already in out_dir/results.json,
    neither cut by a budget nor failed, for the sweep to go on from; ([], 0) without one. A
    sweep with other settings there is an error, not overwritten."""
    path = out_dir / "results.json"
    if not path.exists():
        return [], 0
    old = json.loads(path.read_text())
    differ = _differing(old["settings"], s)
    if differ:
        raise ConfigError(f"MQAR sweep: {path} holds a sweep with other settings "
                          f"({', '.join(differ)} differ); choose another --out or remove it")
    runs = [r for r in old["runs"] if "test" in r and not r.get("cut")]
    steps = int(old["plan"].get("steps") or 0) if runs else 0
    if runs and s.train_steps and s.train_steps != steps:
        raise ConfigError(f"MQAR sweep: the {len(runs)} finished runs in {path} trained "
                          f"{steps} steps, not train_steps={s.train_steps}; set "
                          f"train_steps={steps} to go on with them or choose another --out")
    return runs, steps


def run(preset: str = "zoology", out: str = "runs/mqar_zoology", overrides: Optional[dict] = None,
        mixers: Optional[Sequence[str]] = None, device: Optional[str] = None,
        log: Callable = print) -> dict:
    """The whole sweep; returns the aggregate (results.json holds everything)."""
    started = time.time()
    overrides = dict(overrides or {})
    if mixers:
        overrides["mixers"] = list(mixers)
    s = settings_for(preset, overrides)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    workers = s.workers or default_workers(dev)
    deadline = started + 60 * s.budget_minutes if s.budget_minutes else 0.0
    # Runs stop training early enough to be evaluated and written before the budget ends;
    # at the budget, whatever has not come back is reported unfinished.
    train_deadline = deadline - min(45.0, 0.1 * 60 * s.budget_minutes) if deadline else 0.0
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment(dev)
    runs_per_mixer = {m: len(s.widths) * (len(s.lrs) + s.seeds - 1) for m in s.mixers}
    plan = {"workers": workers, "runs": sum(runs_per_mixer.values()),
            "budget_minutes": s.budget_minutes, "device": str(dev)}
    log(f"mqar sweep ({preset}): {len(s.mixers)} mixers x {len(s.widths)} widths x "
        f"({len(s.lrs)} learning rates + {s.seeds - 1} more seeds) = {plan['runs']} runs"
        + (f" (+ up to {s.edge_lrs} rate(s) past the grid's edges each)" if s.edge_lrs else "")
        + f", {workers} worker process(es) on {dev}")
    plan["mps"] = mps_running() if dev.type == "cuda" else None
    if plan["mps"] is False and workers > 1:
        log("mqar sweep: note: CUDA MPS is not running, so the worker processes take turns on "
            "the GPU; start it first (nvidia-cuda-mps-control -d) to let their kernels overlap")
    runs, steps = finished_runs(out_dir, s)
    if runs:
        log(f"mqar sweep: going on from {len(runs)} finished runs of {steps} steps in "
            f"{out_dir / 'results.json'}")
    plan["resumed_runs"] = len(runs)
    partial = str(out_dir / "partial")          # cut runs' training state, to go on from
    runner = (_Pool(s, str(dev), workers, partial) if workers > 1
              else _InProcess(s, str(dev), partial))
    try:
        steps = steps or s.train_steps
        if not steps:
            # A timing that has not come back within 40% of the budget will not fit in it.
            plan["timing"] = _timing(runner, s, workers,
                                     min(deadline, time.time() + 0.4 * 60 * s.budget_minutes),
                                     log)
            steps = fit_steps(s, plan["timing"], runs_per_mixer, workers,
                              train_deadline - time.time())
            if steps == s.min_steps:
                log(f"mqar sweep: WARNING: the budget fits fewer than {s.min_steps} steps per "
                    f"run; running {s.min_steps} (runs past the budget are cut). Reduce the "
                    f"sweep (--set lrs=..., widths=..., seeds=...) or raise --budget-minutes")
        plan["steps"] = steps
        log(f"mqar sweep: {steps} steps per run, {s.tokens_per_step} tokens per step")
        limited = _AtMost(runner, s.max_runs)
        _sweep(limited, s, steps, train_deadline, deadline, runs, out_dir, plan, env, log)
        if limited.held:
            plan["held_back"] = limited.held
            log(f"mqar sweep: max_runs={s.max_runs} reached; {limited.held} run(s) (and the "
                f"seeds that follow them) wait for the next sweep into {out_dir}")
    finally:
        runner.close()
    plan["seconds"] = time.time() - started
    text = write_outputs(out_dir, s, plan, runs, env)
    log("\n" + text + f"\n\nwritten: {out_dir / 'results.md'}, {out_dir / 'mqar_zoology.png'}, "
        f"{out_dir / 'results.json'} ({plan['seconds'] / 60:.1f} min)")
    return aggregate(s, runs)


class _AtMost:
    """A runner that starts at most `limit` runs (0: no limit) and counts those it holds back,
    so that a call with a known time can take only runs that finish in it."""

    def __init__(self, runner, limit: int):
        self.runner, self.limit, self.started, self.held = runner, limit, 0, 0

    def submit(self, job: Job, barrier=None) -> None:
        if self.limit and self.started >= self.limit:
            self.held += 1
            return
        self.started += 1
        self.runner.submit(job, barrier)

    def results(self, until: float):
        return self.runner.results(until)


def _sweep(runner, s, steps, train_deadline, deadline, runs, out_dir, plan, env, log) -> None:
    """Every learning rate at seed 0; as soon as a (mixer, width) has all of them, its other
    seeds at the best one."""
    done = {Job(**r["job"]).key for r in runs}
    pending_lr = {}
    for width in sorted(s.widths, reverse=True):       # the slowest first
        for mixer in s.mixers:
            todo = [lr for lr in s.lrs if Job("lr", mixer, width, lr, 0, steps).key not in done]
            pending_lr[(mixer, width)] = len(todo)
            for lr in todo:
                runner.submit(Job("lr", mixer, width, lr, 0, steps, train_deadline))
            if not todo:
                pending_lr[(mixer, width)] = _lr_search_done(runner, s, runs, (mixer, width),
                                                             done, steps, train_deadline)
    plotted = time.time()
    for result in runner.results(deadline):
        runs.append(result)
        job = result["job"]
        _log_result(result, log)
        group = (job["mixer"], job["width"])
        # A run cut or not started goes on in the next sweep: its group's seeds wait for it.
        if job["kind"] == "lr" and not (result.get("cut") or "skipped" in result):
            pending_lr[group] -= 1
            if pending_lr[group] == 0:
                pending_lr[group] = _lr_search_done(runner, s, runs, group, done, steps,
                                                    train_deadline)
        # The plot every half minute (it takes a fraction of a second); the end redraws it.
        with_plot = time.time() - plotted > 30
        write_outputs(out_dir, s, plan, runs, env, with_plot)
        plotted = time.time() if with_plot else plotted


def next_lr(s: SweepSettings, lr_runs: List[dict]) -> Optional[float]:
    """One more learning rate for a (mixer, width) whose finished seed-0 runs are `lr_runs`:
    past the lowest or highest rate tried when the best is there (by the ratio of the two
    tried rates at that end, rounded to 3 digits), while fewer than `edge_lrs` rates outside
    `lrs` were tried; else None."""
    tried = sorted({r["job"]["lr"] for r in lr_runs if "val" in r})
    extra = [lr for lr in tried if not any(math.isclose(lr, x) for x in s.lrs)]
    best = best_lr(lr_runs)
    if len(tried) < 2 or len(extra) >= s.edge_lrs or best is None:
        return None
    if best == tried[0]:
        return float(f"{tried[0] * tried[0] / tried[1]:.3g}")
    if best == tried[-1]:
        return float(f"{tried[-1] * tried[-1] / tried[-2]:.3g}")
    return None


def _lr_search_done(runner, s, runs, group, done, steps, train_deadline) -> int:
    """A (mixer, width) has every learning rate it was to try: one more past an edge
    (`next_lr`), or its other seeds. The number of learning-rate runs it now waits for."""
    lr_runs = [r for r in runs if r["job"]["kind"] == "lr"
               and (r["job"]["mixer"], r["job"]["width"]) == group]
    lr = next_lr(s, lr_runs)
    if lr is not None:
        runner.submit(Job("lr", group[0], group[1], lr, 0, steps, train_deadline))
        return 1
    _submit_seeds(runner, s, best_lr(lr_runs), group, done, steps, train_deadline)
    return 0


def _submit_seeds(runner, s, lr, group, done, steps, train_deadline) -> None:
    """The other seeds of (mixer, width) at its best learning rate `lr` (None: no finished
    learning-rate run, nothing to seed), those not yet done."""
    if lr is None:
        return
    for seed in range(1, s.seeds):
        job = Job("seed", group[0], group[1], lr, seed, steps, train_deadline)
        if job.key not in done:
            runner.submit(job)


def _log_result(r: dict, log) -> None:
    key = Job(**r["job"]).key
    if "error" in r:
        log(f"  {key}: ERROR {r['error'].splitlines()[0]}")
    elif "skipped" in r:
        log(f"  {key}: skipped ({r['skipped']})")
    else:
        cut = " (cut by the budget)" if r["cut"] else ""
        loss = "-" if r["final_loss"] is None else f"{r['first_loss']:.2f} -> {r['final_loss']:.3f}"
        log(f"  {key}: {r['steps']} steps{cut}, loss {loss}, test "
            + " ".join(f"{a:.3f}" for a in r["test"].values()) + f" ({r['seconds']:.0f} s)")
