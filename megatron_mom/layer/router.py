"""The MoM router: which memories each token writes to, with what weight, and its losses.

Per token (float32): p = softmax(x W_g); the top-k memories are chosen and their weights
renormalised to sum to one. The load-balancing loss (Switch form) and the optional z-loss come
from Megatron-Core's MoE utilities and are attached to the routing weights with
`MoEAuxLossAutoScaler`, so their gradient flows in the ordinary backward pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.module import MegatronModule

from megatron_mom.config import MoMConfig
from megatron_mom.ops.common import compute_dtype

@dataclass
class Routing:
    """Where every token goes. N tokens (in any order; the layer's are time-major), S = k (+1
    shared) slots.

    memory: [N, S] int64 memory index per slot (the shared memory is index M, always last).
    weight: [N, S] mixing weight per slot in the logits' dtype (1 for the shared memory).
    tokens_per_memory: [M] routed token counts over the tokens routed together (for logging).
    """

    memory: Tensor
    weight: Tensor
    tokens_per_memory: Tensor


class MoMRouter(MegatronModule):
    """Replicated linear gate W_g: D -> M (no bias), evaluated in float32."""

    def __init__(self, config, mom: MoMConfig):
        super().__init__(config)
        self.mom = mom
        self.weight = torch.nn.Parameter(torch.empty(
            mom.num_memories, config.hidden_size, dtype=config.params_dtype,
            device="cpu" if config.use_cpu_initialization else torch.cuda.current_device()))
        if config.perform_initialization:
            config.init_method(self.weight)
        # Under sequence parallelism each rank routes only its own tokens, so its gradient is a
        # partial sum: Megatron's finalize_model_grads all-reduces params marked like this.
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)
        # Tokens each memory received in training since the last `metrics.memory_load` (for
        # logs only: not in checkpoints; int64, which precision casts of the model leave as is).
        self.register_buffer("routed_tokens", torch.zeros(
            mom.num_memories, dtype=torch.int64, device=self.weight.device), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., D] -> logits [..., M] in float32 (float64 for float64 inputs)."""
        return _GatingLinear.apply(x, self.weight, compute_dtype(x.dtype))

    @torch.no_grad()
    def count(self, tokens_per_memory: Tensor) -> None:
        """Add one routed group's tokens per memory [M] to `routed_tokens`."""
        self.routed_tokens += tokens_per_memory.to(self.routed_tokens.dtype)


class _GatingLinear(torch.autograd.Function):
    """x W^T with float32 (`ct`) accumulation that keeps x in its own dtype for the backward:
    autograd through `x.to(ct)` would keep the float32 copy (128 MiB of the layer's peak at
    B4 T4096, hidden 2048). Megatron's `router_gating_linear` does the same but in
    megatron-core 0.16.1 raises NameError without Transformer Engine.

    On CUDA with bf16 x the GEMMs read x as it is (bf16 products are exact in float32, summed
    in float32; errors against float64 in docs/performance.md) instead of through a float32
    copy; the weight gradient splits the float32 logit gradient into two bf16 parts (hi + lo,
    16 significant bits), so it keeps near-float32 accuracy."""

    @staticmethod
    def forward(ctx, x, weight, ct):
        ctx.save_for_backward(x, weight)
        ctx.ct = ct
        x2 = x.reshape(-1, x.shape[-1])
        if _reads_bf16(x2, weight, ct):
            logits = torch.mm(x2, weight.t(), out_dtype=ct)
        else:
            logits = x2.to(ct) @ weight.to(ct).t()
        return logits.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, d_logits):
        x, weight = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        d2 = d_logits.reshape(-1, d_logits.shape[-1]).to(ctx.ct)          # [N, M]
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = (d2 @ weight.to(ctx.ct)).to(x.dtype).view(x.shape)
        if ctx.needs_input_grad[1]:
            if _reads_bf16(x2, weight, ctx.ct):
                dw = _split_weight_grad(d2, x2).to(weight.dtype)
            else:
                dw = (d2.t() @ x2.to(ctx.ct)).to(weight.dtype)
        return dx, dw, None


