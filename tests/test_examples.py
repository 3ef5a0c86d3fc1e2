"""The documented quickstart runs as written and does what docs/api.md says."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(__file__))


@pytest.mark.slow
def test_quickstart_trains_and_generates():
    # Not the MASTER_PORT of this process's own process group (conftest's megatron_single
    # exports it), which is in use.
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "quickstart.py")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    first = float(lines[0].split("loss")[1])
    last = float(lines[-2].split("loss")[1])
    assert last < 0.5 * first, proc.stdout
    assert lines[-1].startswith("the quick"), proc.stdout
