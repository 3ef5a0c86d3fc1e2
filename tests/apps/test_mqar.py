"""MQAR: the data generator's layout, and a tiny end-to-end run with its table and plot."""
import dataclasses
import json
import math
import os

import pytest
import torch

from megatron_mom.apps import mqar
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


# ------------------------------------------------------------------ the Zoology-style sweep
from megatron_mom.apps import mqar_sweep  # noqa: E402


def test_mixer_variants(megatron_single):
    """Every sweep mixer builds; single-state holds MoM's total state in one memory,
    single-params the parameter count closest to MoM's, hybrid ends in attention; the layer
    parameter formula matches the built layers."""
    s = mqar_sweep.model_settings(mqar_sweep.settings_for("zoology-cpu"), width=32)
    layers, patterns = {}, {}
    for mixer in mqar.ALL_MIXERS:
        model = mqar.build_model(mixer, s, torch.device("cpu"))
        layers[mixer] = [layer.self_attention for layer in model.decoder.layers]
        patterns[mixer], _ = mqar.mixer_pattern_and_mom(mixer, s)
    mom = {m: layers[m][0].mom for m in layers if patterns[m][0] == "M"}
    for mixer, m in mom.items():
        built = sum(p.numel() for p in layers[mixer][0].parameters())
        assert built == mqar.mom_layer_parameters(m, s.hidden_size), mixer
    assert patterns["hybrid"] == "MA" and type(layers["hybrid"][1]).__name__ == "SelfAttention"
    assert (mom["mom-noshared"].num_memories, mom["mom-noshared"].shared_memory) == (4, False)
    state = lambda m: m.num_memory_weights * m.num_heads * m.key_dim * m.value_dim
    assert state(mom["single-state"]) == state(mom["mom"]) == 5 * state(mom["single"])
    target = mqar.mom_layer_parameters(mom["mom"], s.hidden_size)
    gap = lambda h: abs(mqar.mom_layer_parameters(mom["single"].replace(num_heads=h),
                                                  s.hidden_size) - target)
    h = mom["single-params"].num_heads
    assert h > mom["single"].num_heads and gap(h) <= min(gap(h - 1), gap(h + 1))
    assert gap(h) < 0.1 * target


def test_sweep_settings_errors():
    with pytest.raises(ConfigError, match="unknown MQAR sweep setting 'lr'"):
        mqar_sweep.settings_for("zoology", {"lr": 1e-3})
    with pytest.raises(ConfigError, match="unknown mixer 'rnn'"):
        mqar_sweep.settings_for("zoology", {"mixers": ["mom", "rnn"]})
    with pytest.raises(ConfigError, match="tokens_per_step 256 must hold"):
        mqar_sweep.settings_for("zoology", {"tokens_per_step": 256})
    with pytest.raises(ConfigError, match="width 65 is not a multiple of num_heads 2"):
        mqar_sweep.settings_for("zoology", {"widths": [64, 65]})
    with pytest.raises(ConfigError, match="hybrid mixer needs num_layers >= 2"):
        mqar_sweep.settings_for("zoology", {"num_layers": 1})
    with pytest.raises(ConfigError, match="train_steps 0 fits the steps to budget_minutes"):
        mqar_sweep.settings_for("zoology", {"budget_minutes": 0})
    with pytest.raises(ConfigError, match="timing_seconds must be > 0"):
        mqar_sweep.settings_for("zoology", {"timing_seconds": 0})
    s = mqar_sweep.settings_for("zoology", {"widths": 128, "lrs": [0.001, "3e-3"]})
    assert s.widths == [128] and s.lrs == [1e-3, 3e-3]
    assert [mqar_sweep.test_pairs(L, s) for L in s.seq_lens] == [16, 32, 64, 64]
    assert mqar_sweep.train_pairs(512, s) == [16, 32, 64]


