"""Invalid configurations fail at construction with a message naming the parameter."""
import types

import pytest
import torch

from megatron_mom import MoMConfig


@pytest.mark.parametrize("kwargs,match", [
    (dict(topk=5, num_memories=4), r"topk \(5\) must be <= num_memories \(4\)"),
    (dict(num_memories=0), "num_memories must be a positive integer"),
    (dict(num_heads=2.5), "num_heads must be a positive integer"),
    (dict(head_dim=10, expand_v=0.35), "head_dim \\* expand_v must be an integer"),
    (dict(expand_v=0), "expand_v must be > 0"),
    (dict(conv_size=-1), "conv_size must be"),
    (dict(chunk_size=48), "chunk_size must be a power of two"),
    (dict(aux_loss_coeff=-1.0), "aux_loss_coeff must be >= 0"),
    (dict(backend="cuda"), "backend must be one of"),
    (dict(grouped_projection=True), "grouped_projection must be one of"),
])
def test_mom_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoMConfig(**kwargs)


def test_mom_config_is_frozen():
    with pytest.raises(Exception):
        MoMConfig().topk = 1
    assert MoMConfig(head_dim=64, expand_v=2).value_dim == 128


def test_parallel_divisibility():
    mom = MoMConfig(num_heads=4)
    mom.check_parallel(tp_size=2, cp_size=2)
    with pytest.raises(ValueError, match="divisible by the tensor-parallel size"):
        mom.check_parallel(tp_size=3)
    with pytest.raises(ValueError, match="tensor_model_parallel_size \\* context_parallel_size"):
        mom.check_parallel(tp_size=2, cp_size=4)


class FakeGroup:
    """Stands in for a process group of another size: construction checks sizes first."""

    def __init__(self, size, rank=0):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def rank(self):
        return self._rank


def _config(**kw):
    from megatron.core.transformer import TransformerConfig
    from megatron_mom import cpu
    kw = {"num_layers": 1, **kw}
    return TransformerConfig(hidden_size=16, num_attention_heads=2,
                             **cpu.megatron_cpu_config_overrides(), **kw)


def test_layer_rejects_heads_not_divisible_by_tp(megatron_single):
    from megatron_mom.mixer import MixtureOfMemories, MoMSubmodules
    pgs = types.SimpleNamespace(tp=FakeGroup(3), cp=FakeGroup(1))
    with pytest.raises(ValueError, match="num_heads \\(4\\) must be divisible by the tensor-parallel"):
        MixtureOfMemories(_config(), MoMSubmodules(), mom=MoMConfig(num_heads=4),
                          pg_collection=pgs)


def test_layer_rejects_bad_dtype_and_mom(megatron_single):
    from megatron_mom.mixer import MixtureOfMemories, MoMSubmodules
    with pytest.raises(ValueError, match="unsupported params_dtype"):
        MixtureOfMemories(_config(params_dtype=torch.int32), MoMSubmodules(),
                          mom=MoMConfig(num_heads=2, head_dim=8))
    with pytest.raises(TypeError, match="mom must be a MoMConfig"):
        MixtureOfMemories(_config(), MoMSubmodules(), mom={"topk": 2})


def test_specs_reject_bad_pattern_and_backend(megatron_single):
    from megatron_mom import get_hybrid_block_spec, get_mom_layer_spec
    from megatron_mom.specs import have_te
    config = _config(num_layers=4)
    with pytest.raises(ValueError, match="unknown layer symbols \\['X'\\]"):
        get_hybrid_block_spec(config, "MMXA", MoMConfig(), backend="local")
    with pytest.raises(ValueError, match="pattern has 3 layers but config.num_layers is 4"):
        get_hybrid_block_spec(config, "MMA", MoMConfig(), backend="local")
    with pytest.raises(ValueError, match="backend must be one of"):
        get_mom_layer_spec(MoMConfig(), backend="apex")
    if not have_te():
        with pytest.raises(ImportError, match="needs Transformer Engine"):
            get_mom_layer_spec(MoMConfig(), backend="te")
