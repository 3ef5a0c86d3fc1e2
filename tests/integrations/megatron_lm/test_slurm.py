"""examples/megatron-lm/train.sbatch, run for real: a private one-host Slurm cluster (installed
with apt-get when missing), `sbatch --wait` of a 2-process CPU job (TP=2 + sequence parallel)
of the tiny hybrid model, then a second job that resumes from its checkpoint.

CI has no Megatron-LM checkout, so the job's PRETRAIN is
tests/integrations/megatron_lm/pretrain_standin.py, which reads the same flags as pretrain_gpt.py;
everything else (args.sh, srun, torchrun rendezvous from SLURM_* variables, the launcher, the
presets, log and checkpoint paths) is the real thing.
"""
import os
import re
import shutil
import subprocess
import tempfile
import sys
from pathlib import Path

import pytest

import slurm_cluster

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    try:
        slurm_cluster.install()
    except (RuntimeError, subprocess.CalledProcessError) as err:
        pytest.skip(f"no Slurm: {err}")
    # Not under pytest's tmp dir: munged runs as user munge and pytest's dirs are 0700.
    root = Path(tempfile.mkdtemp(prefix="mom-slurm-"))
    try:
        yield slurm_cluster.start(root)
    finally:
        slurm_cluster.stop(root)
        shutil.rmtree(root, ignore_errors=True)


def sbatch(slurm, tmp_path, train_iters):
    env = {**os.environ, **slurm,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # this venv's torchrun
           "PYTHONPATH": str(ROOT),
           "PRETRAIN": str(ROOT / "tests" / "integrations" / "megatron_lm" / "pretrain_standin.py"),
           "CONFIG": "tiny", "TP": "2", "NPROC_PER_NODE": "2", "TRAIN_ITERS": str(train_iters),
           "RUN_DIR": str(tmp_path / "run"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / f"slurm-{train_iters}.out"
    # --gpus-per-node=0 overrides the script's #SBATCH GPU request: this node has none.
    result = subprocess.run(
        ["sbatch", "--wait", "--nodes=1", "--gpus-per-node=0", "--time=5", f"--output={out}",
         str(ROOT / "examples" / "megatron-lm" / "train.sbatch"),
         "--log-interval", "1", "--vocab-size", "128", "--lr", "1e-2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    text = out.read_text() if out.exists() else ""
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{text[-4000:]}"
    job = re.search(r"Submitted batch job (\d+)", result.stdout).group(1)
    return job, text


def losses(text):
    return {int(it): float(loss) for it, loss in
            re.findall(r"iteration\s+(\d+)/\s*\d+ \|.*?\| lm loss: ([0-9.E+-]+) \|", text)}


def test_sbatch_trains_saves_and_resumes(slurm, tmp_path):
    job, text = sbatch(slurm, tmp_path, train_iters=4)
    assert f"train.sbatch: job {job}, 1 nodes x 2 processes, TP=2 PP=1 CP=1 SP=1" in text
    assert "pipeline stage 0: layers 1-4 = MMAM" in text
    log = (tmp_path / "run" / "logs" / f"train-{job}.log").read_text()  # the job's own log
    first = losses(log)
    assert sorted(first) == [1, 2, 3, 4], log[-3000:]
    lb = [float(x) for x in re.findall(r"mom_load_balancing_loss: ([0-9.E+-]+)", log)]
    assert len(lb) == 4 and all(0.005 < x < 0.05 for x in lb), lb  # coeff 0.01 x ~1 balanced
    ckpt = tmp_path / "run" / "checkpoints"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    files = {f.name for f in (ckpt / "iter_0000004").iterdir()}
    assert ".metadata" in files and {f[:3] for f in files if f.endswith(".distcp")} == {
        "__0", "__1"}, files  # torch_dist shards written by both ranks

    job2, text2 = sbatch(slurm, tmp_path, train_iters=6)
    log2 = (tmp_path / "run" / "logs" / f"train-{job2}.log").read_text()
    assert "successfully loaded checkpoint" in log2 and "at iteration 4" in log2
    second = losses(log2)
    assert sorted(second) == [5, 6], log2[-3000:]
    assert second[6] < first[1] - 1.0, (first, second)  # it learns across the resume
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
