"""benchmarks/bench_gpt.py at a tiny shape on the CPU, so the end-to-end benchmark cannot rot."""
import json

import pytest

from benchmarks import bench_gpt


def test_bench_gpt_tiny_runs_every_kind(megatron_single, tmp_path):
    rows = bench_gpt.main(["--shape", "tiny", "--seqs", "32", "--tokens", "64", "--iters", "1",
                           "--warmup", "1", "--profile-iters", "0", "--out", str(tmp_path / "out"),
                           "--kinds", "attention,mom,hybrid,mom1,mom-lean,mom-full-recompute,"
                           "mom-selective"])
    assert [r["kind"] for r in rows] == ["attention", "mom", "hybrid", "mom1", "mom-lean",
                                         "mom-full-recompute", "mom-selective"]
    for r in rows:
        assert "error" not in r, r
        assert r["mbs"] == 2 and r["ms"] > 0 and r["tokens_per_s"] > 0
        assert 0 < r["loss"] < 20
    # The one-memory model has fewer parameters than MoM (one k, v, b, a projection, not five).
    by_kind = {r["kind"]: r for r in rows}
    assert by_kind["mom1"]["params"] < by_kind["mom"]["params"]
    # The same model and batch: full activation recompute changes neither the loss nor the size.
    assert by_kind["mom-full-recompute"]["params"] == by_kind["mom"]["params"]
    assert by_kind["mom-full-recompute"]["loss"] == by_kind["mom"]["loss"]
    assert by_kind["mom-selective"]["loss"] == by_kind["mom"]["loss"]
    saved = json.loads((tmp_path / "out" / "bench_gpt.json").read_text())
    assert [r["kind"] for r in saved["rows"]] == [r["kind"] for r in rows]
    table = (tmp_path / "out" / "bench_gpt.md").read_text()
    assert "| mom1 | 32 x 2 |" in table and "1.00x" in table


def test_kernel_kinds():
    kind = bench_gpt.kernel_kind
    assert kind("state_fwd_kernel") == "recurrence"
    assert kind("_conv_bwd_kernel") == "convolution"
    assert kind("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT") == "gemm"
    assert kind("pytorch_flash::flash_fwd_kernel<...>") == "attention"
    assert kind("multi_tensor_apply_kernel<AdamFunctor>") == "optimizer"
    assert kind("vectorized_elementwise_kernel<8, CUDAFunctor_add>") == "elementwise"


def test_single_mempool_needs_graphs(capsys):
    with pytest.raises(SystemExit):
        bench_gpt.main(["--cuda-graph-single-mempool"])
    assert "--cuda-graph-single-mempool needs --cuda-graph" in capsys.readouterr().err


def test_launch_settings_reach_the_mom_layers():
    opts = bench_gpt.launch_options(["chunk_bwd_main.128.split_k=1", "state_fwd.256.BV=16"])
    assert opts.launch["chunk_bwd_main"][128]["split_k"] == 1
    assert opts.launch["state_fwd"][256]["BV"] == 16
    shape = bench_gpt.SHAPES["tiny"]
    assert bench_gpt.mom_config("mom", shape, opts).execution.kernels == opts
    recompute = bench_gpt.mom_config("mom-recompute", shape, opts).execution.kernels
    assert recompute.recompute_states and recompute.launch == opts.launch
    assert bench_gpt.mom_config("mom", shape).execution.kernels.launch["chunk_bwd_main"][128][
        "split_k"] == 0
    with pytest.raises(ValueError, match="give kernel.key=N or kernel.K.key=N"):
        bench_gpt.launch_options(["chunk_bwd_main.128.split_k"])
