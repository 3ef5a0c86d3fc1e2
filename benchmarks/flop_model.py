"""Algorithmic FLOPs of a training step's sequence mixing, and the rates measured times imply.

The gated delta rule's count is measured, not derived by hand: torch's FlopCounterMode over the
chunked reference (`ops/gated_delta_rule/reference.py`) forward and its autograd backward, one
head, a few chunks, divided by the tokens (the chunked form's cost is linear in T; padding of
MoM's routed segments to whole chunks is not counted). Causal softmax attention: QK^T and PV
over the lower triangle, backward twice the forward. Neither count includes recomputation, so
the rates compare the work each mixer must do, not what its kernels happen to do.

    python benchmarks/flop_model.py --seq 4096 --mbs 4 --recurrence-ms 103.7 --attention-ms 28.7
    python benchmarks/flop_model.py --gpt-json OUT/bench_gpt.json     # rows of bench_gpt.py
"""
import argparse
import json
import os
import sys
from functools import lru_cache

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

SHAPE_380M = dict(layers=24, hidden=1024, mom_heads=4, head_dim=256, slots=3, chunk=64)


@lru_cache(maxsize=None)
def gdr_flops_per_token(K: int, V: int, chunk: int) -> tuple:
    """(forward, backward) FLOPs of the chunked gated delta rule per token and head."""
    from megatron_mom.ops.gated_delta_rule.reference import chunk_gated_delta_rule
    T = 16 * chunk  # enough chunks that the per-sequence terms (final state) are ~1/16
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, T, 1, K, generator=gen).requires_grad_() for _ in range(2))
    v = torch.randn(1, T, 1, V, generator=gen, requires_grad=True)
    g = (-0.1 * torch.rand(1, T, 1, generator=gen)).requires_grad_()
    beta = torch.rand(1, T, 1, generator=gen, requires_grad=True)
    with FlopCounterMode(display=False) as fwd:
        o, state = chunk_gated_delta_rule(q, k, v, g, beta, K ** -0.5, chunk_size=chunk)
    with FlopCounterMode(display=False) as bwd:
        (o.sum() + state.sum()).backward()
    return fwd.get_total_flops() / T, bwd.get_total_flops() / T


def recurrence_flops(tokens: int, shape: dict) -> float:
    """One training step's recurrence FLOPs: every token in `slots` memories of every layer."""
    f, b = gdr_flops_per_token(shape["head_dim"], shape["head_dim"], shape["chunk"])
    return (f + b) * tokens * shape["slots"] * shape["mom_heads"] * shape["layers"]


def attention_flops(seq: int, mbs: int, shape: dict) -> float:
    """One training step's causal attention-core FLOPs (forward 2 T^2 D per sequence, x3)."""
    return 6.0 * seq * seq * shape["hidden"] * mbs * shape["layers"]


def report(seq: int, mbs: int, recurrence_ms: float, attention_ms: float, shape: dict) -> str:
    rec, att = recurrence_flops(seq * mbs, shape), attention_flops(seq, mbs, shape)
    rate = lambda flops, ms: f"{flops / ms / 1e9:.0f}" if ms else "-"  # noqa: E731 (TFLOP/s)
    return (f"| {seq} x {mbs} | {rec / 1e12:.2f} | {recurrence_ms or '-'} | "
            f"{rate(rec, recurrence_ms)} | {att / 1e12:.2f} | {attention_ms or '-'} | "
            f"{rate(att, attention_ms)} | {rec / att:.2f} |")


HEADER = ("| seq x mbs | recurrence TFLOP/step | ms | TFLOP/s | attention TFLOP/step | ms | "
          "TFLOP/s | recurrence / attention FLOPs |\n|---|---|---|---|---|---|---|---|")


def rows_from_json(path: str):
    """(seq, mbs, recurrence ms of the MoM row, attention ms of the attention row) per seq."""
    rows = json.load(open(path))["rows"]
    by = lambda kind, seq: next((r for r in rows if r["kind"].split("+")[0] == kind  # noqa: E731
                                 and r["seq"] == seq and "split" in r), None)
    for seq in sorted({r["seq"] for r in rows}):
        mom, att = by("mom", seq), by("attention", seq)
        yield (seq, (mom or att)["mbs"], mom and mom["split"].get("recurrence"),
               att and att["split"].get("attention"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpt-json", help="bench_gpt.json: the mom and attention rows' kernel split")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--mbs", type=int, default=4)
    p.add_argument("--recurrence-ms", type=float, default=0.0, help="measured, per step")
    p.add_argument("--attention-ms", type=float, default=0.0, help="measured, per step")
    a = p.parse_args(argv)
    f, b = gdr_flops_per_token(SHAPE_380M["head_dim"], SHAPE_380M["head_dim"], SHAPE_380M["chunk"])
    lines = [f"380M shape (24 layers, hidden 1024; MoM 4 heads x 256, 3 memories a token); "
             f"gated delta rule per token and head: {f / 1e6:.3f} MFLOP forward, "
             f"{b / 1e6:.3f} backward", "", HEADER]
    cases = (rows_from_json(a.gpt_json) if a.gpt_json
             else [(a.seq, a.mbs, a.recurrence_ms, a.attention_ms)])
    lines += [report(s, m, r, t, SHAPE_380M) for s, m, r, t in cases]
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
