"""examples/convert_official_mom.py, the runnable example of docs/convert.md: official-layout
weights -> MixtureOfMemories (strict load) -> back, bit for bit; per-rank files for TP=2."""
import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def example():
    spec = importlib.util.spec_from_file_location(
        "convert_official_mom", ROOT / "examples" / "convert_official_mom.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMALL = ["--num-heads", "2", "--head-dim", "16", "--hidden", "32", "--num-memories", "3"]


def test_demo_converts_into_a_layer_and_back(megatron_single, capsys):
    assert example().main(["--demo", *SMALL]) == 0
    assert "round trip exact" in capsys.readouterr().out


def test_converts_a_checkpoint_file_per_tp_rank(megatron_single, tmp_path):
    ex = example()
    from megatron_mom import MoMConfig
    mom = MoMConfig(num_memories=3, num_heads=2, head_dim=16)
    official = ex.random_official(mom, 32, "model.layers.5.attn.")
    official["model.layers.5.mlp.up_proj.weight"] = torch.zeros(1)  # other keys are left alone
    torch.save(official, tmp_path / "model.pt")
    out = tmp_path / "conv" / "layer5"
    assert ex.main(["--official", str(tmp_path / "model.pt"), "--prefix", "model.layers.5.attn.",
                    *SMALL[:4], "--num-memories", "3", "--tp", "2", "--out", str(out)]) == 0
    r0, r1 = (torch.load(f"{out}.tp{r}.pt") for r in (0, 1))
    assert r0["A_log"].shape == (1,) and torch.equal(
        torch.cat([r0["A_log"], r1["A_log"]]), official["model.layers.5.attn.A_log"])
    with pytest.raises(KeyError, match="missing"):  # a config that does not match the weights
        ex.main(["--official", str(tmp_path / "model.pt"), "--prefix", "model.layers.5.attn.",
                 *SMALL[:4], "--num-memories", "4"])
