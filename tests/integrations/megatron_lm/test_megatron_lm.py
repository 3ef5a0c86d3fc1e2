"""Megatron-LM integration without a Megatron-LM checkout: --mom-* flags, the --spec presets in
both forms, the training-log hook, the CPU launcher's flags and the patch script's refusals.
(tests/integrations/megatron_lm/test_megatron_lm_checkout.py runs the real pretrain_gpt.py when
MEGATRON_LM_PATH is set.)
"""
import argparse
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron_mom import MoMConfig
from megatron_mom.integrations.megatron_lm import args as mom_args

ROOT = Path(__file__).resolve().parents[3]
SMALL = ["--mom-num-memories", "3", "--mom-topk", "2", "--mom-num-heads", "2",
         "--mom-head-dim", "16", "--mom-chunk-size", "16"]


def parse(argv, **megatron):
    """Flags as Megatron-LM would hold them after parsing (plus the Megatron flags we read)."""
    parser = mom_args.add_mom_args(argparse.ArgumentParser())
    args = parser.parse_args(argv)
    defaults = dict(tensor_model_parallel_size=1, context_parallel_size=1, num_experts=None,
                    transformer_impl="local", num_layers=4, mtp_num_layers=None)
    for key, value in {**defaults, **megatron}.items():
        setattr(args, key, value)
    return args


def test_flags_become_a_mom_config():
    args = parse(SMALL + ["--no-mom-shared-memory", "--mom-aux-loss-coeff", "0.001",
                          "--mom-expand-v", "2", "--mom-layer-pattern", "MMAM"])
    assert mom_args.mom_config_from_args(args) == MoMConfig(
        num_memories=3, topk=2, num_heads=2, head_dim=16, chunk_size=16, shared_memory=False,
        aux_loss_coeff=0.001, expand_v=2.0)
    assert args.mom_layer_pattern == "MMAM"
    recompute = mom_args.mom_config_from_args(parse(["--mom-recompute-states"]))
    assert recompute.execution.kernels.recompute_states
    # No flags: MoMConfig's own defaults.
    assert mom_args.mom_config_from_args(parse([])) == MoMConfig()


@pytest.mark.parametrize("argv, megatron, needles", [
    (["--mom-topk", "5", "--mom-num-memories", "4"], {},
     ["--mom-topk (5) must be <= --mom-num-memories (4)"]),
    (["--mom-num-heads", "6"], {"tensor_model_parallel_size": 4},
     ["--mom-num-heads (6)", "--tensor-model-parallel-size (4)"]),
    (["--mom-num-heads", "4"], {"tensor_model_parallel_size": 2, "context_parallel_size": 4},
     ["--context-parallel-size"]),
    (["--mom-chunk-size", "24"], {}, ["--mom-chunk-size must be one of (16, 32, 64), got 24"]),
    ([], {"num_experts": 8}, ["--num-experts is not supported"]),
])
def test_bad_flags_are_refused_naming_the_flags(argv, megatron, needles):
    args = parse(argv, **megatron)
    with pytest.raises(ValueError) as err:
        mom_args.check_parallel_args(args, mom_args.mom_config_from_args(args))
    for needle in needles:
        assert needle in str(err.value)


def test_flags_missing_means_unpatched_script():
    with pytest.raises(RuntimeError, match="apply the megatron-mom patch"):
        mom_args.mom_config_from_args(argparse.Namespace(num_layers=4))


def test_default_patterns():
    from megatron_mom.integrations.megatron_lm.presets import default_pattern
    assert default_pattern("mom", 3) == "MMM"
    hybrid = default_pattern("hybrid", 24)
    assert [i + 1 for i, c in enumerate(hybrid) if c == "A"] == [8, 16, 24]
    assert default_pattern("hybrid", 10) == "MMMMMMMAMM"
    with pytest.raises(ValueError, match="--mom-layer-pattern"):
        default_pattern("hybrid", 4)


def _config(num_layers=4, **kw):
    from megatron.core.transformer import TransformerConfig
    from megatron_mom.testing import cpu
    return TransformerConfig(num_layers=num_layers, hidden_size=32, num_attention_heads=4,
                             ffn_hidden_size=64, hidden_dropout=0.0, attention_dropout=0.0,
                             normalization="RMSNorm", **cpu.megatron_cpu_config_overrides(), **kw)


@pytest.fixture
def megatron_lm_args(monkeypatch):
    """Stand in for megatron.training.get_args() / core_transformer_config_from_args."""
    from megatron_mom.integrations.megatron_lm import presets
    state = {}

    def use(argv, config):
        state["args"] = parse(argv, num_layers=config.num_layers)
        state["config"] = config
        return state["args"]

    monkeypatch.setattr(presets, "_megatron_args", lambda: state["args"])
    monkeypatch.setattr(presets, "_megatron_config", lambda args: state["config"])
    return use


