"""examples/megatron-lm: the paper configs say what docs/mom_spec.md section 7 says, and args.sh
turns the knobs into the pretrain_gpt.py flags they name."""
import argparse
import math
import subprocess
from pathlib import Path

import pytest

from megatron_mom.integrations.megatron_lm.args import add_mom_args, mom_config_from_args

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "megatron-lm"
PAPER = {  # name: (hidden, MLP ratio, tokens, preset)
    "mom-380m": (1024, 3, 15e9, "mom"), "hybrid-380m": (1024, 3, 15e9, "hybrid"),
    "mom-1.3b": (2048, 4, 100e9, "mom"), "hybrid-1.3b": (2048, 4, 100e9, "hybrid"),
}


def bash(script, env=None):
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", **(env or {})})
    assert out.returncode == 0, out.stderr
    return out.stdout.split("\0")[:-1]


def parse(argv):
    p = argparse.ArgumentParser()
    for flag in ("num-layers", "hidden-size", "ffn-hidden-size", "seq-length", "train-iters",
                 "global-batch-size", "lr", "weight-decay", "clip-grad"):
        p.add_argument(f"--{flag}", type=float)
    p.add_argument("--spec", nargs=2)
    p.add_argument("--position-embedding-type")
    add_mom_args(p)
    args, _ = p.parse_known_args(argv)
    return args


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs(name):
    hidden, ratio, tokens, preset = PAPER[name]
    argv = bash(f'source {EXAMPLES}/configs/{name}.sh; printf "%s\\0" "${{MODEL_ARGS[@]}}" '
                f'"${{TRAIN_ARGS[@]}}"')
    a = parse(argv)
    assert a.spec == ["megatron_mom.integrations.megatron_lm.presets", preset]
    assert (a.num_layers, a.hidden_size, a.seq_length) == (24, hidden, 2048)
    assert a.ffn_hidden_size == math.ceil(hidden * ratio * 2 / 3 / 256) * 256  # SwiGLU ratio
    mom = mom_config_from_args(a)
    assert (mom.num_heads, mom.head_dim, mom.num_memories, mom.topk, mom.shared_memory) == (
        4, 256, 4, 2, True)
    assert (a.lr, a.weight_decay, a.clip_grad) == (3e-4, 0.01, 1.0)
    assert abs(a.train_iters * a.global_batch_size * 2048 - tokens) / tokens < 1e-3
    assert a.position_embedding_type == ("rope" if preset == "hybrid" else "none")
    assert "--swiglu" in argv and "--bf16" in argv


def test_args_sh_turns_knobs_into_flags(tmp_path):
    env = {"PRETRAIN": "/x/pretrain_gpt.py", "RUN_DIR": str(tmp_path / "run"), "TP": "2",
           "PP": "2", "VPP": "3", "CP": "2", "CONFIG": "hybrid-380m", "TRAIN_ITERS": "7",
           "DATA_PATH": "0.5 /d/a 0.5 /d/b"}
    argv = bash(f'source {EXAMPLES}/args.sh; printf "%s\\0" "$PRETRAIN" "${{ARGS[@]}}"', env)
    line = " ".join(argv)
    assert argv[0] == "/x/pretrain_gpt.py"
    for flags in ("--tensor-model-parallel-size 2", "--pipeline-model-parallel-size 2",
                  "--context-parallel-size 2", "--sequence-parallel",
                  "--num-layers-per-virtual-pipeline-stage 3", "--train-iters 7",
                  "--data-path 0.5 /d/a 0.5 /d/b", f"--save {tmp_path}/run/checkpoints",
                  f"--load {tmp_path}/run/checkpoints", "presets hybrid"):
        assert flags in line, flags
    assert (tmp_path / "run" / "logs").is_dir()
    env.update(TP="1", CONFIG="tiny")
    del env["DATA_PATH"]
    line = " ".join(bash(f'source {EXAMPLES}/args.sh; printf "%s\\0" "${{ARGS[@]}}"', env))
    assert "--sequence-parallel" not in line and "--mock-data" in line
    assert "--vocab-size 1024" in line


def test_args_sh_needs_megatron_lm_path():
    out = subprocess.run(["bash", "-c", f"source {EXAMPLES}/args.sh"], capture_output=True,
                         text=True, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode != 0 and "MEGATRON_LM_PATH" in out.stderr
