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


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def megatron_single():
    """One gloo process with Megatron's parallel state at TP = PP = CP = 1 (CPU redirections on
    when there is no GPU)."""
    import torch.distributed as dist
    from megatron_mom import cpu
    cpu.enable()
    if not dist.is_initialized():
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(_free_port())
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                rank=0, world_size=1)
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    yield
