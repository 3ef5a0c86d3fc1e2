"""`megatron-mom export` / `import`: whole models between Megatron checkpoints and Hugging Face
MoM folders (fla's MomForCausalLM).

A tiny MoM model (tied embeddings) and a tiny hybrid (untied) are trained a few steps, exported,
and checked three ways: the folder is exactly fla's format for the config; an independent
float64 per-token model written from fla's definition (tests/naive_mom.py) computes our model's
logits from the exported weights; importing at TP=2 or PP=2 (two gloo processes) and exporting
again gives back every tensor bit for bit, and `megatron-mom train --resume` continues the
imported run. A Megatron-LM-layout checkpoint (tests/integrations/megatron_lm/pretrain_standin.py,
layers stacked, args in common.pt) goes the same way through `import --format megatron-lm`.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from naive_mom import naive_gpt

ROOT = Path(__file__).resolve().parents[2]
TINY = {"model.hidden_size": 64, "model.ffn_hidden_size": 96, "model.num_attention_heads": 4,
        "model.seq_length": 32, "mom.num_heads": 2, "mom.head_dim": 16, "mom.chunk_size": 16,
        "mom.norm_eps": 1e-5, "train.steps": 3, "train.micro_batch_size": 2,
        "train.global_batch_size": 2, "train.warmup_steps": 1, "train.eval_interval": 0,
        "train.save_interval": 0, "train.lr": 5e-3}
MODELS = {"mom": {"model.num_layers": 2, "model.pattern": "MM", "model.tie_embeddings": True},
          "hybrid": {"model.num_layers": 2, "model.pattern": "MA",
                     "model.tie_embeddings": False}}


def _env():
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.update(PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return env


def cli(*args, nproc=1):
    launch = [sys.executable]
    if nproc > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    done = subprocess.run([*launch, "-m", "megatron_mom.apps.cli.main", *map(str, args)],
                          capture_output=True, text=True, env=_env(), timeout=600)
    return done


def ok(done):
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout


def read_folder(folder):
    from megatron_mom.apps.hf import read_fla_folder
    return read_fla_folder(Path(folder))


def assert_same_weights(a, b):
    (config_a, state_a), (config_b, state_b) = read_folder(a), read_folder(b)
    assert config_a == config_b
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert state_a[key].dtype == state_b[key].dtype, key
        assert torch.equal(state_a[key], state_b[key]), key


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    text = "Return the number of items in the container, or raise an error. "
    path.write_text("\n\n".join(f"{text * 2} ({i})" for i in range(40)))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    """{name: (run directory, exported folder)} for the tiny MoM and hybrid models."""
    from megatron_mom.apps import hf_checkpoint
    from megatron_mom.train.config import build_config
    from megatron_mom.train.loop import train
    out = {}
    for name, model in MODELS.items():
        base = tmp_path_factory.mktemp(name)
        cfg = build_config({}, {**TINY, **model, "data.corpus": str(corpus),
                                "data.split": "100,0,0", "output_dir": str(base / "run")})
        train(cfg, show_progress=False, sample=False)
        hf_checkpoint.export(str(base / "run"), str(base / "hf"))
        out[name] = (base / "run", base / "hf")
    return out


# ------------------------------------------------------------------ export
@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_export_is_fla_format(runs, name):
    from megatron_mom.apps.hf import check_fla_state, describe_fla
    config, state = read_folder(runs[name][1])
    assert config["model_type"] == "mom" and config["architectures"] == ["MomForCausalLM"]
    assert config["num_hidden_layers"] == 2 and config["intermediate_size"] == 96
    assert config["tie_word_embeddings"] is (name == "mom")
    assert ("lm_head.weight" in state) is (name == "hybrid")
    if name == "hybrid":
        assert config["attn"] == {"layers": [1], "num_heads": 4, "num_kv_heads": 4,
                                  "qkv_bias": False, "window_size": None, "rope_theta": 10000.0}
        assert state["model.layers.1.attn.q_proj.weight"].shape == (64, 64)
    else:
        assert config["attn"] is None
    check_fla_state(state, describe_fla(config))          # exactly fla's keys and shapes
    assert {t.dtype for t in state.values()} == {torch.float32}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_exported_weights_give_our_logits(runs, name, megatron_single):
    """Our trained model (float32) against fla's model definition in float64 on the exported
    weights: a wrong mapping anywhere gives errors of order one."""
    from megatron_mom.train.generate import load_for_generation
    run, folder = runs[name]
    gpt, _, _ = load_for_generation(str(run))
    tokens = torch.tensor([[72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100],
                           [3, 200, 17, 17, 400, 9, 0, 65, 66, 67, 511, 256]])
    positions = torch.arange(tokens.shape[1])[None].expand_as(tokens)
    gpt.eval()
    with torch.no_grad():
        ours = gpt(tokens, positions, None).double()
    config, state = read_folder(folder)
    reference = naive_gpt(tokens, state, config)
    err = (ours - reference).abs().max().item() / reference.abs().max().item()
    assert err < 2e-5, err


# ------------------------------------------------------------------ round trips
@pytest.mark.slow
@pytest.mark.parametrize("name, layout", [("mom", "--tp"), ("hybrid", "--pp"),
                                          ("hybrid", "--tp"), ("mom", "--pp")])
def test_import_at_tp2_pp2_round_trip_is_bit_identical(runs, name, layout, tmp_path, corpus):
    run, folder = runs[name]
    imported = tmp_path / "imported"
    out = ok(cli("import", "--hf", folder, "--out", imported, layout, 2, "--set",
                 f"data.corpus={corpus}", "--set", "train.micro_batch_size=1", "--set",
                 "train.global_batch_size=2", "--set", "train.eval_interval=0", nproc=2))
    assert "iter_0000000" in out and ("TP=2 PP=1" if layout == "--tp" else "TP=1 PP=2") in out
    ok(cli("export", "--checkpoint", imported, "--out", tmp_path / "again"))
    assert_same_weights(folder, tmp_path / "again")
    if (name, layout) == ("mom", "--tp"):  # and training continues from it at that layout
        done = ok(cli("train", "--config", imported / "config.yaml", "--resume", "--steps", 1,
                      "--no-progress", layout, 2, nproc=2))
        assert "resumed from" in done and "step     1/1" in done


@pytest.mark.slow
def test_megatron_lm_checkpoint_both_ways(tmp_path):
    """A pretrain_gpt.py-layout checkpoint (stand-in: layers stacked, args in common.pt) saved
    at TP=2 exports; the export imports as a release checkpoint that the stand-in loads at TP=2
    and saves again (lr 0: unchanged), which exports to the same tensors."""
    flags = ["--spec", "megatron_mom.integrations.megatron_lm.presets", "mom", "--num-layers", "2",
             "--hidden-size", "64", "--ffn-hidden-size", "96", "--num-attention-heads", "4",
             "--seq-length", "32", "--vocab-size", "256", "--micro-batch-size", "2",
             "--tensor-model-parallel-size", "2", "--normalization", "RMSNorm",
             "--norm-epsilon", "1e-5", "--swiglu", "--disable-bias-linear",
             "--position-embedding-type", "rope", "--transformer-impl", "local",
             "--mom-num-heads", "2", "--mom-head-dim", "16", "--mom-chunk-size", "16",
             "--mom-norm-eps", "1e-5", "--mom-num-memories", "3"]

    def standin(*extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2",
               "-m", "megatron_mom.integrations.megatron_lm.launch",   # the CPU redirections
               str(ROOT / "tests" / "integrations" / "megatron_lm" / "pretrain_standin.py"),
               *flags, *extra]
        return ok(subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600))

    standin("--train-iters", "2", "--save", tmp_path / "lm")
    ok(cli("export", "--checkpoint", tmp_path / "lm", "--out", tmp_path / "hf"))
    config, state = read_folder(tmp_path / "hf")
    assert config["num_memories"] == 3 and config["vocab_size"] == 256
    out = ok(cli("import", "--hf", tmp_path / "hf", "--out", tmp_path / "release",
                 "--format", "megatron-lm"))
    assert "pretrain_gpt.py --load" in out and "--mom-num-memories 3" in out
    log = standin("--train-iters", "1", "--lr", "0", "--load", tmp_path / "release", "--save",
                  tmp_path / "resaved")
    assert "successfully loaded checkpoint" in log
    ok(cli("export", "--checkpoint", tmp_path / "resaved", "--out", tmp_path / "hf2"))
    assert_same_weights(tmp_path / "hf", tmp_path / "hf2")


@pytest.mark.slow
def test_transformer_engine_names_and_sharded_folders_round_trip(runs, tmp_path):
    """Import for Transformer Engine layer names, export from them; a folder sharded into
    several safetensors files with an index reads back the same."""
    from megatron_mom.apps.hf import INDEX_FILE
    folder = runs["hybrid"][1]
    for flags, named in [(["--format", "megatron-lm", "--tp", "2", "--set", "train.lr=1e-4"],
                          "--tp, --set apply to --format megatron-mom, not megatron-lm"),
                         (["--transformer-impl", "transformer_engine"],
                          "--transformer-impl apply to --format megatron-lm, not megatron-mom")]:
        done = cli("import", "--hf", folder, "--out", tmp_path / "unused", *flags)
        assert done.returncode == 2 and named in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "unused").exists()
    ok(cli("import", "--hf", folder, "--out", tmp_path / "te", "--format", "megatron-lm",
           "--transformer-impl", "transformer_engine"))
    from megatron_mom.apps.hf_checkpoint import read_model_tensors
    from megatron_mom.train.build import init_process_groups
    init_process_groups(1, 1)
    keys = set(read_model_tensors(tmp_path / "te" / "release"))
    assert "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight" in keys
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in keys
    assert "decoder.layers.0.input_layernorm.weight" in keys          # MoM layers keep TENorm
    ok(cli("export", "--checkpoint", tmp_path / "te", "--out", tmp_path / "sharded",
           "--max-shard-size", "100KB"))
    index = json.loads((tmp_path / "sharded" / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert_same_weights(folder, tmp_path / "sharded")


@pytest.mark.slow
def test_bfloat16_and_mixed_dtypes_are_kept(runs, tmp_path, megatron_single):
    """bfloat16 weights stay bfloat16 through a Megatron checkpoint and back, bit for bit; a
    folder mixing float32 norms with bfloat16 weights (as fla's float32 RMSNorms can leave it)
    is imported in float32, which holds both exactly."""
    from megatron_mom.apps import hf_checkpoint
    from megatron_mom.apps.hf import read_fla_folder, write_fla_folder
    config, state = read_fla_folder(runs["hybrid"][1])
    bf16 = {k: v.to(torch.bfloat16) for k, v in state.items()}
    write_fla_folder(tmp_path / "bf16", bf16, {**config, "torch_dtype": "bfloat16"}, 10 ** 9)
    hf_checkpoint.import_megatron_lm(str(tmp_path / "bf16"), str(tmp_path / "lm"))
    hf_checkpoint.export(str(tmp_path / "lm"), str(tmp_path / "back"))
    assert_same_weights(tmp_path / "bf16", tmp_path / "back")
    mixed = {k: (v if "norm" in k else v.to(torch.bfloat16)) for k, v in state.items()}
    write_fla_folder(tmp_path / "mixed", mixed, config, 10 ** 9)
    hf_checkpoint.import_megatron_lm(str(tmp_path / "mixed"), str(tmp_path / "lm2"))
    hf_checkpoint.export(str(tmp_path / "lm2"), str(tmp_path / "back2"))
    _, back = read_fla_folder(tmp_path / "back2")
    assert {t.dtype for t in back.values()} == {torch.float32}
    assert all(torch.equal(back[k], mixed[k].float()) for k in mixed)


@pytest.mark.slow
def test_tokenizer_files_travel_with_the_model(runs, tmp_path, megatron_single):
    from megatron_mom.apps import hf_checkpoint
    from megatron_mom.apps.hf import ConversionError
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text('{"model": {}}')
    (tokenizer / "tokenizer_config.json").write_text("{}")
    (tokenizer / "notes.txt").write_text("not a tokenizer file")
    hf_checkpoint.export(str(runs["mom"][0]), str(tmp_path / "hf"), tokenizer=str(tokenizer))
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == '{"model": {}}'
    assert not (tmp_path / "hf" / "notes.txt").exists()
    text = hf_checkpoint.import_megatron_lm(str(tmp_path / "hf"), str(tmp_path / "lm"))
    assert (tmp_path / "lm" / "tokenizer" / "tokenizer_config.json").is_file()
    assert f"--tokenizer-model {tmp_path / 'lm' / 'tokenizer'}" in text
    with pytest.raises(ConversionError, match="has none of"):
        hf_checkpoint.export(str(runs["mom"][0]), str(tmp_path / "hf2"),
                             tokenizer=str(tmp_path / "lm"))
    assert not list(tmp_path.glob("*hf2"))                     # nothing written


# ------------------------------------------------------------------ refusals
def _settings(**changes):
    from megatron_mom.apps.hf import MegatronSettings
    return MegatronSettings(**changes)


def _desc(pattern="MA", **changes):
    from megatron_mom import MoMConfig
    from megatron_mom.apps.hf import GPTDescription
    values = dict(pattern=pattern, hidden_size=64, ffn_hidden_size=96, vocab_size=512,
                  num_attention_heads=4, num_query_groups=2, max_position_embeddings=32,
                  norm_eps=1e-5, tie_embeddings=True,
                  mom=MoMConfig(num_heads=2, head_dim=16, norm_eps=1e-5))
    values.update(changes)
    return GPTDescription(**values)


@pytest.mark.parametrize("changes, needle", [
    ({"layernorm_epsilon": 1e-6}, "one norm_eps"),
    ({"normalization": "LayerNorm"}, "RMSNorm"),
    ({"swiglu": False}, "SwiGLU"),
    ({"add_bias_linear": True}, "no biases"),
    ({"rotary_base": 500000.0}, "rotary base 10000"),
    ({"rotary_interleaved": True}, "interleaved"),
    ({"rotary_percent": 0.5}, "whole head"),
    ({"position_embedding_type": "learned_absolute"}, "rotary embeddings"),
    ({"qk_layernorm": True}, "q/k norms"),
    ({"add_qkv_bias": True}, "q/k/v biases"),
    ({"kv_channels": 32}, "hidden_size / num_heads"),
    ({"num_experts": 8}, "dense"),
    ({"mtp_num_layers": 1}, "multi-token"),
])
def test_what_fla_cannot_express_is_refused_by_name(changes, needle):
    from megatron_mom.apps.hf import ConversionError, refuse, unexpressible
    assert unexpressible(_settings(), _desc()) == []                # GQA is expressible
    problems = unexpressible(_settings(names={"rotary_base": "--rotary-base"}, **changes),
                             _desc())
    assert len(problems) == 1 and needle in problems[0], problems
    with pytest.raises(ConversionError, match="cannot be expressed"):
        refuse(problems, "this model")
    if "rotary_base" in changes:
        assert problems[0].startswith("--rotary-base")


def test_mom_only_models_need_no_rope_settings():
    from megatron_mom.apps.hf import unexpressible
    assert unexpressible(_settings(rotary_base=1e6, position_embedding_type="none"),
                         _desc("MM")) == []
    assert unexpressible(_settings(), _desc("MM", mom=_desc().mom.replace(conv_size=1))) == []


def _fla_config(**changes):
    from megatron_mom.apps.hf import fla_config
    config = fla_config(_desc(), torch.float32)
    config.update(changes)
    return config


@pytest.mark.parametrize("changes, needle", [
    ({"single_kv_proj": True}, "single_kv_proj"),
    ({"use_short_conv": False}, "use_short_conv"),
    ({"attnres_block_size": 2}, "attnres_block_size"),
    ({"model_type": "llama"}, "model_type"),
    ({"attn": {"layers": [1], "num_heads": 4, "window_size": 16}}, "window_size"),
    ({"attn": {"layers": [1], "num_heads": 4, "rope_theta": 5e5}}, "rope_theta"),
    ({"attn": [{"layers": [0], "num_heads": 4}, {"layers": [1], "num_heads": 2}]},
     "different head counts"),
    ({"attn": {"layers": [5], "num_heads": 4}}, "out of range"),
    ({"topk": 9}, "topk"),
])
def test_fla_configs_we_cannot_hold_are_refused(changes, needle):
    from megatron_mom.apps.hf import ConversionError, describe_fla
    assert describe_fla(_fla_config()) == _desc()
    with pytest.raises(ConversionError, match=needle):
        describe_fla(_fla_config(**changes))


def test_fla_default_intermediate_size_rule():
    from megatron_mom.apps.hf import describe_fla
    config = _fla_config(intermediate_size=None, hidden_ratio=4, hidden_size=2048)
    assert describe_fla(config).ffn_hidden_size == 5632   # 2/3 * 4 * 2048 rounded up to 256


def _random_fla_state(desc, seed=0):
    from megatron_mom.apps.hf import _non_mom_shapes
    from naive_mom import official_params
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(*s, generator=g) for k, s in _non_mom_shapes(desc).items()}
    for i, symbol in enumerate(desc.pattern):
        if symbol == "M":
            layer = official_params(desc.mom, desc.hidden_size, seed=seed + i,
                                    dtype=torch.float32)
            state.update({f"model.layers.{i}.attn.{k}": v for k, v in layer.items()})
    return state


def test_every_tensor_is_accounted_for_both_ways():
    from megatron_mom.apps.hf import ConversionError, fla_to_megatron, megatron_to_fla
    desc = _desc("MAM", num_query_groups=2)
    state = _random_fla_state(desc)
    ours = fla_to_megatron(state, desc)
    back = megatron_to_fla(ours, desc)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    assert sum(t.numel() for t in ours.values()) == sum(t.numel() for t in state.values())
    with pytest.raises(ConversionError, match="unexpected.*extra.weight"):
        fla_to_megatron({**state, "model.extra.weight": torch.zeros(1)}, desc)
    with pytest.raises(ConversionError, match="missing.*model.norm.weight"):
        fla_to_megatron({k: v for k, v in state.items() if k != "model.norm.weight"}, desc)
    with pytest.raises(ConversionError, match="wrong shape"):
        fla_to_megatron({**state, "model.norm.weight": torch.zeros(65)}, desc)
    with pytest.raises(ConversionError, match="MoM layer 'model.layers.2.attn.'"):
        fla_to_megatron({**state, "model.layers.2.attn.k_proj.9.weight": torch.zeros(1)}, desc)
    with pytest.raises(ConversionError, match="no place.*decoder.extra"):
        megatron_to_fla({**ours, "decoder.extra": torch.zeros(1)}, desc)
    with pytest.raises(ConversionError, match="no official counterpart"):
        megatron_to_fla({**ours, "decoder.layers.0.self_attention.stray": torch.zeros(1)}, desc)


def test_gqa_rows_follow_megatrons_query_groups():
    """Megatron packs [q heads of group g, k_g, v_g] per group: check one row of each."""
    from megatron_mom.apps.hf import fla_to_megatron
    desc = _desc("A", num_query_groups=2)
    state = _random_fla_state(desc)
    qkv = fla_to_megatron(state, desc)["decoder.layers.0.self_attention.linear_qkv.weight"]
    q, k, v = (state[f"model.layers.0.attn.{n}_proj.weight"] for n in "qkv")
    d = 16  # head size; 2 query heads per group: rows of group 1 start at 4 * d
    assert torch.equal(qkv[4 * d: 6 * d], q[2 * d: 4 * d])
    assert torch.equal(qkv[6 * d: 7 * d], k[d: 2 * d])
    assert torch.equal(qkv[7 * d: 8 * d], v[d: 2 * d])


def test_folders_refuse_pickles_and_inconsistent_indexes(tmp_path):
    from megatron_mom.apps.hf import ConversionError, read_fla_folder, write_fla_folder, fla_config
    desc = _desc("MA")
    state = _random_fla_state(desc)
    write_fla_folder(tmp_path / "hf", state, fla_config(desc, torch.float32), 50_000)
    config, back = read_fla_folder(tmp_path / "hf")
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(ConversionError, match="exists"):
        write_fla_folder(tmp_path / "hf", state, config, 50_000)
    index = tmp_path / "hf" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    files = sorted(set(data["weight_map"].values()))
    shared = [f for f in files if list(data["weight_map"].values()).count(f) > 1][0]
    key = next(k for k, f in data["weight_map"].items() if f == shared)
    data["weight_map"][key] = next(f for f in files if f != shared)
    index.write_text(json.dumps(data))
    with pytest.raises(ConversionError, match="places"):
        read_fla_folder(tmp_path / "hf")
    data["weight_map"][key] = "model-00009-of-00009.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(ConversionError, match="not a file of"):
        read_fla_folder(tmp_path / "hf")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(json.dumps(config))
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ConversionError, match="pickles, which we never load"):
        read_fla_folder(tmp_path / "bin")


def test_megatron_lm_checkpoints_naming_the_presets_by_their_old_path_convert():
    # checkpoints trained before the package's layout by floor name the presets by the old path
    import argparse
    from megatron_mom.apps.hf import ConversionError
    from megatron_mom.apps.hf_checkpoint import PRESETS_MODULE, describe_megatron_lm
    from megatron_mom.integrations.megatron_lm import args as mom_args

    def args_with(spec):
        args = mom_args.add_mom_args(argparse.ArgumentParser()).parse_args([])
        for key, value in dict(spec=spec, tensor_model_parallel_size=1, context_parallel_size=1,
                               transformer_impl="local", num_layers=8, hidden_size=256,
                               ffn_hidden_size=512, vocab_size=300, num_attention_heads=4,
                               seq_length=64).items():
            setattr(args, key, value)
        return args

    assert PRESETS_MODULE == "megatron_mom.integrations.megatron_lm.presets"
    new = describe_megatron_lm(args_with([PRESETS_MODULE, "hybrid"]))
    old = describe_megatron_lm(args_with(["megatron_mom.megatron_lm.presets", "hybrid"]))
    assert old == new and new[0].pattern == "MMMMMMMA"
    with pytest.raises(ConversionError, match="not trained with the megatron-mom presets"):
        describe_megatron_lm(args_with(["megatron_mom.megatron_lm.other", "hybrid"]))
