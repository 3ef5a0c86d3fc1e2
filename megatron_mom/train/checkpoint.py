"""Atomic, resumable checkpoints with Megatron's distributed checkpointing.

Layout of `<output_dir>/checkpoints/`:
    iter_0000100/          a complete checkpoint (dist_checkpointing files + config.yaml)
    latest                 the name of the newest complete checkpoint (one line)
    .tmp_iter_0000200/     a save in progress (or one that crashed): never read

A save writes everything into `.tmp_iter_N`, then renames it to `iter_N` and only then points
`latest` at it (itself replaced atomically). A crash at any moment leaves `latest` naming a
complete checkpoint. Resuming restores model, optimizer, learning-rate schedule, iteration,
consumed samples and every RNG state, so the losses continue exactly as without the stop.
"""
from __future__ import annotations

import os
import random
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_mom.train.config import RunConfig, dump_config

LATEST = "latest"
CONFIG_FILE = "config.yaml"
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
    """The newest complete checkpoint under `root`, or None."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    return path if path.is_dir() else None


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
    from megatron.core import tensor_parallel
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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
        if final.exists():                        # re-saving an iteration (e.g. after resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _atomic_write(root / LATEST, final.name + "\n")
        _prune(root, keep)
    dist.barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints and any stale temporary dirs."""
    done = sorted(p for p in root.glob("iter_*") if p.is_dir())
    latest = latest_checkpoint(root)
    for old in done[:-keep]:
        if old != latest:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(f"{TMP_PREFIX}iter_*"):
        shutil.rmtree(stale, ignore_errors=True)


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
    from megatron.core import dist_checkpointing

    _init_adam_states(trainables.optimizer)
    template = _state(trainables, None, is_loading=True)
    loaded = dist_checkpointing.load(template, str(path))
    trainables.gpt.load_state_dict(loaded["model"])
    with _distributed_optimizer_load_fixes(trainables.optimizer):
        trainables.optimizer.load_state_dict(loaded["optimizer"])
    trainables.scheduler.load_state_dict(loaded["scheduler"])
    set_rng_state(loaded["rng"])
    return loaded["train_state"]


def load_model_weights(path: Path, gpt) -> None:
    """Only the model's weights (generation)."""
    from megatron.core import dist_checkpointing
    template = {"model": gpt.sharded_state_dict(metadata=dict(MODEL_METADATA))}
    loaded = dist_checkpointing.load(template, str(path))
    gpt.load_state_dict(loaded["model"])
