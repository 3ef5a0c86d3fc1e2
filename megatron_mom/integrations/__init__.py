"""Integrations with outside training stacks (Megatron-LM's pretrain_gpt.py)."""
