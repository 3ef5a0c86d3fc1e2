"""Execution options travel with the call: KernelOptions for the kernels, MoMExecution for the
layer; nothing about how a call runs is process-wide state."""
import pytest
import torch

from megatron_mom import MoMConfig
from megatron_mom.config import MoMExecution, from_settings, settings_fields
from megatron_mom.ops import KernelOptions
from megatron_mom.ops.options import TUNED_LAUNCH


@pytest.mark.parametrize("kwargs, match", [
    (dict(precision="fp8"), "precision must be one of"),
    (dict(t_dtype="bfloat16"), "t_dtype must be one of"),
    (dict(backward_head_groups=0), "backward_head_groups must be an integer >= 1"),
    (dict(recompute_states=1), "recompute_states must be True or False"),
    (dict(launch={"prepare": {}}), "launch must map every kernel"),
])
def test_kernel_options_reject_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KernelOptions(**kwargs)


def test_tuned_launch_table_is_read_only_and_with_launch_copies():
    with pytest.raises(TypeError):
        TUNED_LAUNCH["state_fwd"][256]["BV"] = 16
    with pytest.raises(TypeError):
        KernelOptions().launch["prepare"]["num_warps"] = 8
    narrow = KernelOptions().with_launch("state_fwd", 256, BV=16)
    assert narrow.launch["state_fwd"][256] == {"BV": 16, "num_warps": 4, "num_stages": 3,
                                               "w_from_t": 0}
    assert TUNED_LAUNCH["state_fwd"][256]["BV"] == 32
    assert KernelOptions().launch["state_fwd"][256]["BV"] == 32
    # The entry a head size runs with: the least K bound at or above it.
    assert narrow.entry("state_fwd", 64) == dict(TUNED_LAUNCH["state_fwd"][128])
    assert narrow.entry("state_fwd", 129)["BV"] == 16
    assert KernelOptions().entry("chunk_bwd_main", 256)["split_k"] == 1
    assert narrow != KernelOptions() and hash(narrow) == hash(KernelOptions())
    with pytest.raises(ValueError, match="unknown kernel 'state'"):
        KernelOptions().with_launch("state", BV=16)
    with pytest.raises(ValueError, match="not 512"):
        KernelOptions().with_launch("state_fwd", 512, BV=16)
    # A misspelt setting or a missing K bound would otherwise change nothing, silently.
    with pytest.raises(ValueError, match="no setting 'splitk'; its settings are dp_first, "
                       "num_stages, num_warps, one_pass, split_k"):
        KernelOptions().with_launch("chunk_bwd_main", 256, splitk=1)
    with pytest.raises(ValueError, match=r"entries per K bound \[128, 256\]: name one"):
        KernelOptions().with_launch("state_fwd", BV=16)
    with pytest.raises(ValueError, match="one entry for every K: give no bound"):
        KernelOptions().with_launch("chunk_bwd_wy", 256, num_warps=8)
    # Values Triton would fail on deep inside a launch, or a truthy string taken as "on".
    for kernel, bound, settings, problem in [
            ("state_fwd", 256, {"BV": 24}, "state_fwd.BV must be a power of two >= 16"),
            ("state_fwd", 256, {"BV": 0}, "state_fwd.BV must be a power of two >= 16"),
            ("state_bwd", 256, {"num_warps": 6}, "num_warps must be a power of two >= 1"),
            ("state_bwd", 256, {"du0": "no"}, "state_bwd.du0 must be 0 or 1"),
            ("chunk_bwd_main", 256, {"num_stages": 0}, "num_stages must be an integer >= 1"),
            ("state_split", None, {"gain": float("nan")}, "gain must be a positive number"),
            ("chunk_out", None, {"min_k": 1.5}, "min_k must be an integer >= 0")]:
        with pytest.raises(ValueError, match=problem):
            KernelOptions().with_launch(kernel, bound, **settings)
    assert KernelOptions().with_launch("state_bwd", 256, du0=True, BV=64, num_warps=8).launch[
        "state_bwd"][256] == {"BV": 64, "num_warps": 8, "num_stages": 2, "du0": True,
                                "w_from_t": 0}


@pytest.mark.parametrize("name, replacement", [
    ("CONFIG", "KernelOptions"), ("set_recompute_states", "recompute_states=True"),
    ("set_backward_head_groups", "backward_head_groups"), ("OVERLAP", "side_streams=False")])
def test_removed_process_wide_switches_name_their_replacement(name, replacement):
    pytest.importorskip("triton")
    from megatron_mom.ops.gated_delta_rule import triton as gdr_triton
    with pytest.raises(AttributeError, match="was removed") as err:
        getattr(gdr_triton, name)
    assert replacement in str(err.value)


