"""Test setup shared by every test file.

Without a GPU, Triton kernels run under Triton's interpreter (TRITON_INTERPRET=1 must be set
before triton is imported); tests marked `gpu` are skipped.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _init_single():
    from megatron_mom.train.build import init_process_groups
    init_process_groups(tp=1, pp=1, seed=1234)


@pytest.fixture(scope="session")
def megatron_single():
    """One process with Megatron's parallel state at TP = PP = CP = 1: gloo with the CPU
    redirections without a GPU, NCCL with one."""
    _init_single()
    yield


@pytest.fixture(autouse=True)
def _megatron_single_intact(request):
    """Brings megatron_single's process group back for a test that asks for it after an
    in-process CLI run (`megatron-mom train` ends by destroying its process group)."""
    if "megatron_single" in request.fixturenames and not torch.distributed.is_initialized():
        _init_single()
    yield


@pytest.fixture
def refuse_host_reads(monkeypatch):
    """Call it to make every host read of a tensor's value fail from then on: on the CPU, the
    stand-in for a GPU launch path, where such a read is a host sync (and breaks CUDA-graph
    capture). The ops' check of cu_seqlens values, which runs only for CPU tensors, is off
    with it, as it is for the GPU tensors this stands for."""
    def install():
        from megatron_mom.ops.common import checks

        def refuse(*_a, **_k):
            raise AssertionError("host read of a device value in the launch path")
        monkeypatch.setattr(checks, "VALUES_CHECKED_ON", ())
        for name in ("item", "tolist", "__int__", "__bool__", "__float__", "__index__"):
            monkeypatch.setattr(torch.Tensor, name, refuse)
    return install
