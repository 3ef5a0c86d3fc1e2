"""Applications built on the layer: the megatron-mom CLI, MQAR, text comparison, HF export/import."""
