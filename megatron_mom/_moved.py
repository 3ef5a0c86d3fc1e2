"""Old module paths of megatron_mom, kept importable after the package was laid out by floor.

Users pass module paths around as strings (`pretrain_gpt.py --spec megatron_mom.megatron_lm.presets
mom`, console scripts, pickled checkpoints, `mock.patch` targets), so an old path must give the
very module object the new path gives, not a copy: a copy would hold its own globals, and a patch
applied through one path would miss code running through the other. A finder placed first on
`sys.meta_path` answers an old name (and everything below it, for packages) by importing the new
module and handing that object back; docs/api.md lists the table.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys

# old path below megatron_mom -> new path below megatron_mom; a package carries its submodules.
MOVED = {
    **{name: f"layer.{name}" for name in ("mixer", "router", "packing", "parallel", "specs",
                                          "attention", "projection", "inference", "metrics")},
    **{name: f"apps.{name}" for name in ("mqar", "mqar_sweep", "text_compare", "convert", "hf",
                                         "hf_checkpoint", "cli")},
    "megatron_lm": "integrations.megatron_lm",
    "cpu": "testing.cpu",
}

# Names an old module offered that now live in another module of a higher floor: the layer's
# decode cache stayed in layer/inference.py, model-level decoding went to train/decoding.py.
# The old path then answers with a module of its own that forwards to both.
MERGED = {"inference": ("layer.inference",
                        {"generate": "train.decoding", "sample": "train.decoding"})}


def new_name(old: str) -> str | None:
    """`megatron_mom.<old path>` -> its new full module name, or None when `old` did not move."""
    prefix = "megatron_mom."
    if not old.startswith(prefix):
        return None
    head, dot, rest = old[len(prefix):].partition(".")
    if head not in MOVED:
        return None
    return prefix + MOVED[head] + dot + rest


class _MergedModule(type(sys)):
    """The old `megatron_mom.inference`: the layer's module, plus names moved to a higher floor."""

    def __init__(self, name: str, base: str, moved_names: dict[str, str]):
        super().__init__(name, f"Old path; see megatron_mom.{base} (docs/api.md).")
        self._base = "megatron_mom." + base
        self._moved_names = {k: "megatron_mom." + v for k, v in moved_names.items()}

    def __getattr__(self, attr):
        module = self._moved_names.get(attr, self._base)
        return getattr(importlib.import_module(module), attr)

    def __dir__(self):
        return sorted(set(dir(importlib.import_module(self._base))) | set(self._moved_names))


class _OldPathLoader(importlib.abc.Loader):
    def __init__(self, target: str | None, merged: tuple | None = None):
        self.target = target
        self.merged = merged
        self.target_spec = None

    def create_module(self, spec):
        if self.merged is not None:
            base, moved_names = self.merged
            return _MergedModule(spec.name, base, moved_names)
        module = importlib.import_module(self.target)
        self.target_spec = module.__spec__
        return module

    def get_code(self, fullname):
        # `python -m <old path>` (runpy) runs the new module's code as __main__.
        return importlib.util.find_spec(self.target).loader.get_code(self.target)

    def exec_module(self, module):
        # The import system stamped the old spec onto the shared module; give it back its own,
        # so that pickling, `python -m` and multiprocessing keep naming the real file.
        if self.target_spec is not None:
            module.__spec__ = self.target_spec


class OldPathFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = new_name(fullname)
        if new is None:
            return None
        merged = MERGED.get(fullname[len("megatron_mom."):])
        if merged:
            return importlib.machinery.ModuleSpec(fullname, _OldPathLoader(None, merged))
        target_spec = importlib.util.find_spec(new)   # imports new's parents, not new itself
        if target_spec is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _OldPathLoader(new),
                                              origin=target_spec.origin)


def install() -> None:
    """Put the finder first on sys.meta_path (once): before the path finder, which would
    otherwise load a moved package's submodule a second time under its old name."""
    if not any(isinstance(f, OldPathFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, OldPathFinder())
