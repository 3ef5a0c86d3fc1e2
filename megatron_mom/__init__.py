"""megatron-mom: Mixture-of-Memories sequence mixing for Megatron-Core."""
from megatron_mom.config import MoMConfig

__version__ = "0.1.0"

_LAZY = {
    "MixtureOfMemories": "megatron_mom.mixer",
    "get_mom_layer_spec": "megatron_mom.specs",
    "get_mom_module_spec": "megatron_mom.specs",
    "get_attention_layer_spec": "megatron_mom.specs",
    "get_hybrid_block_spec": "megatron_mom.specs",
}


def __getattr__(name):
    # Megatron-Core is imported only when a Megatron-facing name is used, so that
    # `megatron_mom.ops` and `MoMConfig` stay importable without it (e.g. on a kernel machine).
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'megatron_mom' has no attribute {name!r}")


__all__ = ["MoMConfig", *_LAZY]
