"""The package's floors, read from its source: an import only ever points to a lower floor
(or its own), and the kernels run without Megatron (docs/design.md draws the floors)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_mom"
# floor of each top-level part; `testing` (the CPU shim) and `_moved` (old module paths, found
# by name at import time) import nothing of ours, so any floor may use them.
FLOOR = {"ops": 0, "config": 1, "testing": 1, "_moved": 1, "layer": 2, "train": 3,
         "integrations": 3, "apps": 4, "__init__": 5}


def part_of(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "__init__"


def imported_modules(path: Path, module: str):
    """Every megatron_mom module `path` imports, absolute or relative, at any depth."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                yield f"{base}.{node.module}" if node.module else base
            else:
                yield node.module
                # `from megatron_mom import layer` names a part too
                if node.module == "megatron_mom":
                    yield from (f"megatron_mom.{a.name}" for a in node.names)


def source_modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield path, ".".join(parts)


@pytest.mark.parametrize("path,module", [pytest.param(p, m, id=m) for p, m in source_modules()])
def test_imports_point_down(path, module):
    own = FLOOR[part_of(module) if module != "megatron_mom" else "__init__"]
    upward = []
    for target in imported_modules(path, module):
        if not target or not target.startswith("megatron_mom.") or target == "megatron_mom":
            continue
        part = part_of(target)
        if part in FLOOR and FLOOR[part] > own:
            upward.append(target)
    assert not upward, f"{module} imports from a higher floor: {upward}"


def test_every_part_has_a_floor():
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    assert parts == set(FLOOR)


def test_ops_import_without_megatron():
    code = ("import sys, megatron_mom.ops, megatron_mom.ops.gated_delta_rule, "
            "megatron_mom.ops.conv_gated_delta_rule, megatron_mom.ops.short_conv, "
            "megatron_mom.ops.mix, megatron_mom.ops.l2norm, megatron_mom.ops.gated_rmsnorm\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'megatron'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
