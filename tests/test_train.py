"""The main job: config validation, training, bit-identical resume, atomic saves, sampling."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_mom.train.build import free_port
from megatron_mom.train.config import ConfigError, RunConfig, build_config, load_config

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["The quick brown fox jumps over the lazy dog. " * 3,
        "Return the number of items in the container, or raise an error. " * 2,
        "This module provides functions for working with files and paths. " * 2]


def tiny_overrides(out: Path, corpus: Path, **extra) -> dict:
    """A model small enough for a few CI steps: 2 layers (MoM + attention), 2 micro-batches
    per step so the schedule's gradient accumulation and the router-loss scaling run."""
    values = {"model.num_layers": 2, "model.pattern": "MA", "model.hidden_size": 64,
              "model.ffn_hidden_size": 128, "model.seq_length": 64, "mom.num_heads": 2,
              "mom.head_dim": 16, "mom.chunk_size": 16, "train.steps": 8,
              "train.micro_batch_size": 2, "train.global_batch_size": 4,
              "train.warmup_steps": 2, "train.lr": 5e-3, "train.log_interval": 4,
              "train.eval_interval": 4, "train.eval_batches": 1, "train.save_interval": 4,
              "generate.max_new_tokens": 16, "data.corpus": str(corpus), "data.split": "90,10,0",
              "output_dir": str(out)}
    values.update(extra)
    return values


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    path.write_text("\n\n".join(f"{doc} ({i})" for i in range(40) for doc in DOCS))
    return path


# ------------------------------------------------------------------------- configuration
def test_example_config_documents_the_embedded_default():
    example = ROOT / "examples/configs/tiny_hybrid.yaml"
    assert load_config(str(example)) == RunConfig()
    assert load_config(None) == RunConfig()
    written = yaml.safe_load(example.read_text())
    defaults = RunConfig().to_dict()
    assert written.keys() == defaults.keys()                 # every key is documented
    for section, values in defaults.items():
        if isinstance(values, dict):
            assert written[section].keys() == values.keys(), section


@pytest.mark.parametrize("data, message", [
    ({"model": {"hiden_size": 64}}, "unknown config key 'model.hiden_size'; did you mean "
                                     "'hidden_size'"),
    ({"trian": {}}, "unknown config key 'trian'; did you mean 'train'"),
    ({"train": {"steps": "many"}}, "train.steps must be a int"),
    ({"train": {"steps": 0}}, "train.steps must be > 0"),
    ({"train": {"precision": "fp8"}}, "train.precision must be one of fp32, bf16, fp16"),
    ({"model": {"pattern": "MMAX"}}, "model.pattern 'MMAX' must have one symbol per layer"),
    ({"model": {"num_layers": 2}}, "model.num_layers = 2"),
    ({"mom": {"topk": 5}}, "mom: MoMConfig: topk (5) must be <= num_memories (4)"),
    ({"train": {"global_batch_size": 12}}, "must be a multiple of train.micro_batch_size"),
    ({"data": {"split": "90,10"}}, "data.split must be three comma-separated weights"),
    ({"parallel": {"tensor_model_parallel_size": 4}}, "num_heads (2) must be divisible"),
    ({"model": "big"}, "model must be a mapping"),
])
def test_config_errors_name_key_and_fix(data, message):
    with pytest.raises(ConfigError) as err:
        build_config(data)
    assert message in str(err.value)


def test_yaml_float_forms_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n")          # PyYAML reads 1e-3 as a string
    cfg = load_config(str(path), {"train.steps": 7, "mom.topk": 1})
    assert (cfg.train.lr, cfg.train.steps, cfg.mom_config().topk) == (1e-3, 7, 1)


def test_cli_reports_config_errors(tmp_path, capsys):
    from megatron_mom.cli.main import main
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"stepz": 3}}))
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml: unknown config key 'train.stepz'; did you mean 'steps'" in err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------- training
def _losses(metrics_path: Path) -> dict:
    return {r["step"]: r["loss"] for r in map(json.loads, metrics_path.read_text().splitlines())
            if "loss" in r}


