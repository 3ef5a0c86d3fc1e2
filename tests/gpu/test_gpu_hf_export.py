"""An exported model in the Hugging Face ecosystem: `transformers.AutoModelForCausalLM` loads the
folder after `import fla` (flash-linear-attention registers MomConfig / MomForCausalLM), holds
exactly our tensors, computes our logits and generates our greedy continuation.

    pip install flash-linear-attention    # fla 0.6.0 and transformers 5.x, on the GPU machine
    python -m pytest -q -m gpu tests/gpu/test_gpu_hf_export.py

Skipped unless fla and transformers import (and, for the hybrid, flash-attn, which fla's
attention layer needs).
"""
import pytest
import torch

pytestmark = pytest.mark.gpu

TINY = {"model.hidden_size": 128, "model.ffn_hidden_size": 256, "model.num_attention_heads": 4,
        "model.seq_length": 128, "mom.num_heads": 2, "mom.head_dim": 64, "mom.chunk_size": 64,
        "mom.norm_eps": 1e-5, "train.steps": 60, "train.micro_batch_size": 8,
        "train.global_batch_size": 8, "train.warmup_steps": 5, "train.eval_interval": 0,
        "train.save_interval": 0, "train.lr": 3e-3, "data.corpus": "bundled"}
PROMPT = "Return the number of"


def _fla():
    pytest.importorskip("transformers")
    pytest.importorskip("fla")
    import fla  # noqa: F401  (registers model_type "mom" with transformers' Auto classes)
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM


def _train_and_export(tmp_path, pattern, tie):
    from megatron_mom.apps import hf_checkpoint
    from megatron_mom.train.config import build_config
    from megatron_mom.train.loop import train
    cfg = build_config({}, {**TINY, "model.num_layers": len(pattern), "model.pattern": pattern,
                            "model.tie_embeddings": tie, "output_dir": str(tmp_path / "run")})
    train(cfg, show_progress=False, sample=False)
    hf_checkpoint.export(str(tmp_path / "run"), str(tmp_path / "hf"))
    return tmp_path / "run", tmp_path / "hf"


def _load_fla(folder):
    from megatron_mom.apps.hf import read_fla_folder
    auto = _fla()
    model, info = auto.from_pretrained(str(folder), dtype=torch.float32,
                                       output_loading_info=True)
    _, exported = read_fla_folder(folder)
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert set(info["missing_keys"]) <= {"lm_head.weight"}, info   # tied: not in the file
    state = model.state_dict()
    for key, tensor in exported.items():
        assert torch.equal(state[key], tensor), key
    if model.config.tie_word_embeddings:
        assert torch.equal(model.lm_head.weight, exported["model.embeddings.weight"])
    return model.cuda().eval()


def _ours(run):
    from megatron_mom.train.generate import load_for_generation
    gpt, _, _ = load_for_generation(str(run))
    return gpt.eval()


def _prompt_ids():
    return torch.tensor([list(PROMPT.encode())], device="cuda")


@torch.no_grad()
def _greedy_ours(gpt, ids, steps):
    from megatron_mom.train.generate import next_token_logits
    for _ in range(steps):
        ids = torch.cat([ids, next_token_logits(gpt, ids).argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.fixture
def stable_memory_order(monkeypatch):
    """fla's `transform` orders each memory's tokens with an unstable argsort; on the CPU (fla
    0.6.0, Triton interpreter) that scrambles their time order and the logits differ from the
    method's (relative error ~0.1), while with a stable sort fla's model matched the float64
    reference on our export to 2.7e-7. This fixture makes the sort stable."""
    import fla.layers.mom as mom_layer
    transform = mom_layer.transform

    def stable_transform(*args, **kwargs):
        argsort = torch.Tensor.argsort
        monkeypatch.setattr(torch.Tensor, "argsort",
                            lambda self, *a, **k: argsort(self, *a, stable=True, **k))
        try:
            return transform(*args, **kwargs)
        finally:
            monkeypatch.setattr(torch.Tensor, "argsort", argsort)

    monkeypatch.setattr(mom_layer, "transform", stable_transform)


def _compare_logits(tmp_path):
    run, folder = _train_and_export(tmp_path, "MMMM", tie=True)
    theirs, ours = _load_fla(folder), _ours(run)
    ids = torch.tensor([list(b"Return the number of items in the container, or raise "
                             b"an error. This module provides functions for work")],
                       device="cuda")
    positions = torch.arange(ids.shape[1], device="cuda")[None]
    with torch.no_grad():
        mine = ours(ids, positions, None).float()
        fla_logits = theirs(input_ids=ids).logits.float()
    err = (mine - fla_logits).abs().max().item() / mine.abs().max().item()
    print(f"logits: max |ours - fla| / max |ours| = {err:.2e}")
    assert err < 1e-2, err                       # bf16-level agreement (tf32/bf16 kernels)
    return theirs, ours


def test_exported_mom_model_matches_fla_with_a_stable_memory_order(tmp_path,
                                                                   stable_memory_order):
    _fla()
    _compare_logits(tmp_path)


def test_exported_mom_model_runs_in_transformers(tmp_path):
    """fla as installed: logits and 32 greedy tokens (fails if fla's unstable sort reorders
    tokens on the GPU too; the test above then tells the mapping apart from that)."""
    _fla()
    theirs, ours = _compare_logits(tmp_path)
    prompt = _prompt_ids()
    want = _greedy_ours(ours, prompt, 32)
    theirs.generation_config.eos_token_id = None  # compare 32 tokens, never stop early
    got = theirs.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=1)
    text = lambda ids: bytes(i for i in ids[0].tolist() if i < 256).decode(errors="replace")
    print("ours:", text(want))
    print("fla: ", text(got))
    assert got.tolist() == want.tolist()


def test_exported_hybrid_loads_in_transformers(tmp_path):
    """fla builds the attention layers of the `attn` section; flash-attn is needed for that.
    fla 0.6.0's MomBlock unpacks four values from its attention layer, which returns three, so
    a hybrid's forward fails inside fla whatever the weights: that part is an expected failure
    until fla fixes it."""
    _fla()
    pytest.importorskip("flash_attn")
    run, folder = _train_and_export(tmp_path, "MMMA", tie=False)
    theirs, ours = _load_fla(folder), _ours(run)
    ids = _prompt_ids()
    try:
        with torch.no_grad():
            fla_logits = theirs(input_ids=ids).logits.float()
    except ValueError as err:
        if "unpack" in str(err):
            pytest.xfail(f"fla's MomBlock cannot run attention layers: {err}")
        raise
    with torch.no_grad():
        mine = ours(ids, torch.arange(ids.shape[1], device="cuda")[None], None).float()
    err = (mine - fla_logits).abs().max().item() / mine.abs().max().item()
    assert err < 1e-2, err
