#!/usr/bin/env python3
"""Rebuild the bundled training corpus, megatron_mom/data/stdlib_docstrings.jsonl.gz.

The corpus is English prose taken from the docstrings of the Python standard library that is
installed with the interpreter running this script (the shipped file was made with CPython
3.11.7). The standard library is distributed under the PSF License Agreement, which allows
derivative works provided the PSF copyright notice and license are retained: see
megatron_mom/data/NOTICE.md and LICENSE-PSF.txt (copied from the same installation).

One JSON object per line, {"text": <docstring>, "source": <module.qualname>}, in a
deterministic order (sorted files, source order inside a file), so the same Python version
rebuilds the same bytes.

    python scripts/build_corpus.py [--max-bytes 2000000] [--out PATH]
"""
from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import inspect
import json
import os
import sysconfig
from pathlib import Path

# Parts of the standard library that are tests, demos, vendored or machine-generated: their
# docstrings are code fixtures rather than prose.
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3",
             "ensurepip", "__pycache__", "turtledemo", "pydoc_data", "encodings"}
MIN_CHARS = 120          # shorter docstrings are mostly one-liners like "Return self."
MAX_NON_ASCII = 0.01     # keep the byte-level corpus almost entirely English ASCII


def stdlib_files(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("test"))
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test"):
                yield Path(dirpath) / name


def docstrings(path: Path, module: str):
    """(qualified name, cleaned docstring) of the module, its classes and functions."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    stack = [(tree, module)]
    while stack:
        node, qualname = stack.pop(0)
        doc = ast.get_docstring(node, clean=False)
        if doc:
            yield qualname, inspect.cleandoc(doc)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                stack.append((child, f"{qualname}.{child.name}"))


def is_prose(text: str) -> bool:
    if len(text) < MIN_CHARS:
        return False
    non_ascii = sum(ord(c) > 127 for c in text)
    if non_ascii > MAX_NON_ASCII * len(text):
        return False
    lines = text.splitlines()
    code_lines = sum(line.lstrip().startswith((">>>", "...")) for line in lines)
    return code_lines <= len(lines) // 3


def build(max_bytes: int):
    root = Path(sysconfig.get_paths()["stdlib"])
    seen, records, total = set(), [], 0
    for path in stdlib_files(root):
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        for qualname, text in docstrings(path, module):
            digest = hashlib.sha1(text.encode()).hexdigest()
            if not is_prose(text) or digest in seen:
                continue
            seen.add(digest)
            records.append({"text": text, "source": qualname})
            total += len(text.encode())
            if total >= max_bytes:
                return records, total
    return records, total


def main():
    here = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-bytes", type=int, default=2_000_000,
                        help="stop after this many bytes of docstring text")
    parser.add_argument("--out", type=Path,
                        default=here / "megatron_mom" / "data" / "stdlib_docstrings.jsonl.gz")
    args = parser.parse_args()
    records, total = build(args.max_bytes)
    # No file name and mtime=0 in the gzip header keep the file reproducible.
    with open(args.out, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as f:
        for record in records:
            f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    print(f"{len(records)} docstrings, {total} bytes of text -> {args.out} "
          f"({args.out.stat().st_size} bytes compressed)")


if __name__ == "__main__":
    main()
