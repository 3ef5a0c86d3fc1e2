"""benchmarks/flop_model.py: its counts against hand derivations."""
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import flop_model


def test_gated_delta_rule_forward_count_is_the_chunked_forms_products():
    # Per chunk of C tokens and one head: A = (beta k) k^T, W = T (beta k), U0 = T (beta v),
    # q k^T, P U (2 C^2 each of K, K, V, K, V) and W S, q S, k^T U (2 C K V each): per token
    # 6 K V + 2 C (3 K + 2 V). The triangular solve is not a matmul the counter sees.
    for K, V, C in ((256, 256, 64), (128, 64, 32)):
        fwd, bwd = flop_model.gdr_flops_per_token(K, V, C)
        assert fwd == 6 * K * V + 2 * C * (3 * K + 2 * V)
        assert 1.7 < bwd / fwd < 2.1  # the backward of every product: two products each


def test_attention_count_is_half_the_dense_products():
    seq, hidden, layers = 64, 32, 3
    q, k, v = (torch.randn(1, seq, hidden, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as dense:  # QK^T and PV over the whole square
        ((q @ k.transpose(-1, -2)).softmax(-1) @ v).sum().backward()
    shape = dict(flop_model.SHAPE_380M, hidden=hidden, layers=layers)
    assert flop_model.attention_flops(seq, 2, shape) == dense.get_total_flops() / 2 * 2 * layers


def test_report_reads_bench_gpt_rows(tmp_path):
    rows = [dict(kind="attention+graph", seq=4096, mbs=4, split=dict(attention=20.0)),
            dict(kind="mom+graph", seq=4096, mbs=4, split=dict(recurrence=80.0)),
            dict(kind="mom1", seq=4096, mbs=4)]  # no kernel split: ignored
    path = tmp_path / "bench_gpt.json"
    path.write_text(json.dumps(dict(rows=rows)))
    lines = flop_model.main(["--gpt-json", str(path)])
    rec = flop_model.recurrence_flops(4096 * 4, flop_model.SHAPE_380M)
    att = flop_model.attention_flops(4096, 4, flop_model.SHAPE_380M)
    row = lines[-1].split("|")
    assert row[1].strip() == "4096 x 4"
    assert float(row[4]) == round(rec / 80.0 / 1e9)  # TFLOP/s from FLOPs and ms
    assert float(row[7]) == round(att / 20.0 / 1e9)
