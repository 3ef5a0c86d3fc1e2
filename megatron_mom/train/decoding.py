"""Model-level decoding: generate token ids from a GPTModel with MoM (and attention) layers.

The model runs through Megatron's static inference context: one prefill over the prompt, then one
token per step; each MoM layer keeps its recurrent states in its cache
(megatron_mom.layer.inference).
"""
from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def generate(model, prompt: Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, generator: torch.Generator | None = None) -> Tensor:
    """Decode from a GPTModel with MoM (and attention) layers using Megatron's static context.

    prompt: [B, T0] token ids (one length for the whole batch). Returns [B, T0 + new] ids.
    temperature 0 is greedy; otherwise sample from the top_k (0: all) tokens. The model runs
    in eval mode and is left in the mode it came in."""
    from megatron.core.inference.contexts import StaticInferenceContext
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"generate: prompt must be [batch, tokens] ids with at least one "
                         f"token, got shape {tuple(prompt.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an integer >= 0, got "
                         f"{max_new_tokens!r}")
    was_training = model.training
    model.eval()
    B, T0 = prompt.shape
    ctx = StaticInferenceContext(max_batch_size=B, max_sequence_length=T0 + max_new_tokens)
    tokens = prompt
    step_input = prompt
    try:
        for _ in range(max_new_tokens):
            offset = ctx.sequence_len_offset
            pos = torch.arange(offset, offset + step_input.shape[1], device=prompt.device)
            logits = model(step_input, pos[None].expand(B, -1), None, inference_context=ctx,
                           runtime_gather_output=True)
            ctx.sequence_len_offset += step_input.shape[1]
            nxt = sample(logits[:, -1].float(), temperature, top_k, generator)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            step_input = nxt[:, None]
            ctx.enable_decode_mode()
    finally:
        model.train(was_training)
    return tokens


def sample(logits: Tensor, temperature: float, top_k: int, generator=None) -> Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]
