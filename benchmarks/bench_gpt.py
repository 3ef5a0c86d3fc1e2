"""End-to-end training step: a MoM GPT against the attention GPT it replaces (Megatron-Core).

One full step per iteration: GPTModel forward + backward, Megatron DDP gradient finalisation and
the Megatron optimizer (Adam, bf16 params with fp32 main weights). For each model kind and
sequence length at a fixed number of tokens per step it reports ms/step, tokens/s, the ratio
to the attention GPT, peak memory, and the step's GPU time split by kernel kind from the torch
profiler (recurrence, convolution, GEMM, attention, elementwise/other, optimizer, host gap).

Kinds:  attention  the same GPT with softmax attention (TE's when Transformer Engine imports,
                   else PyTorch SDPA: megatron_mom.layer.attention.SDPAttention)
        mom        every layer MoM (paper: M=4, top-2, shared memory, 4 heads x 256)
        hybrid     MoM with an attention layer after every 7 MoM layers ("MMMMMMMA" * 3)
        mom1       one memory, no routing (M=1, top-1, no shared): the gated-DeltaNet equivalent
        mom-lean   `mom` with lean_backward=True
        mom-recompute `mom` whose recurrence keeps only its inputs for the backward, which
                   reruns the forward kernels first (KernelOptions(recompute_states=True))
        mom-full-recompute `mom` with Megatron's full activation recompute (every layer keeps
                   only its input; the backward reruns each layer's forward; eager only)
        mom-selective `mom` with Megatron's selective recompute of the mixing core
                   (--recompute-activations: each MoM layer keeps its input and read-out
                   and reruns its projection, memory path, mix and norm in the backward)

    python benchmarks/bench_gpt.py --shape 380m --seqs 4096,16384 --out DIR      (one GPU)
    python benchmarks/bench_gpt.py --shape tiny --seqs 64 --iters 2               (CPU smoke)
Writes bench_gpt.json and bench_gpt.md to --out. On the GPU each row's JSON also has `idle_ms`:
the GPU's idle time per profiled step by the step phase the host was in (forward, backward,
gradient finalisation, optimizer, other). `--grad-norm foreach` replaces Megatron's gradient
norm fallback without apex / Transformer Engine (a host read per gradient tensor) by
torch._foreach_norm for every kind, as a user with apex or TE has no such reads;
`--tensor-scale foreach` likewise replaces Megatron's per-tensor `multi_tensor_scale` fallback
(two kernels and their host work per parameter tensor, where the optimizer copies its fp32
parameters to the model's and where gradients are clipped) by torch's multi-tensor ops.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

SHAPES = {  # layers, hidden, ffn (SwiGLU), attention heads, vocab; MoM heads x head_dim
    "380m": dict(layers=24, hidden=1024, ffn=2048, heads=16, vocab=32768, mom_heads=4, head_dim=256),
    "1.3b": dict(layers=24, hidden=2048, ffn=5632, heads=32, vocab=32768, mom_heads=4, head_dim=256),
    "tiny": dict(layers=2, hidden=64, ffn=128, heads=4, vocab=256, mom_heads=2, head_dim=16),
}
KINDS = ("attention", "mom", "hybrid", "mom1", "mom-lean", "mom-recompute",
         "mom-full-recompute", "mom-selective")
HYBRID_PERIOD = "MMMMMMMA"
RECOMPUTE_OF_KIND = {"mom-full-recompute": "full", "mom-selective": "selective"}  # train.recompute

# Kernel-name fragments of each kind, matched in this order (first match wins).
KERNEL_KINDS = (
    ("recurrence", ("state_fwd", "state_bwd", "chunk_bwd", "prepare_kernel", "chunk_fwd",
                    "recurrent", "l2norm")),
    ("convolution", ("_conv_", "conv_l2norm", "short_conv")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_generated", "softmax")),
    ("optimizer", ("multi_tensor", "adam", "foreach", "l2norm_kernel", "clip")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "grouped_mm", "sm90_", "matmul",
              "splitk")),
    ("communication", ("nccl",)),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(k in low for k in keys):
            return kind
    return "elementwise"


def launch_options(specs) -> "KernelOptions":
    """KernelOptions with launch entries changed by `--launch` specs: "kernel.key=value" or,
    for the state kernels' entries per K bound, "kernel.K.key=value" (integers)."""
    from megatron_mom.ops import KernelOptions
    opts = KernelOptions()
    for spec in specs:
        path, _, value = spec.partition("=")
        parts = path.split(".")
        if not value.lstrip("-").isdigit() or len(parts) not in (2, 3):
            raise ValueError(f"--launch {spec!r}: give kernel.key=N or kernel.K.key=N, e.g. "
                             f"chunk_bwd_main.128.split_k=1 or state_fwd.256.BV=32")
        kernel, *bound, key = parts
        opts = opts.with_launch(kernel, int(bound[0]) if bound else None, **{key: int(value)})
    return opts


