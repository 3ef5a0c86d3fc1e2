"""The MoM layer for Megatron-Core: mixer, router, packing, parallel pieces, specs, decode cache."""
