"""Parallel-vs-single-process comparisons, run as `torchrun --nproc_per_node 2 parallel_worker.py`.

Each phase re-initialises Megatron's parallel state on the same two gloo processes, so one
launch covers every layout. Results (max relative errors, losses) go to OUT/results_<name>.json;
tests/parallel/test_parallel.py asserts on them.

  layer: the MoM mixer alone in float64, TP=2, TP=2+SP, CP=2 (dense and packed documents)
         against the same mixer at TP=1: outputs, input gradients and parameter gradients
         (reduced as Megatron's DDP/finalize_model_grads would); and the grouped projection
         in float32 at TP=1, TP=2, TP=2+SP (packed documents) against the dense one at TP=1.
  gpt:   a MoM/attention GPT through Megatron's DDP, schedules and finalize_model_grads at
         TP=2+SP, CP=2 (MoM only) and PP=2, starting from one TP=1 distributed checkpoint;
         losses compared, gradients compared by checkpointing them and reloading at TP=1;
         a checkpoint saved at TP=2 reloads at TP=1 with bitwise-equal parameters.
"""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from megatron_mom import MoMConfig
from megatron_mom.testing import cpu  # noqa: E402

F64 = torch.float64
DEVICE = "cpu"


def setup(tp=1, pp=1, cp=1, vpp=None, seed=1234):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tp, pp, virtual_pipeline_model_parallel_size=vpp,
                                 context_parallel_size=cp)
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    return ps


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def cp_local(x, cp, rank, dim=0):
    """Megatron's load-balanced context-parallel split: chunks rank and 2cp-1-rank."""
    if cp == 1:
        return x
    chunks = x.chunk(2 * cp, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]], dim=dim)


