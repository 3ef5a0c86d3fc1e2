#!/usr/bin/env python3
"""Apply the megatron-mom patch that matches a Megatron-LM checkout's version.

    python patches/apply.py /path/to/Megatron-LM            # apply
    python patches/apply.py /path/to/Megatron-LM --check    # only say whether it would apply
    python patches/apply.py /path/to/Megatron-LM --revert   # take it out again

Each patch touches three places (see docs/megatron-lm.md): pretrain_gpt.py registers the
--mom-* flags, pipeline_parallel/schedules.py sets the aux-loss gradient scale for MoM models
as it does for MoE ones, training.py puts the MoM router losses in the training log.
The version is read from megatron/core/package_info.py; an unknown version is refused.
Standard library only; exit status 0 when applied (or already applied), 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# package_info version -> patch. The core_v0.19.0 tag already reports 0.19.1.
PATCHES = {
    "0.16.0": "megatron-lm-core_v0.16.1.patch",
    "0.16.1": "megatron-lm-core_v0.16.1.patch",
    "0.19.0": "megatron-lm-core_v0.19.0.patch",
    "0.19.1": "megatron-lm-core_v0.19.0.patch",
}


def checkout_version(root: Path) -> str:
    info = root / "megatron" / "core" / "package_info.py"
    if not (root / "pretrain_gpt.py").is_file() or not info.is_file():
        raise SystemExit(f"apply.py: {root} is not a Megatron-LM checkout "
                         f"(no pretrain_gpt.py or megatron/core/package_info.py)")
    text = info.read_text()
    parts = {}
    for key in ("MAJOR", "MINOR", "PATCH", "PRE_RELEASE"):
        m = re.search(rf"^{key}\s*=\s*['\"]?([^'\"\n]*)['\"]?\s*$", text, re.M)
        parts[key] = m.group(1).strip() if m else ""
    return f"{parts['MAJOR']}.{parts['MINOR']}.{parts['PATCH']}{parts['PRE_RELEASE']}"


def git_env(root: Path) -> dict:
    """The environment for git at `root`: it must not find a repository above the checkout.
    Inside another work tree, `git apply` takes paths from that tree's top level and silently
    skips every file outside the current folder, so it would "apply" (or "revert") nothing and
    succeed. With the ceiling at root's parent, git sees the checkout's own repository, or none
    (then it patches plain files)."""
    env = {k: v for k, v in os.environ.items() if k not in ("GIT_DIR", "GIT_WORK_TREE")}
    env["GIT_CEILING_DIRECTORIES"] = str(root.parent)
    return env


def run_apply(root: Path, patch: Path, *flags: str) -> bool:
    """`git apply` where git exists (works outside a git repo too), else `patch -p1`."""
    if shutil.which("git"):
        cmd = ["git", "apply", *flags, str(patch)]
    else:
        flags = ["--dry-run" if f == "--check" else "-R" if f == "--reverse" else f
                 for f in flags]
        cmd = ["patch", "-p1", "--forward", "--silent", *flags, "-i", str(patch)]
    return subprocess.run(cmd, cwd=root, env=git_env(root), capture_output=True).returncode == 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("megatron_lm", type=Path, help="Megatron-LM checkout")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="change nothing")
    mode.add_argument("--revert", action="store_true", help="remove the patch")
    args = parser.parse_args(argv)
    root = args.megatron_lm.resolve()
    version = checkout_version(root)
    name = PATCHES.get(version)
    if name is None:
        known = ", ".join(f"{v} ({p})" for v, p in PATCHES.items())
        print(f"apply.py: refusing: Megatron-LM {version} at {root} is not a version megatron-mom "
              f"has a patch for. Known versions: {known}. Check out tag core_v0.16.1 or "
              f"core_v0.19.0, or port the patch by hand (docs/megatron-lm.md lists its three "
              f"changes).", file=sys.stderr)
        return 1
    patch = HERE / name
    applied = run_apply(root, patch, "--reverse", "--check")
    if args.revert:
        if not applied:
            print(f"apply.py: {name} is not applied to {root}; nothing to revert", file=sys.stderr)
            return 1
        ok = run_apply(root, patch, "--reverse")
        print(f"apply.py: reverted {name} in {root}" if ok else "apply.py: revert failed")
        return 0 if ok else 1
    if applied:
        print(f"apply.py: {name} is already applied to Megatron-LM {version} at {root}")
        return 0
    if not run_apply(root, patch, "--check"):
        print(f"apply.py: refusing: {name} does not apply cleanly to Megatron-LM {version} at "
              f"{root} (local changes to pretrain_gpt.py, megatron/training/training.py or "
              f"megatron/core/pipeline_parallel/schedules.py?)", file=sys.stderr)
        return 1
    if args.check:
        print(f"apply.py: {name} applies cleanly to Megatron-LM {version} at {root}")
        return 0
    if not run_apply(root, patch):
        print(f"apply.py: applying {name} failed", file=sys.stderr)
        return 1
    print(f"apply.py: applied {name} to Megatron-LM {version} at {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
