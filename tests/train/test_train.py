"""The main job: config validation, training, bit-identical resume, atomic saves, sampling."""
import json
import os
import pickle
import random
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from megatron_mom.train.config import ConfigError, RunConfig, build_config, load_config

ROOT = Path(__file__).resolve().parents[2]
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
    ({"train": {"recompute": "core_attn"}}, "train.recompute must be one of none, selective, "
                                            "full"),
    ({"model": {"pattern": "MMAX"}}, "model.pattern 'MMAX' must have one symbol per layer"),
    ({"model": {"num_layers": 2}}, "model.num_layers = 2"),
    ({"mom": {"topk": 5}}, "mom: MoMConfig: topk (5) must be <= num_memories (4)"),
    ({"train": {"global_batch_size": 12}}, "must be a multiple of train.micro_batch_size"),
    ({"data": {"split": "90,10"}}, "data.split must be three comma-separated weights"),
    ({"parallel": {"tensor_model_parallel_size": 4}}, "num_heads (2) must be divisible"),
    ({"parallel": {"tensor_model_parallel_size": 2}, "model": {"num_attention_heads": 1,
                                                                "hidden_size": 63}},
     "model.num_attention_heads (1) must be divisible by parallel.tensor_model_parallel_size"),
    ({"parallel": {"tensor_model_parallel_size": 2}, "model": {"ffn_hidden_size": 129}},
     "model.ffn_hidden_size (129) must be divisible"),
    ({"parallel": {"tensor_model_parallel_size": 3}, "model": {"num_attention_heads": 3,
                                                                "hidden_size": 63,
                                                                "ffn_hidden_size": 129}},
     "the tokenizer's vocabulary (512) must be divisible"),
    ({"model": "big"}, "model must be a mapping"),
])
def test_config_errors_name_key_and_fix(data, message):
    with pytest.raises(ConfigError) as err:
        build_config(data)
    assert message in str(err.value)


def test_sequence_parallel_at_tp_1_splits_nothing():
    """As in Megatron-LM: --sequence-parallel without tensor parallelism is accepted and off."""
    from megatron_mom.train.build import transformer_config
    cfg = build_config({"parallel": {"sequence_parallel": True}})
    assert not transformer_config(cfg, on_cpu=True).sequence_parallel
    cfg = build_config({"parallel": {"sequence_parallel": True, "tensor_model_parallel_size": 2}})
    assert transformer_config(cfg, on_cpu=True).sequence_parallel


def test_yaml_float_forms_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n")          # PyYAML reads 1e-3 as a string
    cfg = load_config(str(path), {"train.steps": 7, "mom.topk": 1})
    assert (cfg.train.lr, cfg.train.steps, cfg.mom_config().topk) == (1e-3, 7, 1)


