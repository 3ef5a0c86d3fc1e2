"""MQAR: the data generator's layout, and a tiny end-to-end run with its table and plot."""
import json

import pytest
import torch

from megatron_mom import mqar
from megatron_mom.train.config import ConfigError


def test_batch_layout_pairs_then_queries():
    gen = torch.Generator().manual_seed(0)
    L, N, V = 64, 6, 64
    inputs, labels = mqar.make_batch(16, L, N, V, 0.01, gen)
    assert inputs.shape == labels.shape == (16, L)
    for x, y in zip(inputs, labels):
        keys, values = x[0:2 * N:2], x[1:2 * N:2]
        assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
        assert len(set(keys.tolist())) == N and len(set(values.tolist())) == N
        answer = dict(zip(keys.tolist(), values.tolist()))
        query_pos = (y != -100).nonzero()[:, 0]
        assert len(query_pos) == N and (query_pos >= 2 * N).all() and (query_pos % 2 == 0).all()
        assert sorted(x[query_pos].tolist()) == sorted(keys.tolist())       # each key once
        assert all(answer[x[p].item()] == y[p].item() for p in query_pos)   # label = its value
        rest = torch.ones(L, dtype=torch.bool)
        rest[:2 * N] = False
        rest[query_pos] = False
        assert (x[rest] == 0).all()                                          # filler


def test_settings_errors():
    with pytest.raises(ConfigError, match="seq_len >= 4 \\* num_pairs"):
        mqar.settings_for("tiny", {"num_pairs": [16]})
    with pytest.raises(ConfigError, match="unknown MQAR setting 'stepz'"):
        mqar.settings_for("tiny", {"stepz": 3})
    with pytest.raises(ConfigError, match="unknown MQAR preset"):
        mqar.settings_for("huge")


def test_mixers_differ_only_in_the_mixer(megatron_single):
    s = mqar.settings_for("tiny")
    kinds = {}
    for mixer in mqar.MIXERS:
        model = mqar.build_model(mixer, s, torch.device("cpu"))
        layer = model.decoder.layers[0].self_attention
        kinds[mixer] = (type(layer).__name__, getattr(layer, "mom", None))
    assert kinds["attention"][0] == "SelfAttention"
    mom, single = kinds["mom"][1], kinds["single"][1]
    assert (mom.num_memories, mom.topk, mom.shared_memory) == (4, 2, True)
    assert (single.num_memories, single.topk, single.shared_memory) == (1, 1, False)
    assert (mom.num_heads, mom.head_dim) == (single.num_heads, single.head_dim)


@pytest.mark.slow
def test_tiny_mqar_run_writes_table_and_plot(megatron_single, tmp_path):
    results = mqar.run("tiny", str(tmp_path), overrides={"train_steps": 12,
                                                         "test_examples": 32},
                       log=lambda *_: None)
    assert list(results) == list(mqar.MIXERS)
    for entry in results.values():
        assert set(entry["accuracy"]) == {"32/2", "32/4", "32/8"}
        assert all(0.0 <= a <= 1.0 for a in entry["accuracy"].values())
        train = entry["train"]["32"]
        assert train["steps"] == 12
        assert train["final_loss"] < train["first_loss"]      # learns the value marginal
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[0].startswith("| mixer |") and "L=32 N=8" in table[0]
    assert [row.split("|")[1].strip() for row in table[2:]] == ["mom", "single", "attention"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["settings"]["train_steps"] == 12
    assert (tmp_path / "mqar.png").stat().st_size > 5_000
