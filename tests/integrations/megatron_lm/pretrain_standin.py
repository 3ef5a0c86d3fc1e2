"""A stand-in for Megatron-LM's pretrain_gpt.py, built on Megatron-Core alone, for CI (where no
Megatron-LM checkout exists) to run examples/megatron-lm/train.sbatch for real:

    PRETRAIN=tests/integrations/megatron_lm/pretrain_standin.py sbatch ... examples/megatron-lm/train.sbatch

It reads the pretrain_gpt.py flags that shape the model, the parallel layout, the batch and the
checkpoints (others, e.g. fusion switches and tokenizer settings, are listed once and ignored),
builds the GPT with the same --spec preset and --mom-* flags, trains on synthetic sequences
that can be learned (token t+1 = token t + 1), prints Megatron-LM-style log lines (with
`mom_load_balancing_loss`) and saves / resumes distributed checkpoints in Megatron-LM's layout
(<save>/iter_0000004/, latest_checkpointed_iteration.txt; a `release` checkpoint loads as
iteration 0), with the parsed `args` in common.pt and the content metadata Megatron-LM 0.16
writes, so `megatron-mom export` reads them as it reads Megatron-LM's. Model weights only: the
optimizer restarts on resume. Tensor and data parallelism (plus sequence parallelism); no
pipeline.
"""
from __future__ import annotations

import argparse
import os
import time
from datetime import datetime

import torch
import torch.distributed as dist


def parse():
    from megatron_mom.integrations.megatron_lm.args import add_mom_args
    p = argparse.ArgumentParser(allow_abbrev=False)
    for flag, typ, default in [
        ("num-layers", int, 2), ("hidden-size", int, 64), ("ffn-hidden-size", int, None),
        ("num-attention-heads", int, 4), ("seq-length", int, 64),
        ("max-position-embeddings", int, None), ("micro-batch-size", int, 2),
        ("global-batch-size", int, None), ("train-iters", int, 4), ("lr", float, 1e-3),
        ("tensor-model-parallel-size", int, 1), ("pipeline-model-parallel-size", int, 1),
        ("context-parallel-size", int, 1), ("vocab-size", int, 1024), ("seed", int, 1234),
        ("save", str, None), ("load", str, None), ("save-interval", int, None),
        ("log-interval", int, 1), ("normalization", str, "LayerNorm"),
        ("norm-epsilon", float, 1e-5), ("position-embedding-type", str, "learned_absolute"),
        ("transformer-impl", str, "transformer_engine"),
    ]:
        p.add_argument(f"--{flag}", type=typ, default=default)
    for flag in ("swiglu", "disable-bias-linear", "untie-embeddings-and-output-weights",
                 "sequence-parallel", "bf16"):
        p.add_argument(f"--{flag}", action="store_true")
    p.add_argument("--spec", nargs=2,
                   default=["megatron_mom.integrations.megatron_lm.presets", "mom"])
    add_mom_args(p)
    args, ignored = p.parse_known_args()
    if args.pipeline_model_parallel_size != 1 or args.context_parallel_size != 1:
        raise SystemExit("pretrain_standin.py: pipeline and context parallelism are not done here")
    args.num_experts, args.mtp_num_layers = None, None
    # What Megatron-LM's argument validation derives and keeps in a checkpoint's args.
    args.add_bias_linear = not args.disable_bias_linear
    args.padded_vocab_size = args.vocab_size
    args.kv_channels = args.hidden_size // args.num_attention_heads
    return args, ignored


def gpt(args):
    import importlib
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig
    from megatron_mom.testing import cpu
    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size, num_attention_heads=args.num_attention_heads,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        sequence_parallel=args.sequence_parallel, normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon, gated_linear_unit=args.swiglu,
        activation_func=torch.nn.functional.silu if args.swiglu else torch.nn.functional.gelu,
        add_bias_linear=not args.disable_bias_linear, hidden_dropout=0.0, attention_dropout=0.0,
        params_dtype=torch.bfloat16 if args.bf16 and torch.cuda.is_available() else torch.float32,
        **(cpu.megatron_cpu_config_overrides() if not torch.cuda.is_available() else {}))
    preset = getattr(importlib.import_module(args.spec[0]), args.spec[1])
    spec = preset.build(config, args)  # what pretrain_gpt.py's --spec builds
    model = GPTModel(config, spec, vocab_size=args.vocab_size,
                     max_sequence_length=args.max_position_embeddings or args.seq_length,
                     share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                     position_embedding_type=args.position_embedding_type)
    return model.to(torch.cuda.current_device()) if torch.cuda.is_available() else model


def batch(args, iteration, micro, dp_rank, device):
    """Sequences k, k+1, k+2, ... (mod vocab): the same on every TP rank of a DP rank."""
    g = torch.Generator().manual_seed(args.seed + 1_000_003 * iteration + 1009 * micro + dp_rank)
    start = torch.randint(0, args.vocab_size, (args.micro_batch_size, 1), generator=g)
    seq = (start + torch.arange(args.seq_length + 1)) % args.vocab_size
    return seq[:, :-1].to(device), seq[:, 1:].to(device)