@pytest.fixture(scope="module")
def straight_run(megatron_single, corpus, tmp_path_factory):
    from megatron_mom.train import train
    out = tmp_path_factory.mktemp("straight")
    result = train(build_config(overrides=tiny_overrides(out, corpus)), show_progress=False)
    return out, result


@pytest.mark.slow
def test_train_loss_falls_and_writes_outputs(straight_run):
    out, result = straight_run
    assert len(result.losses) == 8 and result.first_step == 1
    assert result.losses[0] > 5.0                       # ~ln(512): untrained byte model
    assert result.losses[-1] < result.losses[0] - 1.0, result.losses
    assert result.val_losses and result.val_losses[-1][1] < result.val_losses[0][1]
    assert (out / "loss.png").stat().st_size > 10_000
    assert (out / "checkpoints" / "latest").read_text().strip() == "iter_0000008"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "iter_0000004", "iter_0000008", "latest"]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "memory_load" in r]
    assert [r["step"] for r in logged] == [4, 8]
    load = logged[-1]["memory_load"]["1"]               # layer 1 is the MoM layer
    assert len(load) == 4 and abs(sum(load) - 1) < 1e-6
    assert 0 < logged[-1]["mom_aux"] < 0.05            # coeff 0.01 x ~1 at balance
    assert result.sample.startswith("Return the") and len(result.sample) > len("Return the")


@pytest.mark.slow
def test_resume_gives_bit_identical_losses(straight_run, corpus, tmp_path):
    from megatron_mom.train import train
    out, uninterrupted = straight_run
    cfg = build_config(overrides=tiny_overrides(tmp_path, corpus))
    first = train(cfg, stop_after=4, show_progress=False, sample=False)
    assert first.losses == uninterrupted.losses[:4]
    resumed = train(cfg, resume=True, show_progress=False, sample=False)
    assert resumed.first_step == 5
    assert resumed.losses == uninterrupted.losses[4:]    # exact float equality
    assert _losses(tmp_path / "metrics.jsonl") == _losses(out / "metrics.jsonl")


@pytest.mark.slow
def test_crash_during_save_keeps_previous_checkpoint(megatron_single, corpus, tmp_path,
                                                     monkeypatch):
    from megatron.core import dist_checkpointing
    from megatron_mom.train import train
    from megatron_mom.train.checkpoint import latest_checkpoint
    cfg = build_config(overrides=tiny_overrides(tmp_path, corpus))
    train(cfg, stop_after=4, show_progress=False, sample=False)
    real_save = dist_checkpointing.save

    def save_then_die(state, directory, **kwargs):
        real_save(state, directory, **kwargs)
        (Path(directory) / "half-written").write_bytes(b"\0" * 100)
        raise RuntimeError("simulated crash during the save of step 8")

    monkeypatch.setattr(dist_checkpointing, "save", save_then_die)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, resume=True, show_progress=False, sample=False)
    monkeypatch.setattr(dist_checkpointing, "save", real_save)
    root = tmp_path / "checkpoints"
    assert latest_checkpoint(root).name == "iter_0000004"
    assert (root / ".tmp_iter_0000008").is_dir()          # the interrupted save, never read
    resumed = train(cfg, resume=True, show_progress=False, sample=False)
    assert resumed.first_step == 5 and len(resumed.losses) == 4
    assert latest_checkpoint(root).name == "iter_0000008"
    assert not list(root.glob(".tmp_*"))                  # cleaned by the next good save


