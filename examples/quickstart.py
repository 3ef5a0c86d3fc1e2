"""Quickstart: a tiny MoM/attention hybrid GPT with Megatron-Core, trained a few steps and
sampled, on one process (CPU without a GPU). Run: python examples/quickstart.py"""
import os

import torch


def main():
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    from megatron_mom import MoMConfig, get_hybrid_block_spec
    from megatron_mom.testing import cpu
    from megatron_mom.train.decoding import generate

    on_cpu = cpu.enable()                     # no-op on a GPU machine
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo" if on_cpu else "nccl", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    model_parallel_cuda_manual_seed(0)

    config = TransformerConfig(
        num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=192,
        normalization="RMSNorm", hidden_dropout=0.0, attention_dropout=0.0,
        hetereogenous_dist_checkpoint=True,        # MoM and attention layers: per-layer keys
        **(cpu.megatron_cpu_config_overrides() if on_cpu else {}))
    mom = MoMConfig(num_memories=4, topk=2, shared_memory=True, num_heads=2, head_dim=32,
                    chunk_size=32)
    spec = get_hybrid_block_spec(config, "MMMA", mom)     # 3 MoM layers, then attention
    model = GPTModel(config, spec, vocab_size=256, max_sequence_length=128)
    if not on_cpu:
        model.cuda()

    device = next(model.parameters()).device
    text = torch.tensor(list(b"the quick brown fox jumps over the lazy dog. " * 8), device=device)
    ids = text[:-1].unfold(0, 64, 16)                       # [batch, 64] windows
    labels = text[1:].unfold(0, 64, 16)
    pos = torch.arange(64, device=device)[None].expand(ids.shape[0], -1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(40):
        loss = model(ids, pos, None, labels=labels).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == 39:
            print(f"step {step:2d}  loss {loss.item():.3f}")

    prompt = torch.tensor([list(b"the quick")], device=device)
    out = generate(model, prompt, max_new_tokens=30)        # recurrent MoM decoding
    print(bytes(out[0].tolist()).decode("utf-8", errors="replace"))
    return loss.item()


if __name__ == "__main__":
    main()
