"""SDPAttention: a fused, memory-linear core attention for the local (no Transformer Engine) spec.

Megatron-Core's local `DotProductAttention` materialises [b, heads, s, s] scores (quadratic
memory: 73 GiB for 24 layers at 4K x 4). This module is a drop-in for the `core_attention` slot
of Megatron's `SelfAttention` that calls PyTorch's `scaled_dot_product_attention`, which picks a
flash or cuDNN kernel on recent GPUs (a math kernel on CPU). RoPE, the QKV projection and GQA's
query groups are configured by Megatron as usual; this module only sees q, k, v.

Masks follow Transformer Engine's `DotProductAttention`: with `AttnMaskType.causal` the
attention is causal and `attention_mask` is not read (Megatron's data loaders pass a plain
causal mask there); with `padding` / `arbitrary` the boolean mask (True = masked out) is used,
which makes the kernel read a mask of [b or 1, 1, s, s].
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


def _dropout_rng(config, dropout: float):
    """Megatron draws attention dropout from its model-parallel RNG stream (as
    DotProductAttention does) unless sequence parallelism gives each rank its own tokens."""
    if dropout == 0.0 or config.sequence_parallel:
        return contextlib.nullcontext()
    return tensor_parallel.get_cuda_rng_tracker().fork()


class SDPAttention(MegatronModule):
    """Core attention through `torch.nn.functional.scaled_dot_product_attention`.

    Input q [sq, b, np, hn], k and v [sk, b, ng, hn] (this rank's heads); output [sq, b, np*hn]."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str = "self", attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None, **kwargs):
        super().__init__(config=config)
        unsupported = {
            "context_parallel_size": (getattr(config, "context_parallel_size", 1) != 1,
                                      "context parallelism needs Transformer Engine's attention "
                                      "(spec backend 'te')"),
            "window_size": (getattr(config, "window_size", None) is not None,
                            "sliding-window attention needs Transformer Engine's attention"),
            "softmax_type": (getattr(config, "softmax_type", "vanilla") != "vanilla",
                             "only the vanilla softmax is supported"),
        }
        for name, (bad, why) in unsupported.items():
            if bad:
                raise ValueError(f"SDPAttention: config.{name}={getattr(config, name)!r} is not "
                                 f"supported: {why}")
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        kv = config.kv_channels or config.hidden_size // config.num_attention_heads
        # Megatron's query-key layer scaling divides the scores by layer_number and multiplies
        # them back inside its softmax: the product is the plain 1/sqrt(hn) scale.
        self.softmax_scale = softmax_scale if softmax_scale is not None else kv ** -0.5
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias: Optional[Tensor] = None,
                packed_seq_params=None, **kwargs) -> Tensor:
        if packed_seq_params is not None:
            raise ValueError(
                "SDPAttention: packed sequences (THD, packed_seq_params) need Transformer "
                "Engine's attention; build the spec with backend='te', or feed [s, b] batches "
                "without packing")
        if attention_bias is not None:
            raise ValueError("SDPAttention: attention_bias is not supported")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, b, heads, hn = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))     # [b, n, s, hn]
        sk = k.shape[2]
        mask, is_causal = None, False
        if mask_type == AttnMaskType.causal:
            # Decoding continues a cached sequence (sq < sk): the queries are its last sq
            # positions, so the causal mask aligns bottom-right (SDPA's is_causal is top-left).
            is_causal = sq == sk
            if 1 < sq < sk:
                mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        elif attention_mask is not None:
            mask = ~attention_mask.to(torch.bool)                          # True = attend
        gqa = k.shape[1] != heads
        if gqa:  # [b, ng, s, hn] -> [b, np, s, hn]; the flash kernel takes no grouped heads
            k = k.repeat_interleave(heads // k.shape[1], dim=1)
            v = v.repeat_interleave(heads // v.shape[1], dim=1)
        dropout = self.dropout_p if self.training else 0.0
        with _dropout_rng(self.config, dropout):
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               dropout_p=dropout, scale=self.softmax_scale)
        return o.permute(2, 0, 1, 3).reshape(sq, b, heads * hn)              # [sq, b, np*hn]
