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
    (dict(expand_v=0), "expand_v must be a finite number > 0"),
    (dict(conv_size=-1), "conv_size must be"),
    (dict(conv_size=0), "conv_size must be an integer >= 1.*cannot be turned off"),
    (dict(conv_size=True), "conv_size must be an integer >= 1"),
    (dict(chunk_size=48), r"chunk_size must be one of \(16, 32, 64\)"),
    (dict(chunk_size=128), r"chunk_size must be one of \(16, 32, 64\)"),
    (dict(chunk_size=1 << 20), r"chunk_size must be one of \(16, 32, 64\)"),
    (dict(aux_loss_coeff=-1.0), "aux_loss_coeff must be a finite number >= 0"),
    (dict(aux_loss_coeff=float("nan")), "aux_loss_coeff must be a finite number >= 0"),
    (dict(aux_loss_coeff=float("inf")), "aux_loss_coeff must be a finite number >= 0"),
    (dict(z_loss_coeff=float("nan")), "z_loss_coeff must be a finite number >= 0"),
    (dict(z_loss_coeff="0.1"), "z_loss_coeff must be a finite number >= 0"),
    (dict(norm_eps=float("nan")), "norm_eps must be a finite number > 0"),
    (dict(norm_eps=float("inf")), "norm_eps must be a finite number > 0"),
    (dict(expand_v=float("inf")), "expand_v must be a finite number > 0"),
    (dict(shared_memory="no"), "shared_memory must be True or False, got 'no'"),
    (dict(use_output_gate="false"), "use_output_gate must be True or False, got 'false'"),
    (dict(lean_backward=1), "lean_backward must be True or False"),
    (dict(recompute_states="yes"), "recompute_states must be True or False"),
    (dict(backend="triton", head_dim=8), r"head_dim = 8 is not one the Triton kernels run "
                                        r"\(backend='triton'\); use one of \(16, 32, 64, 128, 256\)"),
    (dict(backend="triton", head_dim=16, expand_v=0.5), "value_dim = head_dim \\* expand_v = 8"),
    (dict(backend="triton", head_dim=64, expand_v=1.5), "value_dim = head_dim \\* expand_v = 96"),
    (dict(backend="triton", conv_size=9), "conv_size = 9 is wider than the Triton kernels' 8"),
    (dict(backend="cuda"), "backend must be one of"),
    (dict(grouped_projection=True), "grouped_projection must be one of"),
])
def test_mom_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoMConfig(**kwargs)


def test_mom_config_accepts_what_the_torch_backend_runs():
    # the Triton limits apply to the Triton backend only
    MoMConfig(backend="torch", head_dim=8, expand_v=1.5, conv_size=12)
    MoMConfig(backend="auto", head_dim=8)           # the layer checks "auto" on a CUDA device
    MoMConfig(backend="triton", head_dim=16, expand_v=2, conv_size=8, chunk_size=16)


def test_triton_limits_mirror_the_kernels():
    pytest.importorskip("triton")
    from megatron_mom import config
    from megatron_mom.ops.gated_delta_rule import triton as gdr
    from megatron_mom.ops.short_conv import triton as conv
    assert config.TRITON_HEAD_DIMS == gdr.HEAD_DIMS
    assert config.CHUNK_SIZES == gdr.CHUNK_SIZES
    assert config.TRITON_MAX_CONV_SIZE == conv.MAX_WIDTH


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_conv_size_1_is_a_per_channel_scale(backend):
    pytest.importorskip("triton")
    from megatron_mom.ops.short_conv import short_conv
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(1, 9, 8, generator=gen), torch.randn(8, 1, generator=gen)
    y, _ = short_conv(x, w, cu_seqlens=torch.tensor([0, 4, 9]), backend=backend)
    torch.testing.assert_close(y, torch.nn.functional.silu(x * w[:, 0]))


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
    from megatron_mom.testing import cpu
    kw = {"num_layers": 1, **kw}
    return TransformerConfig(hidden_size=16, num_attention_heads=2,
                             **cpu.megatron_cpu_config_overrides(), **kw)


def test_layer_rejects_heads_not_divisible_by_tp(megatron_single):
    from megatron_mom.layer.mixer import MixtureOfMemories, MoMSubmodules
    pgs = types.SimpleNamespace(tp=FakeGroup(3), cp=FakeGroup(1))
    with pytest.raises(ValueError, match="num_heads \\(4\\) must be divisible by the tensor-parallel"):
        MixtureOfMemories(_config(), MoMSubmodules(), mom=MoMConfig(num_heads=4),
                          pg_collection=pgs)


