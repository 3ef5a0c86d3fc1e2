"""`megatron-mom`: train, generate, mqar.

    megatron-mom train [--config FILE] [--resume] [--steps N] [--set key=value ...]
    torchrun --nproc-per-node 4 -m megatron_mom.cli.main train --tp 2 --pp 2 ...
    megatron-mom generate --checkpoint runs/tiny_hybrid --prompt "Return the"
    megatron-mom mqar [--preset tiny|gpu] [--out runs/mqar]
    megatron-mom mqar --preset zoology --budget-minutes 8 --out runs/mqar_zoology
"""
from __future__ import annotations

import argparse
import os
import sys


def _train_parser(sub):
    p = sub.add_parser("train", help="train a MoM hybrid GPT (the embedded tiny hybrid by "
                                     "default)")
    p.add_argument("--config", help="YAML run config (default: the embedded tiny hybrid, "
                                    "written out in examples/configs/tiny_hybrid.yaml)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in the output directory")
    p.add_argument("--steps", type=int, help="train.steps")
    p.add_argument("--output-dir", help="where checkpoints, metrics.jsonl and loss.png go")
    p.add_argument("--tp", type=int, help="parallel.tensor_model_parallel_size")
    p.add_argument("--pp", type=int, help="parallel.pipeline_model_parallel_size")
    p.add_argument("--sequence-parallel", action="store_true", default=None,
                   help="parallel.sequence_parallel")
    p.add_argument("--distributed-optimizer", action="store_true", default=None,
                   help="parallel.use_distributed_optimizer")
    p.add_argument("--stop-after", type=int,
                   help="stop (with a checkpoint) after this many steps, keeping the "
                        "schedule of train.steps; continue later with --resume")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set train.lr=1e-3 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _generate_parser(sub):
    p = sub.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("--checkpoint", required=True,
                   help="a run's output directory, its checkpoints/ folder or an iter_* folder")
    p.add_argument("--prompt", help="text to continue (default: the run's generate.prompt)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float, help="0 for greedy decoding")
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decode", choices=("full", "recurrent"),
                   help="full: a forward pass over the text per token; recurrent: MoM states "
                        "and attention KV cache (default: the run's generate.decode)")


def _mqar_parser(sub):
    p = sub.add_parser("mqar", help="multi-query associative recall: MoM vs one memory vs "
                                    "attention")
    p.add_argument("--preset", default="tiny",
                   help="tiny (CPU, minutes) or gpu; the sweeps: zoology (one GPU), "
                        "zoology-cpu (CI size)")
    p.add_argument("--out", default="runs/mqar", help="output folder (table, plot, json)")
    p.add_argument("--mixers", help="comma-separated subset of: mom,single,attention (and for "
                                    "the sweeps mom-noshared,single-state,single-params,hybrid)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset field, e.g. --set train_steps=200")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    # The Zoology-style sweep (megatron_mom/mqar_sweep.py): presets zoology, zoology-cpu.
    p.add_argument("--budget-minutes", type=float,
                   help="wall-time budget (budget_minutes); the zoology presets fit their "
                        "step count to it and stop there")
    p.add_argument("--workers", type=int,
                   help="zoology presets: runs in parallel, in processes sharing the GPU "
                        "(default: min(8, CPUs - 2) on a GPU, 1 on the CPU)")


def _overrides(args) -> dict:
    from megatron_mom.train.config import parse_override
    flags = {"train.steps": args.steps, "output_dir": args.output_dir,
             "parallel.tensor_model_parallel_size": args.tp,
             "parallel.pipeline_model_parallel_size": args.pp,
             "parallel.sequence_parallel": args.sequence_parallel,
             "parallel.use_distributed_optimizer": args.distributed_optimizer}
    out = {k: v for k, v in flags.items() if v is not None}
    out.update(parse_override(text) for text in args.set)
    return out


def _run_train(args) -> int:
    from megatron_mom.train import load_config
    from megatron_mom.train.loop import train
    cfg = load_config(args.config, _overrides(args))
    result = train(cfg, resume=args.resume, stop_after=args.stop_after,
                   show_progress=not args.no_progress)
    if result.losses and int(os.environ.get("RANK", "0")) == 0:
        print(f"done: loss {result.losses[0]:.3f} (step {result.first_step}) -> "
              f"{result.losses[-1]:.3f} (step {result.first_step + len(result.losses) - 1}); "
              f"outputs in {result.output_dir}")
    return 0


def _run_generate(args) -> int:
    from megatron_mom.train.generate import generate_command
    print(generate_command(args.checkpoint, args.prompt, args.max_new_tokens, args.temperature,
                           args.top_k, args.seed, args.decode))
    return 0


def _run_mqar(args) -> int:
    from megatron_mom.train.config import ConfigError, parse_override
    from megatron_mom import mqar
    from megatron_mom import mqar_sweep
    overrides = dict(parse_override(text) for text in args.set)
    mixers = args.mixers.split(",") if args.mixers else None
    if args.budget_minutes is not None:
        overrides["budget_minutes"] = args.budget_minutes
    if args.preset in mqar_sweep.PRESETS:
        if args.workers is not None:
            overrides["workers"] = args.workers
        mqar_sweep.run(args.preset, args.out, overrides=overrides, mixers=mixers,
                       device=args.device)
        return 0
    if args.workers is not None:
        raise ConfigError(f"--workers applies to the sweep presets "
                          f"({', '.join(mqar_sweep.PRESETS)}), not to {args.preset!r}")
    mqar.run(args.preset, args.out, overrides=overrides, mixers=mixers, device=args.device)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-mom", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _generate_parser(sub)
    _mqar_parser(sub)
    args = parser.parse_args(argv)
    run = {"train": _run_train, "generate": _run_generate, "mqar": _run_mqar}[args.command]
    from megatron_mom.train.config import ConfigError
    try:
        return run(args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"megatron-mom {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        _shutdown()


def _shutdown() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":  # torchrun -m megatron_mom.cli.main; dist_checkpointing needs this
    sys.exit(main())
