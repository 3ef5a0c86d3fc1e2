"""GPTModel built from our specs: forward, backward, and a few steps that lower the loss."""
import pytest
import torch

from megatron_mom import MoMConfig

MOM = MoMConfig(num_memories=3, topk=2, num_heads=2, head_dim=16, chunk_size=16)


def gpt(spec_fn, num_layers=4, **overrides):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig
    from megatron_mom.testing import cpu
    config = TransformerConfig(num_layers=num_layers, hidden_size=48, num_attention_heads=4,
                               ffn_hidden_size=96, hidden_dropout=0.0, attention_dropout=0.0,
                               normalization="RMSNorm", **cpu.megatron_cpu_config_overrides(),
                               **overrides)
    return GPTModel(config, spec_fn(config), vocab_size=64, max_sequence_length=40)


def train_steps(model, steps=6):
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 40))
    pos = torch.arange(40)[None].expand(2, -1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = model(ids, pos, None, labels=ids).mean()
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all()
                   for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", ["layer_spec", "hybrid_block"])
def test_gpt_trains(megatron_single, kind):
    from megatron_mom import get_hybrid_block_spec, get_mom_layer_spec
    from megatron_mom.layer.mixer import MixtureOfMemories
    spec_fn = {"layer_spec": lambda c: get_mom_layer_spec(MOM, backend="local"),
               "hybrid_block": lambda c: get_hybrid_block_spec(c, "MMAM", MOM, backend="local")}
    model = gpt(spec_fn[kind], hetereogenous_dist_checkpoint=kind == "hybrid_block")
    kinds = [type(layer.self_attention).__name__ for layer in model.decoder.layers]
    expected = ["MixtureOfMemories"] * 4 if kind == "layer_spec" else \
        ["MixtureOfMemories", "MixtureOfMemories", "SelfAttention", "MixtureOfMemories"]
    assert kinds == expected
    losses = train_steps(model)
    assert losses[-1] < losses[0] - 0.5, losses


def test_hybrid_pattern_is_sliced_per_pipeline_stage(megatron_single):
    from megatron.core.transformer import TransformerConfig
    from megatron_mom.testing import cpu
    from megatron_mom import get_hybrid_block_spec
    from megatron_mom.layer.specs import local_layer_ids
    config = TransformerConfig(num_layers=8, hidden_size=16, num_attention_heads=2,
                               pipeline_model_parallel_size=2, pipeline_dtype=torch.float32,
                               hetereogenous_dist_checkpoint=True,
                               **cpu.megatron_cpu_config_overrides())
    assert local_layer_ids(config, pp_rank=0) == [0, 1, 2, 3]
    assert local_layer_ids(config, pp_rank=1) == [4, 5, 6, 7]
    block = get_hybrid_block_spec(config, "MMMAMMMA", MOM, backend="local", pp_rank=1)
    names = [s.submodules.self_attention.module.__name__ for s in block.layer_specs]
    assert names == ["MixtureOfMemories"] * 3 + ["SelfAttention"]


def test_hybrid_block_spec_reads_the_config_and_never_changes_it(megatron_single):
    """A mixed pattern needs per-layer checkpoint keys in the caller's config: refused with the
    fix named when absent; with them, and for an all-MoM pattern, the config is left as it
    was."""
    import dataclasses
    from megatron.core.transformer import TransformerConfig
    from megatron_mom.testing import cpu
    from megatron_mom import get_hybrid_block_spec
    from megatron_mom.layer.specs import mixes_layer_kinds
    config = TransformerConfig(num_layers=4, hidden_size=16, num_attention_heads=2,
                               **cpu.megatron_cpu_config_overrides())
    before = dict(vars(config))
    with pytest.raises(ValueError, match="hetereogenous_dist_checkpoint=True"):
        get_hybrid_block_spec(config, "MMAM", MOM, backend="local")
    assert len(get_hybrid_block_spec(config, "MMMM", MOM, backend="local").layer_specs) == 4
    assert vars(config) == before
    keyed = dataclasses.replace(config, hetereogenous_dist_checkpoint=True)
    keyed_before = dict(vars(keyed))
    assert len(get_hybrid_block_spec(keyed, "MMAM", MOM, backend="local").layer_specs) == 4
    assert vars(keyed) == keyed_before
    assert mixes_layer_kinds("MMAM") and not mixes_layer_kinds("MMMM")



def recompute_runs(make_model, ids, pos, granularity="full"):
    """(loss, grads, routed-token counts, logged router losses) of one forward+backward of
    make_model(settings) without and with Megatron's activation recompute of `granularity`
    (the training app's train.recompute settings)."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron_mom.layer import metrics
    from megatron_mom.train.build import RECOMPUTE
    runs = []
    for settings in ({}, RECOMPUTE[granularity]):
        torch.manual_seed(0)
        model_parallel_cuda_manual_seed(0)      # the same weights where they are made on a GPU
        model = make_model(settings)
        metrics.router_loss_values(clear=True)
        loss = model(ids, pos, None, labels=ids).float().mean()
        loss.backward()
        counts = [m.routed_tokens.clone() for m in model.modules() if hasattr(m, "routed_tokens")]
        runs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}, counts,
                     metrics.router_loss_values(clear=True)))
    return runs


@pytest.mark.parametrize("granularity", ["full", "selective"])
@pytest.mark.parametrize("pattern", ["MM", "MA"])
def test_activation_recompute_matches_and_logs_once(megatron_single, pattern, granularity):
    """Megatron's full activation recompute (each layer's forward rerun in the backward) and
    its selective recompute of the mixing core ("core_attn": the MoM layers' projection,
    memory path, mix and read-out norm, the attention layers' core attention) give the loss and
    gradients of the plain step bit for bit, MoM-only and hybrid, and the router's logs
    (Megatron's aux-loss tracker, the memories' token counts) count the step once, not once per
    forward.
    (The torch backend: the recompute concerns the layer's Python side; the Triton kernels
    under it run in tests/gpu/test_gpu_layer.py.)"""
    from megatron_mom import get_hybrid_block_spec
    from megatron_mom.layer import metrics
    mom = MOM.replace(backend="torch", aux_loss_coeff=0.01, z_loss_coeff=1e-3)
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(40)[None].expand(2, -1)
    (loss0, grads0, counts0, logged0), (loss1, grads1, counts1, logged1) = recompute_runs(
        lambda extra: gpt(lambda c: get_hybrid_block_spec(c, pattern, mom, backend="local"),
                          num_layers=2, hetereogenous_dist_checkpoint=True, **extra), ids, pos,
        granularity)
    assert torch.equal(loss0, loss1)
    for name in grads0:
        assert torch.equal(grads0[name], grads1[name]), name
    assert len(counts0) == pattern.count("M") and int(counts0[0].sum()) == 2 * 40 * mom.topk
    for a, b in zip(counts0, counts1):
        assert torch.equal(a, b)
    assert set(logged0) == {metrics.LOAD_BALANCING_LOSS, metrics.Z_LOSS}
    for name in logged0:
        assert logged0[name].abs().sum() > 0 and torch.equal(logged0[name], logged1[name]), name


def test_memory_load_is_counted_without_router_losses(megatron_single):
    """The per-memory token counts that training logs do not depend on the router losses:
    with both coefficients 0 they still sum to tokens x top-k."""
    from megatron_mom import get_mom_layer_spec
    from megatron_mom.layer import metrics
    mom = MOM.replace(backend="torch", aux_loss_coeff=0.0, z_loss_coeff=0.0)
    model = gpt(lambda c: get_mom_layer_spec(mom, backend="local"), num_layers=2)
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(40)[None].expand(2, -1)
    metrics.memory_load(model, clear=True)
    model(ids, pos, None, labels=ids).float().mean().backward()
    counts = [m.routed_tokens.clone() for m in model.modules() if hasattr(m, "routed_tokens")]
    assert len(counts) == 2 and all(int(c.sum()) == 2 * 40 * mom.topk for c in counts)
    load = metrics.memory_load(model, clear=True)
    assert sorted(load) == [1, 2] and all(abs(float(f.sum()) - 1) < 1e-6 for f in load.values())