def test_mom_config_keeps_the_execution_keywords():
    """backend, grouped_projection and lean_backward: keywords of MoMConfig and replace(), and
    attributes, as before they moved into `execution`."""
    mom = MoMConfig(num_heads=2, backend="torch", lean_backward=True)
    assert mom.execution == MoMExecution(backend="torch", lean_backward=True)
    assert (mom.backend, mom.grouped_projection, mom.lean_backward) == ("torch", "auto", True)
    on = mom.replace(grouped_projection="on")
    assert on.execution.grouped_projection == "on" and on.execution.backend == "torch"
    assert on.num_heads == 2
    assert MoMConfig(execution=MoMExecution(backend="torch")) == MoMConfig(backend="torch")
    with pytest.raises(ValueError, match="backend must be one of"):
        MoMConfig(backend="cuda")
    with pytest.raises(ValueError, match="execution must be a MoMExecution"):
        MoMConfig(execution="torch")
    with pytest.raises(ValueError, match="kernels must be a megatron_mom.ops.KernelOptions"):
        MoMExecution(kernels={"precision": "ieee"})


def test_settings_are_the_model_fields_then_the_execution_ones():
    names = [f.name for f in settings_fields()]
    assert names[-4:] == ["backend", "grouped_projection", "lean_backward", "recompute_states"]
    assert "execution" not in names and "kernels" not in names
    mom = from_settings({"topk": 1, "backend": "torch", "lean_backward": True})
    assert mom == MoMConfig(topk=1, execution=MoMExecution(backend="torch", lean_backward=True))


def test_two_calls_with_other_options_do_not_affect_each_other():
    """The recurrence with recomputed states, four head groups and another launch setting, and
    then with the defaults, in one process: both the reference's results; the second call
    keeps every state of the forward (the first only its inputs)."""
    pytest.importorskip("triton")
    from megatron_mom.ops.gated_delta_rule import gated_delta_rule
    gen = torch.Generator().manual_seed(0)
    B, T, H, K = 1, 40, 4, 32
    q, k, v = (torch.randn(B, T, H, K, generator=gen) for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, generator=gen) + 2)
    beta = torch.rand(B, T, H, generator=gen)
    leaves = [x.requires_grad_() for x in (q, k, v, g, beta)]
    lean = KernelOptions(recompute_states=True, backward_head_groups=4).with_launch(
        "chunk_bwd", BK=32, BV=32)
    want = None
    for options, saved in ((lean, 5), (None, 5 + 6)):
        o, _ = gated_delta_rule(*leaves, chunk_size=16, backend="triton", options=options)
        assert len([t for t in o.grad_fn.saved_tensors if t is not None]) == saved
        grads = torch.autograd.grad(o.sum(), leaves)
        if want is None:
            o_ref, _ = gated_delta_rule(*leaves, chunk_size=16, backend="torch")
            want = [o_ref] + list(torch.autograd.grad(o_ref.sum(), leaves))
        for a, b in zip([o] + list(grads), want):
            assert (a - b).norm() / b.norm() < 2e-5


def _layer(mom, hidden=16):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.spec_utils import build_module
    from megatron_mom.testing import cpu
    from megatron_mom.layer.specs import get_mom_module_spec
    config = TransformerConfig(num_layers=2, hidden_size=hidden, num_attention_heads=2,
                               params_dtype=torch.float64, **cpu.megatron_cpu_config_overrides())
    return build_module(get_mom_module_spec(mom, backend="local"), config=config, layer_number=1)


def test_memory_load_is_counted_by_each_layer(megatron_single):
    """metrics.memory_load(model) reads the fraction of routed tokens per memory from the
    model's own layers (the top-k choices counted by hand here) and clears it; a second layer
    in the same process counts only its own tokens."""
    from megatron_mom.layer import metrics
    mom = MoMConfig(num_memories=4, topk=2, num_heads=2, head_dim=8, chunk_size=16)
    first, second = _layer(mom), _layer(mom)
    x = torch.randn(11, 2, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    first.train()
    first(x)
    chosen = first.router(x).reshape(-1, 4).topk(2, dim=-1).indices
    want = torch.bincount(chosen.reshape(-1), minlength=4).double() / chosen.numel()
    got = metrics.memory_load(first)
    assert list(got) == [1] and torch.allclose(got[1].double(), want)
    assert metrics.memory_load(second)[1].sum() == 0
    assert metrics.memory_load([first])[1].sum() == 0                  # cleared by the read
    with pytest.raises(TypeError, match="pass the model"):
        metrics.memory_load(True)
