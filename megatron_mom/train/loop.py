"""`megatron-mom train`: the training loop.

One step = one global batch through Megatron's forward/backward schedule (no pipelining,
1F1B or interleaved, picked by `get_forward_backward_func`), then the Megatron optimizer and
learning-rate schedule. Rank 0 shows a progress bar, prints a log line every
`train.log_interval` steps, appends every step's numbers to `metrics.jsonl`, redraws
`loss.png` and prints a text sample at the end.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist

from megatron_mom.train import build, checkpoint, data, plot
from megatron_mom.train.config import ConfigError, RunConfig


@dataclass
class TrainResult:
    output_dir: Path
    losses: List[float]                  # train loss of every step run by this call
    first_step: int                      # the step number of losses[0]
    checkpoint: Optional[Path] = None
    sample: Optional[str] = None
    val_losses: List[tuple] = field(default_factory=list)


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Mean token loss of one micro-batch (Megatron's legacy averaging over micro-batches)."""
    mask = loss_mask.view(-1).float()
    loss = torch.sum(output_tensor.view(-1).float() * mask) / mask.sum().clamp(min=1)
    # A copy: the schedule divides the returned loss by the number of micro-batches in place.
    return loss, {"lm loss": loss.detach().clone()}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"])


def _set_router_loss_scale(trainables, num_microbatches: int) -> None:
    from megatron_mom.layer import metrics  # context parallelism is not offered here: cp_size 1
    metrics.set_router_loss_scale(trainables.optimizer.get_loss_scale(), num_microbatches)


def _global_mean_loss(losses_reduced: list, device) -> torch.Tensor:
    """This step's loss on every rank: mean over micro-batches on the last pipeline stage,
    shared across the pipeline, averaged over data-parallel replicas."""
    from megatron.core import parallel_state as ps
    value = torch.zeros(1, dtype=torch.float64, device=device)
    if losses_reduced:
        value += torch.stack([x["lm loss"].double() for x in losses_reduced]).mean()
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(value, group=ps.get_pipeline_model_parallel_group())
    dist.all_reduce(value, group=ps.get_data_parallel_group())
    return value / ps.get_data_parallel_world_size()


def _run_schedule(trainables, iterator, cfg: RunConfig, num_microbatches: int,
                  forward_only: bool) -> list:
    from megatron.core.pipeline_parallel import get_forward_backward_func
    return get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=iterator, model=[trainables.model],
        num_microbatches=num_microbatches, seq_length=cfg.model.seq_length,
        micro_batch_size=cfg.train.micro_batch_size, forward_only=forward_only)


def train_step(trainables, iterator, cfg: RunConfig, num_microbatches: int,
               par) -> tuple[float, bool]:
    """(mean loss, whether the optimizer updated the weights: fp16's loss scaler skips a step
    whose gradients overflowed)."""
    trainables.model.train()
    trainables.model.zero_grad_buffer()
    trainables.optimizer.zero_grad()
    _set_router_loss_scale(trainables, num_microbatches)
    losses = _run_schedule(trainables, iterator, cfg, num_microbatches, forward_only=False)
    updated, _, _ = trainables.optimizer.step()
    if updated:  # as Megatron-LM: a skipped update does not advance the learning-rate schedule
        trainables.scheduler.step(increment=1)
    return _global_mean_loss(losses, par.device).item(), bool(updated)


@torch.no_grad()
def evaluate(trainables, valid, cfg: RunConfig, layout: data.BatchLayout, par) -> float:
    """Mean validation loss over the first `eval_batches` global batches (the same ones every
    time, so values are comparable along a run)."""
    trainables.model.eval()
    iterator = data.micro_batches(valid, layout, 0, par.device)
    total = 0.0
    for _ in range(cfg.train.eval_batches):
        losses = _run_schedule(trainables, iterator, cfg, layout.num_microbatches, True)
        total += _global_mean_loss(losses, par.device).item()
    trainables.model.train()
    return total / cfg.train.eval_batches