def mom_config(kind: str, shape: dict, kernels=None):
    from megatron_mom import MoMConfig
    mom = MoMConfig(num_memories=4, topk=2, shared_memory=True, num_heads=shape["mom_heads"],
                    head_dim=shape["head_dim"], chunk_size=16 if shape["head_dim"] < 64 else 64,
                    lean_backward=kind == "mom-lean")
    if kind == "mom1":
        mom = mom.replace(num_memories=1, topk=1, shared_memory=False)
    if kernels is not None or kind == "mom-recompute":
        from megatron_mom.ops import KernelOptions
        kernels = kernels or KernelOptions()
        if kind == "mom-recompute":
            kernels = kernels.replace(recompute_states=True)
        mom = mom.replace(execution=mom.execution.replace(kernels=kernels))
    return mom


def layer_spec(kind: str, config, shape: dict, kernels=None):
    from megatron_mom import get_hybrid_block_spec
    layers = config.num_layers
    if kind == "attention":
        pattern = "A" * layers
    elif kind == "hybrid":
        pattern = (HYBRID_PERIOD * (layers // len(HYBRID_PERIOD) + 1))[:layers]
        if "A" not in pattern:
            pattern = pattern[:-1] + "A"
    else:
        pattern = "M" * layers
    return get_hybrid_block_spec(config, pattern, mom_config(kind, shape, kernels),
                                 backend="auto")


def build(kind: str, shape: dict, seq: int, on_cpu: bool, cuda_graph: bool = False,
          init_state: dict = None, single_pool: bool = False, kernels=None):
    """(DDP model, Megatron optimizer, TransformerConfig, parameter count, device); the GPT's
    weights from `init_state` (a GPTModel state dict) when given, before the optimizer copies
    them. single_pool: Megatron's cuda_graph_use_single_mempool (at one pipeline stage
    megatron-core 0.16.1 captures every graph in one pool with or without it)."""
    from megatron.core.distributed import (DistributedDataParallel,
                                           DistributedDataParallelConfig, finalize_model_grads)
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer import TransformerConfig
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.module import Float16Module
    from megatron_mom.testing import cpu
    from megatron_mom.train.build import RECOMPUTE

    # Every kind from the same seeds: kinds of the same parameters start from the same weights.
    torch.manual_seed(1234)
    if cuda_graph:  # Megatron's graphs need an RNG tracker whose state lives on the device
        model_parallel_cuda_manual_seed(1234, use_cudagraphable_rng=True, force_reset_rng=True)
    else:
        model_parallel_cuda_manual_seed(1234)

    dtype = torch.float32 if on_cpu else torch.bfloat16
    overrides = cpu.megatron_cpu_config_overrides()
    overrides["use_cpu_initialization"] = on_cpu
    config = TransformerConfig(
        num_layers=shape["layers"], hidden_size=shape["hidden"], ffn_hidden_size=shape["ffn"],
        num_attention_heads=shape["heads"], gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, normalization="RMSNorm", layernorm_epsilon=1e-6,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.02,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, **overrides,
        hetereogenous_dist_checkpoint=kind == "hybrid",   # MoM and attention layers: own keys
        **RECOMPUTE[RECOMPUTE_OF_KIND.get(kind, "none")],
        **(dict(cuda_graph_impl="local", cuda_graph_warmup_steps=2,
                cuda_graph_use_single_mempool=single_pool) if cuda_graph else {}))
    has_attention = kind in ("attention", "hybrid")
    gpt = GPTModel(config, layer_spec(kind, config, shape, kernels), vocab_size=shape["vocab"],
                   max_sequence_length=seq, share_embeddings_and_output_weights=False,
                   position_embedding_type="rope" if has_attention else "none")
    device = torch.device("cpu") if on_cpu else torch.device("cuda", torch.cuda.current_device())
    gpt = gpt.to(device)
    if init_state is not None:
        result = gpt.load_state_dict(init_state, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise ValueError(f"bench_gpt: init_state does not fit the model: missing {missing}, "
                             f"unexpected {result.unexpected_keys}")
    inner = Float16Module(config, gpt) if dtype == torch.bfloat16 else gpt
    model = DistributedDataParallel(config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False), inner)
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=3e-4, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95,
        clip_grad=1.0, bf16=dtype == torch.bfloat16, params_dtype=dtype), [model])
    config.finalize_model_grads_func = finalize_model_grads
    return model, optimizer, config, sum(p.numel() for p in gpt.parameters()), device


