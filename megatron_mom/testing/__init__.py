"""Test support: the CPU shim that lets Megatron-Core run without CUDA."""
