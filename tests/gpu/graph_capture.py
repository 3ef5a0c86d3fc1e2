"""CUDA-graph capture for the GPU tests: warm up, capture one step, replay."""
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def capture_and_replay(step, warmups: int = 1):
    """`step()` returns a list of tensors. It runs `warmups` times eagerly on a side stream
    (compiles the kernels; autograd remembers the stream a leaf's gradient node first ran on,
    and a capture must not wait on the default stream), then once under capture, and the
    graph is replayed. Returns (graph, replayed outputs, clones of the last eager outputs);
    keep the graph while its outputs are used."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            eager = [t.clone() for t in step()]
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = list(step())
    graph.replay()
    torch.cuda.synchronize()
    return graph, captured, eager


def run_script(source: str, timeout: int) -> subprocess.CompletedProcess:
    """Run `source` in a fresh Python (a failed capture leaves the CUDA context of its
    process unusable for every later test), with this folder importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-c", source], capture_output=True, text=True,
                          timeout=timeout, env=env)