def test_training_batches_mask_held_out_rows():
    """A training row equal to a held-out sequence contributes no labels; others keep all."""
    s = mqar_sweep.settings_for("zoology-cpu")
    step = 1
    gen = lambda: torch.Generator().manual_seed(3)
    pick = lambda: torch.Generator().manual_seed(4)
    none = torch.zeros(0, dtype=torch.long)
    x, y, masked = mqar_sweep.training_batch(s, step, gen(), pick(), none, "cpu")
    assert int(masked) == 0 and (y != -100).sum(1).min() > 0
    held_out = mqar_sweep.row_hashes(x[::2])           # every other row is "held out"
    x2, y2, masked2 = mqar_sweep.training_batch(s, step, gen(), pick(), held_out, "cpu")
    assert torch.equal(x, x2) and int(masked2) == (x.shape[0] + 1) // 2
    assert (y2[::2] == -100).all() and torch.equal(y2[1::2], y[1::2])
    sets = mqar_sweep.held_out_sets(s, "cpu")
    for L in s.seq_lens:                                  # val and test differ
        assert not torch.isin(mqar_sweep.row_hashes(sets["test"][L][0]),
                              mqar_sweep.row_hashes(sets["val"][L][0])).any()


def test_fit_steps_to_budget():
    s = mqar_sweep.settings_for("zoology", {"min_steps": 10, "max_steps": 5000})
    timing = {"a": {"seconds_per_step": 0.01, "overhead_seconds": 2.0},
              "b": {"seconds_per_step": 0.03, "overhead_seconds": 4.0}}
    runs = {"a": 10, "b": 10}
    # 0.8 * 100 s * 4 workers = 320 s; minus 60 s fixed; 0.4 s per step of all runs.
    assert mqar_sweep.fit_steps(s, timing, runs, 4, 100.0) == 650
    assert mqar_sweep.fit_steps(s, timing, runs, 4, 10.0) == 10          # the floor
    assert mqar_sweep.fit_steps(s, timing, runs, 400, 1000.0) == 5000    # the ceiling


class _WaveRecorder:
    """A runner that records what the timing submits and answers each job at once."""

    def __init__(self):
        self.submitted, self.barriers = [], []

    def barrier(self, parties):
        self.barriers.append(object())
        self.parties = parties
        return self.barriers[-1]

    def submit(self, job, barrier=None):
        self.submitted.append((job, barrier))

    def results(self, until):
        for i, (job, _) in enumerate(self.submitted):
            yield {"job": job.__dict__, "seconds_per_step": 0.01 * (i + 1),
                   "overhead_seconds": 1.0, "met_others": True}


def test_timing_runs_in_waves_that_share_a_barrier():
    """7 mixers over 3 workers: 3 waves of 3 jobs, each wave's jobs sharing its own barrier
    of 3, every mixer timed at least once, at the largest width."""
    s = mqar_sweep.settings_for("zoology")
    runner = _WaveRecorder()
    timing = mqar_sweep._timing(runner, s, 3, 0.0, lambda *_: None)
    assert len(runner.submitted) == 9 and runner.parties == 3 and len(runner.barriers) == 3
    for w in range(3):
        assert {id(b) for _, b in runner.submitted[3 * w:3 * w + 3]} == {id(runner.barriers[w])}
    assert set(timing) == set(s.mixers) and all(t["together"] for t in timing.values())
    assert {job.width for job, _ in runner.submitted} == {max(s.widths)}
    # attention was timed twice (jobs 0 and 7): its step time is their mean
    assert timing["attention"]["seconds_per_step"] == pytest.approx((0.01 + 0.08) / 2)


def test_a_timing_job_alone_at_its_barrier_goes_on_at_the_limit():
    import threading
    import time
    assert mqar_sweep._meet(None, 0.0) is None
    start = time.time()
    assert mqar_sweep._meet(threading.Barrier(2), time.time() + 0.2) is False
    assert 0.15 < time.time() - start < 5.0