def _batch_layout(cfg: RunConfig, par) -> data.BatchLayout:
    t = cfg.train
    per_step = t.micro_batch_size * par.dp
    if t.global_batch_size % per_step:
        raise ConfigError(f"train.global_batch_size ({t.global_batch_size}) must be a multiple "
                         f"of micro_batch_size * data-parallel size ({t.micro_batch_size} * "
                         f"{par.dp}); the data-parallel size is world size / (TP * PP)")
    return data.BatchLayout(t.micro_batch_size, par.dp, par.dp_rank,
                            t.global_batch_size // per_step)


def _prepare_data(cfg: RunConfig, par, out: Path, layout: data.BatchLayout):
    prefix = None
    if par.rank == 0:
        prefix = data.build_indexed_dataset(cfg.data.corpus, out / "data")
    holder = [prefix]
    dist.broadcast_object_list(holder, src=0)
    num_valid = cfg.train.eval_batches * layout.global_batch_size if cfg.train.eval_interval else 0
    return data.build_datasets(holder[0], cfg.model.seq_length, cfg.data.split, cfg.train.seed,
                               cfg.train.steps * layout.global_batch_size, num_valid)


def _router_stats(cfg: RunConfig, par, model, steps: int, num_microbatches: int):
    """(MoM router loss - load balancing plus z-loss - per MoM layer and micro-batch,
    {layer: fraction of routed tokens per memory}), gathered from every rank; every rank
    must call this together."""
    from megatron_mom.layer import metrics
    L, M = cfg.model.num_layers, cfg.mom.num_memories
    lb = torch.zeros(L, dtype=torch.float64)
    for values in metrics.router_loss_values(clear=True).values():  # load balancing (+ z)
        lb += values.detach().double().cpu()[:L]                      # [num_layers (+ MTP)]
    load = torch.zeros(L, M, dtype=torch.float64)
    for layer, fractions in metrics.memory_load(model, clear=True).items():
        load[layer - 1] = fractions.double().cpu()
    both = torch.cat([lb, load.view(-1)]).to(par.device)
    dist.all_reduce(both)  # each layer lives on one pipeline stage: sum over its replicas
    both = both.cpu()
    # Data-parallel and tensor-parallel ranks repeat a layer's values, except that under
    # sequence parallelism each TP rank holds its share of the loss (the shares add up).
    lb = both[:L] / (par.dp * (1 if cfg.parallel.sequence_parallel else par.tp))
    load = both[L:].view(L, M) / (par.dp * par.tp)
    mom_layers = [i for i, s in enumerate(cfg.model.pattern) if s == "M"]
    if not mom_layers:
        return None, {}
    aux = lb[mom_layers].mean().item() / max(steps * num_microbatches, 1)
    return aux, {i + 1: load[i].tolist() for i in mom_layers}


def _log_line(step: int, total: int, loss: float, lr: float, tokens_per_s: float,
              aux: Optional[float], load: dict) -> str:
    parts = [f"step {step:>5}/{total}", f"loss {loss:.4f}", f"lr {lr:.2e}",
             f"{tokens_per_s:,.0f} tok/s"]
    if aux is not None:
        parts.append(f"mom_aux {aux:.4f}")
    if load:
        layer, fractions = next(iter(load.items()))
        parts.append(f"load(L{layer}) " + "/".join(f"{x:.2f}" for x in fractions))
    return " | ".join(parts)


class _MetricsFile:
    """metrics.jsonl: one JSON object per step (and per validation); truncated on resume so a
    resumed run's file reads as if it had never stopped."""

    def __init__(self, path: Path, start_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = []
        if start_step > 0 and path.exists():
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            for i, line in enumerate(lines):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    if i == len(lines) - 1:  # cut short by a kill while appending: past the
                        break                # checkpoint, and rewritten by this run
                    raise ConfigError(f"{path}: line {i + 1} is not JSON; the file is damaged "
                                      f"(move it away to resume with a fresh log)") from None
                if record["step"] <= start_step:
                    kept.append(line)
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _is_terminal() -> bool:
    """Whether stdout is a terminal: the bar's carriage-return updates would clutter a log
    file (the log lines every train.log_interval steps report progress there)."""
    return sys.stdout.isatty()


def _say(par, text: str, bar=None) -> None:
    if not par.is_logger:
        return
    if bar is not None:
        bar.write(text)
    else:
        print(text, flush=True)


@dataclass
class _Run:
    """Everything one call of `train` works with, and its reporting (rank 0 prints)."""
    cfg: RunConfig
    par: object
    trainables: object
    layout: data.BatchLayout
    train_set: object
    valid_set: object
    out: Path
    start: int = 0
    metrics: Optional[_MetricsFile] = None
    bar: object = None
    last_log: float = 0.0
    last_log_step: int = 0

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    def say(self, text: str) -> None:
        _say(self.par, text, self.bar)

    def open_reporting(self, show_progress: bool) -> None:
        from tqdm import tqdm
        self.metrics = _MetricsFile(self.out / "metrics.jsonl", self.start, self.par.is_logger)
        self.say(_banner(self.cfg, self.par, self.trainables, self.layout))
        self.bar = tqdm(total=self.cfg.train.steps, initial=self.start, desc="train",
                        unit="step", dynamic_ncols=True, file=sys.stdout,
                        disable=not (self.par.is_logger and show_progress and _is_terminal()))
        self.last_log, self.last_log_step = time.time(), self.start
        self.not_training = 0.0   # seconds of validation and saving since the last log line
        self.skipped = 0          # updates the fp16 loss scaler skipped since then

    def step_done(self, step: int, loss: float) -> None:
        lr = self.trainables.optimizer.param_groups[0]["lr"]
        self.metrics.write({"step": step, "loss": loss, "lr": lr})
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.3f}")

    def log(self, step: int, loss: float) -> None:
        """A log line (collective: gathers the router statistics from every rank)."""
        elapsed = time.time() - self.last_log - self.not_training
        n = step - self.last_log_step
        aux, load = _router_stats(self.cfg, self.par, self.trainables.gpt, n,
                                  self.layout.num_microbatches)
        tokens_per_s = n * self.layout.global_batch_size * self.cfg.model.seq_length / elapsed
        lr = self.trainables.optimizer.param_groups[0]["lr"]
        line = _log_line(step, self.cfg.train.steps, loss, lr, tokens_per_s, aux, load)
        self.say(line + (f" | skipped {self.skipped} (fp16 overflow)" if self.skipped else ""))
        record = {"step": step, "tokens_per_s": tokens_per_s, "mom_aux": aux, "memory_load": load}
        if self.cfg.train.precision == "fp16":
            record["skipped_updates"] = self.skipped
        self.metrics.write(record)
        self.last_log, self.last_log_step = time.time(), step
        self.not_training, self.skipped = 0.0, 0

    def validate(self, step: int) -> float:
        began = time.time()
        val = evaluate(self.trainables, self.valid_set, self.cfg, self.layout, self.par)
        self.metrics.write({"step": step, "val_loss": val})
        self.say(f"step {step:>5}/{self.cfg.train.steps} | validation loss {val:.4f}")
        self.not_training += time.time() - began
        return val

    def save(self, step: int, train_state: dict) -> Path:
        began = time.time()
        path = checkpoint.save_checkpoint(self.ckpt_root, step, self.trainables, train_state,
                                          self.cfg, self.cfg.train.keep_checkpoints)
        png = self.out / "loss.png"
        if self.par.is_logger:
            drawn = plot.loss_curve(self.out / "metrics.jsonl", png)
            self.say(f"saved {path} and {png}" if drawn else
                     f"saved {path}; {plot.not_drawn(png)}")
        self.not_training += time.time() - began
        return path


def _set_up(cfg: RunConfig, overwrite: bool) -> _Run:
    out = Path(cfg.output_dir)
    par = build.init_parallel(cfg)
    layout = _batch_layout(cfg, par)
    if par.is_logger:
        if overwrite:
            _remove_run(out)
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_temporaries(out / "checkpoints")
    dist.barrier()
    torch.manual_seed(cfg.train.seed)
    trainables = build.build_trainables(cfg, par)
    train_set, valid_set = _prepare_data(cfg, par, out, layout)
    return _Run(cfg, par, trainables, layout, train_set, valid_set, out)


RUN_FILES = ("checkpoints", "metrics.jsonl", "loss.png")   # what a run writes (data/ is a cache)


def _existing_run(out: Path) -> list:
    """The files of an earlier run in `out` that a new run would overwrite."""
    ckpt = out / "checkpoints"
    found = [p for p in (ckpt / checkpoint.LATEST, out / "metrics.jsonl") if p.exists()]
    return found + (sorted(ckpt.glob("iter_*")) if ckpt.is_dir() else [])


def _remove_run(out: Path) -> None:
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _check_output_dir(cfg: RunConfig, resume: bool, overwrite: bool) -> Optional[Path]:
    """Before anything is built: the output directory is usable, a new run does not silently
    replace an old one, and a resumed run matches its checkpoint. Returns the checkpoint to
    resume from."""
    out = Path(cfg.output_dir)
    if resume and overwrite:
        raise ConfigError("--resume continues the run in the output directory and --overwrite "
                          "replaces it: give one of them")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"output_dir {str(out)!r} cannot be created ({err.strerror}); pass "
                          f"a writable directory with --output-dir") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {str(out)!r} is not writable; pass a writable "
                          f"directory with --output-dir")
    if resume:
        found = checkpoint.latest_checkpoint(out / "checkpoints")
        if found is None:
            raise ConfigError(f"--resume: no checkpoint in {out / 'checkpoints'}; train "
                              f"without --resume first (add --overwrite to replace what is "
                              f"in {out})")
        world = dist.get_world_size() if dist.is_initialized() else \
            int(os.environ.get("WORLD_SIZE", "1"))
        checkpoint.check_resume(found, cfg, world)
        return found
    existing = _existing_run(out)
    if existing and not overwrite:
        raise ConfigError(f"output_dir {str(out)!r} already holds a run "
                          f"({', '.join(str(p.relative_to(out)) for p in existing[:3])}); "
                          f"continue it with --resume, replace it with --overwrite, or pass "
                          f"another --output-dir")
    return None