# The phases of a step, as profiler ranges: `profile_split` charges each GPU idle interval to
# the phase the host was in when it happened.
PHASES = ("forward", "backward", "finalize_grads", "optimizer")


def train_step(model, optimizer, config, tokens, positions):
    from megatron.core.distributed import finalize_model_grads
    from torch.profiler import record_function
    model.zero_grad_buffer()
    optimizer.zero_grad()
    with record_function("step/forward"):
        loss = model(tokens, positions, None, labels=tokens).float().mean()
    with record_function("step/backward"):
        loss.backward()
    with record_function("step/finalize_grads"):
        finalize_model_grads([model])
    with record_function("step/optimizer"):
        optimizer.step()
    if config.cuda_graph_impl == "local":  # what Megatron's schedules call after each step
        from megatron.core.transformer.cuda_graphs import create_cudagraphs
        create_cudagraphs()
    return loss


def foreach_grad_norm():
    """Megatron's gradient-norm fallback without apex or Transformer Engine
    (`megatron.core.utils.local_multi_tensor_l2_norm`) reads every per-tensor norm on the host
    (one sync a gradient tensor); this replaces it, in this process, by torch's multi-tensor
    norm (`torch._foreach_norm`, no host read), which is what apex's and TE's fused
    `multi_tensor_l2norm` give a user who has them: same value up to summation order."""
    from megatron.core.optimizer import clip_grads

    def l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
        norms = [n for ts in tensor_lists if ts for n in torch._foreach_norm(ts)]
        return torch.linalg.vector_norm(torch.stack(norms).float()).reshape(1), None

    clip_grads.l2_norm_impl = l2_norm


def foreach_tensor_scale():
    """Megatron's `multi_tensor_scale` fallback without apex or Transformer Engine
    (`megatron.core.utils.local_multi_tensor_scale`) launches `dst.copy_(src * scale)` per
    tensor, from the host, where the optimizer copies its fp32 parameters into the model's bf16
    ones and where gradients are clipped; this replaces it, in this process, by torch's
    multi-tensor ops, as apex's or TE's fused `multi_tensor_scale` does it for a user who has
    them: the same values (a bf16 copy of the fp32 product, rounded once)."""
    from megatron.core.optimizer import clip_grads, optimizer

    def scale(chunk_size, noop_flag, tensor_lists, factor):
        src, dst = tensor_lists
        if not dst:                    # torch's multi-tensor ops refuse empty lists
            return
        if all(a is b for a, b in zip(src, dst)):
            torch._foreach_mul_(dst, factor)
        else:
            torch._foreach_copy_(dst, src if factor == 1.0 else torch._foreach_mul(src, factor))

    clip_grads.multi_tensor_scale_impl = scale
    optimizer.multi_tensor_scale_impl = scale