def _check_sweep(agg, saved, s):
    runs = [r for r in saved["runs"] if r["job"]["kind"] != "time"]
    assert not [r for r in runs if "error" in r or "skipped" in r]
    for mixer in s.mixers:                       # every mixer trained at every width and lr
        for width in s.widths:
            group = [r for r in runs if (r["job"]["mixer"], r["job"]["width"]) == (mixer, width)]
            sweep = {r["job"]["lr"]: r for r in group if r["job"]["kind"] == "lr"}
            assert sorted(sweep) == sorted(s.lrs)
            assert all(r["job"]["seed"] == 0 for r in sweep.values())
            entry = agg[mixer][str(width)]
            best = entry["best_lr"]                  # chosen on validation, not test
            val = lambda r: sum(r["val"].values())
            assert val(sweep[best]) == max(val(r) for r in sweep.values())
            seeds = [r for r in group if r["job"]["kind"] == "seed"]
            assert sorted(r["job"]["seed"] for r in seeds) == list(range(1, s.seeds))
            assert all(r["job"]["lr"] == best for r in seeds)
            for r in group:
                assert r["steps"] == saved["plan"]["steps"] and not r["cut"]
                assert math.isfinite(r["first_loss"]) and math.isfinite(r["final_loss"])
                for L in s.seq_lens:                 # every query answer of the test set
                    N = mqar_sweep.test_pairs(L, s)
                    assert r["test_answers"][str(L)] == s.test_examples * N
                    assert 0.0 <= r["test"][str(L)] <= 1.0
            for L in s.seq_lens:
                t = entry["test"][str(L)]
                accs = [r["test"][str(L)] for r in group if r["job"]["lr"] == best]
                assert t["n"] == s.seeds == len(accs)
                assert t["mean"] == pytest.approx(sum(accs) / len(accs))


@pytest.mark.slow
def test_zoology_cpu_sweep_in_process(megatron_single, tmp_path):
    s = mqar_sweep.settings_for("zoology-cpu")
    agg = mqar_sweep.run("zoology-cpu", str(tmp_path), log=lambda *_: None)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["plan"]["steps"] == s.train_steps and saved["plan"]["workers"] == 1
    _check_sweep(agg, saved, s)
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {m} | 32 |" in table for m in mqar_sweep.SWEEP_MIXERS)
    assert (tmp_path / "mqar_zoology.png").stat().st_size > 5_000


@pytest.mark.slow
def test_zoology_sweep_workers_and_budget(tmp_path):
    """The GPU path on the CPU: worker processes, the steps fitted to a budget from a timing
    of each mixer with both workers stepping at once, then the seeds at the best learning
    rate."""
    overrides = {"mixers": ["attention", "mom"], "widths": [32], "lrs": [1e-3, 1e-2],
                 "train_steps": 0, "budget_minutes": 2.0, "min_steps": 2, "max_steps": 3,
                 "workers": 2, "timing_seconds": 1.0}
    agg = mqar_sweep.run("zoology-cpu", str(tmp_path), overrides=overrides,
                         log=lambda *_: None)
    saved = json.loads((tmp_path / "results.json").read_text())
    s = mqar_sweep.settings_for("zoology-cpu", overrides)
    assert saved["plan"]["steps"] == 3 and saved["plan"]["workers"] == 2
    assert set(saved["plan"]["timing"]) == {"attention", "mom"}
    # both timing jobs met at their wave's barrier before timing: steps timed side by side
    assert all(t["together"] is True for t in saved["plan"]["timing"].values()), \
        saved["plan"]["timing"]
    assert os.getpid() not in {r["pid"] for r in saved["runs"]}   # ran in the workers
    _check_sweep(agg, saved, s)


def test_zoology_sweep_goes_on_from_its_finished_runs(megatron_single, tmp_path):
    """A sweep run again into its folder trains only what is missing (runs lost to a budget
    or removed here), keeps the finished ones as they were, and refuses other settings."""
    overrides = {"mixers": ["single", "mom"], "widths": [32], "lrs": [1e-3, 1e-2], "seeds": 2}
    mqar_sweep.run("zoology-cpu", str(tmp_path), overrides=overrides, log=lambda *_: None)
    first = json.loads((tmp_path / "results.json").read_text())
    assert len(first["runs"]) == 2 * (2 + 1)
    # Lose the mom runs, as a budget would; the single-memory runs stay finished.
    kept = [r for r in first["runs"] if r["job"]["mixer"] == "single"]
    (tmp_path / "results.json").write_text(json.dumps({**first, "runs": kept}))
    mqar_sweep.run("zoology-cpu", str(tmp_path), overrides={**overrides, "budget_minutes": 5.0},
                   log=lambda *_: None)
    second = json.loads((tmp_path / "results.json").read_text())
    assert second["plan"]["resumed_runs"] == len(kept) == 3
    assert second["runs"][:3] == kept                  # untouched, not retrained
    mom = [r for r in second["runs"] if r["job"]["mixer"] == "mom"]
    assert len(mom) == 3 and all("test" in r for r in mom)
    # A call for a part of the sweep (one mixer) keeps the other parts' runs and adds none.
    mqar_sweep.run("zoology-cpu", str(tmp_path), overrides={**overrides, "mixers": ["single"]},
                   log=lambda *_: None)
    third = json.loads((tmp_path / "results.json").read_text())
    assert third["runs"] == second["runs"] and third["plan"]["resumed_runs"] == 6
    with pytest.raises(ConfigError, match="other settings .*seeds differ"):
        mqar_sweep.run("zoology-cpu", str(tmp_path), overrides={**overrides, "seeds": 3},
                       log=lambda *_: None)
    with pytest.raises(ConfigError, match="trained 4 steps, not train_steps=5"):
        mqar_sweep.run("zoology-cpu", str(tmp_path), overrides={**overrides, "train_steps": 5},
                       log=lambda *_: None)