# ---------------------------------------------------------------------------------- layer
def layer_phase(mode, official, mom, x, dy, cu_docs, dtype=F64):
    """Run the mixer under `mode` (a layout, "_selective": with Megatron's selective recompute);
    return full-sequence output, input grad and official-format parameter grads (identical on
    every rank)."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.spec_utils import build_module
    from megatron_mom.apps.convert import from_official_mom, to_official_mom
    from megatron_mom.layer.specs import get_mom_module_spec
    from megatron_mom.train.build import RECOMPUTE
    recompute = RECOMPUTE["selective" if mode.endswith("_selective") else "none"]
    mode = mode.removesuffix("_selective")
    tp = 2 if mode.startswith("tp2") else 1
    cp = 2 if mode == "cp2" else 1
    sp = mode == "tp2_sp"
    ps = setup(tp=tp, cp=cp)
    overrides = cpu.megatron_cpu_config_overrides() if DEVICE == "cpu" else \
        {"gradient_accumulation_fusion": False}
    config = TransformerConfig(num_layers=1, hidden_size=x.shape[-1], num_attention_heads=4,
                               params_dtype=dtype, tensor_model_parallel_size=tp,
                               context_parallel_size=cp, sequence_parallel=sp, **overrides,
                               **recompute)
    layer = build_module(get_mom_module_spec(mom, backend="local"), config=config,
                         layer_number=1).to(DEVICE)
    assert layer.train()._recomputes_core() == bool(recompute)
    x, dy = x.to(DEVICE, dtype), dy.to(DEVICE, dtype)
    if cu_docs is not None:
        cu_docs = cu_docs.to(DEVICE, torch.int32)
    tp_rank, cp_rank = ps.get_tensor_model_parallel_rank(), ps.get_context_parallel_rank()
    layer.load_state_dict(from_official_mom(official, mom, tp_rank, tp))

    def local(t):
        t = cp_local(t, cp, cp_rank)
        return t.chunk(tp)[tp_rank] if sp else t

    x_local = local(x).clone().requires_grad_(True)
    if mom.grouped_projection == "on":
        assert layer._grouped_projection_applies(x_local), mode
    packed = None if cu_docs is None else PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu_docs, cu_seqlens_kv=cu_docs)
    out, _ = layer(x_local, packed_seq_params=packed)
    out.backward(local(dy))

    grads = {n: p.grad.double() for n, p in layer.named_parameters()}
    for n, p in layer.named_parameters():   # what finalize_model_grads / DDP would reduce
        if sp and getattr(p, "sequence_parallel", False):
            dist.all_reduce(grads[n], group=ps.get_tensor_model_parallel_group())
        if cp > 1:
            dist.all_reduce(grads[n], group=ps.get_context_parallel_group())
    if tp > 1:
        shards = [None] * tp
        dist.all_gather_object(shards, {n: g.cpu() for n, g in grads.items()},
                               group=ps.get_tensor_model_parallel_group())
    else:
        shards = [{n: g.cpu() for n, g in grads.items()}]
    param_grads = to_official_mom(shards, mom)

    def full(t):  # gather the sequence back in natural order
        group = ps.get_tensor_model_parallel_group() if sp else ps.get_context_parallel_group()
        n = group.size() if (sp or cp > 1) else 1
        parts = [torch.empty_like(t) for _ in range(n)]
        dist.all_gather(parts, t.contiguous(), group=group)
        if sp:
            return torch.cat(parts)
        if cp > 1:
            halves = [p.chunk(2) for p in parts]
            order = [halves[r][0] for r in range(cp)] + [halves[r][1] for r in reversed(range(cp))]
            return torch.cat(order)
        return t
    return full(out.detach()).cpu().double(), full(x_local.grad).cpu().double(), param_grads


def run_layer(out_dir):
    mom = MoMConfig(num_memories=3, topk=2, num_heads=4, head_dim=8, expand_v=2.0,
                    chunk_size=16, aux_loss_coeff=0.05, z_loss_coeff=0.01)
    from naive_mom import official_params
    official = official_params(mom, 24, seed=7)
    g = torch.Generator().manual_seed(11)
    results = {}
    for packed in (False, True):
        s, b = (24, 2) if not packed else (40, 1)
        x = torch.randn(s, b, 24, generator=g, dtype=F64)
        dy = torch.randn(s, b, 24, generator=g, dtype=F64)
        cu = torch.tensor([0, 7, 8, 30, 40]) if packed else None
        ref = layer_phase("tp1", official, mom, x, dy, cu)
        modes = ("tp2", "tp2_sp") if packed else ("tp2", "tp2_sp", "cp2", "tp2_sp_selective",
                                                   "cp2_selective")
        for mode in modes:
            got = layer_phase(mode, official, mom, x, dy, cu)
            key = f"{mode}{'_packed' if packed else ''}"
            results[key] = {
                "out": rel(got[0], ref[0]), "dx": rel(got[1], ref[1]),
                "dparam_max": max(rel(got[2][k], ref[2][k]) for k in ref[2]),
                "dparam_worst": max(ref[2], key=lambda k: rel(got[2][k], ref[2][k])),
            }
    # The grouped projection (torch._grouped_mm: no CPU float64) under TP and SP, in float32,
    # against the dense layer at TP=1: its own sequence gather / TP copy of the input.
    f32 = {k: v.float() for k, v in official.items()}
    x, dy = x.float(), dy.float()
    ref = layer_phase("tp1", f32, mom, x, dy, cu, dtype=torch.float32)
    for mode in ("tp1", "tp2", "tp2_sp"):
        got = layer_phase(mode, f32, mom.replace(grouped_projection="on"), x, dy, cu,
                          dtype=torch.float32)
        results[f"{mode}_grouped_f32"] = {
            "out": rel(got[0], ref[0]), "dx": rel(got[1], ref[1]),
            "dparam_max": max(rel(got[2][k], ref[2][k]) for k in ref[2]),
            "dparam_worst": max(ref[2], key=lambda k: rel(got[2][k], ref[2][k])),
        }
    if dist.get_rank() == 0:
        json.dump(results, open(os.path.join(out_dir, "results_layer.json"), "w"), indent=1)


def run_gpu_layer(out_dir):
    """bf16 with the Triton kernels under TP=2+SP and CP=2 on two GPUs, against a float32
    torch-reference layer at TP=1 on the same weights (and TP=1 bf16 for scale)."""
    from naive_mom import official_params
    results = {}
    dry_run = DEVICE == "cpu"   # a CPU rehearsal of this phase: torch kernels, small shapes
    T = 64 if dry_run else 2048
    for K in ((16,) if dry_run else (128, 256)):
        mom = MoMConfig(num_memories=4, topk=2, num_heads=4, head_dim=K, backend="torch",
                        aux_loss_coeff=0.01)
        # Weights and inputs are bf16 values for both sides, so the float32 reference routes
        # exactly like the bf16 run (a near-tie flipped by rounding would change whole memories).
        bf = lambda t: t.bfloat16().float()
        official = {k: bf(v) for k, v in official_params(mom, 512, seed=3).items()}
        g = torch.Generator().manual_seed(4)
        x = bf(torch.randn(T, 2, 512, generator=g))
        dy = bf(torch.randn(T, 2, 512, generator=g))
        ref = layer_phase("tp1", official, mom, x, dy, None, dtype=torch.float32)
        fast = mom.replace(backend="torch" if dry_run else "triton")
        for mode in ("tp1", "tp2_sp", "cp2"):
            got = layer_phase(mode, official, fast, x, dy, None, dtype=torch.bfloat16)
            errs = {k: rel(got[2][k], ref[2][k]) for k in ref[2]}
            worst = max(errs, key=errs.get)
            results[f"K{K}_{mode}_bf16"] = {"out": rel(got[0], ref[0]), "dx": rel(got[1], ref[1]),
                                           "dparam_max": errs[worst], "dparam_worst": worst}
    if dist.get_rank() == 0:
        json.dump(results, open(os.path.join(out_dir, "results_gpu_layer.json"), "w"), indent=1)
        print(json.dumps(results, indent=1))


# ------------------------------------------------------------------------------------ gpt
MOM_GPT = MoMConfig(num_memories=3, topk=2, num_heads=4, head_dim=8, chunk_size=16,
                    aux_loss_coeff=0.05)
SEQ, BATCH, VOCAB, HIDDEN = 32, 2, 64, 32


def build_gpt(tp=1, pp=1, cp=1, sp=False, pattern="MMAM", vpp=None, deterministic=False):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig
    from megatron_mom import get_hybrid_block_spec
    ps = setup(tp=tp, pp=pp, cp=cp, vpp=vpp)
    config = TransformerConfig(
        num_layers=len(pattern), hidden_size=HIDDEN, num_attention_heads=4, ffn_hidden_size=64,
        hidden_dropout=0.0, attention_dropout=0.0, normalization="RMSNorm",
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        context_parallel_size=cp, sequence_parallel=sp, pipeline_dtype=torch.float32,
        calculate_per_token_loss=True, virtual_pipeline_model_parallel_size=vpp,
        deterministic_mode=deterministic,
        # gloo + interleaved schedule trains wrong with batched p2p (cpu_testing.md)
        batch_p2p_comm=vpp is None, hetereogenous_dist_checkpoint=len(set(pattern)) > 1,
        **cpu.megatron_cpu_config_overrides())
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = None if vpp is None else vp_stage
        pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
        post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage)
        spec = get_hybrid_block_spec(config, pattern, MOM_GPT, backend="local", vp_stage=stage)
        model = GPTModel(config, spec, vocab_size=VOCAB, max_sequence_length=SEQ,
                         pre_process=pre, post_process=post, vp_stage=stage,
                         share_embeddings_and_output_weights=False)
        chunks.append(DistributedDataParallel(config, DistributedDataParallelConfig(), model))
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [c.no_sync for c in chunks] if vpp else chunks[0].no_sync
    return ps, config, chunks


def batch():
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


MICROBATCHES = 2


def train_step(ps, config, chunks, cp):
    """Forward/backward of MICROBATCHES copies of one batch through Megatron's schedule.
    Returns (loss per token, per-layer MoM load-balancing loss summed over stages)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron_mom.layer import metrics
    metrics.set_router_loss_scale()
    metrics.router_loss_values(clear=True)
    ids, labels = batch()
    r = ps.get_context_parallel_rank()
    ids, labels = cp_local(ids, cp, r, 1), cp_local(labels, cp, r, 1)
    pos = cp_local(torch.arange(SEQ), cp, r)[None].expand(BATCH, -1)
    totals = torch.zeros(2)

    def loss_func(output):
        loss = output.float().sum()
        n = torch.tensor(output.numel(), dtype=torch.int)
        totals.add_(torch.stack([loss.detach(), n.float()]))
        return loss, n, {"lm loss": torch.stack([loss.detach(), n.float()])}

    def forward_step(data_iterator, model):
        next(data_iterator)
        return model(ids, pos, None, labels=labels), loss_func

    for c in chunks:
        c.zero_grad_buffer()
    iterators = [iter([None] * MICROBATCHES) for _ in chunks]
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks, num_microbatches=MICROBATCHES, seq_length=SEQ // cp,
        micro_batch_size=BATCH, forward_only=False)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(totals, group=ps.get_pipeline_model_parallel_group())
    if cp > 1:
        dist.all_reduce(totals, group=ps.get_context_parallel_group())
    lb = metrics.router_loss_values()[metrics.LOAD_BALANCING_LOSS]
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(lb, group=ps.get_pipeline_model_parallel_group())
    if cp > 1 or config.sequence_parallel:   # each rank recorded its share
        dist.all_reduce(lb, group=ps.get_tensor_and_context_parallel_group())
    return (totals[0] / totals[1]).item(), lb.tolist()


