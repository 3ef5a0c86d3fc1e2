"""Layer benchmark on one GPU: our MixtureOfMemories vs fla's MomAttention and GatedDeltaNet,
measured in the same run (bf16, triton.testing.do_bench medians).

  training: forward and forward+backward at the paper configuration (hidden 2048, 4 heads x 256,
            M=4, top-2, shared memory), B4 T4096, and fwd+bwd at B8 T2048, B1 T16384, B1 T65536;
            peak extra memory of one forward+backward.
            With --cuda-graph also ours captured in one CUDA graph (the time without host
            overhead).
  decoding: per-token latency of one decode step after a 512-token prefill at batch 1 and 64
            (ours eager and CUDA-graph replayed; fla's MomAttention with its cache).

Usage: python benchmarks/bench_layer.py [--quick] [--out DIR]   (needs megatron-core; fla optional)
Writes bench_layer.json and bench_layer.md to --out (default $OUT or the temp folder).
"""
import argparse
import json
import os
import sys
import tempfile
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

HIDDEN = 2048
RESULTS = {}
OUT_DIR = None


def log(key, value):
    RESULTS[key] = value
    print(time.strftime("%X"), key, value, flush=True)
    if OUT_DIR:  # after every case, so a run cut off by its time limit keeps what it measured
        json.dump(RESULTS, open(os.path.join(OUT_DIR, "bench_layer.json"), "w"), indent=1)


def setup_megatron():
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29591")
    if not dist.is_initialized():
        dist.init_process_group("nccl", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0)


EXECUTION = None               # MoMExecution of our layers (--lean-backward, --head-groups, ...)


def paper_mom():
    """The paper's MoM configuration: 4 memories, top-2, a shared memory, 4 heads x 256."""
    from megatron_mom import MoMConfig
    return MoMConfig(num_memories=4, topk=2, shared_memory=True, num_heads=4, head_dim=256)


def our_layer(mom):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.spec_utils import build_module
    from megatron_mom.layer.specs import get_mom_module_spec
    config = TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=16,
                               params_dtype=torch.bfloat16, bf16=True,
                               gradient_accumulation_fusion=False)
    if EXECUTION is not None:
        mom = mom.replace(execution=EXECUTION)
    layer = build_module(get_mom_module_spec(mom, backend="local"), config=config, layer_number=1)
    return layer.cuda()


