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


def test_merge_compares_each_row_with_attention_run_the_same_way(tmp_path):
    """--merge: rows of separate runs in one table, each against the attention row of its
    length run the same way: tokens/s, and memory by the reserved footprint under CUDA graphs
    (the allocated peak elsewhere)."""
    def run(name, *rows, launch=None):
        path = tmp_path / f"{name}.json"
        env = dict(device="GPU", date=f"d{name}", **({"launch": launch} if launch else {}))
        path.write_text(json.dumps(dict(env=env, rows=[
            dict(kind=k, seq=seq, mbs=16384 // seq, params_m=1, ms=ms, tokens_per_s=tps,
                 peak_gib=peak, reserved_gib=res) for k, seq, ms, tps, peak, res in rows])))
        return str(path)
    files = [run("a", ("attention+graph", 4096, 150.0, 100000, 10.0, 28.0),
                 ("attention", 4096, 151.0, 99000, 24.0, 25.0)),
             run("b", ("mom+graph", 4096, 300.0, 50000, 15.0, 61.6)),
             run("c", ("mom", 4096, 330.0, 44550, 60.0, 62.0), launch=["state_fwd.256.BV=16"])]
    bench_gpt.main(["--merge", *files, "--out", str(tmp_path / "out")])
    table = (tmp_path / "out" / "bench_gpt_merged.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines()
            if line.startswith("| ") and " x " in line}
    assert rows["mom+graph"][5] == "0.50x" and rows["mom+graph"][8] == "2.20x"   # 61.6 / 28
    mom = rows["mom (state_fwd.256.BV=16)"]                  # a run's --launch settings shown
    assert mom[5] == "0.45x" and mom[8] == "2.50x"                                # 60 / 24
    assert rows["attention+graph"][5] == "1.00x" and "3 runs merged" in table


def test_idle_time_is_charged_to_the_phase_the_host_was_in():
    """GPU idle intervals between kernels (overlapping kernels merged) go to the step phase
    whose host range covers them, the rest to "other"; per step. The profiler's device-side
    copy of a range is not busy time."""
    from types import SimpleNamespace as NS

    def event(device, name, start, end, annotation=False):
        return NS(device_type=NS(name=device), name=name, key=name, is_user_annotation=annotation,
                  time_range=NS(start=start, end=end))
    ms = 1000                                                        # profiler times in us
    events = [event("CPU", "step/forward", 0, 100 * ms),
              event("CPU", "step/optimizer", 150 * ms, 300 * ms),
              event("CUDA", "k1", 10 * ms, 40 * ms),
              event("CUDA", "k2", 30 * ms, 60 * ms),        # overlaps k1: busy up to 60
              event("CUDA", "k3", 90 * ms, 120 * ms),       # idle 60-90, in forward
              event("CUDA", "k4", 200 * ms, 210 * ms),      # idle 120-150 other, 150-200 opt.
              event("CPU", "aten::mm", 0, 300 * ms),
              # a range's device-side event spans its kernels and the gaps between them
              event("CUDA", "step/forward", 10 * ms, 120 * ms, annotation=True),
              event("CUDA", "Optimizer.step#AdamW.step", 150 * ms, 290 * ms, annotation=True)]
    idle = bench_gpt.idle_by_phase(events, n=2)
    assert idle == {"forward": 15.0, "backward": 0.0, "finalize_grads": 0.0,
                    "optimizer": 25.0, "other": 15.0}


def test_foreach_grad_norm_matches_megatrons_fallback(monkeypatch, megatron_single):
    """--grad-norm foreach: the replacement of Megatron's fallback gives its value (the norm of
    all gradients together) without host reads; the clip code looks it up at call time."""
    import torch
    from megatron.core.optimizer import clip_grads
    monkeypatch.setattr(clip_grads, "l2_norm_impl", clip_grads.l2_norm_impl)   # restored after
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=g) for s in ((3, 4), (5,), (2, 2, 2))]
    bench_gpt.foreach_grad_norm()
    norm, per_tensor = clip_grads.l2_norm_impl(2048, None, [grads], False)
    want = torch.linalg.vector_norm(torch.cat([t.flatten() for t in grads]))
    assert per_tensor is None and norm.shape == (1,) and norm.dtype == torch.float32
    torch.testing.assert_close(norm[0], want)
    total = clip_grads.get_grad_norm_fp32(grads)            # Megatron's caller, on the CPU here
    assert abs(total - float(want)) < 1e-5 * float(want)


def test_foreach_tensor_scale_matches_megatrons_fallback(monkeypatch):
    """--tensor-scale foreach: the replacement of Megatron's multi_tensor_scale fallback gives
    its values, for the optimizer's fp32-to-bf16 copy (scale 1), a scaled copy and the in-place
    scale of gradient clipping, looked up by both callers at call time."""
    import torch
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, optimizer
    monkeypatch.setattr(clip_grads, "multi_tensor_scale_impl", clip_grads.multi_tensor_scale_impl)
    monkeypatch.setattr(optimizer, "multi_tensor_scale_impl", optimizer.multi_tensor_scale_impl)
    bench_gpt.foreach_tensor_scale()
    assert clip_grads.multi_tensor_scale_impl is optimizer.multi_tensor_scale_impl
    g = torch.Generator().manual_seed(0)
    src = [torch.randn(s, generator=g) for s in ((3, 4), (5,), (2, 2, 2))]
    for factor in (1.0, 0.37):
        got = [torch.zeros(t.shape, dtype=torch.bfloat16) for t in src]
        want = [torch.zeros(t.shape, dtype=torch.bfloat16) for t in src]
        optimizer.multi_tensor_scale_impl(2048, None, [src, got], factor)
        utils.local_multi_tensor_scale(2048, None, [src, want], factor)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    optimizer.multi_tensor_scale_impl(2048, None, [[], []], 1.0)   # a group with no tensors
    grads = [t.clone() for t in src]
    clip_grads.multi_tensor_scale_impl(2048, None, [grads, grads], 0.5)
    for a, b in zip(grads, src):
        assert torch.equal(a, b * 0.5)