def test_layer_rejects_bad_dtype_and_mom(megatron_single):
    from megatron_mom.layer.mixer import MixtureOfMemories, MoMSubmodules
    with pytest.raises(ValueError, match="unsupported params_dtype"):
        MixtureOfMemories(_config(params_dtype=torch.int32), MoMSubmodules(),
                          mom=MoMConfig(num_heads=2, head_dim=8))
    with pytest.raises(TypeError, match="mom must be a MoMConfig"):
        MixtureOfMemories(_config(), MoMSubmodules(), mom={"topk": 2})


def test_specs_reject_bad_pattern_and_backend(megatron_single):
    from megatron_mom import get_hybrid_block_spec, get_mom_layer_spec
    from megatron_mom.layer.specs import have_te
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


def test_layer_rejects_bad_input_at_forward(megatron_single):
    from test_mixer import build_layer
    layer = build_layer(MoMConfig(num_memories=2, topk=1, num_heads=2, head_dim=8, chunk_size=16),
                        hidden=24, dtype=torch.float32)
    message = r"hidden_states must be a non-empty \[sequence, batch, hidden_size=24\] tensor"
    for bad in (torch.empty(0, 2, 24), torch.empty(5, 0, 24), torch.randn(5, 24),
                torch.randn(5, 2, 2, 24), torch.randn(5, 2, 23)):
        with pytest.raises(ValueError, match=message):
            layer(bad)


@pytest.mark.parametrize("override,message", [
    ("train.lr=nan", "train.lr must be a finite number, got nan"),
    ("train.lr=.inf", "train.lr must be a finite number, got inf"),
    ("train.clip_grad=.nan", "train.clip_grad must be a finite number"),
    ("train.weight_decay=inf", "train.weight_decay must be a finite number"),
    ("generate.temperature=.nan", "generate.temperature must be a finite number"),
    ("train.adam_beta2=1.0", "train.adam_beta2 must be >= 0 and < 1"),
    ("train.adam_beta1=.nan", "train.adam_beta1 must be a finite number"),
    ("model.dropout=1.5", "model.dropout must be >= 0 and < 1"),
    ("mom.aux_loss_coeff=.nan", "mom: MoMConfig: aux_loss_coeff must be a finite number >= 0"),
    ("mom.norm_eps=.inf", "mom: MoMConfig: norm_eps must be a finite number > 0"),
    ("mom.conv_size=0", "mom: MoMConfig: conv_size must be an integer >= 1"),
    ("mom.chunk_size=4096", r"mom: MoMConfig: chunk_size must be one of \(16, 32, 64\)"),
    ("mom.shared_memory='no'", "mom.shared_memory must be a bool"),
])
def test_run_config_rejects_non_finite_and_out_of_range(override, message):
    from megatron_mom.train.config import ConfigError, build_config, parse_override
    with pytest.raises(ConfigError, match=message):
        build_config(overrides=dict([parse_override(override)]))


@pytest.mark.parametrize("flags,message", [
    (dict(max_new_tokens=-5), "--max-new-tokens must be >= 1, got -5"),
    (dict(max_new_tokens=0), "--max-new-tokens must be >= 1, got 0"),
    (dict(temperature=-1.0), "--temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "--temperature must be a finite number >= 0"),
    (dict(top_k=-3), "--top-k must be >= 0"),
])
def test_generate_flags_are_checked_before_loading(tmp_path, flags, message):
    # `megatron-mom generate` turns a ConfigError into its one-line error and exit code 2
    from megatron_mom.train.config import ConfigError
    from megatron_mom.train.generate import generate_command
    args = dict(prompt=None, max_new_tokens=None, temperature=None, top_k=None, seed=0) | flags
    with pytest.raises(ConfigError, match=message):   # the checkpoint does not exist: flags first
        generate_command(str(tmp_path / "none"), **args)


def test_auto_backend_on_cuda_refuses_sizes_the_kernels_cannot_run():
    """The check the layer makes when it is built on a CUDA device (callable without one)."""
    from megatron_mom.layer.mixer import check_kernel_sizes
    check_kernel_sizes(MoMConfig(head_dim=8, backend="auto"), torch.device("cpu"))   # torch runs it
    check_kernel_sizes(MoMConfig(head_dim=64, backend="auto"), torch.device("cuda"))
    with pytest.raises(ValueError, match="head_dim = 8 .*backend='auto' on a CUDA device"):
        check_kernel_sizes(MoMConfig(head_dim=8, backend="auto"), torch.device("cuda"))


def test_recompute_states_is_one_switch_in_two_places():
    """The flat setting (flags, YAML) and KernelOptions.recompute_states never disagree."""
    from megatron_mom.config import MoMExecution
    from megatron_mom.ops import KernelOptions
    flat = MoMConfig(recompute_states=True)
    assert flat.recompute_states and flat.execution.kernels.recompute_states
    nested = MoMExecution(kernels=KernelOptions(recompute_states=True, precision="ieee"))
    assert nested.recompute_states and nested.kernels.precision == "ieee"
    assert not MoMConfig().execution.kernels.recompute_states