def _resume(run: _Run, found: Path) -> dict:
    train_state = checkpoint.load_checkpoint(found, run.trainables)
    run.say(f"resumed from {found} (step {train_state['iteration']})")
    return train_state


def _due(step: int, interval: int, end: int) -> bool:
    return step == end or (interval > 0 and step % interval == 0)


def train(cfg: RunConfig, resume: bool = False, stop_after: Optional[int] = None,
          show_progress: bool = True, sample: bool = True,
          overwrite: bool = False) -> TrainResult:
    """Train per `cfg`. `resume`: continue from the newest checkpoint in the output
    directory (its config.yaml must agree with `cfg`, see checkpoint.MAY_CHANGE_ON_RESUME).
    `overwrite`: replace an earlier run in the output directory (refused without it).
    `stop_after`: end (with a checkpoint) after this many steps in total, as if the job had
    been stopped there; the schedule still follows `train.steps`."""
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int)
                                   or stop_after < 1):
        raise ConfigError(f"--stop-after (stop_after) must be a whole number of steps >= 1, "
                          f"got {stop_after!r}")
    found = _check_output_dir(cfg, resume, overwrite)
    run = _set_up(cfg, overwrite)
    train_state = _resume(run, found) if resume else {"iteration": 0, "consumed_samples": 0}
    run.start = train_state["iteration"]
    end = min(cfg.train.steps, stop_after if stop_after is not None else cfg.train.steps)
    _clear_router_stats(run.trainables.gpt)
    run.open_reporting(show_progress)
    iterator = data.micro_batches(run.train_set, run.layout, train_state["consumed_samples"],
                                  run.par.device)
    result = TrainResult(output_dir=run.out, losses=[], first_step=run.start + 1)
    if run.start >= end:
        run.say(f"nothing to train: the checkpoint is at step {run.start} and train.steps is "
                f"{cfg.train.steps}; pass --steps N (N > {run.start}) to train on")
    for step in range(run.start + 1, end + 1):
        loss, updated = train_step(run.trainables, iterator, cfg, run.layout.num_microbatches,
                                   run.par)
        run.skipped += not updated
        if not math.isfinite(loss):
            raise FloatingPointError(f"step {step}: loss is {loss}; lower train.lr or use fp32")
        train_state = {"iteration": step, "consumed_samples":
                       train_state["consumed_samples"] + run.layout.global_batch_size}
        result.losses.append(loss)
        run.step_done(step, loss)
        if _due(step, cfg.train.log_interval, end):
            run.log(step, loss)
        if cfg.train.eval_interval and _due(step, cfg.train.eval_interval, end):
            result.val_losses.append((step, run.validate(step)))
        if _due(step, cfg.train.save_interval, end):
            result.checkpoint = run.save(step, train_state)
    run.bar.close()
    if sample and end == cfg.train.steps:
        result.sample = _print_sample(cfg, run.trainables, run.par)
    return result