@pytest.mark.slow
def test_generate_from_checkpoint(straight_run):
    from megatron_mom.train.generate import generate_command
    out, _ = straight_run
    text = generate_command(str(out), "The quick", 24, 0.0, 0, seed=0)
    assert text.startswith("The quick") and len(text) > len("The quick") + 5
    again = generate_command(str(out / "checkpoints" / "iter_0000008"), "The quick", 24, 0.0,
                             0, seed=0)
    assert again == text                                   # greedy: deterministic
    recurrent = generate_command(str(out), "The quick", 24, 0.0, 0, seed=0,
                                 decode_mode="recurrent")
    assert recurrent == text                               # MoM states == full forwards
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        generate_command(str(out / "nowhere"), "x", 1, 0.0, 0, seed=0)


@pytest.mark.slow
def test_console_command_trains_on_bundled_corpus_and_generates(tmp_path):
    """The README path: the `megatron-mom` CLI in a fresh process, the shipped corpus."""
    overrides = tiny_overrides(tmp_path / "run", Path("unused"), **{"data.corpus": "bundled",
                                                                   "train.steps": 3})
    args = [sys.executable, "-m", "megatron_mom.cli.main", "train", "--no-progress"]
    args += [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.update(PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step     3/3 | loss" in done.stdout and "mom_aux" in done.stdout
    assert "--- sample (prompt 'Return the') ---" in done.stdout
    gen = subprocess.run([sys.executable, "-m", "megatron_mom.cli.main", "generate",
                          "--checkpoint", str(tmp_path / "run"), "--prompt", "Hello",
                          "--max-new-tokens", "8"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert gen.stdout.startswith("Hello")


def _torchrun_train(out: Path, *extra) -> subprocess.CompletedProcess:
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.update(PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    settings = {"model.num_layers": 2, "model.pattern": "MA", "model.hidden_size": 64,
                "model.ffn_hidden_size": 128, "model.seq_length": 64, "mom.head_dim": 16,
                "mom.chunk_size": 16, "train.micro_batch_size": 2, "train.global_batch_size": 4,
                "train.warmup_steps": 1, "train.eval_interval": 0, "train.save_interval": 2,
                "train.log_interval": 2, "data.corpus": "bundled"}
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "megatron_mom.cli.main", "train", "--no-progress",
            "--steps", "4", "--output-dir", str(out), *extra]
    args += [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_data_parallel_distributed_optimizer_resume_is_bit_identical(tmp_path):
    """Two gloo processes (DP=2) with Megatron's distributed optimizer: stop after 2 steps,
    resume, and the losses of steps 3-4 equal an uninterrupted run's (the optimizer-state
    traps of cpu_testing.md would make them drift)."""
    straight = _torchrun_train(tmp_path / "straight", "--distributed-optimizer")
    assert "DP=2" in straight.stdout
    _torchrun_train(tmp_path / "stopped", "--distributed-optimizer", "--stop-after", "2")
    resumed = _torchrun_train(tmp_path / "stopped", "--distributed-optimizer", "--resume")
    assert "resumed from" in resumed.stdout
    assert _losses(tmp_path / "stopped" / "metrics.jsonl") == \
        _losses(tmp_path / "straight" / "metrics.jsonl")
    assert len(_losses(tmp_path / "straight" / "metrics.jsonl")) == 4


@pytest.mark.slow
@pytest.mark.parametrize("layout, banner", [(("--tp", "2", "--sequence-parallel"), "TP=2 PP=1"),
                                            (("--pp", "2"), "TP=1 PP=2")])
def test_model_parallel_layouts_train(tmp_path, layout, banner):
    """Tensor (+ sequence) and pipeline parallelism through the CLI on two gloo processes."""
    done = _torchrun_train(tmp_path, *layout, "--set", "mom.num_heads=2")
    assert f"{banner} DP=1" in done.stdout
    losses = _losses(tmp_path / "metrics.jsonl")
    assert losses[4] < losses[1] - 0.3, losses
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    aux = [r["mom_aux"] for r in logged if "mom_aux" in r]
    assert aux and all(0.009 < a < 0.02 for a in aux), aux   # coeff 0.01 x ~1, not a share