def _lr_run(lr, val, loss=1.0):
    return {"job": {"kind": "lr", "lr": lr}, "val": {"64": val}, "final_loss": loss}


def test_next_lr_goes_past_an_edge_where_the_best_rate_is():
    s = mqar_sweep.settings_for("zoology", {"edge_lrs": 1})          # lrs 1e-4, 3e-4, 1e-3
    low = [_lr_run(1e-4, 0.4), _lr_run(3e-4, 0.1), _lr_run(1e-3, 0.0)]
    high = [_lr_run(1e-4, 0.0), _lr_run(3e-4, 0.1), _lr_run(1e-3, 0.9)]
    inside = [_lr_run(1e-4, 0.0), _lr_run(3e-4, 0.5), _lr_run(1e-3, 0.2)]
    assert mqar_sweep.next_lr(s, low) == pytest.approx(3.33e-5)
    assert mqar_sweep.next_lr(s, high) == pytest.approx(3.33e-3)
    assert mqar_sweep.next_lr(s, inside) is None
    # One rate past the edge already tried: edge_lrs=1 stops there even if it is best again.
    assert mqar_sweep.next_lr(s, low + [_lr_run(3.33e-5, 0.6)]) is None
    assert mqar_sweep.next_lr(dataclasses.replace(s, edge_lrs=2),
                              low + [_lr_run(3.33e-5, 0.6)]) == pytest.approx(1.11e-5)
    assert mqar_sweep.next_lr(mqar_sweep.settings_for("zoology"), low) is None   # off
    # Unfinished runs (no validation) do not count as tried.
    assert mqar_sweep.next_lr(s, [_lr_run(1e-4, 0.4), {"job": {"kind": "lr", "lr": 3e-4}}]) \
        is None


@pytest.mark.slow
def test_zoology_sweep_tries_past_the_edge_then_seeds_the_best(megatron_single, tmp_path):
    """With two rates the best is always at an edge: every (mixer, width) gets a third rate
    past it before its seeds, which run at the best of all three; a sweep continued with
    edge_lrs (it only adds runs) keeps the runs made without it."""
    overrides = {"mixers": ["single", "attention"], "widths": [32], "lrs": [1e-3, 1e-2],
                 "seeds": 2}
    mqar_sweep.run("zoology-cpu", str(tmp_path), overrides=overrides, log=lambda *_: None)
    first = json.loads((tmp_path / "results.json").read_text())["runs"]
    agg = mqar_sweep.run("zoology-cpu", str(tmp_path),
                         overrides={**overrides, "edge_lrs": 1}, log=lambda *_: None)
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert runs[:len(first)] == first
    for mixer in overrides["mixers"]:
        group = [r for r in runs if r["job"]["mixer"] == mixer]
        first_lrs = [r for r in group[:3] if r["job"]["kind"] == "lr"]
        extra = mqar_sweep.next_lr(mqar_sweep.settings_for("zoology-cpu", {**overrides,
                                                                           "edge_lrs": 1}),
                                   first_lrs)
        lrs = sorted(r["job"]["lr"] for r in group if r["job"]["kind"] == "lr")
        assert lrs == sorted([1e-3, 1e-2, extra]) and extra in (1e-4, 0.1)
        best = agg[mixer]["32"]["best_lr"]
        assert best == mqar_sweep.best_lr([r for r in group if r["job"]["kind"] == "lr"])
        assert {r["job"]["seed"] for r in group if r["job"]["lr"] == best} == {0, 1}
    table = (tmp_path / "results.md").read_text()
    assert "lr 0.0001" in table or "lr 0.1" in table


