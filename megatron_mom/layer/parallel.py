"""Tensor- and sequence-parallel glue of the MoM layer, in one place.

The layer's input projection is column-parallel and its output projection row-parallel, like
attention. Two things need more than that:
- Router logits are computed from the layer input as each rank holds it (its sequence shard
  under sequence parallelism) and then brought to the full sequence like the input projection's
  input: gathered (reduce-scattered in backward) under SP, or copied (all-reduced in backward)
  otherwise. Each TP rank mixes only its own heads, so these backward reductions are what make
  the router's gradient whole.
- Replicated parameters used only by the local heads (the output norm's gamma, shared by heads)
  pass through `copy_to_tensor_model_parallel_region`, whose backward sums their gradient
  over the TP group.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from megatron.core.tensor_parallel import mappings


class _CopyToGroup(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient over `group`.

    Megatron's `copy_to_tensor_model_parallel_region` all-reduces `grad.contiguous()` and returns
    the original tensor, so a non-contiguous gradient (here: one coming through a transpose)
    silently skips the reduction (`_reduce` in tensor_parallel/mappings.py)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def full_sequence(x: Tensor, tp_group, sequence_parallel: bool) -> Tensor:
    """[s_local, ...] -> [s, ...] on every TP rank; backward sums the partial gradients."""
    if tp_group is None or tp_group.size() == 1:
        return x
    if sequence_parallel:
        return mappings.gather_from_sequence_parallel_region(
            x, tensor_parallel_output_grad=True, group=tp_group)
    return _CopyToGroup.apply(x, tp_group)


def tp_replicated(param: Tensor, tp_group) -> Tensor:
    """A replicated parameter whose gradient must be summed over the TP group."""
    if tp_group is None or tp_group.size() == 1:
        return param
    return _CopyToGroup.apply(param, tp_group)


def mark_tp_sharded(param: Tensor, dim: int = 0) -> None:
    """Mark a parameter that holds only this rank's heads (Megatron's TP attributes)."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
    set_tensor_model_parallel_attributes(param, True, dim, 1)


def local_slice(full: Tensor, tp_rank: int, tp_size: int, dim: int = 0) -> Tensor:
    """This rank's contiguous 1/tp_size part of `full` along `dim`."""
    size = full.shape[dim] // tp_size
    return full.narrow(dim, tp_rank * size, size)


class SequenceParallelNorm(torch.nn.Module):
    """LayerNorm/RMSNorm from torch whose parameters are marked for sequence parallelism.

    Megatron's local `WrappedTorchNorm` refuses sequence parallelism and its fused norm needs
    apex; a plain torch norm is right under SP as long as its replicated weights (which see only
    this rank's tokens) are marked `sequence_parallel`, so finalize_model_grads sums them."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        if getattr(config, "layernorm_zero_centered_gamma", False):
            raise ValueError("layernorm_zero_centered_gamma (Megatron-LM --apply-layernorm-1p) "
                             "needs Transformer Engine's norms (--transformer-impl "
                             "transformer_engine); the local norms are torch's, weight w not "
                             "1 + w: drop --apply-layernorm-1p")
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"normalization must be LayerNorm or RMSNorm for the local MoM "
                             f"spec, got {config.normalization!r}")
        for p in norm.parameters():
            setattr(p, "sequence_parallel", config.sequence_parallel)
        return norm


def split_sharded_tensor(sh_ten, sections: list[tuple[str, int]], dim: int = 0):
    """Checkpoint a packed TP-sharded tensor as one sharded tensor per section.

    A rank's slice of a packed projection is the concatenation of its slices of every section
    (q, gate, k.0, ...), so one contiguous TP split of the whole would not reshard. Saved per
    section (keys `<key>.<section>`), each section reshards along its own heads."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    template = sh_ten.without_data()
    if sum(rows for _, rows in sections) != template.local_shape[dim]:
        raise ValueError(f"sections {sections} do not cover {template.key} "
                         f"({template.local_shape[dim]} rows)")

    def build(key, data, replica_id, *rest):
        extra = {"flattened_range": rest[0]} if rest and hasattr(template, "flattened_range") else {}
        whole = dataclasses.replace(template, key=key, data=data, dtype=data.dtype,
                                    replica_id=replica_id, **extra)
        parts, start = [], 0
        for name, rows in sections:
            for part in whole.narrow(dim, start, rows):
                part.key = f"{part.key}.{name}"
                parts.append(part)
            start += rows
        return parts

    def merge(parts):
        return torch.cat(parts, dim=dim)

    return ShardedTensorFactory(sh_ten.key, sh_ten.data, build, merge, sh_ten.replica_id)


# ---------------------------------------------------------------- context parallelism
# Megatron splits a sequence into 2 * cp chunks and gives rank r chunks r and 2cp-1-r (so every
# rank gets the same share of causal-attention work). MoM needs whole sequences per memory, so
# the layer trades the sequence split for a head split (all-to-all), restores the natural chunk
# order, runs, and undoes both on the way out.

def _chunk_order(cp: int) -> list[int]:
    """Chunk ids in the order ranks hold them: [0, 2cp-1, 1, 2cp-2, ...]."""
    return [c for r in range(cp) for c in (r, 2 * cp - 1 - r)]