def _gpt(config, spec):
    from megatron.core.models.gpt import GPTModel
    return GPTModel(config, spec, vocab_size=64, max_sequence_length=32)


def _mixers(model):
    return "".join("M" if type(layer.self_attention).__name__ == "MixtureOfMemories" else "A"
                   for layer in model.decoder.layers)


def test_object_form_builds_the_hybrid_gpt_and_trains(megatron_single, megatron_lm_args, capsys):
    """Megatron-LM <= 0.18 hand the imported object to TransformerBlock as is."""
    from megatron_mom.integrations.megatron_lm import presets
    config = _config()
    args = megatron_lm_args(SMALL + ["--mom-layer-pattern", "MMAM"], config)
    model = _gpt(config, presets.hybrid)
    assert _mixers(model) == "MMAM"
    assert "pipeline stage 0: layers 1-4 = MMAM" in capsys.readouterr().out
    # Read by the patched schedule (aux-loss scale) and by TransformerBlock's checkpointing.
    assert config.mom_aux_loss is True and config.hetereogenous_dist_checkpoint is True
    assert args.mom_layer_pattern == "MMAM"
    keys = model.sharded_state_dict().keys()
    assert "decoder.layers.2.self_attention.linear_qkv.weight" in keys
    assert "decoder.layers.0.self_attention.conv_q" in keys
    ids = torch.randint(0, 64, (2, 32))
    pos = torch.arange(32)[None].expand(2, -1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        loss = model(ids, pos, None, labels=ids).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


def test_object_form_pure_mom_uses_flags(megatron_single, megatron_lm_args):
    from megatron_mom.integrations.megatron_lm import presets
    config = _config(num_layers=2)
    megatron_lm_args(SMALL + ["--mom-num-memories", "5", "--mom-topk", "3"], config)
    model = _gpt(config, presets.mom)
    assert _mixers(model) == "MM"
    mixer = model.decoder.layers[1].self_attention
    assert (mixer.mom.num_memories, mixer.mom.topk) == (5, 3)
    assert mixer.layer_number == 2
    assert not config.hetereogenous_dist_checkpoint  # homogeneous layers stay stacked


def test_object_form_refuses_bad_flags_when_building(megatron_single, megatron_lm_args):
    from megatron_mom.integrations.megatron_lm import presets
    config = _config()
    megatron_lm_args(SMALL + ["--mom-layer-pattern", "MMXM"], config)
    with pytest.raises(ValueError, match="unknown layer symbols"):
        _gpt(config, presets.hybrid)


def test_context_parallel_hybrid_without_te_is_refused(megatron_single, megatron_lm_args):
    from megatron_mom.integrations.megatron_lm import presets
    config = _config()
    args = megatron_lm_args(SMALL + ["--mom-layer-pattern", "MMAM"], config)
    args.context_parallel_size = 2
    with pytest.raises(ValueError, match="needs Transformer Engine's attention"):
        presets.hybrid.build(config, args)
    args.mom_layer_pattern = "MMMM"  # MoM layers alone run context parallelism
    assert len(presets.mom.build(config, args).layer_specs) == 4


def test_settings_the_layers_would_not_honour_are_refused(megatron_single, megatron_lm_args):
    """--qk-layernorm with attention layers, --apply-layernorm-1p on the local norms and
    --reset-attention-mask: refused by name, not built into another model than asked for."""
    from megatron_mom import get_hybrid_block_spec
    from megatron_mom.integrations.megatron_lm import presets
    config = _config(qk_layernorm=True, hetereogenous_dist_checkpoint=True)
    args = megatron_lm_args(SMALL + ["--mom-layer-pattern", "MMAM"], config)
    with pytest.raises(ValueError, match="--qk-layernorm"):
        presets.hybrid.build(config, args)
    with pytest.raises(ValueError, match="--qk-layernorm"):
        get_hybrid_block_spec(config, "MMAM", backend="local")
    args.mom_layer_pattern = "MMMM"          # MoM's q and k: L2-normalised, no norm to add
    assert len(presets.mom.build(config, args).layer_specs) == 4
    args.reset_attention_mask = True
    with pytest.raises(ValueError, match="--reset-attention-mask"):
        presets.mom.build(config, args)
    config = _config(num_layers=2, layernorm_zero_centered_gamma=True)
    megatron_lm_args(SMALL, config)
    with pytest.raises(ValueError, match="--apply-layernorm-1p"):
        _gpt(config, presets.mom)


def test_callable_form(megatron_single, megatron_lm_args):
    """Megatron-LM 0.19 calls the preset with its GPTModelConfig and the virtual stage."""
    import inspect
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
    from megatron_mom.integrations.megatron_lm import presets
    config = _config(num_layers=8)
    megatron_lm_args(SMALL, config)
    assert "vp_stage" in inspect.signature(presets.hybrid).parameters
    block = presets.hybrid(SimpleNamespace(transformer=config), vp_stage=None)
    assert type(block) is TransformerBlockSubmodules and len(block.layer_specs) == 8
    model = _gpt(config, block)
    assert _mixers(model) == "MMMMMMMA"


def test_pattern_layer_index_follows_pipeline_stages():
    """Global layer of a stage-local layer number: what PatternLayer looks up in the pattern."""
    from megatron_mom.integrations.megatron_lm.presets import global_layer_index
    config = _config(num_layers=8, pipeline_model_parallel_size=2,
                     virtual_pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
    # 8 layers, PP=2 x VPP=2: stage 0 holds [0, 1] and [4, 5], stage 1 [2, 3] and [6, 7].
    got = {(pp, vp): [global_layer_index(config, n, vp, pp) for n in (1, 2)]
           for pp in (0, 1) for vp in (0, 1)}
    assert got == {(0, 0): [0, 1], (0, 1): [4, 5], (1, 0): [2, 3], (1, 1): [6, 7]}


def test_object_form_refuses_uneven_virtual_stages(megatron_single):
    from megatron_mom.integrations.megatron_lm.presets import block_spec
    config = _config(num_layers=6, pipeline_model_parallel_size=2,
                     virtual_pipeline_model_parallel_size=2, pipeline_dtype=torch.float32,
                     account_for_embedding_in_pipeline_split=True,
                     account_for_loss_in_pipeline_split=True)
    with pytest.raises(ValueError, match="different layer counts"):
        block_spec(config, "M" * 6, MoMConfig(num_heads=2, head_dim=16), "local")
    assert len(block_spec(config, "M" * 6, MoMConfig(num_heads=2, head_dim=16), "local",
                          vp_stage=1).layer_specs) == 2


def test_training_log_counts_only_mom_layers():
    from megatron_mom.integrations.megatron_lm.hooks import _mom_layer_flags, _track_names
    args = parse(["--mom-layer-pattern", "MMAM", "--mom-z-loss-coeff", "0.001"],
                 mtp_num_layers=1)
    assert _mom_layer_flags(args) == [1, 1, 0, 1, 0]
    assert _track_names(args) == ["mom_load_balancing_loss", "mom_z_loss"]
    assert _track_names(parse(["--mom-aux-loss-coeff", "0"])) == []


def test_launcher_adds_only_missing_cpu_flags():
    from megatron_mom.integrations.megatron_lm.launch import cpu_argv
    argv, added = cpu_argv(["--num-layers", "2", "--transformer-impl", "local",
                            "--distributed-backend", "gloo"])
    assert argv[:6] == ["--num-layers", "2", "--transformer-impl", "local",
                        "--distributed-backend", "gloo"]
    assert "--use-cpu-initialization" in added and "--no-rope-fusion" in added
    assert "--distributed-backend" not in added and "--transformer-impl" not in added
    _, added = cpu_argv(["--transformer-impl=transformer_engine"])       # the = form
    assert "--transformer-impl" not in added


def _fake_checkout(tmp_path, version):
    major, minor, patch = version.split(".")
    (tmp_path / "megatron" / "core").mkdir(parents=True)
    (tmp_path / "megatron" / "core" / "package_info.py").write_text(
        f"MAJOR = {major}\nMINOR = {minor}\nPATCH = {patch}\nPRE_RELEASE = ''\n")
    (tmp_path / "pretrain_gpt.py").write_text("")
    return tmp_path


def _apply(*argv):
    return subprocess.run([sys.executable, str(ROOT / "patches" / "apply.py"), *map(str, argv)],
                          capture_output=True, text=True)


def test_patch_script_refuses_unknown_versions(tmp_path):
    result = _apply(_fake_checkout(tmp_path, "0.18.0"))
    assert result.returncode == 1
    assert "refusing: Megatron-LM 0.18.0" in result.stderr and "core_v0.16.1" in result.stderr
    result = _apply(tmp_path / "nowhere")
    assert result.returncode == 1 and "not a Megatron-LM checkout" in result.stderr


def test_patch_script_refuses_a_checkout_the_patch_does_not_fit(tmp_path):
    result = _apply(_fake_checkout(tmp_path, "0.16.1"))
    assert result.returncode == 1 and "does not apply cleanly" in result.stderr


def test_every_pinned_patch_exists_and_touches_only_three_files():
    from importlib.util import module_from_spec, spec_from_file_location
    spec = spec_from_file_location("apply", ROOT / "patches" / "apply.py")
    apply = module_from_spec(spec)
    spec.loader.exec_module(apply)
    for name in set(apply.PATCHES.values()):
        text = (ROOT / "patches" / name).read_text()
        files = sorted(line.split(" b/")[-1] for line in text.splitlines()
                       if line.startswith("diff --git"))
        assert files == ["megatron/core/pipeline_parallel/schedules.py",
                         "megatron/training/training.py", "pretrain_gpt.py"], name
        added = [l for l in text.splitlines() if l.startswith("+") and not l.startswith("+++")]
        assert len(added) <= 14, (name, added)