def test_mps_running_looks_for_the_control_pipe(tmp_path, monkeypatch):
    """The sweep's MPS note reads the daemon's control pipe where CUDA would look for it."""
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    assert not mqar_sweep.mps_running()
    os.mkfifo(tmp_path / "control")
    assert mqar_sweep.mps_running()


def test_answer_logits_are_the_full_logits_at_the_answers(megatron_single):
    """The output layer run at the labelled positions only gives the full logits' rows there,
    and the training loss and every gradient of the full-logits loss."""
    s = mqar_sweep.settings_for("zoology-cpu")
    ms = mqar_sweep.model_settings(s, width=32)
    torch.manual_seed(0)
    model = mqar.build_model("mom", ms, torch.device("cpu"))
    gen = torch.Generator().manual_seed(3)
    inputs, labels = mqar.make_batch(4, 32, 6, s.vocab_size, s.power_a, gen)
    full = mqar._logits(model, inputs)                                      # [b, L, V]
    loss_full = torch.nn.functional.cross_entropy(full.reshape(-1, full.shape[-1]),
                                                  labels.reshape(-1), ignore_index=-100)
    grads_full = torch.autograd.grad(loss_full, list(model.parameters()), allow_unused=True)
    logits, answers = mqar._answer_logits(model, inputs, labels)
    assert model.post_process                                               # restored
    keep = (labels != -100).t()
    assert logits.shape == (int(keep.sum()), s.vocab_size)
    torch.testing.assert_close(logits, full.transpose(0, 1)[keep], rtol=1e-5, atol=1e-6)
    assert torch.equal(answers, labels.t()[keep])
    loss = torch.nn.functional.cross_entropy(logits, answers)
    torch.testing.assert_close(loss, loss_full, rtol=1e-6, atol=0)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    for (name, _), g, g_full in zip(model.named_parameters(), grads, grads_full):
        if g_full is None:
            assert g is None, name
        else:
            torch.testing.assert_close(g, g_full, rtol=1e-4, atol=1e-7, msg=name)


def test_padded_answer_rows_equal_the_exact_ones(megatron_single):
    """With max_answers the step computes a fixed number of answer rows (no data-dependent
    shape, so it can be captured in a CUDA graph): the labelled rows first, equal to the exact
    path's, then padding labelled -100; the loss and every gradient equal the exact path's."""
    s = mqar_sweep.settings_for("zoology-cpu")
    ms = mqar_sweep.model_settings(s, width=32)
    torch.manual_seed(0)
    model = mqar.build_model("single", ms, torch.device("cpu"))
    gen = torch.Generator().manual_seed(5)
    inputs, labels = mqar.make_batch(4, 32, 5, s.vocab_size, s.power_a, gen)
    labels[1] = -100                                    # a row masked out (held-out duplicate)
    exact, answers = mqar._answer_logits(model, inputs, labels)
    n = answers.numel()
    assert n == 3 * 5
    padded, targets = mqar._answer_logits(model, inputs, labels, max_answers=4 * 8)
    assert padded.shape == (32, s.vocab_size) and targets.shape == (32,)
    torch.testing.assert_close(padded[:n], exact, rtol=0, atol=0)
    assert torch.equal(targets[:n], answers) and (targets[n:] == -100).all()
    F = torch.nn.functional
    loss, loss_exact = F.cross_entropy(padded, targets), F.cross_entropy(exact, answers)
    torch.testing.assert_close(loss, loss_exact, rtol=1e-6, atol=0)
    params = list(model.parameters())
    for g, g_exact in zip(torch.autograd.grad(loss, params, allow_unused=True),
                          torch.autograd.grad(loss_exact, params, allow_unused=True)):
        if g_exact is None:
            assert g is None
        else:
            torch.testing.assert_close(g, g_exact, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="max_answers 14 is below the batch's 15 labelled"):
        mqar._answer_logits(model, inputs, labels, max_answers=14)


