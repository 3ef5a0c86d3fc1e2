"""The real-text comparison runner at its CPU size: the corpus split, the same training
windows for every mixer, validation curves, the outputs. Checks the pipeline, not the
numbers."""
import json
import math

import pytest

from megatron_mom.apps import text_compare
from megatron_mom.train.config import ConfigError


def test_split_by_file_is_stable_and_about_the_fraction():
    names = [f"pkg/module_{i}.py" for i in range(4000)]
    val = [n for n in names if text_compare.is_validation(n, 0.05)]
    assert val == [n for n in names if text_compare.is_validation(n, 0.05)]
    assert 0.03 < len(val) / len(names) < 0.07


def test_settings_errors():
    with pytest.raises(ConfigError, match="unknown text_compare setting 'steps'"):
        text_compare.settings_for("cpu", {"steps": 3})
    with pytest.raises(ConfigError, match="unknown mixer 'rnn'"):
        text_compare.settings_for("cpu", {"mixers": ["rnn"]})
    with pytest.raises(ConfigError, match="eval_every must be >= 0"):
        text_compare.settings_for("cpu", {"eval_every": -1})
    with pytest.raises(ConfigError, match="sources must name some of stdlib, torch"):
        text_compare.settings_for("cpu", {"sources": ["web"]})
    with pytest.raises(ConfigError, match="fewer than min_train_tokens"):
        text_compare.load_corpus(text_compare.settings_for(
            "cpu", {"max_corpus_bytes": 50_000, "min_train_tokens": 1_000_000}))


def test_a_curve_has_about_ten_points_whatever_the_steps():
    auto = text_compare.settings_for("cpu", {"eval_every": 0})
    assert text_compare.eval_steps(auto, 78) == list(range(7, 78, 7)) + [78]
    assert text_compare.eval_steps(auto, 4) == [1, 2, 3, 4]
    assert text_compare.eval_steps(auto, 1000) == list(range(100, 1001, 100))
    fixed = text_compare.settings_for("cpu", {"eval_every": 3})
    assert text_compare.eval_steps(fixed, 10) == [3, 6, 9, 10]


@pytest.mark.slow
def test_cpu_preset_trains_every_mixer_on_the_same_windows(megatron_single, tmp_path):
    mixers = ["attention", "single", "mom"]
    agg = text_compare.run("cpu", str(tmp_path), {"mixers": mixers}, log=lambda *_: None)
    saved = json.loads((tmp_path / "results.json").read_text())
    s = text_compare.settings_for("cpu")
    assert saved["plan"]["files"]["val"] > 0 and saved["plan"]["val_bytes"] > s.seq_len
    runs = saved["runs"]
    assert sorted((r["mixer"], r["seed"]) for r in runs) == sorted(
        (m, seed) for m in mixers for seed in range(s.seeds))
    for seed in range(s.seeds):
        digests = {r["training_windows_sha256"] for r in runs if r["seed"] == seed}
        assert len(digests) == 1                        # the same data for every mixer
    for r in runs:
        assert [p["step"] for p in r["curve"]] == [2, 4]
        assert all(math.isfinite(p["val_loss"]) and p["val_loss"] > 0 for p in r["curve"])
    assert set(agg) == set(mixers) and all(e["final_val_loss"]["n"] == 2 for e in agg.values())
    assert (tmp_path / "text_lm.png").stat().st_size > 5_000
    assert "| mixer | parameters |" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_a_comparison_goes_on_in_its_folder(megatron_single, tmp_path):
    quiet = lambda *_: None  # noqa: E731
    one = {"mixers": ["single", "mom"], "seeds": 1, "train_steps": 2, "eval_every": 1}
    text_compare.run("cpu", str(tmp_path), one, log=quiet)
    first = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [(r["mixer"], r["seed"]) for r in first] == [("single", 0), ("mom", 0)]
    # A second seed and a third mixer: the finished runs are kept as they were, the rest added
    # with the saved step count (train_steps 0 does not refit it).
    text_compare.run("cpu", str(tmp_path), {**one, "mixers": ["single", "mom", "attention"],
                                            "seeds": 2, "train_steps": 0}, log=quiet)
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert runs[:2] == first
    assert sorted((r["mixer"], r["seed"]) for r in runs[2:]) == sorted(
        [("attention", 0), ("single", 1), ("mom", 1), ("attention", 1)])
    assert all(r["steps"] == 2 for r in runs)
    digests = {r["training_windows_sha256"] for r in runs if r["seed"] == 0}
    assert len(digests) == 1                            # the same windows as the first call's
    with pytest.raises(ConfigError, match=r"other settings: lr \(saved 0.001, now 0.002\)"):
        text_compare.run("cpu", str(tmp_path), {**one, "lr": 2e-3}, log=quiet)
    with pytest.raises(ConfigError, match=r"train_steps \(saved 2, now 3\)"):
        text_compare.run("cpu", str(tmp_path), {**one, "train_steps": 3}, log=quiet)


def test_the_budget_stops_before_a_run_that_would_not_fit():
    plan = {"steps": 100, "seconds_per_step": {"mom": 0.5, "single": 0.2}}
    assert text_compare.estimated_seconds("mom", [], plan) == pytest.approx(55.0)
    runs = [{"mixer": "mom", "seconds": 70.0}, {"mixer": "mom", "seconds": 64.0}]
    assert text_compare.estimated_seconds("mom", runs, plan) == 70.0
    assert text_compare.estimated_seconds("attention", runs, plan) is None
    with pytest.raises(ConfigError, match="budget_minutes must be >= 0"):
        text_compare.settings_for("cpu", {"budget_minutes": -1})
