"""megatron-mom: Mixture-of-Memories sequence mixing for Megatron-Core.

Floors, lowest first (an import only ever points down): `ops` (kernels, no Megatron), `config`,
`layer` (the Megatron-Core layer), `train` and `integrations.megatron_lm`, `apps`; `testing`
holds the CPU shim. docs/design.md draws them."""
from megatron_mom import _moved
from megatron_mom.config import MoMConfig

__version__ = "0.1.0"

_moved.install()

_LAZY = {
    "MixtureOfMemories": "megatron_mom.layer.mixer",
    "get_mom_layer_spec": "megatron_mom.layer.specs",
    "get_mom_module_spec": "megatron_mom.layer.specs",
    "get_attention_layer_spec": "megatron_mom.layer.specs",
    "get_hybrid_block_spec": "megatron_mom.layer.specs",
}


def __getattr__(name):
    # Megatron-Core is imported only when a Megatron-facing name is used, so that
    # `megatron_mom.ops` and `MoMConfig` stay importable without it (e.g. on a kernel machine).
    import importlib
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _moved.MOVED:  # an old module path used as an attribute: `megatron_mom.mixer`
        return importlib.import_module(f"megatron_mom.{name}")
    raise AttributeError(f"module 'megatron_mom' has no attribute {name!r}")


__all__ = ["MoMConfig", *_LAZY]
