"""Resume on the GPU through the restricted checkpoint reader (megatron_mom/train/safe_load.py):
bf16, CUDA RNG states, and with Transformer Engine layers, whose `_extra_state` objects come
back through torch.load(weights_only=True). A run stopped after 2 steps and resumed must
reproduce the uninterrupted run's losses of steps 3-4 (float equality where the kernels are
deterministic; the assertion allows 1e-3 relative, and the message shows the exact values).
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]
TINY = {"model.num_layers": 2, "model.pattern": "MA", "model.hidden_size": 128,
        "model.ffn_hidden_size": 256, "model.seq_length": 128, "mom.head_dim": 64,
        "mom.chunk_size": 64, "train.micro_batch_size": 4, "train.global_batch_size": 8,
        "train.warmup_steps": 1, "train.eval_interval": 0, "train.save_interval": 2,
        "train.log_interval": 1, "train.precision": "bf16", "data.corpus": "bundled"}


def _train(out: Path, backend: str, *extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    # The repository first; what the caller's path holds (megatron-core, say) stays importable.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    args = [sys.executable, "-m", "megatron_mom.apps.cli.main", "train", "--no-progress",
            "--steps", "4", "--output-dir", str(out), "--set", f"model.spec_backend={backend}",
            *extra]
    args += [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def _losses(out: Path) -> dict:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text()
                                                .splitlines()) if "loss" in r}


@pytest.mark.parametrize("backend", ["local", "te"])
def test_bf16_resume_through_the_restricted_reader(tmp_path, backend):
    if backend == "te" and importlib.util.find_spec("transformer_engine") is None:
        pytest.skip("Transformer Engine is not installed")
    _train(tmp_path / "straight", backend)
    _train(tmp_path / "stopped", backend, "--stop-after", "2")
    resumed = _train(tmp_path / "stopped", backend, "--resume")
    assert "resumed from" in resumed.stdout
    want, got = _losses(tmp_path / "straight"), _losses(tmp_path / "stopped")
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        assert abs(got[step] - want[step]) <= 1e-3 * abs(want[step]), (want, got)
