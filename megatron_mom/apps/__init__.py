"""Applications built on the layer: the megatron-mom CLI, MQAR, text comparison, conversion
(official MoM weights, Hugging Face export/import)."""
