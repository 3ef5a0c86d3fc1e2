"""A tiny training run in its own process that can be killed with SIGKILL inside a checkpoint
save (the fault-injection test in tests/train/test_train.py).

    python tests/train/checkpoint_fault_run.py SETTINGS_JSON KILL_AT [--resume | --overwrite]

SETTINGS_JSON: the run's config overrides. While a save runs, every file-system call of this
process (open, os.open, mkdir, fsync, rename, replace, unlink, rmdir, rmtree, torch.save) is
a point where the file state can change; the process group is killed with SIGKILL just before
call number KILL_AT (counted over the run's saves from 0), as a power cut or an OOM kill would,
taking the shard-writing worker processes with it wherever they are. KILL_AT -1 runs to the
end and prints {"save_calls": {step: number of calls in that step's save}}. The caller starts
this in a new session, so that the kill reaches only this run's processes.
"""
import builtins
import io
import json
import os
import shutil
import signal
import sys


class _SaveKiller:
    """Counts the file-system calls of this process inside checkpoint.save_checkpoint."""

    def __init__(self, checkpoint, kill_at: int):
        import torch
        self.targets = [(os, name) for name in ("open", "mkdir", "makedirs", "fsync", "rename",
                                                  "replace", "unlink", "remove", "rmdir")]
        self.targets += [(builtins, "open"), (io, "open"), (shutil, "rmtree"), (torch, "save")]
        self.originals = {(module, name): getattr(module, name) for module, name in self.targets}
        self.kill_at, self.calls, self.per_save = kill_at, 0, {}
        self.pid = os.getpid()          # forked writer processes inherit the wrappers
        self.real_save = checkpoint.save_checkpoint
        checkpoint.save_checkpoint = self.save

    def _counted(self, original):
        def call(*args, **kwargs):
            if os.getpid() == self.pid:
                if self.calls == self.kill_at:
                    os.killpg(os.getpgid(0), signal.SIGKILL)
                self.calls += 1
            return original(*args, **kwargs)
        return call

    def save(self, root, iteration, *args, **kwargs):
        before = self.calls
        for (module, name), original in self.originals.items():
            setattr(module, name, self._counted(original))
        try:
            return self.real_save(root, iteration, *args, **kwargs)
        finally:
            for (module, name), original in self.originals.items():
                setattr(module, name, original)
            self.per_save[iteration] = self.calls - before


def main() -> None:
    from megatron_mom.train import build_config, checkpoint
    from megatron_mom.train.loop import train
    overrides, kill_at = json.loads(sys.argv[1]), int(sys.argv[2])
    killer = _SaveKiller(checkpoint, kill_at)
    train(build_config(overrides=overrides), resume="--resume" in sys.argv,
          overwrite="--overwrite" in sys.argv, show_progress=False, sample=False)
    print(json.dumps({"save_calls": killer.per_save}))


if __name__ == "__main__":  # dist_checkpointing's helper process re-imports __main__
    main()