def test_sweep_max_answers_bounds_every_training_batch():
    s = mqar_sweep.settings_for("zoology-cpu")
    gen, pick = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    for step in range(12):
        x, y, _ = mqar_sweep.training_batch(s, step, gen, pick, torch.zeros(0, dtype=torch.long),
                                            "cpu")
        bound = mqar_sweep.max_answers(x.shape[1], s)
        assert int((y != -100).sum()) <= bound
    # the bound is reached: full batches at the largest N of a length
    assert mqar_sweep.max_answers(32, s) == (s.tokens_per_step // 32) * 8


def test_train_step_on_the_cpu_is_the_eager_step(megatron_single):
    """TrainStep without a GPU (or with graphs off) is _train_batch at the given rate: same
    losses and weights as the loop that sets the rate itself."""
    s = mqar_sweep.settings_for("zoology-cpu")
    ms = mqar_sweep.model_settings(s, width=32)
    models, opts = [], []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(mqar.build_model("mom", ms, torch.device("cpu")))
        opts.append(torch.optim.AdamW(models[-1].parameters(), lr=1e-3))
    step = mqar.TrainStep(models[0], opts[0], graphs=True)
    assert not step.graphs
    gen = torch.Generator().manual_seed(2)
    for i, lr in enumerate((1e-3, 5e-4, 2e-3)):
        x, y = mqar.make_batch(4, 32, 4 + i, s.vocab_size, s.power_a, gen)
        loss = step(x, y, lr, max_answers=4 * 8)
        for group in opts[1].param_groups:
            group["lr"] = lr
        loss_ref = mqar._train_batch(models[1], opts[1], x, y)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=0)
        assert opts[0].param_groups[0]["lr"] == lr
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_adamw_spares_1d_parameters_as_megatron_does(megatron_single):
    """No weight decay on 1-D parameters (norm gains, A_log, dt_bias) and biases, decay on the
    rest: with zero gradients a step leaves the former as they are and shrinks the latter by
    lr * weight_decay. decay_1d decays everything."""
    s = mqar_sweep.settings_for("zoology-cpu")
    torch.manual_seed(0)
    model = mqar.build_model("mom", mqar_sweep.model_settings(s, width=32), torch.device("cpu"))
    names = dict(model.named_parameters())
    assert any(n.endswith("A_log") for n in names) and any(n.endswith("dt_bias") for n in names)
    for decay_1d in (False, True):
        opt = mqar.adamw(model, 0.5, 0.1, decay_1d)
        before = {n: p.detach().clone() for n, p in names.items()}
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        for n, p in names.items():
            spared = not decay_1d and (p.ndim == 1 or n.endswith(".bias"))
            expect = before[n] if spared else before[n] * (1 - 0.5 * 0.1)
            torch.testing.assert_close(p.detach(), expect, rtol=1e-6, atol=0, msg=n)
        with torch.no_grad():
            for n, p in names.items():
                p.copy_(before[n])
    assert len(mqar.adamw(model, 1e-3, 0.1).param_groups) == 2
    assert len(mqar.adamw(model, 1e-3, 0.1, decay_1d=True).param_groups) == 1


def test_a_sweep_written_before_decay_1d_ran_with_it(megatron_single, tmp_path):
    """A results.json without the decay_1d setting was trained decaying every parameter: it
    goes on only with decay_1d true, and the error names the setting otherwise."""
    overrides = {"mixers": ["single"], "widths": [32], "lrs": [1e-3], "seeds": 1,
                 "decay_1d": True}
    mqar_sweep.run("zoology-cpu", str(tmp_path), overrides=overrides, log=lambda *_: None)
    path = tmp_path / "results.json"
    old = json.loads(path.read_text())
    del old["settings"]["decay_1d"]
    path.write_text(json.dumps(old))
    with pytest.raises(ConfigError, match="decay_1d differ"):
        mqar_sweep.run("zoology-cpu", str(tmp_path), overrides={**overrides, "decay_1d": False},
                       log=lambda *_: None)
    mqar_sweep.run("zoology-cpu", str(tmp_path), overrides=overrides, log=lambda *_: None)
    assert json.loads(path.read_text())["plan"]["resumed_runs"] == 1