def test_cli_reports_config_errors(tmp_path, capsys):
    from megatron_mom.apps.cli.main import main
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
    with pytest.raises(ConfigError, match="stop_after"):
        train(cfg, stop_after=0, show_progress=False, sample=False)
    assert not tmp_path.joinpath("metrics.jsonl").exists()      # refused before anything
    first = train(cfg, stop_after=4, show_progress=False, sample=False)
    assert first.losses == uninterrupted.losses[:4]
    with open(tmp_path / "metrics.jsonl", "a") as f:             # killed while appending
        f.write('{"step": 5, "loss": 5.8')
    from megatron_mom.train.checkpoint import resume_config
    again = resume_config(None, {"output_dir": str(tmp_path)})   # `train --resume`, no --steps
    assert again == cfg                      # the saved config, train.steps 8 (not 300)
    resumed = train(again, resume=True, show_progress=False, sample=False)
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
    (root / ".tmp_latest.99999").write_text("iter_0000008\n")   # a pointer update cut short
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
    args = [sys.executable, "-m", "megatron_mom.apps.cli.main", "train", "--no-progress"]
    args += [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.update(PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step     3/3 | loss" in done.stdout and "mom_aux" in done.stdout
    assert "--- sample (prompt 'Return the') ---" in done.stdout
    gen = subprocess.run([sys.executable, "-m", "megatron_mom.apps.cli.main", "generate",
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
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "megatron_mom.apps.cli.main", "train", "--no-progress",
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
    _resume_in_one_process_names_the_launch(tmp_path, banner)
    losses = _losses(tmp_path / "metrics.jsonl")
    assert losses[4] < losses[1] - 0.3, losses
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    aux = [r["mom_aux"] for r in logged if "mom_aux" in r]
    assert aux and all(0.009 < a < 0.02 for a in aux), aux   # coeff 0.01 x ~1, not a share



def _resume_in_one_process_names_the_launch(out: Path, banner: str) -> None:
    """A TP=2 or PP=2 checkpoint resumed by a plain one-process command: refused before
    anything is built, with the launch that fits (and a layout change named as such)."""
    from megatron_mom.apps.cli.main import main
    tp_pp = banner.split()                                      # ["TP=2", "PP=1"]
    err = _cli_error(main, ["train", "--resume", "--output-dir", str(out)])
    assert f"saved with {' '.join(tp_pp)}, which 1 process(es) cannot hold" in err, err
    assert "torchrun --nproc-per-node 2 -m megatron_mom.apps.cli.main train --resume" in err, err
    err = _cli_error(main, ["train", "--resume", "--output-dir", str(out), "--tp", "1",
                            "--pp", "1"])
    key = "tensor" if tp_pp[0] == "TP=2" else "pipeline"
    assert f"parallel.{key}_model_parallel_size: checkpoint 2, this run 1" in err, err


def _cli_error(main, argv) -> str:
    """Run the CLI in this process; it must refuse (exit status 2) before building anything."""
    import io
    from contextlib import redirect_stderr
    stderr = io.StringIO()
    with redirect_stderr(stderr):
        status = main(argv)
    assert status == 2, stderr.getvalue()
    return stderr.getvalue()


def _tiny_cli_args(out: Path, corpus: Path, **extra) -> list:
    overrides = tiny_overrides(out, corpus, **extra)
    return ["--no-progress"] + [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]


# ------------------------------------------------------------------------- run directories
def test_cli_refuses_binary_yaml_and_unusable_output_dirs(tmp_path, corpus):
    from megatron_mom.apps.cli.main import main
    binary = tmp_path / "config.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    err = _cli_error(main, ["train", "--config", str(binary)])
    assert f"{binary}: not a YAML text file" in err, err
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    for out in (a_file, a_file / "run"):
        err = _cli_error(main, ["train", *_tiny_cli_args(out, corpus, **{"train.steps": 1})])
        assert f"output_dir {str(out)!r} cannot be created" in err, err
        assert "--output-dir" in err


@pytest.mark.slow
def test_new_run_into_an_existing_run_needs_resume_or_overwrite(straight_run, corpus, tmp_path):
    from megatron_mom.apps.cli.main import main
    from megatron_mom.train import train
    out = tmp_path / "run"
    shutil.copytree(straight_run[0], out)
    metrics = (out / "metrics.jsonl").read_text()
    args = _tiny_cli_args(out, corpus, **{"train.steps": 1, "train.eval_interval": 0})
    err = _cli_error(main, ["train", *args])
    assert f"output_dir {str(out)!r} already holds a run" in err, err
    assert "continue it with --resume, replace it with --overwrite" in err
    assert (out / "metrics.jsonl").read_text() == metrics             # nothing touched
    assert (out / "checkpoints" / "latest").read_text() == "iter_0000008\n"
    err = _cli_error(main, ["train", "--resume", "--overwrite", *args])
    assert "give one of them" in err
    cfg = build_config(overrides=tiny_overrides(out, corpus, **{"train.steps": 1,
                                                                "train.eval_interval": 0}))
    train(cfg, overwrite=True, show_progress=False, sample=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iter_0000001", "latest"]
    assert list(_losses(out / "metrics.jsonl")) == [1]


def _readme_train_commands() -> list:
    """(number of processes, CLI arguments) of every `train` command in the README."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    blocks = text.split("```")[1::2]                       # the fenced code blocks
    commands = []
    for line in (x for block in blocks if block.startswith("bash") for x in block.splitlines()):
        for part in line.split("#")[0].split("&&"):
            words = shlex.split(part)
            if "train" not in words or not words:
                continue
            if words[0].endswith("megatron-mom"):
                commands.append((1, words[1:]))
            elif "megatron_mom.apps.cli.main" in words:
                assert words[0] == ".venv/bin/torchrun", part      # the venv's, not the PATH's
                procs = int(words[words.index("--nproc-per-node") + 1])
                commands.append((procs, words[words.index("megatron_mom.apps.cli.main") + 1:]))
    return commands


def test_readme_train_commands_work_as_written(tmp_path, monkeypatch):
    """Each README `train` line gets through config validation and the batch layout of its
    process count, and no two new runs share an output directory (the second would be
    refused)."""
    from megatron_mom.apps.cli.main import main
    from megatron_mom.train import loop
    commands = _readme_train_commands()
    assert len(commands) == 4 and max(n for n, _ in commands) == 8
    monkeypatch.chdir(tmp_path)                  # no runs/ here: --resume finds no checkpoint
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    seen = []

    def check_layout(cfg, **kwargs):
        p = cfg.parallel
        tp_pp = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
        assert procs % tp_pp == 0
        loop._batch_layout(cfg, SimpleNamespace(dp=procs // tp_pp, dp_rank=0))
        seen.append((cfg.output_dir, kwargs["resume"]))
        return loop.TrainResult(output_dir=Path(cfg.output_dir), losses=[], first_step=1)

    monkeypatch.setattr(loop, "train", check_layout)
    for procs, argv in commands:
        assert main(argv) == 0, argv
    new_runs = [out for out, resume in seen if not resume]
    assert len(new_runs) == len(set(new_runs)), seen


@pytest.mark.slow
def test_torchrun_config_error_is_printed_once(tmp_path):
    """Every rank fails the same validation; only rank 0 prints it."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.update(PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m",
            "megatron_mom.apps.cli.main", "train", "--no-progress", "--output-dir",
            str(tmp_path / "run"), "--set", "train.global_batch_size=8"]   # micro 8 x DP 2
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0
    message = "megatron-mom train: error: train.global_batch_size (8) must be a multiple"
    assert done.stderr.count(message) == 1, done.stderr[-3000:]


# ------------------------------------------------------------------------- checkpoint trust
class _RunsCode:
    """Unpickling this creates the file `marker`: it stands for any code a pickle can run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.slow
def test_resume_never_runs_code_stored_in_a_checkpoint(megatron_single, corpus, tmp_path,
                                                       monkeypatch):
    """An object planted among the saved RNG states (read back from the shard files) is
    refused on resume, and its code never runs."""
    from megatron_mom.train import checkpoint, train
    marker = tmp_path / "code-ran"
    real_rng_state = checkpoint.rng_state
    monkeypatch.setattr(checkpoint, "rng_state",
                        lambda: {**real_rng_state(), "planted": _RunsCode(marker)})
    cfg = build_config(overrides=tiny_overrides(
        tmp_path / "run", corpus, **{"train.steps": 2, "train.save_interval": 2,
                                     "train.eval_interval": 0}))
    train(cfg, show_progress=False, sample=False)
    monkeypatch.setattr(checkpoint, "rng_state", real_rng_state)
    assert not marker.exists()
    with pytest.raises(Exception) as err:
        train(cfg, resume=True, show_progress=False, sample=False)
    assert not marker.exists(), "loading the checkpoint ran code"
    assert "refused to unpickle it" in str(err.value) and "rng" in str(err.value)


def _plant_in_metadata(folder: Path, planted) -> None:
    with open(folder / ".metadata", "rb") as f:
        metadata = pickle.load(f)           # our own file, written by the straight run
    metadata.planted = planted
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(metadata, f)


def _plant_in_common(folder: Path, planted) -> None:
    import torch
    common = torch.load(folder / "common.pt", weights_only=True)
    common["planted"] = planted
    torch.save(common, folder / "common.pt")


@pytest.mark.slow
@pytest.mark.parametrize("plant, refusal", [
    (_plant_in_metadata, "is not a checkpoint-metadata class"),
    (_plant_in_common, "refused to unpickle it")])
def test_loading_never_runs_code_from_checkpoint_files(straight_run, tmp_path, monkeypatch,
                                                       plant, refusal):
    """Pickled code in torch's `.metadata` (read with a plain pickle.load by torch) or in
    `common.pt` (even with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1) is refused, not run; the
    manifest is updated as an attacker would, so that the refusal is the unpickler's."""
    from megatron_mom.train.generate import generate_command
    folder = tmp_path / "iter_0000008"
    shutil.copytree(straight_run[0] / "checkpoints" / "iter_0000008", folder)
    marker = tmp_path / "code-ran"
    plant(folder, _RunsCode(marker))
    manifest = folder / "manifest.json"
    if manifest.exists():
        sizes = json.loads(manifest.read_text())
        sizes.update({name: (folder / name).stat().st_size for name in sizes})
        manifest.write_text(json.dumps(sizes))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(Exception) as err:
        generate_command(str(folder), "The", 2, 0.0, 0, seed=0)
    assert not marker.exists(), "loading the checkpoint ran code"
    assert refusal in str(err.value), str(err.value)[:2000]


def _truncate(folder: Path, name: str, keep_manifest: bool) -> None:
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])
    if not keep_manifest and (folder / "manifest.json").exists():
        sizes = json.loads((folder / "manifest.json").read_text())
        sizes[name] = len(data) // 2
        (folder / "manifest.json").write_text(json.dumps(sizes))


def _scramble(folder: Path, name: str) -> None:
    """Garbage of the file's own length: the size manifest cannot tell."""
    size = (folder / name).stat().st_size
    (folder / name).write_bytes(b"#" * size)


@pytest.mark.slow
@pytest.mark.parametrize("damage, message", [
    (lambda f: _truncate(f, "__0_0.distcp", True), "file __0_0.distcp has"),
    (lambda f: _truncate(f, "__0_0.distcp", False), "reading the checkpoint failed (EOFError"),
    (lambda f: _truncate(f, ".metadata", False), "pickle data was truncated"),
    (lambda f: _truncate(f, "common.pt", False), "common.pt is damaged or truncated"),
    (lambda f: (f / "manifest.json").unlink(), "has no manifest.json"),
    (lambda f: _scramble(f, "metadata.json"), "reading the checkpoint failed (JSONDecodeError"),
    (lambda f: (f / "config.yaml").write_bytes(bytes(range(256))),
     "config.yaml: not a YAML text file"),
    (lambda f: (f.parent / "latest").write_bytes(b"\xff\x00../x"), "not a checkpoint folder"),
])
def test_damaged_checkpoints_give_clear_errors(straight_run, tmp_path, damage, message):
    from megatron_mom.train.generate import generate_command
    run = tmp_path / "run"
    shutil.copytree(straight_run[0] / "checkpoints", run / "checkpoints")
    damage(run / "checkpoints" / "iter_0000008")
    with pytest.raises((ConfigError, RuntimeError)) as err:
        generate_command(str(run), "The", 2, 0.0, 0, seed=0)
    assert message in str(err.value), str(err.value)[:2000]
    assert type(err.value).__name__ in ("ConfigError", "CheckpointError")


@pytest.mark.slow
def test_resume_refuses_a_changed_configuration_naming_the_keys(straight_run, tmp_path):
    from megatron_mom.apps.cli.main import main
    out = tmp_path / "run"
    shutil.copytree(straight_run[0], out)
    metrics = (out / "metrics.jsonl").read_text()
    err = _cli_error(main, ["train", "--output-dir", str(out), "--resume", "--steps", "10",
                            "--set", "mom.shared_memory=false", "--set", "model.num_layers=1",
                            "--set", "model.pattern=M"])
    assert "mom.shared_memory: checkpoint True, this run False" in err, err
    assert "model.num_layers: checkpoint 2, this run 1" in err
    assert "model.pattern: checkpoint 'MA', this run 'M'" in err
    assert "train.steps" not in err.split("may change only")[0]      # steps may change
    assert (out / "metrics.jsonl").read_text() == metrics
    # Training-only keys may change; the saved train.steps stays unless given.
    from megatron_mom.train.checkpoint import check_resume, resume_config, saved_config
    found = out / "checkpoints" / "iter_0000008"
    longer = resume_config(None, {"output_dir": str(out), "train.steps": 12,
                                  "train.log_interval": 3, "mom.backend": "torch"})
    check_resume(found, longer, world_size=1)
    leaner = resume_config(None, {"output_dir": str(out), "mom.recompute_states": True,
                                  "mom.lean_backward": True})   # after an out-of-memory stop
    check_resume(found, leaner, world_size=1)
    config_file = tmp_path / "other.yaml"
    config_file.write_text(yaml.safe_dump(saved_config(found).to_dict()).replace(
        "steps: 8", "steps: 300"))
    assert resume_config(str(config_file), {"output_dir": str(out)}).train.steps == 8
    with pytest.raises(ConfigError, match="train.lr: checkpoint 0.005, this run 0.001"):
        check_resume(found, resume_config(None, {"output_dir": str(out), "train.lr": 1e-3}), 1)


@pytest.mark.slow
@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_activation_recompute_trains_the_same_steps(straight_run, corpus, tmp_path, recompute):
    """train.recompute (Megatron's activation recompute) reruns activations in the backward and
    changes nothing else: the first three steps' losses equal the plain run's bit for bit (the
    plain run's schedule kept with stop_after), and a run may resume with another setting."""
    from megatron_mom.train import train
    from megatron_mom.train.checkpoint import check_resume, resume_config
    out = tmp_path / "run"
    result = train(build_config(overrides=tiny_overrides(out, corpus, **{
        "train.recompute": recompute})), stop_after=3, show_progress=False)
    assert result.losses == straight_run[1].losses[:3]
    found = straight_run[0] / "checkpoints" / "iter_0000008"
    check_resume(found, resume_config(None, {"output_dir": str(straight_run[0]),
                                             "train.recompute": recompute}), world_size=1)


# ------------------------------------------------------------------------- fault injection
def _fault_run(out: Path, settings: dict, kill_at: int, *flags) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    args = [sys.executable, str(ROOT / "tests" / "train" / "checkpoint_fault_run.py"),
            json.dumps({**settings, "output_dir": str(out)}), str(kill_at), *flags]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=600,
                          start_new_session=True)     # its own process group, for the kill


@pytest.mark.slow
def test_runs_killed_during_saves_resume_bit_identically(corpus, tmp_path):
    """SIGKILL at seeded random file-system calls inside saves (tests/train/checkpoint_fault_run.py),
    three times in a row on one run directory, each time continuing with --resume (or
    --overwrite when no checkpoint was complete yet); the losses of all steps then equal an
    uninterrupted run's, float for float, and no temporary file is left."""
    from megatron_mom.train.checkpoint import latest_checkpoint
    settings = tiny_overrides(tmp_path, corpus, **{"train.steps": 6, "train.save_interval": 2,
                                                   "train.log_interval": 2,
                                                   "train.eval_interval": 0})
    reference = _fault_run(tmp_path / "reference", settings, -1)
    assert reference.returncode == 0, reference.stderr[-3000:]
    calls = json.loads(reference.stdout.strip().splitlines()[-1])["save_calls"]
    assert sorted(calls) == ["2", "4", "6"] and min(calls.values()) > 10, calls
    out, rng, flags, kills = tmp_path / "killed", random.Random(2024), [], []
    for _ in range(3):
        found = latest_checkpoint(out / "checkpoints") if out.exists() else None
        next_save = str((int(found.name[5:]) if found else 0) + 2)
        if next_save not in calls:
            break                                   # killed after its last save was complete
        kill_at = rng.randrange(calls[next_save])   # inside this run's first save
        done = _fault_run(out, settings, kill_at, *flags)
        assert done.returncode == -9, done.stderr[-3000:]
        kills.append((next_save, kill_at))
        resumable = latest_checkpoint(out / "checkpoints") is not None
        flags = ["--resume"] if resumable else ["--overwrite"]
    assert len(kills) >= 2, kills
    done = _fault_run(out, settings, -1, *flags)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _losses(out / "metrics.jsonl") == _losses(tmp_path / "reference" / "metrics.jsonl"), \
        kills
    assert len(_losses(out / "metrics.jsonl")) == 6
    assert latest_checkpoint(out / "checkpoints").name == "iter_0000006"
    assert not list((out / "checkpoints").glob(".tmp_*")), kills


def test_triton_backend_without_a_gpu_is_refused_with_the_fix(corpus, tmp_path, monkeypatch):
    """mom.backend=triton on a machine without a GPU (and without Triton's interpreter) is a
    one-line config error, not Triton's driver error from the first forward."""
    from megatron_mom.apps.cli.main import main
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the triton backend runs")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    argv = ["train", "--no-progress"]
    for key, val in tiny_overrides(tmp_path / "run", corpus, **{"mom.backend": "triton"}).items():
        argv += ["--set", f"{key}={val}"]
    err = _cli_error(main, argv)
    assert "mom.backend 'triton' runs the kernels on a GPU" in err and "TRITON_INTERPRET=1" in err


@pytest.mark.slow
def test_tokens_per_s_counts_training_time_only(corpus, tmp_path, monkeypatch):
    """On a fake clock (1 s a step, 10 s a save, 5 s a validation) every logged rate is the
    training rate, whatever falls between the log lines."""
    from types import SimpleNamespace
    from megatron_mom.train import loop
    clock = [0.0]
    monkeypatch.setattr(loop, "time", SimpleNamespace(time=lambda: clock[0]))

    def costs(seconds, fn):
        def timed(*args, **kwargs):
            out = fn(*args, **kwargs)
            clock[0] += seconds
            return out
        return timed
    monkeypatch.setattr(loop, "train_step", costs(1.0, loop.train_step))
    monkeypatch.setattr(loop.checkpoint, "save_checkpoint",
                        costs(10.0, loop.checkpoint.save_checkpoint))
    monkeypatch.setattr(loop, "evaluate", costs(5.0, loop.evaluate))
    cfg = build_config(overrides=tiny_overrides(
        tmp_path, corpus, **{"train.steps": 6, "train.log_interval": 3, "train.save_interval": 2,
                             "train.eval_interval": 2, "train.keep_checkpoints": 1}))
    loop.train(cfg, show_progress=False, sample=False)
    rates = [r["tokens_per_s"] for r in map(json.loads, (tmp_path / "metrics.jsonl").open())
             if "tokens_per_s" in r]
    assert rates == [4 * 64 / 1.0] * 2       # global batch 4 x 64 tokens a second


@pytest.mark.slow
def test_fp16_skipped_updates_do_not_advance_the_schedule(corpus, tmp_path):
    """fp16's loss scaler starts at 2^32 and skips the first updates (overflow); as in
    Megatron-LM the learning rate stays where it was until an update happens, and the log
    counts the skipped ones."""
    from megatron_mom.train import train
    cfg = build_config(overrides=tiny_overrides(
        tmp_path, corpus, **{"train.steps": 20, "train.warmup_steps": 4, "train.log_interval": 1,
                             "train.eval_interval": 0, "train.save_interval": 0,
                             "train.precision": "fp16"}))
    train(cfg, show_progress=False, sample=False)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if "lr" in r]              # the next step's lr, per step
    skipped = [r["skipped_updates"] for r in records if "skipped_updates" in r]
    assert len(lrs) == len(skipped) == 20 and set(skipped) <= {0, 1}
    first = skipped.index(0)                                   # the first real update
    assert first > 0, "the loss scaler skipped nothing: the test shows nothing"
    assert lrs[:first] == [0.0] * first                        # warm-up not spent on skips
    assert lrs[first] == pytest.approx(cfg.train.lr / 4)       # its first warm-up step


def test_corpus_bytes_that_are_special_ids_are_left_out(tmp_path, capsys):
    """Bytes 0x00 and 0x01 would tokenize to the end-of-document and padding ids (GPTDataset
    masks the padding id out of the loss): they are left out, and the build says so."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron_mom.train.data import build_indexed_dataset
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": t}) for t in ["a\x01b\x00c", "plain"]))
    prefix = build_indexed_dataset(str(corpus), tmp_path / "data")
    docs = [list(map(int, doc)) for doc in IndexedDataset(prefix)]
    assert docs == [[97, 98, 99, 0], [112, 108, 97, 105, 110, 0]]    # bytes, then eod
    assert "left out 2 NUL (0x00) / SOH (0x01) bytes of c.jsonl" in capsys.readouterr().out
