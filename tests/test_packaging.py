"""The source distribution is complete: its tests run, its examples and docs are there, and it
carries the license. Built offline with setuptools' own build backend from a copy of the tree
(so the checkout gets no egg-info)."""
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# top-level folders and files that are not source (build output; tests/ is source)
NOT_SOURCE = {".git", "runs", ".venv", "build", "dist", ".pytest_cache", ".whl", ".device"}
MUST_SHIP = ["LICENSE", "README.md", "MANIFEST.in", "tests/conftest.py", "tests/naive_mom.py",
             "tests/parallel/parallel_worker.py", "tests/gpu/test_gpu_layer.py",
             "examples/configs/tiny_hybrid.yaml", "examples/quickstart.py", "docs/training.md",
             "patches/apply.py", "patches/megatron-lm-core_v0.16.1.patch",
             "megatron_mom/data/stdlib_docstrings.jsonl.gz", "megatron_mom/data/LICENSE-PSF.txt"]


def _setuptools_reads_pyproject() -> bool:
    import setuptools
    major = int(setuptools.__version__.split(".")[0])
    return major >= 77          # the SPDX `license` string and `license-files`


@pytest.mark.skipif(not _setuptools_reads_pyproject(),
                    reason="needs setuptools >= 77 (pyproject's build-system floor) installed "
                           "to build offline")
def test_sdist_ships_tests_examples_docs_patches_and_license(tmp_path):
    src = tmp_path / "src"
    anywhere = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT, src, ignore=lambda folder, names: set(anywhere(folder, names)) | (
        NOT_SOURCE & set(names) if Path(folder) == ROOT else set()))
    build = subprocess.run(
        [sys.executable, "-c", "from setuptools import build_meta; "
                               "print(build_meta.build_sdist('out'))"],
        cwd=src, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    with tarfile.open(src / "out" / build.stdout.split()[-1]) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
        pkg_info = tar.extractfile(next(m for m in tar.getmembers()
                                        if m.name.count("/") == 1 and
                                        m.name.endswith("/PKG-INFO"))).read().decode()
    missing = [path for path in MUST_SHIP if path not in names]
    assert not missing, missing
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "tests", "examples", "docs",
                              "patches"], capture_output=True, text=True)
    if tracked.returncode == 0:          # a git checkout: every tracked file of these folders
        missing = [path for path in tracked.stdout.split() if path not in names]
        assert not missing, missing
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert "License-Expression: Apache-2.0 AND PSF-2.0" in pkg_info
