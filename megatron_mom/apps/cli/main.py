"""`megatron-mom`: train, generate, mqar.

    megatron-mom train [--config FILE] [--resume] [--steps N] [--set key=value ...]
    torchrun --nproc-per-node 4 -m megatron_mom.apps.cli.main train --tp 2 --pp 2 ...
    megatron-mom generate --checkpoint runs/tiny_hybrid --prompt "Return the"
    megatron-mom mqar [--preset tiny|cpu|gpu] [--out runs/mqar]
    megatron-mom mqar --preset zoology --budget-minutes 8 --out runs/mqar_zoology
    megatron-mom export --checkpoint runs/tiny_hybrid --out hf/tiny_hybrid
    megatron-mom import --hf hf/tiny_hybrid --out runs/imported [--tp 2 --pp 2 under torchrun]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings

# Megatron-Core's notices at import and configuration time that a megatron-mom command does
# not act on (it runs without Transformer Engine and Apex by design, and sets no CUDA-graph
# scope): silenced for the command only, not for programs that import megatron_mom.
QUIET_WARNINGS = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"full scope is deprecated",
)


def _train_parser(sub):
    p = sub.add_parser("train", help="train a MoM hybrid GPT (the embedded tiny hybrid by "
                                     "default)")
    p.add_argument("--config", help="YAML run config with the keys to change (default: the "
                                    "embedded tiny hybrid, written out with comments in the "
                                    "source tree's examples/configs/tiny_hybrid.yaml; every "
                                    "checkpoint holds its run's full config.yaml)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in the output directory (with "
                        "its config; train.steps stays the saved run's unless --steps)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in the output directory (refused without it)")
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
                   help="tiny (default; seconds on a CPU: shows that it runs, its accuracies "
                        "are at chance level), cpu (a few minutes on a CPU) or gpu (about 5 "
                        "minutes on one GPU); the sweeps: zoology (one GPU), zoology-cpu (CI "
                        "size)")
    p.add_argument("--out", default="runs/mqar", help="output folder (table, plot, json)")
    p.add_argument("--mixers", help="comma-separated subset of: mom,single,attention (and for "
                                    "the sweeps mom-noshared,single-state,single-params,hybrid)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset field, e.g. --set train_steps=200")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    # The Zoology-style sweep (megatron_mom/apps/mqar_sweep.py): presets zoology, zoology-cpu.
    p.add_argument("--budget-minutes", type=float,
                   help="wall-time budget (budget_minutes); the zoology presets fit their "
                        "step count to it and stop there")
    p.add_argument("--workers", type=int,
                   help="zoology presets: runs in parallel, in processes sharing the GPU "
                        "(default: min(8, CPUs - 2) on a GPU, 1 on the CPU)")


def _export_parser(sub):
    p = sub.add_parser("export", help="a Megatron checkpoint (megatron-mom train or Megatron-LM "
                                      "pretrain_gpt.py) -> a Hugging Face MomForCausalLM folder")
    p.add_argument("--checkpoint", required=True,
                   help="a run's output directory (or its checkpoints/ or an iter_* folder), or "
                        "a Megatron-LM --save directory (or one of its iter_*/release folders)")
    p.add_argument("--out", required=True, help="the new Hugging Face folder")
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest safetensors file before the weights are sharded with an index")
    p.add_argument("--tokenizer", help="a folder of Hugging Face tokenizer files to include")


def _import_parser(sub):
    p = sub.add_parser("import", help="a Hugging Face MomForCausalLM folder -> a megatron-mom "
                                      "train run or a Megatron-LM checkpoint")
    p.add_argument("--hf", required=True, help="the Hugging Face folder (safetensors)")
    p.add_argument("--out", required=True, help="the new run / --save directory")
    p.add_argument("--format", choices=("megatron-mom", "megatron-lm"), default="megatron-mom",
                   help="megatron-mom: a run that `megatron-mom train --resume` continues at "
                        "--tp/--pp (launch with torchrun for TP * PP > 1); megatron-lm: a "
                        "release checkpoint for pretrain_gpt.py --load (any TP/PP)")
    p.add_argument("--tp", type=int, help="parallel.tensor_model_parallel_size (megatron-mom)")
    p.add_argument("--pp", type=int, help="parallel.pipeline_model_parallel_size (megatron-mom)")
    p.add_argument("--config", help="run config for the training settings (megatron-mom)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a run-config key, e.g. --set train.lr=1e-4 (megatron-mom)")
    p.add_argument("--transformer-impl", choices=("local", "transformer_engine"),
                   help="layer naming of the Megatron-LM run (megatron-lm; default local)")


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
    from megatron_mom.train.checkpoint import resume_config
    from megatron_mom.train.loop import train
    overrides = _overrides(args)
    cfg = (resume_config if args.resume else load_config)(args.config, overrides)
    result = train(cfg, resume=args.resume, stop_after=args.stop_after,
                   show_progress=not args.no_progress, overwrite=args.overwrite)
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


def _run_export(args) -> int:
    from megatron_mom.apps import hf_checkpoint
    print(hf_checkpoint.export(args.checkpoint, args.out, args.max_shard_size, args.tokenizer))
    return 0


def _run_import(args) -> int:
    from megatron_mom.apps import hf_checkpoint
    from megatron_mom.train.config import ConfigError, parse_override
    flags_of = {"megatron-mom": {"--tp": args.tp, "--pp": args.pp, "--config": args.config,
                                 "--set": args.set or None},
                "megatron-lm": {"--transformer-impl": args.transformer_impl}}
    other = "megatron-mom" if args.format == "megatron-lm" else "megatron-lm"
    given = [flag for flag, value in flags_of[other].items() if value is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} apply to --format {other}, not {args.format}: "
                          f"drop them or import with --format {other}")
    if args.format == "megatron-lm":
        text = hf_checkpoint.import_megatron_lm(args.hf, args.out,
                                                args.transformer_impl or "local")
    else:
        overrides = dict(parse_override(text) for text in args.set)
        for key, value in (("parallel.tensor_model_parallel_size", args.tp),
                           ("parallel.pipeline_model_parallel_size", args.pp)):
            if value is not None:
                overrides[key] = value
        text = hf_checkpoint.import_run(args.hf, args.out, args.config, overrides)
    if int(os.environ.get("RANK", "0")) == 0:
        print(text)
    return 0


def _run_mqar(args) -> int:
    from megatron_mom.train.config import ConfigError, parse_override
    from megatron_mom.apps import mqar
    from megatron_mom.apps import mqar_sweep
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
    _export_parser(sub)
    _import_parser(sub)
    args = parser.parse_args(argv)
    run = {"train": _run_train, "generate": _run_generate, "mqar": _run_mqar,
           "export": _run_export, "import": _run_import}[args.command]
    from megatron_mom.train.config import ConfigError
    from megatron_mom.train.safe_load import CheckpointError
    try:
        with _quiet_megatron_warnings():
            return run(args)
    except (ConfigError, CheckpointError, FileNotFoundError, _conversion_error()) as err:
        # A config error arises alike on every rank (torchrun): rank 0 reports it once.
        if not isinstance(err, ConfigError) or int(os.environ.get("RANK", "0")) == 0:
            print(f"megatron-mom {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        _shutdown()


@contextlib.contextmanager
def _quiet_megatron_warnings():
    with warnings.catch_warnings():
        for message in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        yield


def _conversion_error():
    from megatron_mom.apps.hf import ConversionError
    return ConversionError


def _shutdown() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":  # torchrun -m megatron_mom.apps.cli.main; dist_checkpointing needs this
    sys.exit(main())