def _to_natural_order(x: Tensor, cp: int) -> Tensor:
    """[cp * s_local, ...] in rank order -> [s, ...] in sequence order."""
    chunks = x.view(2 * cp, x.shape[0] // (2 * cp), *x.shape[1:])
    inverse = torch.tensor(_chunk_order(cp), device=x.device).argsort()
    return chunks[inverse].reshape(x.shape)


def _to_rank_order(x: Tensor, cp: int) -> Tensor:
    chunks = x.view(2 * cp, x.shape[0] // (2 * cp), *x.shape[1:])
    order = torch.tensor(_chunk_order(cp), device=x.device)
    return chunks[order].reshape(x.shape)


def check_cp_sequence(s_local: int, cp: int) -> None:
    if cp > 1 and s_local % 2:
        raise ValueError(
            f"MixtureOfMemories: with context_parallel_size={cp} each rank must hold an even "
            f"number of tokens (two load-balanced chunks), got {s_local}; make the sequence "
            f"length divisible by 2 * context_parallel_size")


def cp_gather_sequence(x: Tensor, cp_group) -> Tensor:
    """[s_local, ...] -> [s, ...] in sequence order on every CP rank. Backward sums the
    partial gradients of all ranks and returns each rank its own tokens' part."""
    cp = cp_group.size()
    if cp == 1:
        return x
    full = mappings.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True,
                                                         group=cp_group)
    return _to_natural_order(full, cp)


def cp_sequence_to_heads(x: Tensor, cp_group) -> Tensor:
    """[s_local, b, cp, d] (d = this rank's share of every head-split section, grouped by
    destination rank) -> [s, b, d]: the whole sequence for this rank's head group."""
    cp = cp_group.size()
    if cp == 1:
        return x.squeeze(2)
    send = x.permute(2, 0, 1, 3).contiguous()                   # [cp (dest), s_local, b, d]
    recv = mappings.all_to_all(cp_group, send)                   # [cp (source), s_local, b, d]
    s_local = x.shape[0]
    return _to_natural_order(recv.view(cp * s_local, *recv.shape[2:]), cp)


def cp_heads_to_sequence(y: Tensor, cp_group) -> Tensor:
    """Inverse of `cp_sequence_to_heads`: [s, b, d] -> [s_local, b, cp, d]."""
    cp = cp_group.size()
    if cp == 1:
        return y.unsqueeze(2)
    s_local = y.shape[0] // cp
    send = _to_rank_order(y, cp).view(cp, s_local, *y.shape[1:])  # [cp (dest), s_local, b, d]
    recv = mappings.all_to_all(cp_group, send.contiguous())       # [cp (source), s_local, b, d]
    return recv.permute(1, 2, 0, 3)


class ContextParallel:
    """The MoM layer's context-parallel steps, in the order the layer takes them (identities
    at context_parallel_size 1). Each CP rank holds 1/cp of every sequence; the memories need
    whole sequences, so the layer gathers the router logits (every rank routes every token),
    trades the projection's sequence split for a head split (each rank runs 1/cp of its TP
    rank's heads over the whole sequence) and trades back after the read-out.

    `sections`: (name, rows) of the TP rank's input projection; every section is a whole
    number of heads, split into cp contiguous head groups."""

    def __init__(self, cp_group, sections: list[tuple[str, int]]):
        self.group = cp_group
        self.size = cp_group.size() if cp_group is not None else 1
        self.rank = cp_group.rank() if cp_group is not None else 0
        self.sections = sections

    def gather_logits(self, logits: Tensor) -> Tensor:
        """[s_local, b, M] -> [s, b, M] in sequence order (backward: each rank's own part of
        the summed gradient)."""
        if self.size == 1:
            return logits
        check_cp_sequence(logits.shape[0], self.size)
        return cp_gather_sequence(logits, self.group)

    def projection_to_heads(self, proj: Tensor) -> Tensor:
        """[s_local, b, P] (this rank's tokens, all of the TP rank's heads) -> [s, b, P / cp]
        (the whole sequence, this rank's head group of every section)."""
        if self.size == 1:
            return proj
        s, b, _ = proj.shape
        parts = proj.split([rows for _, rows in self.sections], dim=-1)
        by_rank = torch.cat([p.reshape(s, b, self.size, -1) for p in parts], dim=-1)
        return cp_sequence_to_heads(by_rank, self.group)

    def heads_to_sequence(self, z: Tensor) -> Tensor:
        """[s, b, d] (this rank's heads) -> [s_local, b, cp * d] (this rank's tokens, the TP
        rank's heads, in head-group order)."""
        if self.size == 1:
            return z
        return cp_heads_to_sequence(z, self.group).reshape(z.shape[0] // self.size,
                                                           z.shape[1], -1)

    def local_heads(self, param: Tensor) -> Tensor:
        """Rows of a per-head parameter [H_tp * d, ...] that this rank computes with."""
        if self.size == 1:
            return param
        return param.view(self.size, -1, *param.shape[1:])[self.rank]
