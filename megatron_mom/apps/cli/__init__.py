"""Command line: `megatron-mom train | generate | mqar`."""