def save(chunks, path):
    from megatron.core import dist_checkpointing
    os.makedirs(path, exist_ok=True)
    dist_checkpointing.save(_sharded(chunks), path)


def _sharded(chunks):
    # Virtual-pipeline chunks reuse local keys ("decoder.layers.0."), so nest them per chunk as
    # Megatron-LM does; the sharded (global) keys inside are what the checkpoint stores.
    return {f"model{i}": c.module.sharded_state_dict() for i, c in enumerate(chunks)}


def load(chunks, path):
    from megatron.core import dist_checkpointing
    state = dist_checkpointing.load(_sharded(chunks), path)
    for i, c in enumerate(chunks):
        c.module.load_state_dict(state[f"model{i}"], strict=True)


def grads_into_params(chunks):
    with torch.no_grad():
        for c in chunks:
            for p in c.module.parameters():
                p.copy_(p.main_grad)


def state(chunks):
    return {k: v.clone() for c in chunks for k, v in c.module.state_dict().items()
            if "extra" not in k}


def run_gpt(out_dir):
    results = {}
    ref_ckpt = os.path.join(out_dir, "ckpt_tp1")
    layouts = {"tp2_sp": dict(tp=2, sp=True), "cp2": dict(cp=2, pattern="MMMM"),
               "pp2": dict(pp=2), "pp2_vpp2": dict(pp=2, vpp=2)}
    for pattern in ("MMAM", "MMMM"):
        ps, config, chunks = build_gpt(pattern=pattern)
        save(chunks, f"{ref_ckpt}_{pattern}")
        loss, lb = train_step(ps, config, chunks, 1)
        results[f"tp1_{pattern}_loss"], results[f"tp1_{pattern}_lb"] = loss, lb
        grads_into_params(chunks)
        save(chunks, os.path.join(out_dir, f"grads_tp1_{pattern}"))
    for name, layout in layouts.items():
        pattern = layout.pop("pattern", "MMAM")
        ps, config, chunks = build_gpt(pattern=pattern, **layout)
        load(chunks, f"{ref_ckpt}_{pattern}")
        loss, lb = train_step(ps, config, chunks, layout.get("cp", 1))
        results[f"{name}_loss"], results[f"{name}_lb"] = loss, lb
        results[f"{name}_pattern"] = pattern
        if name == "tp2_sp":  # reshard back: TP=2 checkpoint -> TP=1, bitwise
            save(chunks, os.path.join(out_dir, "ckpt_tp2"))
        grads_into_params(chunks)
        save(chunks, os.path.join(out_dir, f"grads_{name}"))

    # CPU initialization, same seed: a fresh TP=2 build holds the fresh TP=1 build's weights.
    ps, config, chunks = build_gpt(tp=2, sp=True)
    save(chunks, os.path.join(out_dir, "init_tp2"))

    # Deterministic mode: the same step twice gives bitwise-equal gradients.
    ps, config, chunks = build_gpt(tp=2, sp=True, deterministic=True)
    load(chunks, f"{ref_ckpt}_MMAM")
    grads = []
    for _ in range(2):
        train_step(ps, config, chunks, 1)
        grads.append([p.main_grad.clone() for c in chunks for p in c.module.parameters()])
    results["deterministic_bitwise"] = all(torch.equal(a, b) for a, b in zip(*grads))

    # Back at TP=1: compare every gradient, and the TP=2 round-tripped checkpoint.
    for pattern in ("MMAM", "MMMM"):
        _, _, ref = build_gpt(pattern=pattern)
        load(ref, os.path.join(out_dir, f"grads_tp1_{pattern}"))
        ref_grads = state(ref)
        for name in layouts:
            if results[f"{name}_pattern"] != pattern:
                continue
            load(ref, os.path.join(out_dir, f"grads_{name}"))
            got = state(ref)
            errs = {k: rel(got[k], ref_grads[k]) for k in ref_grads}
            worst = max(errs, key=errs.get)
            results[f"{name}_grad_max_rel"] = errs[worst]
            results[f"{name}_grad_worst"] = worst
        if pattern == "MMAM":
            _, _, orig = build_gpt(pattern=pattern)
            load(orig, f"{ref_ckpt}_{pattern}")
            load(ref, os.path.join(out_dir, "ckpt_tp2"))
            a, b = state(orig), state(ref)
            results["ckpt_tp2_to_tp1_bitwise"] = all(torch.equal(a[k], b[k]) for k in a)
            load(ref, os.path.join(out_dir, "init_tp2"))
            c = state(ref)
            results["init_tp2_differs"] = sorted(k for k in a if not torch.equal(a[k], c[k]))
    if dist.get_rank() == 0:
        json.dump(results, open(os.path.join(out_dir, "results_gpt.json"), "w"), indent=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("phases", nargs="+", choices=["layer", "gpt", "gpu_layer"])
    args = parser.parse_args()
    if "gpu_layer" in args.phases and torch.cuda.is_available():
        DEVICE = "cuda"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
    else:
        cpu.enable()
        dist.init_process_group("gloo")
    for phase in args.phases:
        {"layer": run_layer, "gpt": run_gpt, "gpu_layer": run_gpu_layer}[phase](args.out)
    dist.barrier()
    dist.destroy_process_group()
