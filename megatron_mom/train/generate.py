"""Text sampling from a trained model, and `megatron-mom generate`.

Two ways to run the model, chosen by `decode`:
- "full": `next_token_logits` runs a full forward pass over the whole (growing) sequence for
  every new token (the last `seq_length` tokens). Simple, and the reference.
- "recurrent": `megatron_mom.train.decoding.generate` prefills once through Megatron's static
  inference context, then feeds one token at a time; MoM layers keep their recurrent states
  (constant memory per token), attention layers their KV cache. Greedy output equals "full"
  (tested) as long as the text fits in `seq_length`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from megatron_mom.train import build, checkpoint
from megatron_mom.train.config import ConfigError, build_config, RunConfig


@torch.no_grad()
def next_token_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [b, vocab] of the token after `tokens` [b, s] (full forward pass)."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)[None].expand_as(tokens)
    logits = model(tokens, positions, None)            # [b, s, vocab]
    return logits[:, -1].float()


def pick_token(logits: torch.Tensor, temperature: float, top_k: int,
               generator: torch.Generator) -> torch.Tensor:
    """Greedy at temperature 0, else sampling from the top_k (0: all) most likely tokens."""
    from megatron_mom.train.decoding import sample as sample_token
    return sample_token(logits, temperature, top_k, generator)


DECODE_MODES = ("full", "recurrent")


def _full_forward_decode(model, tokens, max_new_tokens, temperature, top_k, context_length,
                         generator, eod) -> torch.Tensor:
    for _ in range(max_new_tokens):
        window = tokens[:, -context_length:]     # RoPE positions stop at seq_length
        token = pick_token(next_token_logits(model, window), temperature, top_k, generator)
        if token.item() == eod:
            break
        tokens = torch.cat([tokens, token[:, None]], dim=1)
    return tokens


def _recurrent_decode(model, tokens, max_new_tokens, temperature, top_k, generator,
                      eod) -> torch.Tensor:
    from megatron_mom.train.decoding import generate
    out = generate(model, tokens, max_new_tokens, temperature=temperature, top_k=top_k,
                   generator=generator)
    new = out[0, tokens.shape[1]:]
    stop = (new == eod).nonzero()
    return out[:, : tokens.shape[1] + (int(stop[0]) if len(stop) else len(new))]


@torch.no_grad()
def sample(model, prompt: str, max_new_tokens: int, temperature: float, top_k: int,
           context_length: int, seed: int = 0, decode_mode: str = "full") -> str:
    """Continue `prompt` by up to `max_new_tokens` bytes (stopping at end-of-document);
    returns prompt + continuation."""
    from megatron_mom.train.data import byte_tokenizer
    if decode_mode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode_mode!r}")
    tokenizer = byte_tokenizer()
    device = next(model.parameters()).device
    ids = tokenizer.tokenize(prompt) or [tokenizer.eod]
    tokens = torch.tensor([ids], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    if decode_mode == "recurrent":
        tokens = _recurrent_decode(model, tokens, max_new_tokens, temperature, top_k,
                                   generator, tokenizer.eod)
    else:
        tokens = _full_forward_decode(model, tokens, max_new_tokens, temperature, top_k,
                                      context_length, generator, tokenizer.eod)
    model.train(was_training)
    return decode(tokenizer, tokens[0].tolist())


def decode(tokenizer, ids) -> str:
    # Special ids (>= 256) are not bytes; incomplete UTF-8 at the end is replaced.
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def load_for_generation(checkpoint_path: str):
    """(GPTModel with the checkpoint's weights, its RunConfig), built at TP = PP = 1 in this
    process whatever the run's layout (dist_checkpointing reshards)."""
    path = checkpoint.resolve_checkpoint(checkpoint_path)
    saved = checkpoint.saved_config(path).to_dict()
    cfg = build_config(saved, {"parallel.tensor_model_parallel_size": 1,
                               "parallel.pipeline_model_parallel_size": 1,
                               "parallel.sequence_parallel": False,
                               "parallel.use_distributed_optimizer": False})
    par = build.init_parallel(cfg)
    gpt = build.build_gpt(cfg, build.transformer_config(cfg, par.on_cpu), par.device)
    checkpoint.load_model_weights(path, gpt)
    return gpt, cfg, path


def check_sampling(max_new_tokens: Optional[int], temperature: Optional[float],
                   top_k: Optional[int]) -> None:
    """Refuse sampling settings that make no sense (None: the run's own setting, checked with
    its config), naming the `generate` flag."""
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if temperature is not None and not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"--temperature must be a finite number >= 0 (0: greedy), got "
                          f"{temperature}")
    if top_k is not None and top_k < 0:
        raise ConfigError(f"--top-k must be >= 0 (0: all tokens), got {top_k}")


def generate_command(checkpoint_path: str, prompt: Optional[str], max_new_tokens: Optional[int],
                     temperature: Optional[float], top_k: Optional[int], seed: int,
                     decode_mode: Optional[str] = None) -> str:
    check_sampling(max_new_tokens, temperature, top_k)
    gpt, cfg, path = load_for_generation(checkpoint_path)
    g = cfg.generate
    pick = lambda given, default: default if given is None else given
    return sample(gpt, pick(prompt, g.prompt), pick(max_new_tokens, g.max_new_tokens),
                  pick(temperature, g.temperature), pick(top_k, g.top_k), cfg.model.seq_length,
                  seed, pick(decode_mode, g.decode))
