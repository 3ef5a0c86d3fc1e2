"""Convert official MoM layer weights (flash-linear-attention's `MomAttention`, the parameter
names of docs/method.md section 8) into megatron-mom's `MixtureOfMemories`, one file per
tensor-parallel rank, and check the result.

    # a real checkpoint: layer 3 of an official model, for TP=2
    python examples/convert_official_mom.py --official model.safetensors \
        --prefix model.layers.3.attn. --num-memories 4 --topk 2 --num-heads 4 --head-dim 256 \
        --tp 2 --out converted/layer3
    # no checkpoint at hand: random weights with the official names and shapes (runs anywhere)
    python examples/convert_official_mom.py --demo

It loads each rank's converted state dict into a freshly built MixtureOfMemories (strict, so
every parameter is accounted for), converts back with `to_official_mom` and compares with the
input bit for bit. With --out it saves `<out>.tp<rank>.pt` files holding the layer's state dict,
ready for `layer.load_state_dict(...)` or for keys `decoder.layers.<i>.self_attention.<name>`
of a GPTModel state dict.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch


def load_official(path: str, prefix: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file  # pip install safetensors
        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v for k, v in sd.items() if k.startswith(prefix)}


def random_official(mom, hidden: int, prefix: str) -> dict:
    """Random weights under the official names, shaped as the official layer shapes them."""
    from megatron_mom.apps.convert import official_keys
    H, K, V, W, M = mom.num_heads, mom.key_dim, mom.value_dim, mom.conv_size, mom.num_memories
    shapes = {"q_proj.weight": (H * K, hidden), "g_proj.weight": (H * V, hidden),
              "gate.weight": (M, hidden), "A_log": (H,), "dt_bias": (H,),
              "q_conv1d.weight": (H * K, 1, W), "k_conv1d.weight": (H * K, 1, W),
              "v_conv1d.weight": (H * V, 1, W), "o_norm.weight": (V,),
              "o_proj.weight": (hidden, H * V)}
    rows = {"k": H * K, "v": H * V, "b": H, "a": H}
    g = torch.Generator().manual_seed(0)
    out = {}
    for key in official_keys(mom):
        part = key.split("_")[1][0] if key.startswith("shared_") else key.split("_")[0]
        shape = shapes.get(key, (rows.get(part, 0), hidden))
        out[prefix + key] = torch.randn(*shape, generator=g)
    return out


def build_layer(mom, hidden: int):
    """One MixtureOfMemories on a single process (gloo; CPU redirections without a GPU)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig
    from megatron_mom.testing import cpu
    from megatron_mom import get_mom_module_spec
    from megatron.core.transformer.spec_utils import build_module

    on_cpu = cpu.enable()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29541")
        dist.init_process_group("gloo" if on_cpu else "nccl", rank=0, world_size=1)
        parallel_state.initialize_model_parallel(1)
        model_parallel_cuda_manual_seed(0)
    config = TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=1,
                               **(cpu.megatron_cpu_config_overrides() if on_cpu else {}))
    return build_module(get_mom_module_spec(mom, backend="local"), config=config,
                        layer_number=1)


def main(argv=None) -> int:
    from megatron_mom import MoMConfig
    from megatron_mom.apps.convert import from_official_mom, to_official_mom

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--official", help="official checkpoint (.safetensors, .pt or .bin)")
    src.add_argument("--demo", action="store_true", help="random weights in the official layout")
    p.add_argument("--prefix", default="model.layers.0.attn.",
                   help="key prefix of the MoM layer to convert")
    p.add_argument("--num-memories", type=int, default=4)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--no-shared-memory", action="store_true")
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=256)
    p.add_argument("--expand-v", type=float, default=1.0)
    p.add_argument("--conv-size", type=int, default=4)
    p.add_argument("--hidden", type=int, default=None, help="hidden size (demo: 256)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to shard for")
    p.add_argument("--out", help="save <out>.tp<rank>.pt files")
    args = p.parse_args(argv)

    mom = MoMConfig(num_memories=args.num_memories, topk=args.topk,
                    shared_memory=not args.no_shared_memory, num_heads=args.num_heads,
                    head_dim=args.head_dim, expand_v=args.expand_v, conv_size=args.conv_size)
    if args.demo:
        official = random_official(mom, args.hidden or 256, args.prefix)
    else:
        official = load_official(args.official, args.prefix)
        if not official:
            sys.exit(f"no keys starting with {args.prefix!r} in {args.official}")
    hidden = official[args.prefix + "q_proj.weight"].shape[1]

    ranks = [from_official_mom(official, mom, tp_rank=r, tp_size=args.tp, prefix=args.prefix)
             for r in range(args.tp)]
    if args.tp == 1:  # every converted tensor goes into a real layer, nothing left over
        layer = build_layer(mom, hidden)
        layer.load_state_dict(ranks[0], strict=True)
    back = to_official_mom(ranks, mom, prefix=args.prefix)
    assert back.keys() == official.keys() and all(torch.equal(back[k], official[k])
                                                  for k in official), "round trip differs"
    for r, sd in enumerate(ranks):
        print(f"tp rank {r}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in sd.items()))
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            torch.save(sd, f"{args.out}.tp{r}.pt")
    print(f"converted {len(official)} official tensors of {args.prefix!r} for TP={args.tp}; "
          f"round trip exact")
    return 0


if __name__ == "__main__":
    sys.exit(main())