def _split_weight_grad(d2: Tensor, x2: Tensor) -> Tensor:
    """d2^T x2 in float32 from a float32 [N, M] d2 and a bf16 [N, D] x2 with bf16 GEMM operands:
    d2 = hi + lo (two bf16 parts, 16 significant bits), one GEMM over [hi | lo] so x2 is read
    once, then the two M-row halves summed."""
    hi = d2.to(x2.dtype)
    lo = (d2 - hi.to(d2.dtype)).to(x2.dtype)
    dw2 = torch.mm(torch.cat([hi, lo], 1).t(), x2, out_dtype=d2.dtype)      # [2M, D]
    M = d2.shape[1]
    return dw2[:M] + dw2[M:]


def _reads_bf16(x: Tensor, weight: Tensor, ct: torch.dtype) -> bool:
    """Whether the gating GEMMs can take bf16 operands with float32 output (CUDA only)."""
    return (x.is_cuda and ct == torch.float32 and x.dtype == weight.dtype == torch.bfloat16
            and _MM_OUT_DTYPE)


_MM_OUT_DTYPE = "out_dtype" in (torch.mm.__doc__ or "") or hasattr(torch.ops.aten.mm, "dtype")


def route(logits: Tensor, mom: MoMConfig) -> Routing:
    """Top-k routing of [N, M] float32 logits (all tokens of the routed group): the choice of
    Megatron-Core's `topk_routing_with_score_function` (softmax after top-k: `torch.topk` of
    the logits, so the same ties), without its [N, M] probability and routing maps."""
    # The k chosen memories of each row in increasing memory order
    memory = torch.sort(torch.topk(logits, mom.topk, dim=1).indices, dim=1).values   # [N, k]
    # softmax over the chosen logits == top-k probabilities renormalised to sum to one; done
    # here in the logits' own precision (Megatron's util rounds through float32).
    weight = torch.softmax(logits.gather(1, memory), dim=-1)
    tokens_per_memory = torch.zeros(mom.num_memories, dtype=torch.int64, device=logits.device)
    tokens_per_memory.scatter_add_(0, memory.reshape(-1), torch.ones_like(memory.reshape(-1)))
    if mom.shared_memory:
        N = logits.shape[0]
        memory = torch.cat([memory, memory.new_full((N, 1), mom.num_memories)], dim=1)
        weight = torch.cat([weight, weight.new_ones(N, 1)], dim=1)
    return Routing(memory=memory, weight=weight, tokens_per_memory=tokens_per_memory)


@dataclass
class RouterLosses:
    """This rank's share of the router losses (summed over ranks they give the full loss)."""

    load_balancing: Optional[Tensor]
    z: Optional[Tensor]

    @property
    def total(self) -> Tensor:
        parts = [x for x in (self.load_balancing, self.z) if x is not None]
        return parts[0] if len(parts) == 1 else parts[0] + parts[1]


def router_losses(local_logits: Tensor, tokens_per_memory: Tensor, total_tokens: int,
                  mom: MoMConfig) -> Optional[RouterLosses]:
    """Load-balancing and z losses of the tokens this rank routed (None when both are off).

    `tokens_per_memory` and `total_tokens` describe every token routed together (all
    sequence-parallel ranks), `local_logits` [n, M] only this rank's: the values are this
    rank's shares, and the shares of all ranks sum to the losses over all tokens.
    """
    if mom.aux_loss_coeff <= 0 and mom.z_loss_coeff <= 0:
        return None
    lb = z = None
    if mom.aux_loss_coeff > 0:
        probs = torch.softmax(local_logits, dim=-1)  # logits are float32 or float64
        lb = moe_utils.switch_load_balancing_loss_func(
            probs, tokens_per_memory, total_tokens, mom.topk, mom.num_memories,
            mom.aux_loss_coeff)
    if mom.z_loss_coeff > 0:
        # z_loss_func takes the mean over this rank's tokens; weight it by this rank's share
        # of the tokens so that the shares sum to the mean over all of them.
        share = local_logits.shape[0] / total_tokens
        z = moe_utils.z_loss_func(local_logits, mom.z_loss_coeff * share)
    return RouterLosses(load_balancing=lb, z=z)


def attach_loss(activation: Tensor, loss: Optional[Tensor]) -> Tensor:
    """Make `loss` part of the backward pass of whatever consumes `activation`."""
    if loss is None or not activation.requires_grad:
        return activation
    return moe_utils.MoEAuxLossAutoScaler.apply(activation, loss)