def bench_train(fn_fwd, x):
    from triton.testing import do_bench

    def fwd_bwd():
        out = fn_fwd()
        out.backward(torch.ones_like(out))

    fwd_bwd()
    torch.cuda.synchronize()
    # do_bench's warmup and rep are milliseconds, not counts: rep=20 took one sample of a 13 ms
    # step (its median was a single run). 300 ms: ~20 samples of our step, ~10 of fla's.
    r = {"fwd_ms": do_bench(fn_fwd, warmup=30, rep=150, return_mode="median"),
         "fwdbwd_ms": do_bench(fwd_bwd, warmup=50, rep=300, return_mode="median")}
    # a second forward timing: one run once showed a forward at 9 ms beside a 11.2 ms fwd+bwd
    r["fwd_ms_again"] = do_bench(fn_fwd, warmup=30, rep=150, return_mode="median")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    r["peak_extra_GiB"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    r["tok_per_s_fwdbwd"] = x.shape[0] * x.shape[1] / (r["fwdbwd_ms"] * 1e-3)
    return r


def graph_step_ms(layer, x):
    """Our layer's fwd+bwd captured in one CUDA graph and replayed: the step's time without the
    host's launch overhead (as under Megatron's CUDA graphs). Fresh layer and input: autograd
    binds a leaf's gradient to the stream it first ran on, and the capture runs on a side one."""
    from triton.testing import do_bench
    params = list(layer.parameters())

    def step():
        for t in params + [x]:
            t.grad = None
        out = layer(x)[0]
        out.backward(torch.ones_like(out))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    return do_bench(graph.replay, warmup=50, rep=300, return_mode="median")


def run_graph(B=4, T=4096):
    mom = paper_mom()
    torch.manual_seed(0)
    layer = our_layer(mom).to("cuda", torch.bfloat16).train()
    x = torch.randn(T, B, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    try:
        ms = graph_step_ms(layer, x)
        log(f"ours_mom_graph_B{B}_T{T}", {"fwdbwd_ms": ms, "tok_per_s_fwdbwd": B * T / (ms * 1e-3)})
    except Exception as e:  # noqa: BLE001 - report and go on
        log(f"ours_mom_graph_B{B}_T{T}", {"error": repr(e)[:300]})


def run_profile(out_dir, B=4, T=4096, by_op=False):
    """Where our layer's forward+backward time goes: CUDA kernels by total time."""
    from torch.profiler import ProfilerActivity, profile
    mom = paper_mom()
    layer = our_layer(mom).train()
    x = torch.randn(T, B, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        out = layer(x)[0]
        out.backward(torch.ones_like(out))

    step()
    torch.cuda.synchronize()
    acts = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if by_op else [])
    with profile(activities=acts, record_shapes=by_op) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    # by_op: aten ops (with input shapes) and the device time of the kernels they launch.
    table = prof.key_averages(group_by_input_shape=by_op).table(
        sort_by="cuda_time_total", row_limit=70 if by_op else 45, max_name_column_width=70,
        max_shapes_column_width=90)
    open(os.path.join(out_dir, "profile_layer.txt"), "w").write(table)
    print(table[:12000])


def run_training(shapes, peers):
    mom = paper_mom()
    for B, T, full in shapes:
        x_bt = torch.randn(B, T, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        x_tb = x_bt.detach().transpose(0, 1).contiguous().requires_grad_(True)
        cases = [("ours_mom", lambda: our_layer(mom), lambda m: m(x_tb)[0], x_bt)]
        for name, make in peers.items():
            cases.append((name, make, lambda m: m(x_bt)[0], x_bt))
        for name, make, call, x in cases:
            key = f"{name}_B{B}_T{T}"
            try:
                torch.manual_seed(0)
                m = make().to("cuda", torch.bfloat16).train()
                r = bench_train(lambda: call(m), x)
                if not full:
                    r.pop("fwd_ms")
                log(key, r)
                del m
            except Exception as e:  # keep measuring the other cases
                log(key, {"error": repr(e)[:300]})
                traceback.print_exc()
            torch.cuda.empty_cache()


def run_decode(batches, prompt_len=512):
    from triton.testing import do_bench
    from megatron.core.inference.contexts import StaticInferenceContext
    mom = paper_mom()
    for B in batches:
        key = f"ours_decode_B{B}"
        try:
            layer = our_layer(mom).eval()
            ctx = StaticInferenceContext(max_batch_size=B, max_sequence_length=prompt_len + 64)
            prompt = torch.randn(prompt_len, B, HIDDEN, device="cuda", dtype=torch.bfloat16)
            step = torch.randn(1, B, HIDDEN, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                layer(prompt, inference_context=ctx)
                ctx.sequence_len_offset = prompt_len
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                eager = do_bench(lambda: layer(step, inference_context=ctx), warmup=5, rep=50,
                                 return_mode="median")
                r = {"eager_ms": eager,
                     "peak_extra_MiB": (torch.cuda.max_memory_allocated() - base) / 2**20,
                     "cache_MiB": sum(t.numel() * t.element_size() for t in vars(
                         ctx.key_value_memory_dict[1]).values()) / 2**20 * 1}
                graph = torch.cuda.CUDAGraph()
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(3):
                        layer(step, inference_context=ctx)
                torch.cuda.current_stream().wait_stream(s)
                with torch.cuda.graph(graph):
                    layer(step, inference_context=ctx)
                r["graph_ms"] = do_bench(graph.replay, warmup=5, rep=50, return_mode="median")
            log(key, r)
        except Exception as e:
            log(key, {"error": repr(e)[:300]})
            traceback.print_exc()
        try:
            from fla.layers.mom import MomAttention
            from fla.models.utils import Cache
            m = MomAttention(hidden_size=HIDDEN, head_dim=256, num_heads=4, expand_v=1,
                             num_memories=4, topk=2, shared_mem=True, layer_idx=0)
            m = m.to("cuda", torch.bfloat16).eval()
            cache = Cache()
            x = torch.randn(B, prompt_len, HIDDEN, device="cuda", dtype=torch.bfloat16)
            step = torch.randn(B, 1, HIDDEN, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                m(x, past_key_values=cache, use_cache=True)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                ms = do_bench(lambda: m(step, past_key_values=cache, use_cache=True), warmup=5,
                              rep=50, return_mode="median")
            log(f"fla_mom_decode_B{B}", {"eager_ms": ms, "peak_extra_MiB":
                                         (torch.cuda.max_memory_allocated() - base) / 2**20})
        except Exception as e:
            log(f"fla_mom_decode_B{B}", {"error": repr(e)[:300]})


def fla_peers():
    try:
        import fla.ops.common.chunk_o as chunk_o
        chunk_o.TRITON_ABOVE_3_7_1 = True  # timing only: fla refuses its backward on Triton 3.6
        from fla.layers.gated_deltanet import GatedDeltaNet
        from fla.layers.mom import MomAttention
    except Exception as e:
        print("fla not available:", e)
        return {}
    # GatedDeltaNet first: its autotuning is the shorter one, so a run cut short by a time
    # limit still has it.
    return {
        "fla_gdn": lambda: GatedDeltaNet(hidden_size=HIDDEN, head_dim=256, num_heads=4,
                                         expand_v=1, layer_idx=0),
        "fla_mom": lambda: MomAttention(hidden_size=HIDDEN, head_dim=256, num_heads=4, expand_v=1,
                                        num_memories=4, topk=2, shared_mem=True, layer_idx=0),
    }


def table() -> str:
    rows = ["| case | fwd ms | fwd+bwd ms | tok/s | peak extra GiB |", "|---|---|---|---|---|"]
    for k, v in RESULTS.items():
        if "fwdbwd_ms" in v:
            nan = float("nan")
            rows.append(f"| {k} | {v.get('fwd_ms', nan):.2f} | {v['fwdbwd_ms']:.2f} | "
                        f"{v.get('tok_per_s_fwdbwd', nan) / 1e3:.0f}K | "
                        f"{v.get('peak_extra_GiB', nan):.2f} |")
    rows += ["", "| decode case | eager ms/token | graph ms/token | peak extra MiB |",
             "|---|---|---|---|"]
    for k, v in RESULTS.items():
        if "eager_ms" in v:
            rows.append(f"| {k} | {v['eager_ms']:.3f} | {v.get('graph_ms', float('nan')):.3f} | "
                        f"{v['peak_extra_MiB']:.1f} |")
    errors = [f"- {k}: {v['error']}" for k, v in RESULTS.items() if "error" in v]
    return "\n".join(rows + ([""] + errors if errors else []))


def add_lean_argument(parser):
    parser.add_argument("--lean-backward", action="store_true",
                        help="our layer with MoMConfig(lean_backward=True): the memory path "
                             "keeps one head's buffers and recomputes the rest, head by head")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="B4 T4096 and decode only")
    p.add_argument("--scaling-ours", action="store_true",
                   help="with --quick: also our layer alone at B8 T2048, B1 T16384, B1 T65536")
    p.add_argument("--profile", action="store_true", help="also a kernel-time profile of ours")
    p.add_argument("--no-decode", action="store_true", help="skip the decode section")
    add_lean_argument(p)
    p.add_argument("--recompute-states", action="store_true",
                   help="our layers' recurrence keeps only its inputs for the backward "
                        "(KernelOptions.recompute_states; with --head-groups: a lean backward "
                        "with that many groups)")
    p.add_argument("--head-groups", type=int, default=None,
                   help="our layers' recurrence backward over N groups of heads "
                        "(KernelOptions.backward_head_groups; --lean-backward always runs one "
                        "head per group)")
    p.add_argument("--peers", default="fla_gdn,fla_mom",
                   help="comma-separated fla layers to time beside ours (fla_gdn, fla_mom)")
    p.add_argument("--no-training-peers", action="store_true",
                   help="time fla's layers only in the decode section")
    p.add_argument("--profile-only", action="store_true", help="only the kernel-time profile")
    p.add_argument("--cuda-graph", action="store_true",
                   help="also our layer's fwd+bwd captured in a CUDA graph (no host overhead)")
    p.add_argument("--profile-ops", action="store_true",
                   help="only a profile by aten op and input shape")
    p.add_argument("--out", default=os.environ.get("OUT") or tempfile.gettempdir())
    args = p.parse_args()
    global OUT_DIR
    global EXECUTION
    from megatron_mom.config import MoMExecution
    from megatron_mom.ops import KernelOptions
    EXECUTION = MoMExecution(lean_backward=args.lean_backward, kernels=KernelOptions(
        recompute_states=args.recompute_states, backward_head_groups=args.head_groups or 1))
    OUT_DIR = args.out
    import triton
    RESULTS["env"] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "triton": triton.__version__, "date": time.strftime("%Y-%m-%d"),
                      "lean_backward": args.lean_backward, "head_groups": args.head_groups,
                      "recompute_states": args.recompute_states}
    setup_megatron()
    if args.profile_only or args.profile_ops:
        return run_profile(args.out, by_op=args.profile_ops)
    shapes = [(4, 4096, True)] + ([] if args.quick else
                                  [(8, 2048, False), (1, 16384, False), (1, 65536, False)])
    wanted = set(args.peers.split(","))
    peers = {} if args.no_training_peers else {
        name: make for name, make in fla_peers().items() if name in wanted}
    run_training(shapes, peers)
    if args.cuda_graph:
        run_graph()
    if args.quick and args.scaling_ours:
        run_training([(8, 2048, False), (1, 16384, False), (1, 65536, False)], {})
    if not args.no_decode:
        run_decode([1, 64])
    if args.profile:
        run_profile(args.out)
    json.dump(RESULTS, open(os.path.join(args.out, "bench_layer.json"), "w"), indent=1)
    md = table()
    open(os.path.join(args.out, "bench_layer.md"), "w").write(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