def _clear_router_stats(model) -> None:
    from megatron_mom.layer import metrics
    metrics.router_loss_values(clear=True)
    metrics.memory_load(model, clear=True)


def _banner(cfg: RunConfig, par, trainables, layout) -> str:
    n_params = sum(p.numel() for p in trainables.gpt.parameters())
    where = "CPU (gloo)" if par.on_cpu else f"{par.world_size} GPU(s)"
    return (f"megatron-mom train: {cfg.model.pattern} ({cfg.model.num_layers} layers, hidden "
            f"{cfg.model.hidden_size}), {n_params / 1e6:.2f}M parameters per rank, on {where}, "
            f"TP={par.tp} PP={par.pp} DP={par.dp}, global batch {layout.global_batch_size} x "
            f"{cfg.model.seq_length} tokens ({layout.num_microbatches} micro-batches), "
            f"{cfg.train.steps} steps -> {cfg.output_dir}")


def _print_sample(cfg: RunConfig, trainables, par) -> Optional[str]:
    """Generate from the trained model in this process (single model-parallel rank only)."""
    from megatron_mom.train import generate
    if par.tp * par.pp > 1:
        _say(par, "sample: run `megatron-mom generate --checkpoint "
                  f"{cfg.output_dir}` (sampling in-process needs TP = PP = 1)")
        return None
    text = generate.sample(trainables.gpt, cfg.generate.prompt, cfg.generate.max_new_tokens,
                           cfg.generate.temperature, cfg.generate.top_k, cfg.model.seq_length,
                           seed=cfg.train.seed, decode_mode=cfg.generate.decode)
    _say(par, f"\n--- sample (prompt {cfg.generate.prompt!r}) ---\n{text}\n---")
    return text
