"""Against a real Megatron-LM checkout (skipped unless MEGATRON_LM_PATH is set, e.g. to a
`git checkout core_v0.16.1` of NVIDIA/Megatron-LM; it is never modified: the tests patch a copy).

- the pinned patch applies cleanly to the checkout's pristine files, and reverts;
- examples/megatron-lm/train.sh runs pretrain_gpt.py with the hybrid preset (TP=2 + SP on two
  CPU processes, or on GPUs): log lines with lm loss and mom_load_balancing_loss, the aux-loss
  gradient scale that the patched schedule sets (1/2 for 2 micro-batches), a checkpoint;
- a bad --mom-* flag stops pretrain_gpt.py at startup with a message naming the flags.
On CPU only checkouts whose Megatron-Core supports this Python run (0.17+ needs Python 3.12).
"""
import filecmp
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]
MLM = os.environ.get("MEGATRON_LM_PATH")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not MLM, reason="set MEGATRON_LM_PATH to a Megatron-LM checkout")]
PATCHED_FILES = ["pretrain_gpt.py", "megatron/training/training.py",
                 "megatron/core/pipeline_parallel/schedules.py"]


def version(root):
    text = (Path(root) / "megatron/core/package_info.py").read_text()
    return tuple(int(re.search(rf"^{k}\s*=\s*(\d+)", text, re.M).group(1))
                 for k in ("MAJOR", "MINOR", "PATCH"))


def apply(root, *flags):
    return subprocess.run([sys.executable, str(ROOT / "patches/apply.py"), str(root), *flags],
                          capture_output=True, text=True)


def test_patch_applies_to_the_pristine_checkout_and_reverts(tmp_path):
    if not (Path(MLM) / ".git").exists():
        pytest.skip("MEGATRON_LM_PATH is not a git checkout (pristine files unknown)")
    for rel in PATCHED_FILES + ["megatron/core/package_info.py"]:
        dst = tmp_path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(subprocess.run(["git", "-C", MLM, "show", f"HEAD:{rel}"],
                                       capture_output=True, check=True).stdout)
    pristine = tmp_path.parent / "pristine"
    shutil.copytree(tmp_path, pristine)
    result = apply(tmp_path)
    assert result.returncode == 0 and "applied" in result.stdout, result.stderr
    assert "mom_extra_args_provider(" in (tmp_path / "pretrain_gpt.py").read_text()
    assert "getattr(config, 'mom_aux_loss', False)" in (tmp_path / PATCHED_FILES[2]).read_text()
    assert "report_losses(" in (tmp_path / PATCHED_FILES[1]).read_text()
    assert "already applied" in apply(tmp_path).stdout
    assert apply(tmp_path, "--revert").returncode == 0
    for rel in PATCHED_FILES:
        assert filecmp.cmp(tmp_path / rel, pristine / rel, shallow=False), rel


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A patched copy of the checkout's code (megatron/ and the GPT entry points)."""
    if not torch.cuda.is_available() and version(MLM) >= (0, 17, 0) and sys.version_info < (3, 12):
        pytest.skip(f"Megatron-LM {version(MLM)} needs Python >= 3.12")
    root = tmp_path_factory.mktemp("megatron-lm")
    shutil.copytree(Path(MLM) / "megatron", root / "megatron",
                    ignore=shutil.ignore_patterns("__pycache__", "build"))
    for name in ("pretrain_gpt.py", "gpt_builders.py", "model_provider.py"):
        if (Path(MLM) / name).exists():
            shutil.copy(Path(MLM) / name, root / name)
    result = apply(root)
    assert result.returncode == 0, result.stderr
    # pretrain() runs `make` for the dataset helpers; reuse megatron-core's compiled ones
    # when they come from the same source (building needs pybind11).
    datasets = root / "megatron/core/datasets"
    helpers = datasets / f"helpers_cpp{sysconfig.get_config_var('EXT_SUFFIX')}"
    if not helpers.exists():
        import megatron.core.datasets as installed
        built = Path(installed.__file__).parent / helpers.name
        if built.exists() and filecmp.cmp(built.parent / "helpers.cpp", datasets / "helpers.cpp"):
            shutil.copy(built, helpers)
    return root


