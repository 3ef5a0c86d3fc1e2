"""Run a Megatron-LM training script, on machines without CUDA too:

    [torchrun ...] python -m megatron_mom.integrations.megatron_lm.launch /path/to/Megatron-LM/pretrain_gpt.py ARGS

With CUDA available this only runs the script (as `python SCRIPT ARGS` would). Without CUDA it
first turns on megatron_mom.testing.cpu's redirections of Megatron-Core's CUDA assumptions, plus the
few that Megatron-LM's `megatron.training` adds (below, each naming the code it works around),
and adds the flags a CPU run needs when they are missing (gloo, no CUDA fusions), saying so.
Nothing in the Megatron-LM checkout changes.
"""
from __future__ import annotations

import contextlib
import functools
import os
import runpy
import sys

import torch

# Flags a CPU run needs: gloo instead of NCCL, and no fused CUDA kernels (cpu_testing.md).
CPU_FLAGS = [
    ("--distributed-backend", "gloo"),
    ("--use-cpu-initialization", None),
    ("--no-gradient-accumulation-fusion", None),
    ("--no-bias-dropout-fusion", None),
    ("--no-rope-fusion", None),
    ("--no-masked-softmax-fusion", None),
    ("--no-persist-layer-norm", None),
    ("--transformer-impl", "local"),
]


def cpu_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """argv plus the CPU flags it lacks; also returns what was added."""
    out, added = list(argv), []
    given = {arg.split("=", 1)[0] for arg in argv}         # --flag value and --flag=value
    for flag, value in CPU_FLAGS:
        if flag not in given:
            extra = [flag] if value is None else [flag, value]
            out += extra
            added += extra
    return out, added


@contextlib.contextmanager
def _one_fake_gpu():
    # initialize.py `_initialize_distributed` creates the model-parallel groups and
    # `_set_random_seed` seeds the model-parallel RNG tracker only `if
    # torch.cuda.device_count() > 0`; `torch.cuda.set_device` would fail. Pretend one device
    # for the duration of those two calls only.
    count, set_device = torch.cuda.device_count, torch.cuda.set_device
    torch.cuda.device_count, torch.cuda.set_device = (lambda: 1), (lambda *a, **k: None)
    try:
        yield
    finally:
        torch.cuda.device_count, torch.cuda.set_device = count, set_device


class _NoStream:
    """A CUDA stream on a machine without one: work is already ordered, waits are no-ops."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args):
        pass

    def wait_event(self, *args):
        pass

    def synchronize(self):
        pass


def _wrap(module, name, wrapper):
    original = getattr(module, name)

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        return wrapper(original, *args, **kwargs)

    setattr(module, name, wrapped)


def enable_cpu_training() -> None:
    """megatron_mom.testing.cpu.enable() plus the redirections Megatron-LM's training loop needs."""
    from megatron_mom.testing import cpu
    if not cpu.enable():
        return
    try:
        from megatron.training import arguments, initialize, training
    except ImportError:  # a script built on Megatron-Core alone needs only cpu.enable()
        return

    def in_fake_gpu(original, *args, **kwargs):
        with _one_fake_gpu():
            return original(*args, **kwargs)

    _wrap(initialize, "_initialize_distributed", in_fake_gpu)
    _wrap(initialize, "_set_random_seed", in_fake_gpu)
    # initialize.py `initialize_megatron` asserts torch.cuda.is_available() unless
    # allow_no_cuda; training.py imports it by name.
    _wrap(training, "initialize_megatron",
          lambda original, *a, **k: original(*a, **{**k, "allow_no_cuda": True}))
    # training.py `get_model` builds DDP on a side stream (torch.cuda.Stream, current_stream,
    # torch.cuda.stream): CPU work is already in order, so the stream calls do nothing.
    torch.cuda.Stream = _NoStream
    torch.cuda.current_stream = lambda *a, **k: _NoStream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    # arguments.py `validate_args` asks the GPU's architecture (utils.get_device_arch_version,
    # imported by name) when TP or CP > 1, then wants CUDA_DEVICE_MAX_CONNECTIONS=1, which
    # orders kernels on a GPU and means nothing here.
    arguments.get_device_arch_version = lambda: 0
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    # initialize.py `_compile_dependencies` runs legacy/fused_kernels.load, which asks nvcc for
    # the CUDA version (it builds nothing in the models used here).
    initialize.fused_kernels.load = lambda *a, **k: None


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if argv else 2)
    script, script_args = os.path.abspath(argv[0]), argv[1:]
    if not os.path.isfile(script):
        sys.exit(f"megatron_mom.integrations.megatron_lm.launch: no such script: {script}")
    # The script imports its neighbours (gpt_builders, model_provider) and its checkout's
    # `megatron` package, exactly as `python SCRIPT` would.
    sys.path.insert(0, os.path.dirname(script))
    if not torch.cuda.is_available():
        script_args, added = cpu_argv(script_args)
        if added and int(os.environ.get("RANK", "0")) == 0:
            print(f"megatron-mom launch: no CUDA, running on CPU; added {' '.join(added)}",
                  flush=True)
        enable_cpu_training()
    sys.argv = [script, *script_args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