def measure(kind: str, shape: dict, seq: int, tokens_per_step: int, iters: int, warmup: int,
            profile_iters: int, on_cpu: bool, cuda_graph: bool = False,
            host_profile: str = "", single_pool: bool = False, kernels=None,
            sync_debug: bool = False) -> dict:
    mbs = max(tokens_per_step // seq, 1)
    model, optimizer, config, nparams, device = build(kind, shape, seq, on_cpu, cuda_graph,
                                                      single_pool=single_pool, kernels=kernels)
    gen = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, shape["vocab"], (mbs, seq), generator=gen).to(device)
    positions = torch.arange(seq, device=device).expand(mbs, -1)
    sync = (lambda: None) if on_cpu else torch.cuda.synchronize
    for _ in range(warmup):
        loss = train_step(model, optimizer, config, tokens, positions)
    sync()
    if not on_cpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(iters):
        loss = train_step(model, optimizer, config, tokens, positions)
    sync()
    ms = (time.perf_counter() - t0) / iters * 1e3
    if host_profile:
        host_functions(lambda: train_step(model, optimizer, config, tokens, positions),
                       f"{host_profile}_{kind}_{seq}.txt", sync)
    syncs = (host_syncs(lambda: train_step(model, optimizer, config, tokens, positions))
             if sync_debug and not on_cpu else None)
    graphs = ("+graph1pool" if single_pool else "+graph") if cuda_graph else ""
    row = dict(kind=kind + graphs, seq=seq, mbs=mbs, params=nparams,
               params_m=round(nparams / 1e6, 1), ms=round(ms, 2),
               tokens_per_s=round(mbs * seq / ms * 1e3), loss=round(float(loss.detach()), 4))
    if not on_cpu:
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        # CUDA graphs keep their tensors in private pools that the allocated count omits once
        # captured: the reserved peak is the footprint to compare there.
        row["reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        row["activations_gib"] = round(activation_memory(model, tokens, positions) / 2**30, 2)
    if syncs is not None:
        row["host_syncs"] = syncs
    if profile_iters:
        row.update(profile_split(lambda: train_step(model, optimizer, config, tokens, positions),
                                 profile_iters, ms, on_cpu))
    del model, optimizer
    gc.collect()
    if not on_cpu:
        torch.cuda.empty_cache()
    return row


def host_syncs(step) -> list:
    """The Python lines that made the host wait for the GPU in one step (torch's sync debug
    mode), each as "file:line xN": a sync in the layers stalls the launch queue, and Megatron's
    per-step ones (e.g. the gradient norm) show here too."""
    import collections
    import warnings
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    where = collections.Counter(f"{os.path.relpath(w.filename)}:{w.lineno}" for w in caught
                                if "synchroniz" in str(w.message))
    return [f"{k} x{n}" for k, n in where.most_common()]


def host_functions(step, path: str, sync, n: int = 3):
    """cProfile of n steps: where the host's time goes (Python, launches, syncs)."""
    import cProfile
    import io
    import pstats
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        step()
    sync()
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(45)
    stats.sort_stats("cumulative").print_stats(60)
    open(path, "w").write(out.getvalue())


def activation_memory(model, tokens, positions) -> int:
    """Bytes the forward keeps for the backward (allocated after forward minus before)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    loss = model(tokens, positions, None, labels=tokens).float().mean()
    held = torch.cuda.memory_allocated() - before
    loss.backward()
    model.zero_grad_buffer()
    return held


def profile_split(step, n: int, wall_ms: float, on_cpu: bool) -> dict:
    """GPU (or CPU) kernel time per step by kind, and the top kernels."""
    from torch.profiler import ProfilerActivity, profile
    # On the GPU the host's ops are recorded too: `idle_by_phase` needs the phases' host ranges
    # (which makes the profiled steps' host slower than the timed ones: more idle there).
    activities = [ProfilerActivity.CPU] + ([] if on_cpu else [ProfilerActivity.CUDA])
    with profile(activities=activities) as prof:
        for _ in range(n):
            step()
        if not on_cpu:
            torch.cuda.synchronize()
    split, top = {}, []
    for e in prof.key_averages():
        t = (e.self_device_time_total if not on_cpu else e.self_cpu_time_total) / n / 1e3
        if t <= 0 or (not on_cpu and not _device_work(e)):
            continue
        kind = kernel_kind(e.key)
        split[kind] = split.get(kind, 0.0) + t
        top.append((round(t, 3), e.count // n, e.key[:100]))
    busy = sum(split.values())
    split = {k: round(v, 2) for k, v in sorted(split.items(), key=lambda kv: -kv[1])}
    top.sort(reverse=True)
    row = dict(gpu_ms=round(busy, 2), host_gap_ms=round(max(wall_ms - busy, 0.0), 2),
               split=split, top=top[:120])
    if not on_cpu:
        row["idle_ms"] = idle_by_phase(prof.events(), n)
    return row


def _device_work(e) -> bool:
    """Whether a profiler event is a kernel, copy or memset: not a host event, and not the
    device-side event that a `record_function` range (ours, or the optimizer's
    "Optimizer.step#AdamW.step") makes to span its kernels and the idle gaps between them."""
    return (e.device_type.name == "CUDA" and not getattr(e, "is_user_annotation", False)
            and not e.key.startswith("step/"))


def idle_by_phase(events, n: int) -> dict:
    """GPU idle time per step (no kernel or copy running, between the first and the last) by
    the step phase (`PHASES`) the host was in meanwhile; "other": between the phases."""
    busy = sorted((e.time_range.start, e.time_range.end) for e in events if _device_work(e))
    phases = [(e.time_range.start, e.time_range.end, e.name.split("/", 1)[1]) for e in events
              if e.device_type.name == "CPU" and e.name.startswith("step/")]
    idle = dict.fromkeys(PHASES + ("other",), 0.0)
    if not busy:
        return idle
    end = busy[0][1]
    for start, stop in busy[1:]:
        if start > end:                                   # the GPU waited from end to start
            rest = start - end
            for a, b, name in phases:
                part = max(0.0, min(b, start) - max(a, end))
                idle[name] += part
                rest -= part
            idle["other"] += max(rest, 0.0)
        end = max(end, stop)
    return {k: round(v / n / 1e3, 2) for k, v in idle.items()}


def _memory_gib(row):
    """What a row's memory is compared by: the reserved footprint under CUDA graphs (the
    allocated peak does not see the graphs' private pool at replay), else the allocated peak."""
    return row.get("reserved_gib") if row["kind"].endswith("+graph") else row.get("peak_gib")


def markdown(rows, header: str) -> str:
    """The rows as a table, each against the attention row of its sequence length run the same
    way (eager or under CUDA graphs): tokens/s and memory (`_memory_gib`)."""
    same_way = lambda r: (r["seq"], r["kind"].endswith("+graph"))     # noqa: E731
    base = {same_way(r): r for r in rows if r["kind"].split("+")[0] == "attention"}
    kinds = sorted({k for r in rows for k in r.get("split", {})})
    lines = [header, "",
             "| kind | seq x mbs | params | ms/step | tokens/s | vs attention | peak GiB | "
             "reserved GiB | memory vs attention | activations GiB | GPU ms | host gap |"
             + "".join(f" {k} |" for k in kinds),
             "|" + "---|" * (12 + len(kinds))]
    for r in rows:
        ref = base.get(same_way(r))
        ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        mine, theirs = _memory_gib(r), ref and _memory_gib(ref)
        memory = f"{mine / theirs:.2f}x" if mine and theirs else "-"
        split = r.get("split", {})
        label = r["kind"] + (f" ({', '.join(r['launch'])})" if r.get("launch") else "")
        lines.append(
            f"| {label} | {r['seq']} x {r['mbs']} | {r['params_m']}M | {r['ms']} | "
            f"{r['tokens_per_s']} | {ratio} | {r.get('peak_gib', '-')} | "
            f"{r.get('reserved_gib', '-')} | {memory} | "
            f"{r.get('activations_gib', '-')} | {r.get('gpu_ms', '-')} | "
            f"{r.get('host_gap_ms', '-')} |" + "".join(f" {split.get(k, '-')} |" for k in kinds))
    return "\n".join(lines) + "\n"


def merge(paths, out: str) -> str:
    """One table of the rows of several bench_gpt.json files (e.g. the graphed rows, a process
    each), written to OUT/bench_gpt_merged.md."""
    rows, envs = [], []
    for path in paths:
        saved = json.load(open(path))
        launch = saved["env"].get("launch")       # the run's --launch settings, if any
        rows += [dict(r, launch=launch) for r in saved["rows"] if "error" not in r]
        envs.append(saved["env"])
    devices = sorted({e.get("device", "?") for e in envs})
    dates = sorted(e.get("date", "?") for e in envs)
    md = markdown(rows, f"bench_gpt, {len(paths)} runs merged: {', '.join(devices)}, "
                        f"{dates[0]} to {dates[-1]}")
    open(os.path.join(out, "bench_gpt_merged.md"), "w").write(md)
    return md


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="380m")
    p.add_argument("--layers", type=int, help="override the shape's number of layers")
    p.add_argument("--kinds", default="attention,mom,hybrid,mom1",
                   help=f"comma-separated, from {KINDS}")
    p.add_argument("--seqs", default="4096,16384", help="comma-separated sequence lengths")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per step (mbs = tokens/seq)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile-iters", type=int, default=2, help="0: no kernel split")
    p.add_argument("--cuda-graph", action="store_true",
                   help="Megatron's per-layer CUDA graphs (cuda_graph_impl='local')")
    p.add_argument("--cuda-graph-single-mempool", action="store_true",
                   help="with --cuda-graph: Megatron's cuda_graph_use_single_mempool "
                   "(megatron-core 0.16.1 shares one pool across graphs without pipeline "
                   "parallelism anyway; the flag matters with several pipeline stages)")
    p.add_argument("--host-profile", action="store_true",
                   help="write a cProfile of 3 steps per case to OUT/host_<kind>_<seq>.txt")
    p.add_argument("--sync-debug", action="store_true",
                   help="after timing, one more step under torch's sync debug mode: the Python "
                   "lines that made the host wait for the GPU, in the JSON as host_syncs")
    p.add_argument("--launch", action="append", default=[], metavar="KERNEL.KEY=N",
                   help="a MoM kernel launch setting for every MoM kind (repeatable), e.g. "
                   "chunk_bwd_main.128.split_k=1 or state_fwd.256.BV=32 (megatron_mom.ops.options)")
    p.add_argument("--grad-norm", choices=("megatron", "foreach"), default="megatron",
                   help="foreach: Megatron's gradient-norm fallback without apex / TE (a host "
                   "read per gradient tensor) replaced by torch._foreach_norm for every kind, "
                   "as apex's or TE's fused norm has no host read (`foreach_grad_norm`)")
    p.add_argument("--tensor-scale", choices=("megatron", "foreach"), default="megatron",
                   help="foreach: Megatron's multi_tensor_scale fallback without apex / TE (two "
                   "kernels per parameter tensor, launched one tensor at a time: the optimizer's "
                   "fp32-to-bf16 parameter copy, gradient clipping) replaced by torch's "
                   "multi-tensor ops for every kind, as apex's or TE's fused one "
                   "(`foreach_tensor_scale`)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="measure nothing: one table of these bench_gpt.json files' rows, each "
                   "against the attention row of its length run the same way, to "
                   "OUT/bench_gpt_merged.md")
    a = p.parse_args(argv)
    if a.merge:
        os.makedirs(a.out, exist_ok=True)
        print(merge(a.merge, a.out))
        return []
    try:
        kernels = launch_options(a.launch) if a.launch else None
    except ValueError as err:
        p.error(str(err))
    kinds = a.kinds.split(",")
    bad = sorted(set(kinds) - set(KINDS))
    if bad:
        p.error(f"--kinds: unknown {bad}; choose from {KINDS}")
    if a.cuda_graph_single_mempool and not a.cuda_graph:
        p.error("--cuda-graph-single-mempool needs --cuda-graph")
    if a.cuda_graph and "mom-full-recompute" in kinds:
        p.error("--cuda-graph: Megatron's per-layer graphs do not capture full activation "
                "recompute; run mom-full-recompute without --cuda-graph")
    shape = dict(SHAPES[a.shape])
    if a.layers:
        shape["layers"] = a.layers

    os.makedirs(a.out, exist_ok=True)
    from megatron_mom.train.build import init_process_groups
    par = init_process_groups(1, 1, seed=1234)
    env = dict(device="cpu" if par.on_cpu else torch.cuda.get_device_name(),
               torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    if a.launch:
        env["launch"] = a.launch
    if a.grad_norm == "foreach":
        foreach_grad_norm()
        env["grad_norm"] = "foreach"
    if a.tensor_scale == "foreach":
        foreach_tensor_scale()
        env["tensor_scale"] = "foreach"
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    rows = []
    for seq in (int(s) for s in a.seqs.split(",")):
        for kind in kinds:
            try:
                row = measure(kind, shape, seq, a.tokens, a.iters, a.warmup, a.profile_iters,
                              par.on_cpu, a.cuda_graph,
                              os.path.join(a.out, "host") if a.host_profile else "",
                              single_pool=a.cuda_graph_single_mempool, kernels=kernels,
                              sync_debug=a.sync_debug)
            except Exception as e:  # report it (OOM, a failed graph capture), measure the rest
                traceback.print_exc()
                row = dict(kind=kind, seq=seq, mbs=max(a.tokens // seq, 1), params_m="-",
                           ms="failed", tokens_per_s=0, error=f"{type(e).__name__}: {e}"[:300])
                gc.collect()
                if not par.on_cpu:
                    torch.cuda.empty_cache()
            if a.cuda_graph:  # Megatron keeps graphs process-wide: the next model records anew
                from megatron.core.transformer.cuda_graphs import delete_cuda_graphs
                delete_cuda_graphs()
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "top"}), flush=True)
            json.dump(dict(env=env, shape=shape, rows=rows), open(
                os.path.join(a.out, "bench_gpt.json"), "w"), indent=1)
    header = (f"bench_gpt: shape {a.shape} ({shape['layers']} layers, hidden {shape['hidden']}), "
              f"{a.tokens} tokens/step, {env}")
    md = markdown([r for r in rows if "error" not in r], header)
    open(os.path.join(a.out, "bench_gpt.md"), "w").write(md)
    print(md)
    return rows


if __name__ == "__main__":
    main()