def test_a_sweep_in_parts_of_max_runs(megatron_single, tmp_path):
    """max_runs starts at most that many runs; the next sweep into the folder takes the rest
    (here: the second learning rate, then the seed at the better one)."""
    overrides = {"mixers": ["single"], "widths": [32], "lrs": [1e-3, 1e-2], "seeds": 2,
                 "max_runs": 1}
    mqar_sweep.run("zoology-cpu", str(tmp_path), overrides=overrides, log=lambda *_: None)
    first = json.loads((tmp_path / "results.json").read_text())
    assert len(first["runs"]) == 1 and first["plan"]["held_back"] == 1
    mqar_sweep.run("zoology-cpu", str(tmp_path), overrides={**overrides, "max_runs": 0},
                   log=lambda *_: None)
    second = json.loads((tmp_path / "results.json").read_text())
    assert second["runs"][0] == first["runs"][0] and second["plan"]["resumed_runs"] == 1
    kinds = sorted((r["job"]["kind"], r["job"]["lr"], r["job"]["seed"]) for r in second["runs"])
    best = mqar_sweep.aggregate(mqar_sweep.settings_for("zoology-cpu", overrides),
                                second["runs"])["single"]["32"]["best_lr"]
    assert kinds == sorted([("lr", 1e-3, 0), ("lr", 1e-2, 0), ("seed", best, 1)])
    with pytest.raises(ConfigError, match="max_runs .* needs a fixed train_steps"):
        mqar_sweep.settings_for("zoology-cpu", {"max_runs": 3, "train_steps": 0,
                                                "budget_minutes": 5.0})


def test_sweep_boolean_settings_take_booleans_only():
    assert mqar_sweep.settings_for("zoology-cpu", {"cuda_graphs": False}).cuda_graphs is False
    with pytest.raises(ConfigError, match="cuda_graphs must be true or false, got 'false'"):
        mqar_sweep.settings_for("zoology-cpu", {"cuda_graphs": "false"})


def test_a_cut_run_goes_on_bit_for_bit(megatron_single, tmp_path, monkeypatch):
    """A run cut by its deadline keeps its state; run again it continues from that step to the
    losses, final loss and accuracies of the same run never cut, and leaves no state behind.
    A state saved at another step count is refused with the fix named."""
    import types
    s = mqar_sweep.settings_for("zoology-cpu", {"log_every": 1, "train_steps": 6})
    dev = torch.device("cpu")
    mqar_sweep.init_worker(dataclasses.asdict(s), "cpu", partial_dir=str(tmp_path))
    job = mqar_sweep.Job("lr", "mom", 32, 1e-2, 0, 6)
    whole = mqar_sweep._train_and_test(job, s, dev)
    assert not whole["cut"] and not list(tmp_path.iterdir())
    # A clock that moves one second a reading cuts the run at a fixed step.
    clock = iter(range(10**6))
    monkeypatch.setattr(mqar_sweep, "time", types.SimpleNamespace(time=lambda: next(clock)))
    cut_job = dataclasses.replace(job, deadline=4)
    cut = mqar_sweep._train_and_test(cut_job, s, dev)
    assert cut["cut"] and 0 < cut["steps"] < 6
    # the tables count finished runs only
    cut_run = {"job": dataclasses.asdict(job), **cut}
    assert mqar_sweep.aggregate(s, [cut_run])["mom"]["32"]["test"] == {}
    assert mqar_sweep.aggregate(s, [{**cut_run, "cut": False}])["mom"]["32"]["test"] != {}
    saved = tmp_path / "mom_w32_lr0.01_seed0.pt"
    assert saved.exists()
    go_on = mqar_sweep._train_and_test(job, s, dev)
    assert go_on["resumed_from_step"] == cut["steps"] and go_on["steps"] == 6
    for key in ("losses", "first_loss", "final_loss", "val", "test", "masked_training_rows"):
        assert go_on[key] == whole[key], key
    assert not saved.exists()
    mqar_sweep._train_and_test(cut_job, s, dev)                     # cut again
    # A state saved before a setting stopped binding a sweep (widths here) still goes on.
    state = torch.load(saved, weights_only=True)
    state["settings"]["widths"] = [999]
    torch.save(state, saved)
    assert mqar_sweep._train_and_test(job, s, dev)["test"] == whole["test"]
    mqar_sweep._train_and_test(cut_job, s, dev)
    longer = dataclasses.replace(job, steps=7)
    with pytest.raises(ConfigError, match="other settings .* remove it"):
        mqar_sweep._train_and_test(longer, s, dev)