def latest(path):
    """(iteration, checkpoint directory) named by Megatron-LM's tracker file, or (0, None)."""
    try:
        with open(os.path.join(path, "latest_checkpointed_iteration.txt")) as f:
            text = f.read().strip()
    except (OSError, TypeError):
        return 0, None
    if text == "release":
        return 0, os.path.join(path, "release")
    return int(text), os.path.join(path, f"iter_{int(text):07d}")


# Megatron-LM 0.16's _build_sharded_state_dict_metadata without a distributed optimizer.
SAVE_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}


def main():
    from megatron.core import dist_checkpointing, parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron_mom.layer import metrics

    args, ignored = parse()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    last = rank == world - 1
    ps.initialize_model_parallel(args.tensor_model_parallel_size, 1)
    model_parallel_cuda_manual_seed(args.seed)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    gbs = args.global_batch_size or args.micro_batch_size * dp
    if gbs % (args.micro_batch_size * dp):
        raise SystemExit(f"global batch {gbs} is not a multiple of micro batch x DP")
    num_micro = gbs // (args.micro_batch_size * dp)
    if last and ignored:
        print(f"pretrain_standin: ignoring {' '.join(a for a in ignored if a.startswith('--'))}")

    model = gpt(args)
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    metrics.set_router_loss_scale(1.0, num_micro, device=device)
    start, ckpt = latest(args.load) if args.load else (0, None)
    if ckpt:
        # As Megatron-LM: the model's checkpoint keys follow the checkpoint's content metadata.
        metadata = dist_checkpointing.load_content_metadata(ckpt) or {}
        state = {"model": model.sharded_state_dict(metadata=metadata)}
        model.load_state_dict(dist_checkpointing.load(state, ckpt)["model"])
        if last:
            print(f"  successfully loaded checkpoint from {args.load} at iteration {start}",
                  flush=True)

    num_mom = max(1, args.mom_layer_pattern.count("M"))
    for it in range(start + 1, args.train_iters + 1):
        t0 = time.time()
        opt.zero_grad()
        total = 0.0
        for micro in range(num_micro):
            tokens, labels = batch(args, it, micro, dp_rank, device)
            pos = torch.arange(tokens.shape[1], device=device)[None].expand_as(tokens)
            loss = model(tokens, pos, None, labels=labels).float().mean() / num_micro
            loss.backward()
            total += loss.item()
        # What Megatron's DDP and finalize_model_grads do: average over DP; sum the gradients
        # of replicated weights that saw only this rank's sequence shard over TP.
        for p in model.parameters():
            if p.grad is None:
                continue
            if getattr(p, "sequence_parallel", False) and args.tensor_model_parallel_size > 1:
                dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
            if dp > 1:
                dist.all_reduce(p.grad, group=ps.get_data_parallel_group())
                p.grad /= dp
        opt.step()
        lm = torch.tensor([total], device=device)
        dist.all_reduce(lm, group=ps.get_data_parallel_group())
        lb = metrics.router_loss_values().get(metrics.LOAD_BALANCING_LOSS)
        lb = torch.zeros(1, device=device) if lb is None else lb.sum().reshape(1).to(device)
        if args.sequence_parallel:  # each TP rank holds its tokens' share
            dist.all_reduce(lb, group=ps.get_tensor_model_parallel_group())
        if last and it % args.log_interval == 0:
            print(f" [{datetime.now()}] iteration {it:8d}/{args.train_iters:8d} | consumed "
                  f"samples: {it * gbs:12d} | elapsed time per iteration (ms): "
                  f"{(time.time() - t0) * 1000:.1f} | learning rate: {args.lr:.6E} | global "
                  f"batch size: {gbs:5d} | lm loss: {lm.item() / dp:.6E} | "
                  f"mom_load_balancing_loss: {lb.item() / num_mom / num_micro:.6E} |", flush=True)
        if args.save and (it == args.train_iters or (args.save_interval
                                                     and it % args.save_interval == 0)):
            path = os.path.join(args.save, f"iter_{it:07d}")
            if rank == 0:
                os.makedirs(path, exist_ok=True)
            dist.barrier()
            state = {"args": args, "checkpoint_version": 3.0, "iteration": it,
                     "model": model.sharded_state_dict(metadata=dict(SAVE_METADATA))}
            dist_checkpointing.save(state, path, content_metadata=dict(SAVE_METADATA))
            dist.barrier()
            if rank == 0:
                with open(os.path.join(args.save, "latest_checkpointed_iteration.txt"), "w") as f:
                    f.write(str(it))
            if last:
                print(f"  successfully saved checkpoint from iteration {it:7d} to {args.save}",
                      flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":  # dist_checkpointing's worker re-imports __main__
    main()