def train_sh(checkout, tmp_path, *extra, nproc=2, tp=2, config="tiny", timeout=300):
    env = {**os.environ, "MEGATRON_LM_PATH": str(checkout), "CONFIG": config,
           "NPROC_PER_NODE": str(nproc), "TP": str(tp), "RUN_DIR": str(tmp_path / "run"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "PYENV_VERSION": "{}.{}.{}".format(*sys.version_info[:3])}  # pyenv's python3-config
    return subprocess.run(["bash", str(ROOT / "examples/megatron-lm/train.sh"),
                           "--log-interval", "1", "--eval-iters", "0", *extra],
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_pretrain_gpt_trains_the_hybrid_preset(checkout, tmp_path):
    gpus = torch.cuda.device_count()
    nproc = 2 if gpus == 0 else min(2, gpus)
    result = train_sh(checkout, tmp_path, "--train-iters", "6", nproc=nproc, tp=nproc)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-6000:]
    assert "pipeline stage 0: layers 1-4 = MMAM" in out
    lm = {int(i): float(v) for i, v in re.findall(
        r"iteration\s+(\d+)/\s*6 \|.*?lm loss: ([0-9.E+-]+) \|", out)}
    lb = [float(v) for v in re.findall(r"\| mom_load_balancing_loss: ([0-9.E+-]+) \|", out)]
    assert sorted(lm) == list(range(1, 7)), out[-4000:]
    assert len(lb) == 6 and all(0.005 < v < 0.05 for v in lb), lb  # coeff 0.01 x ~1
    # global batch 4 = 2 micro-batches of 2 (one data-parallel rank): the schedule must set 1/2.
    assert "MoM aux-loss gradient scale 0.5 " in out
    assert lm[6] < lm[1], lm
    ckpt = tmp_path / "run" / "checkpoints"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    assert (ckpt / "iter_0000006" / ".metadata").exists()


def test_pretrain_gpt_refuses_bad_mom_flags_at_startup(checkout, tmp_path):
    result = train_sh(checkout, tmp_path, "--spec", "megatron_mom.integrations.megatron_lm.presets",
                      "mom", "--mom-topk", "4", nproc=1, tp=1)
    assert result.returncode != 0
    assert "--mom-topk (4) must be <= --mom-num-memories (3)" in result.stdout + result.stderr


def test_scaling_run_rehearsal_tp2_matches_tp1(checkout, tmp_path):
    """benchmarks/scaling_run.sh at SHAPE=tiny (the GPU run's command lines, 2 processes):
    the TP=2 + SP hybrid starts from the TP=1 weights (same loss at iteration 1), and the
    report has both rows, an efficiency and the parity table."""
    if torch.cuda.is_available():
        pytest.skip("the CPU rehearsal; on GPUs run the script itself")
    out = tmp_path / "scaling"
    env = {**os.environ, "MEGATRON_LM_PATH": str(checkout), "OUT": str(out), "SHAPE": "tiny",
           "TRAIN_ITERS": "4", "OMP_NUM_THREADS": "1",
           "JOBS": "hybrid-tp2:hybrid:2:1:1 hybrid-tp1:hybrid:1:1:1",
           "REPORT_ARGS": "--ref hybrid-tp2=hybrid-tp1 --skip 1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(ROOT / "benchmarks/scaling_run.sh")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    import json
    jobs = json.loads((out / "summary.json").read_text())
    assert jobs["hybrid-tp2"]["status"] == jobs["hybrid-tp1"]["status"] == "completed", jobs
    assert jobs["hybrid-tp2"]["peak_alloc_gib"] > 0
    assert jobs["hybrid-tp2"]["efficiency"] > 0
    parity = jobs["hybrid-tp2"]["parity"]
    assert parity["iterations"] == [1, 2, 3, 4]
    assert parity["first_abs_diff"] < 5e-3, parity  # bf16, same weights and batch
    assert "hybrid-tp2 vs hybrid-tp1" in (out / "summary.md").read_text()
