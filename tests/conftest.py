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
