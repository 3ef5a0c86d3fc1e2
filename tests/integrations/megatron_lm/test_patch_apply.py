"""patches/apply.py on a stand-in Megatron-LM checkout (no Megatron-LM needed): the files hold
exactly the lines the patch expects (its hunks' pre-images), so the real patch applies.
tests/integrations/megatron_lm/test_megatron_lm_checkout.py runs it against a real checkout when one
is given."""
import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PATCH = ROOT / "patches/megatron-lm-core_v0.16.1.patch"
PATCHED_FILES = ["pretrain_gpt.py", "megatron/training/training.py",
                 "megatron/core/pipeline_parallel/schedules.py"]


def pre_images(patch_text: str) -> dict:
    """{path: text} made of each hunk's context and removed lines, hunks apart by a filler line."""
    files, path = {}, None
    for line in patch_text.splitlines():
        if line.startswith("+++ b/"):
            path = line[len("+++ b/"):]
            files[path] = []
        elif line.startswith("@@"):
            files[path].append("# filler between hunks")
        elif path and line[:1] in (" ", "-") and not line.startswith("---"):
            files[path].append(line[1:])
    return {p: "\n".join(lines) + "\n" for p, lines in files.items()}


def fake_checkout(root: Path) -> None:
    for rel, text in pre_images(PATCH.read_text()).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "megatron/core/package_info.py").write_text("MAJOR = 0\nMINOR = 16\nPATCH = 1\n"
                                                        "PRE_RELEASE = ''\n")


def apply(root, *flags):
    return subprocess.run([sys.executable, str(ROOT / "patches/apply.py"), str(root), *flags],
                          capture_output=True, text=True)


def git(*args):
    subprocess.run(["git", *args], check=True, capture_output=True)


@pytest.mark.skipif(not shutil.which("git"), reason="needs git (the fallback `patch` does not "
                                                    "look for repositories)")
@pytest.mark.parametrize("own_repo", [False, True], ids=["plain_files", "own_git_repo"])
def test_apply_and_revert_inside_another_git_work_tree(tmp_path, own_repo):
    outer = tmp_path / "outer"
    root = outer / "third_party" / "Megatron-LM"
    root.mkdir(parents=True)
    git("init", "-q", str(outer))
    fake_checkout(root)
    if own_repo:
        git("init", "-q", str(root))
    pristine = tmp_path / "pristine"
    shutil.copytree(root, pristine, ignore=shutil.ignore_patterns(".git"))

    result = apply(root)
    assert result.returncode == 0 and "apply.py: applied" in result.stdout, result
    assert "mom_extra_args_provider(" in (root / "pretrain_gpt.py").read_text()
    assert "getattr(config, 'mom_aux_loss', False)" in (root / PATCHED_FILES[2]).read_text()
    assert "report_losses(" in (root / PATCHED_FILES[1]).read_text()
    assert "already applied" in apply(root).stdout

    result = apply(root, "--revert")
    assert result.returncode == 0 and "reverted" in result.stdout, result
    for rel in PATCHED_FILES:
        assert filecmp.cmp(root / rel, pristine / rel, shallow=False), rel
    assert apply(root, "--revert").returncode == 1           # nothing left to revert
