"""Run Megatron-LM's pretrain_gpt.py as megatron_mom.integrations.megatron_lm.launch does, and
report each rank's peak GPU memory while it trains (used by benchmarks/scaling_run.sh):

    torchrun ... benchmarks/scaling_launch.py /path/to/Megatron-LM/pretrain_gpt.py ARGS

Megatron's own memory report prints once, after the first iteration, on one rank. Here every
rank prints, after iterations 1, 2, 5 and every 10th,
`scaling-run: rank R iteration I peak allocated X GiB reserved Y GiB` (torch.cuda's peak
counters; on CPU the process's peak resident memory instead), and once more at exit. It also
seeds the CPU generator again right before the model is built (see reseed_before_model).
SCALING_LIST_MODULES=FILE writes the top-level modules imported (for checking what a bare
machine lacks).
"""
from __future__ import annotations

import atexit
import os
import resource
import runpy
import sys

import torch

from megatron_mom.integrations.megatron_lm import launch

RANK = int(os.environ.get("RANK", "0"))
_calls = 0


def peak_line(tag: str) -> str:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        alloc = torch.cuda.max_memory_allocated() / 2**30
        reserved = torch.cuda.max_memory_reserved() / 2**30
        return f"scaling-run: rank {RANK} {tag} peak allocated {alloc:.2f} GiB reserved {reserved:.2f} GiB"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return f"scaling-run: rank {RANK} {tag} peak cpu-rss {rss:.2f} GiB"


def wrap_training_log() -> None:
    from megatron.training import training

    original = training.training_log

    def training_log(*args, **kwargs):
        global _calls
        out = original(*args, **kwargs)
        _calls += 1
        if _calls in (1, 2, 5) or _calls % 10 == 0:
            print(peak_line(f"iteration {_calls}"), flush=True)
        return out

    training.training_log = training_log


def reseed_before_model() -> None:
    """Seed the CPU generator again right before the model is built, as Megatron seeded it
    (seed + 100 x pipeline rank), so that --use-cpu-initialization draws the same weights at every
    TP/CP size: on a machine without CUDA, Megatron's JIT warm-up (`_warmup_jit_function`) draws
    TP-sized random tensors from the CPU generator in between."""
    from megatron.core import parallel_state
    from megatron.training import get_args, training

    original = training.get_model

    def get_model(*args, **kwargs):
        torch.manual_seed(get_args().seed + 100 * parallel_state.get_pipeline_model_parallel_rank())
        return original(*args, **kwargs)

    training.get_model = get_model


def list_modules(path: str) -> None:
    names = sorted({m.split(".")[0] for m in list(sys.modules)})
    with open(f"{path}.{RANK}", "w") as f:
        f.write("\n".join(names) + "\n")


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    script, script_args = os.path.abspath(sys.argv[1]), sys.argv[2:]
    sys.path.insert(0, os.path.dirname(script))  # the checkout's megatron and GPT builders
    if not torch.cuda.is_available():
        script_args, added = launch.cpu_argv(script_args)
        if added and RANK == 0:
            print(f"scaling-run: no CUDA, running on CPU; added {' '.join(added)}", flush=True)
        launch.enable_cpu_training()
    wrap_training_log()
    reseed_before_model()
    atexit.register(lambda: print(peak_line("exit"), flush=True))
    if os.environ.get("SCALING_LIST_MODULES"):
        atexit.register(list_modules, os.environ["SCALING_LIST_MODULES"])
    sys.argv = [script, *script_args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
