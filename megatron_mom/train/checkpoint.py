"""Atomic, config-checked, resumable checkpoints with Megatron's distributed checkpointing.

Layout of `<output_dir>/checkpoints/`:
    iter_0000100/          a complete checkpoint (dist_checkpointing files, config.yaml and
                           manifest.json: the name and size of every file)
    latest                 the name of the newest complete checkpoint (one line)
    .tmp_iter_0000200/     a save in progress (or one that crashed): never read
    .tmp_latest.<pid>      `latest` being replaced (or left by a crash): never read

A save writes everything into `.tmp_iter_N`, then renames it to `iter_N` and only then points
`latest` at it (itself replaced atomically). A crash at any moment leaves `latest` naming a
complete checkpoint. Resuming restores model, optimizer, learning-rate schedule, iteration,
consumed samples and every RNG state, so the losses continue exactly as without the stop.
Loading checks the file sizes against the manifest and unpickles nothing but tensors, plain
data and torch's checkpoint metadata (`safe_load`), so a checkpoint never runs code.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_mom.config import EXECUTION_SETTINGS
from megatron_mom.train.config import (ConfigError, RunConfig, build_config, dump_config,
                                        load_config, read_yaml)
from megatron_mom.train.safe_load import CheckpointError, dist_load

LATEST = "latest"
CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "manifest.json"
TMP_PREFIX = ".tmp_"
# fully_reshardable: the distributed optimizer's format that loads at any DP size and works
# without apex/TE (see docs/training.md).
SAVE_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
# A hybrid stack's layers differ (MoM vs attention), so they cannot be stacked along one
# "layers" axis (Megatron's default): save each layer under its own global index.
MODEL_METADATA = {"non_homogeneous_layers": True}


def iteration_dir(root: Path, iteration: int) -> Path:
    return root / f"iter_{iteration:07d}"


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The checkpoint `latest` names; without `latest` (a save stopped between renaming its
    folder and writing the pointer) the newest iter_* folder: every iter_* folder is complete,
    as folders appear and disappear only by renames. None if nothing was saved yet."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        done = sorted(p for p in Path(root).glob("iter_*") if p.is_dir())
        return done[-1] if done else None
    name = pointer.read_bytes().decode("utf-8", errors="replace").strip()
    if not re.fullmatch(r"iter_\d{7}", name) or not (Path(root) / name).is_dir():
        raise CheckpointError(f"{pointer} names {name[:40]!r}, which is not a checkpoint folder "
                              f"next to it; write the name of a complete iter_NNNNNNN folder "
                              f"into it")
    return Path(root) / name


def resolve_checkpoint(path: str) -> Path:
    """A checkpoint directory, or a run's checkpoints/ or output directory (-> its latest)."""
    p = Path(path)
    for root in (p, p / "checkpoints"):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    if (p / CONFIG_FILE).is_file():
        return p
    raise FileNotFoundError(f"no checkpoint at {path!r}: give a run's output directory, its "
                            f"checkpoints/ folder or one iter_NNNNNNN folder")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    """Every RNG state as tensors and plain numbers, so it loads with weights_only=True."""
    from megatron.core import tensor_parallel
    version, mersenne, gauss_next = random.getstate()
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {"python": {"version": version, "state": torch.tensor(mersenne, dtype=torch.int64),
                       "gauss_next": gauss_next},
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": dict(tensor_parallel.get_cuda_rng_tracker().get_states())}


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel
    py, nps = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    np.random.set_state(("MT19937", nps["keys"].numpy().astype(np.uint32), nps["pos"],
                         nps["has_gauss"], nps["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(data):
    """RNG states differ between tensor/pipeline ranks and repeat across data-parallel ones."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    shape = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size())
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank())
    return ShardedObject("rng_state", data, shape, offset,
                         replica_id=ps.get_data_parallel_rank(with_context_parallel=True))


def _state(trainables, train_state: Optional[dict], is_loading: bool) -> dict:
    model_sd = trainables.gpt.sharded_state_dict(metadata=dict(MODEL_METADATA))
    optim_sd = trainables.optimizer.sharded_state_dict(
        model_sd, is_loading=is_loading, metadata={**MODEL_METADATA, **SAVE_METADATA})
    return {"model": model_sd, "optimizer": optim_sd,
            "scheduler": trainables.scheduler.state_dict(),
            "train_state": train_state,
            "rng": _rng_sharded_object(None if is_loading else rng_state())}


def save_checkpoint(root: Path, iteration: int, trainables, train_state: dict,
                    cfg: RunConfig, keep: int) -> Path:
    """Write checkpoint `iteration` atomically (collective: every rank calls it)."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final, tmp = iteration_dir(root, iteration), root / f"{TMP_PREFIX}iter_{iteration:07d}"
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)   # a crashed earlier save of this iteration
        tmp.mkdir()
    dist.barrier()
    dist_checkpointing.save(_state(trainables, train_state, is_loading=False), str(tmp),
                            content_metadata=SAVE_METADATA)
    dist.barrier()
    if dist.get_rank() == 0:
        _atomic_write(tmp / CONFIG_FILE, dump_config(cfg))
        write_manifest(tmp)
        _fsync_dir(tmp)
        if final.exists():                        # re-saving an iteration (e.g. after resume)
            _remove_checkpoint(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _atomic_write(root / LATEST, final.name + "\n")
        _fsync_dir(root)
        _prune(root, keep)
    dist.barrier()
    return final


def write_manifest(folder: Path) -> None:
    """The manifest that `verify_files` checks a checkpoint folder against (rank 0, after the
    save's last file)."""
    _atomic_write(Path(folder) / MANIFEST_FILE, json.dumps(_file_sizes(Path(folder)), indent=1)
                  + "\n")


def _file_sizes(folder: Path) -> dict:
    """{relative path: size in bytes} of every file under `folder` but the manifest."""
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*"))
            if f.is_file() and f.name != MANIFEST_FILE}


def verify_files(path: Path) -> None:
    """Every file the save wrote is there with its size (a truncated copy or a lost shard
    fails here, with the file named, instead of deep inside the loader)."""
    manifest = Path(path) / MANIFEST_FILE
    try:
        expected = json.loads(manifest.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {MANIFEST_FILE}: it is not a complete "
                              f"checkpoint of megatron-mom (or was written by an older "
                              f"version)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{manifest} is damaged ({err})") from None
    actual = _file_sizes(Path(path))
    for name, size in expected.items():
        if name not in actual:
            raise CheckpointError(f"{path}: file {name} is missing; the checkpoint is "
                                  f"incomplete: resume from an earlier one (delete this folder "
                                  f"and point {LATEST} at it)")
        if actual[name] != size:
            raise CheckpointError(f"{path}: file {name} has {actual[name]} bytes, the save "
                                  f"wrote {size}: the checkpoint is damaged (a truncated copy?); "
                                  f"resume from an earlier one or copy it again")


def _prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints and any temporary files left by
    interrupted saves (only rank 0 writes here, and its save is complete)."""
    done = sorted(p for p in root.glob("iter_*") if p.is_dir())
    latest = latest_checkpoint(root)
    for old in done[:-keep]:
        if old != latest:
            _remove_checkpoint(old)
    remove_temporaries(root)


def _remove_checkpoint(path: Path) -> None:
    """Renamed first, so that no half-deleted folder is ever named iter_*."""
    doomed = path.with_name(f"{TMP_PREFIX}{path.name}.deleting")
    shutil.rmtree(doomed, ignore_errors=True)     # left by an interrupted earlier removal
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_temporaries(root: Path) -> None:
    """`.tmp_iter_N/` folders and `.tmp_latest.<pid>` files of saves that did not finish."""
    for stale in Path(root).glob(f"{TMP_PREFIX}*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _distributed_optimizers(optimizer) -> list:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    chain = getattr(optimizer, "chained_optimizers", [optimizer])
    return [opt for opt in chain if isinstance(opt, DistributedOptimizer)]


def _init_adam_states(optimizer) -> None:
    """A fresh distributed optimizer has no Adam states yet, but building its load template
    reads them, 'step' included (distrib_optimizer.py:641 without apex/TE)."""
    for opt in _distributed_optimizers(optimizer):
        for group in opt.optimizer.param_groups:
            for param in group["params"]:
                state = opt.optimizer.state[param]
                state.setdefault("exp_avg", torch.zeros_like(param.data))
                state.setdefault("exp_avg_sq", torch.zeros_like(param.data))
                state.setdefault("step", torch.tensor(0.0))


@contextmanager
def _distributed_optimizer_load_fixes(optimizer):
    """Work around two traps of megatron-core 0.16.1's distributed optimizer without apex/TE:
    - its fully-reshardable load copies every saved state into the live one by key
      (distrib_optimizer.py:936) and the checkpoint has no per-parameter 'step': KeyError;
    - its load_state_dict gives every parameter the SAME 'step' tensor (line 825), which
      torch's Adam then increments once per parameter and step: training silently diverges.
    """
    optimizers = _distributed_optimizers(optimizer)
    for opt in optimizers:
        original = opt._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, opt=opt, original=original):
            group_index, group_order = opt.model_param_group_index_map[model_param]
            main_param = opt.optimizer.param_groups[group_index]["params"][group_order]
            state = opt.optimizer.state[main_param]
            if "step" in state and "step" not in tensors:
                tensors = {**tensors, "step": state["step"]}   # keep the loaded step
            original(model_param, tensors)

        opt._set_main_param_and_optimizer_states = set_states
    try:
        yield
    finally:
        for opt in optimizers:
            del opt._set_main_param_and_optimizer_states      # back to the class method
            for state in opt.optimizer.state.values():
                if "step" in state:
                    state["step"] = state["step"].clone()     # one step tensor per parameter


def load_checkpoint(path: Path, trainables) -> dict:
    """Restore everything saved by `save_checkpoint`; returns the saved train_state."""
    verify_files(path)
    _init_adam_states(trainables.optimizer)
    template = _state(trainables, None, is_loading=True)
    loaded = dist_load(template, path)
    trainables.gpt.load_state_dict(loaded["model"])
    with _distributed_optimizer_load_fixes(trainables.optimizer):
        trainables.optimizer.load_state_dict(loaded["optimizer"])
    trainables.scheduler.load_state_dict(loaded["scheduler"])
    set_rng_state(loaded["rng"])
    return loaded["train_state"]


def load_model_weights(path: Path, gpt) -> None:
    """Only the model's weights (generation)."""
    verify_files(path)
    template = {"model": gpt.sharded_state_dict(metadata=dict(MODEL_METADATA))}
    loaded = dist_load(template, path)
    gpt.load_state_dict(loaded["model"])


# ------------------------------------------------------------------ config checks on resume
# What a resumed run may change: how long it runs, how often it logs, validates and saves,
# the kernels that compute the same model, sampling, and where the run lives. Everything else
# (model, data, optimizer, schedule, precision, seed, batch, parallel layout) fixes what the
# checkpoint holds or how training continues from it.
MAY_CHANGE_ON_RESUME = ("train.steps", "train.log_interval", "train.eval_interval",
                        "train.eval_batches", "train.save_interval", "train.keep_checkpoints",
                        "train.recompute",
                        *(f"mom.{name}" for name in EXECUTION_SETTINGS),
                        "mom.chunk_size", "generate.", "output_dir")


def _may_change() -> str:
    return ", ".join(k + "*" if k.endswith(".") else k for k in MAY_CHANGE_ON_RESUME)


def saved_config(path: Path) -> RunConfig:
    """The run config stored with checkpoint `path` (validated like a user's)."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: {path} is not a complete checkpoint")
    try:
        return build_config(read_yaml(file))
    except ConfigError as err:
        raise ConfigError(f"{file} (the checkpoint's config): {err}") from None


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_keys(saved: RunConfig, cfg: RunConfig) -> dict:
    """{dotted key: (checkpoint's value, this run's value)} for keys a resume must keep."""
    old, new = _flat(saved.to_dict()), _flat(cfg.to_dict())
    return {key: (old[key], new[key]) for key in old
            if old[key] != new[key] and not key.startswith(MAY_CHANGE_ON_RESUME)}


def _layout_hint(saved: RunConfig) -> str:
    p = saved.parallel
    flags = f"--tp {p.tensor_model_parallel_size} --pp {p.pipeline_model_parallel_size}"
    flags += " --sequence-parallel" if p.sequence_parallel else ""
    flags += " --distributed-optimizer" if p.use_distributed_optimizer else ""
    n = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    return (f"resume with the saved layout on a multiple of {n} process(es) (TP x PP), e.g. "
            f".venv/bin/torchrun --nproc-per-node {n} -m megatron_mom.apps.cli.main train --resume "
            f"--output-dir {saved.output_dir} {flags}")


def check_resume(path: Path, cfg: RunConfig, world_size: int) -> None:
    """Refuse to resume checkpoint `path` with a different model, training setup or parallel
    layout, or on a number of processes that cannot hold its layout (before anything is
    built)."""
    saved = saved_config(path)
    saved.output_dir = cfg.output_dir
    changed = changed_keys(saved, cfg)
    if changed:
        listing = "; ".join(f"{key}: checkpoint {old!r}, this run {new!r}"
                            for key, (old, new) in changed.items())
        hint = (_layout_hint(saved) if any(k.startswith("parallel.") for k in changed) else
                "drop those changes to resume, or train the new configuration as a new run "
                "(another --output-dir, or --overwrite)")
        raise ConfigError(f"--resume: {path} was saved with a different configuration: "
                          f"{listing}. A resumed run may change only {_may_change()}; {hint}")
    p = saved.parallel
    if world_size % (p.tensor_model_parallel_size * p.pipeline_model_parallel_size):
        raise ConfigError(f"--resume: {path} was saved with TP={p.tensor_model_parallel_size} "
                          f"PP={p.pipeline_model_parallel_size}, which {world_size} process(es) "
                          f"cannot hold; {_layout_hint(saved)}")


def resume_config(config_path: Optional[str], overrides: dict) -> RunConfig:
    """The config of `train --resume`: the checkpoint's own config (or the --config file),
    with the command line's overrides; `train.steps` stays the saved run's unless given."""
    requested = load_config(config_path, overrides)
    found = latest_checkpoint(Path(requested.output_dir) / "checkpoints")
    if found is None:
        return requested            # train() says that there is nothing to resume
    saved = saved_config(found)
    cfg = requested
    if config_path is None:
        cfg = build_config(saved.to_dict(), {**overrides, "output_dir": requested.output_dir})
    if "train.steps" not in overrides:
        cfg.train.steps = saved.train.steps
    return cfg
