"""The Zoology-style MQAR sweep's GPU path in small: worker processes sharing the GPU, the
step count fitted from a timing with all workers busy, the Triton kernels at the sweep's head
sizes (width 64: heads of 32; single-state: 10 heads), training data drawn on the GPU, the
seeds at the chosen learning rate. About a minute on an H200 (the first run compiles the
kernels). The budget is a cap, not the run time: the timing must come back within 40% of it,
and with a cold Triton cache compiling MoM's kernels in three processes at once took more than
2 minutes' 40% on an H100. Checks the pipeline, not the numbers."""
import json

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_zoology_sweep_on_the_gpu(tmp_path):
    from megatron_mom.apps import mqar_sweep
    overrides = {"mixers": ["attention", "single-state", "mom"], "widths": [64],
                 "seq_lens": [64, 256], "lrs": [1e-3, 3e-3], "seeds": 2, "train_steps": 0,
                 "budget_minutes": 5.0, "min_steps": 20, "max_steps": 40, "workers": 3,
                 "val_examples": 64, "test_examples": 128}
    agg = mqar_sweep.run("zoology", str(tmp_path), overrides=overrides, device="cuda")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["environment"]["device"] == torch.cuda.get_device_name()
    runs = saved["runs"]
    assert not [r for r in runs if "error" in r or "skipped" in r], runs
    assert len(runs) == 3 * (2 + 1) and all(r["steps"] == saved["plan"]["steps"] for r in runs)
    assert 20 <= saved["plan"]["steps"] <= 40
    for mixer in overrides["mixers"]:
        entry = agg[mixer]["64"]
        assert entry["best_lr"] in overrides["lrs"] and entry["seeds"] == [0, 1]
        for L in ("64", "256"):
            assert entry["test"][L]["n"] == 2 and 0.0 <= entry["test"][L]["mean"] <= 1.0
    assert (tmp_path / "mqar_zoology.png").stat().st_size > 5_000
