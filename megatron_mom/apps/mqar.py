"""MQAR: multi-query associative recall (Zoology, arXiv:2312.04927), `megatron-mom mqar`.

A sequence of length L starts with N key-value pairs `k1 v1 k2 v2 ... kN vN` (keys from the
lower half of the vocabulary, values from the upper half, all distinct within a sequence);
the rest holds each key once more as a query, at even offsets drawn without replacement
from a power law (Zoology's `power_a`), with filler token 0 between them. At a query's
position the model must predict that key's value; accuracy counts those predictions only.

Three 2-layer Megatron GPTModels that differ only in the sequence mixer are trained on fresh
random batches and tested on a fixed test set per (L, N):
    mom        MoM: M=4 memories, top-2 routing, plus the shared memory
    single     one gated-delta memory with the same heads and head size (M=1, k=1, no shared)
    attention  softmax attention
Outputs in the output folder: results.json, results.md (the table) and mqar.png.
The Zoology-style sweep over widths, learning rates and seeds (`--preset zoology`) is in
`megatron_mom/apps/mqar_sweep.py`; it adds the mixers of `EXTRA_MIXERS` below.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from megatron_mom.train.config import ConfigError
from megatron_mom.train.plot import not_drawn, pyplot

MIXERS = ("mom", "single", "attention")
# More single-memory baselines and variants (all 2-layer unless said), for the sweep:
EXTRA_MIXERS = {
    "mom-noshared": "MoM without the shared memory (M memories, top-k)",
    "single-state": "one memory with (M+1) x the heads: the same total state as MoM",
    "single-params": "one memory with the heads that bring its layer's parameter count "
                     "closest to MoM's",
    "hybrid": "MoM layers with softmax attention as the last layer",
}
ALL_MIXERS = MIXERS + tuple(EXTRA_MIXERS)


@dataclass
class MQARSettings:
    vocab_size: int = 128
    seq_lens: List[int] = field(default_factory=lambda: [32])
    num_pairs: List[int] = field(default_factory=lambda: [2, 4, 8])
    power_a: float = 0.01
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 2            # MoM / single-memory heads and attention heads
    head_dim: int = 16            # K = V of each memory (the per-memory state is H x K x K)
    num_memories: int = 4
    topk: int = 2
    chunk_size: int = 16
    mom_backend: str = "auto"     # MoM kernels: auto (Triton on GPUs when present) | triton | torch
    tf32: bool = True             # CUDA: TF32 matmuls and convolutions (False: full float32)
    train_steps: int = 40
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.1
    decay_1d: bool = False        # weight decay on 1-D parameters and biases too (see adamw)
    warmup_steps: int = 10
    test_examples: int = 64
    eval_batch_size: int = 256
    max_minutes_per_model: float = 0.0   # 0: no cap; else stop training early (reported)
    budget_minutes: float = 0.0          # >0: time a few steps of each mixer first and lower
                                         # train_steps (the same for all) to fit this budget
    seed: int = 0


PRESETS = {
    # CI / first look on a CPU: seconds per model, numbers are not meaningful yet.
    "tiny": MQARSettings(),
    # A few minutes on 2 CPU cores.
    "cpu": MQARSettings(vocab_size=128, seq_lens=[64], num_pairs=[4, 8, 16], hidden_size=64,
                        num_heads=2, head_dim=16, train_steps=400, batch_size=64,
                        lr=1e-3, warmup_steps=20, test_examples=256),
    # One H100, about 5 minutes for all three mixers (the steps are fitted to budget_minutes:
    # 3,140 with the torch reference kernels; faster kernels give more). A first try at
    # vocab 2048, L=256, N<=64 and lr 3e-3 learned nothing in 1,797 steps (docs/results.md);
    # 2-layer models need lr ~1e-3 here.
    "gpu": MQARSettings(vocab_size=256, seq_lens=[128], num_pairs=[4, 8, 16, 32],
                        hidden_size=128, num_heads=2, head_dim=16, chunk_size=64,
                        train_steps=5000, batch_size=128, lr=1e-3, warmup_steps=100,
                        test_examples=1000, budget_minutes=4.0, max_minutes_per_model=2.0),
}


TINY_NOTE = ("mqar: note: the tiny preset only shows that everything runs; its models are too "
             "small and trained too briefly to learn the task, so its accuracies are at chance "
             "level and say nothing about the mixers. For meaningful numbers use --preset cpu "
             "(minutes on a CPU) or --preset gpu.")


def preset_with_overrides(presets: dict, preset: str, overrides: Optional[dict], what: str):
    """A copy of presets[preset] with `overrides` ({field: value}) applied, each value converted
    to its field's type (list fields element by element; `mixers` holds names)."""
    if preset not in presets:
        raise ConfigError(f"unknown {what} preset {preset!r}; choose one of "
                          f"{', '.join(presets)}")
    s = dataclasses.replace(presets[preset])
    fields = {f.name for f in dataclasses.fields(s)}
    for key, value in (overrides or {}).items():
        if key not in fields:
            raise ConfigError(f"unknown {what} setting {key!r}; valid: {', '.join(fields)}")
        current = getattr(s, key)
        if isinstance(current, list):
            value = value if isinstance(value, list) else [value]
            kind = str if key == "mixers" else type(current[0]) if current else float
            value = [kind(v) for v in value]
        elif isinstance(current, bool):
            if not isinstance(value, bool):     # bool("false") would be True
                raise ConfigError(f"{what} setting {key} must be true or false, got {value!r}")
        else:
            value = type(current)(value)
        setattr(s, key, value)
    return s


def settings_for(preset: str, overrides: Optional[dict] = None) -> MQARSettings:
    s = preset_with_overrides(PRESETS, preset, overrides, "MQAR")
    _check(s)
    return s


def _check(s: MQARSettings) -> None:
    for L in s.seq_lens:
        for N in s.num_pairs:
            if 4 * N > L:
                raise ConfigError(f"num_pairs {N} does not fit seq_len {L}: MQAR needs "
                                 f"seq_len >= 4 * num_pairs (pairs plus query slots)")
    for mixer in ("mom", "single"):
        try:
            mixer_pattern_and_mom(mixer, s)
        except ValueError as err:
            raise ConfigError(f"MQAR settings: {err}") from None
    if max(s.num_pairs) > s.vocab_size // 2 - 1:
        raise ConfigError(f"vocab_size {s.vocab_size} has too few keys/values for "
                         f"{max(s.num_pairs)} distinct pairs; raise vocab_size")


# ---------------------------------------------------------------------------------- data
def make_batch(batch: int, seq_len: int, num_pairs: int, vocab_size: int, power_a: float,
               generator: torch.Generator, device="cpu"):
    """(inputs [b, L], labels [b, L]); labels are -100 except at query positions."""
    half = vocab_size // 2
    N, b = num_pairs, batch
    on = generator.device            # drawn where the generator lives (a CUDA one: no copies)
    keys = torch.rand(b, half - 1, generator=generator, device=on).argsort(dim=1)[:, :N] + 1
    values = torch.rand(b, vocab_size - half, generator=generator,
                        device=on).argsort(dim=1)[:, :N] + half
    context = torch.stack([keys, values], dim=2).reshape(b, 2 * N)
    space = (seq_len - 2 * N) // 2
    # Zoology's power law: query gaps favour short distances.
    p = power_a * torch.arange(1, space + 1, dtype=torch.float64, device=on) ** (power_a - 1)
    gaps = torch.multinomial(p.expand(b, -1), N, replacement=False, generator=generator)
    inputs = torch.zeros(b, seq_len, dtype=torch.long, device=on)
    inputs[:, : 2 * N] = context
    labels = torch.full((b, seq_len), -100, dtype=torch.long, device=on)
    positions = 2 * N + 2 * gaps
    inputs.scatter_(1, positions, keys)
    labels.scatter_(1, positions, values)
    return inputs.to(device), labels.to(device)


# ---------------------------------------------------------------------------------- models
def mixer_pattern_and_mom(mixer: str, s: MQARSettings):
    """(layer pattern, MoMConfig of its 'M' layers) of a mixer name in ALL_MIXERS."""
    from megatron_mom import MoMConfig
    common = dict(num_heads=s.num_heads, head_dim=s.head_dim, chunk_size=s.chunk_size,
                  backend=s.mom_backend)
    mom = MoMConfig(num_memories=s.num_memories, topk=s.topk, shared_memory=True, **common)
    single = MoMConfig(num_memories=1, topk=1, shared_memory=False, aux_loss_coeff=0.0,
                       **common)
    stack = "M" * s.num_layers
    if mixer == "mom":
        return stack, mom
    if mixer == "single":
        return stack, single
    if mixer == "attention":
        return "A" * s.num_layers, MoMConfig(**common)
    if mixer == "mom-noshared":
        return stack, mom.replace(shared_memory=False)
    if mixer == "single-state":
        return stack, single.replace(num_heads=s.num_heads * mom.num_memory_weights)
    if mixer == "single-params":
        return stack, parameter_matched_single(single, mom, s.hidden_size)
    if mixer == "hybrid":
        return "M" * (s.num_layers - 1) + "A", mom
    raise ConfigError(f"unknown mixer {mixer!r}; choose from {', '.join(ALL_MIXERS)}")


def mom_layer_parameters(mom, hidden_size: int) -> int:
    """Parameters of one MixtureOfMemories layer (router, projections, convolutions, decay
    parameters and the output norm) at tensor-parallel size 1."""
    from megatron_mom.layer.mixer import in_proj_sections
    H, K, V, W = mom.num_heads, mom.key_dim, mom.value_dim, mom.conv_size
    in_rows = sum(rows for _, rows in in_proj_sections(mom))
    return ((mom.num_memories + in_rows) * hidden_size + H * V * hidden_size
            + (2 * H * K + H * V) * W + 2 * H + V)


def parameter_matched_single(single, mom, hidden_size: int):
    """`single` with the number of heads whose layer has the parameter count closest to
    `mom`'s (the fewer heads on a tie)."""
    target = mom_layer_parameters(mom, hidden_size)
    heads = range(1, 4 * mom.num_memory_weights * mom.num_heads + 1)
    best = min(heads, key=lambda h: (abs(mom_layer_parameters(single.replace(num_heads=h),
                                                              hidden_size) - target), h))
    return single.replace(num_heads=best)


def build_model(mixer: str, s: MQARSettings, device: torch.device):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig
    from megatron_mom.testing import cpu
    from megatron_mom.layer.specs import get_hybrid_block_spec, mixes_layer_kinds

    overrides = cpu.megatron_cpu_config_overrides()
    overrides["use_cpu_initialization"] = device.type == "cpu"
    pattern, mom = mixer_pattern_and_mom(mixer, s)
    config = TransformerConfig(
        num_layers=s.num_layers, hidden_size=s.hidden_size, ffn_hidden_size=2 * s.hidden_size,
        num_attention_heads=s.num_heads, hidden_dropout=0.0, attention_dropout=0.0,
        normalization="RMSNorm", add_bias_linear=False,
        hetereogenous_dist_checkpoint=mixes_layer_kinds(pattern), **overrides)
    spec = get_hybrid_block_spec(config, pattern, mom, backend="local")
    model = GPTModel(config, spec, vocab_size=s.vocab_size,
                     max_sequence_length=max(s.seq_lens), position_embedding_type="rope",
                     share_embeddings_and_output_weights=False)
    return model.to(device)


def _positions(inputs):
    return torch.arange(inputs.shape[1], device=inputs.device)[None].expand_as(inputs)


def _logits(model, inputs):
    return model(inputs, _positions(inputs), None)             # [b, L, V]


def _answer_logits(model, inputs, labels, max_answers: int = 0):
    """(logits [n, V], their labels [n]) at the labelled positions (labels != -100) only.
    MQAR labels one position in 4 to 8, and at vocabulary 8192 the output layer and the
    softmax over every position cost about as much as the rest of a small model's step; their
    rows here equal the full logits' rows. Rows in time-major order ([L, b] flattened).

    max_answers > 0: always that many rows, the labelled ones first, then padding whose
    labels are -100 (cross_entropy ignores them), so no shape depends on the data: no wait for
    the GPU, and the step can be replayed from a CUDA graph. It must bound the batch's count
    of labels (the caller knows it: sequences x most pairs a sequence holds)."""
    # Without post_process a GPTModel returns its decoder's output (after the final norm)
    # instead of running the output layer on every position.
    post_process, model.post_process = model.post_process, False
    try:
        hidden = model(inputs, _positions(inputs), None)       # [L, b, D]
    finally:
        model.post_process = post_process
    flat = labels.t().flatten()                                             # [L * b]
    labelled = flat != -100
    if max_answers:
        if labels.device.type == "cpu" and int(labelled.sum()) > max_answers:
            raise ValueError(f"max_answers {max_answers} is below the batch's "
                             f"{int(labelled.sum())} labelled positions; raise it")
        rows = torch.nonzero_static(labelled, size=max_answers).squeeze(1)  # [n], -1 padded
        padding = rows < 0
        rows = rows.clamp(min=0)
        targets = flat.index_select(0, rows).masked_fill(padding, -100)
    else:
        # One nonzero, one wait for the GPU: how many answers a batch has is data.
        rows = labelled.nonzero().squeeze(1)                                # [n]
        targets = flat.index_select(0, rows)
    answers = hidden.flatten(0, 1).index_select(0, rows)                   # [n, D]
    logits, _ = model.output_layer(answers.unsqueeze(1))                   # [n, 1, V]
    return logits.squeeze(1), targets


def adamw(model, lr: float, weight_decay: float, decay_1d: bool = False, **kwargs):
    """torch's AdamW with Megatron-Core's standard weight-decay rule: no decay on 1-D
    parameters (norm gains, each memory's decay parameters A_log and dt_bias) and biases, as
    Megatron-LM's optimizer and `megatron-mom train` apply it. Decoupled decay shrinks a
    parameter by lr * weight_decay a step towards 0 whatever its role; for dt_bias (about -6
    at initialisation) that shortens the memory's reach as training goes on.
    decay_1d: decay every parameter alike instead."""
    decayed, kept = [], []
    for name, p in model.named_parameters():
        (kept if not decay_1d and (p.ndim == 1 or name.endswith(".bias")) else decayed).append(p)
    groups = [{"params": decayed, "weight_decay": weight_decay},
              {"params": kept, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, **kwargs)


def _lr(step: int, s: MQARSettings) -> float:
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(s.train_steps - s.warmup_steps, 1)
    return s.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _train_batch(model, opt, inputs, labels, every_position: bool = False,
                 max_answers: int = 0, set_to_none: bool = True) -> torch.Tensor:
    """One optimizer step on the mean cross-entropy over the labelled positions.
    every_position: every label is a token (language modelling), so the full logits are the
    answers and nothing is selected. max_answers: see `_answer_logits`."""
    if every_position:
        logits = _logits(model, inputs)
        logits, targets = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    else:
        logits, targets = _answer_logits(model, inputs, labels, max_answers)
    loss = F.cross_entropy(logits.float(), targets)
    opt.zero_grad(set_to_none=set_to_none)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss


class TrainStep:
    """`_train_batch` of one model and optimizer, at a learning rate given per step; on a GPU
    with `graphs`, replayed from one CUDA graph per batch shape.

    A small model's step is a few hundred short kernels (394 for a 2-layer MQAR model at width
    256), so eagerly the host's launches, not the GPU, set its pace, and processes sharing a
    GPU queue behind each other's launch gaps. Replayed from a graph the step is one launch.
    The first `warmup` steps of each shape run eagerly on a side stream (as CUDA graph capture
    requires), the next is captured and replayed, and later ones replay it; each step runs
    once, the same kernels as eagerly, so the results equal the eager steps' bit for bit
    (tests/gpu/test_gpu_mqar_graphs.py). Needs `max_answers` (fixed shapes) and an optimizer
    built with `capturable=True`; the learning rate becomes a GPU tensor of the optimizer's
    param groups (the graph reads it there, so changing it needs no new capture). The graphs
    share one memory pool: they replay one at a time on one stream."""

    def __init__(self, model, opt, graphs: bool = True, warmup: int = 2):
        self.model, self.opt, self.warmup = model, opt, warmup
        device = next(model.parameters()).device
        self.graphs = graphs and device.type == "cuda"
        self._graphs: Dict[tuple, tuple] = {}    # shape -> (graph, inputs, labels, loss)
        self._eager_steps: Dict[tuple, int] = {}
        if self.graphs:
            if not all(g.get("capturable") for g in opt.param_groups):
                raise ValueError("TrainStep(graphs=True) needs an optimizer built with "
                                 "capturable=True")
            self.lr = torch.tensor(float(opt.param_groups[0]["lr"]), device=device)
            for group in opt.param_groups:
                group["lr"] = self.lr
            self.stream = torch.cuda.Stream(device)
            self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, inputs, labels, lr: float, max_answers: int = 0) -> torch.Tensor:
        """The step's loss (under graphs a buffer the next step of that shape overwrites)."""
        if not self.graphs:
            for group in self.opt.param_groups:
                group["lr"] = lr
            return _train_batch(self.model, self.opt, inputs, labels, max_answers=max_answers)
        if not max_answers:
            raise ValueError("TrainStep(graphs=True) needs max_answers > 0 (fixed shapes)")
        self.lr.fill_(lr)
        key = (tuple(inputs.shape), max_answers)
        if key in self._graphs:
            graph, x, y, loss = self._graphs[key]
            x.copy_(inputs)
            y.copy_(labels)
            graph.replay()
            return loss
        here = torch.cuda.current_stream()
        self.stream.wait_stream(here)
        seen = self._eager_steps[key] = self._eager_steps.get(key, 0) + 1
        if seen <= self.warmup:
            with torch.cuda.stream(self.stream):
                loss = _train_batch(self.model, self.opt, inputs, labels,
                                    max_answers=max_answers, set_to_none=False)
            here.wait_stream(self.stream)
            return loss
        x, y = inputs.clone(), labels.clone()
        graph = torch.cuda.CUDAGraph()
        # set_to_none=False: the gradients stay where the eager steps put them, outside the
        # pool, so every shape's graph accumulates into the same tensors.
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            loss = _train_batch(self.model, self.opt, x, y, max_answers=max_answers,
                                set_to_none=False)
        here.wait_stream(self.stream)
        self._graphs[key] = (graph, x, y, loss)
        graph.replay()                            # capture records; this step runs now
        return loss


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds_per_step(mixer: str, s: MQARSettings, seq_len: int, device, steps: int = 5) -> float:
    """Time a few training steps of a throw-away model (after two warm-up steps)."""
    model = build_model(mixer, s, device)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr)
    gen = torch.Generator().manual_seed(1)
    batch = make_batch(s.batch_size, seq_len, max(n for n in s.num_pairs if 4 * n <= seq_len),
                       s.vocab_size, s.power_a, gen, device)
    for _ in range(2):
        _train_batch(model, opt, *batch)
    _sync(device)
    start = time.time()
    for _ in range(steps):
        _train_batch(model, opt, *batch)
    _sync(device)
    return (time.time() - start) / steps


def fit_steps_to_budget(s: MQARSettings, mixers, device, log=print) -> dict:
    """Lower s.train_steps so that every mixer at every length fits s.budget_minutes."""
    timing = {m: {L: seconds_per_step(m, s, L, device) for L in s.seq_lens} for m in mixers}
    per_step = sum(t for per_len in timing.values() for t in per_len.values())
    fitting = int(s.budget_minutes * 60 / per_step)
    steps = max(min(s.train_steps, fitting), 1)
    log("mqar: seconds per step " + ", ".join(
        f"{m}: {t[max(s.seq_lens)]:.3f}" for m, t in timing.items())
        + f" -> {steps} steps per model (budget {s.budget_minutes} min)")
    s.train_steps = steps
    s.warmup_steps = min(s.warmup_steps, max(steps // 10, 1))
    return {m: {str(L): t for L, t in per_len.items()} for m, per_len in timing.items()}


def train_model(model, s: MQARSettings, seq_len: int, device, log=print) -> dict:
    """Fresh random batches; each batch draws one N from the pairs that fit seq_len."""
    from megatron_mom.layer import metrics
    metrics.set_router_loss_scale(device=device)   # one micro-batch, no loss scaling
    opt = adamw(model, s.lr, s.weight_decay, s.decay_1d, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(s.seed + seq_len)
    pairs = [n for n in s.num_pairs if 4 * n <= seq_len]
    model.train()
    start, loss_value, step, first_loss = time.time(), float("nan"), 0, float("nan")
    for step in range(s.train_steps):
        if s.max_minutes_per_model and time.time() - start > 60 * s.max_minutes_per_model:
            log(f"    time cap reached after {step} steps")
            break
        N = pairs[int(torch.randint(len(pairs), (1,), generator=gen))]
        inputs, labels = make_batch(s.batch_size, seq_len, N, s.vocab_size, s.power_a, gen,
                                    device)
        for group in opt.param_groups:
            group["lr"] = _lr(step, s)
        loss = _train_batch(model, opt, inputs, labels)
        if step == 0:
            first_loss = loss.item()
        if step % max(s.train_steps // 5, 1) == 0 or step == s.train_steps - 1:
            loss_value = loss.item()
            log(f"    step {step:>5}/{s.train_steps}  loss {loss_value:.3f}  N={N}")
    else:
        step = s.train_steps
    return {"steps": step, "seconds": time.time() - start, "first_loss": first_loss,
            "final_loss": loss.item()}


@torch.no_grad()
def test_accuracy(model, s: MQARSettings, seq_len: int, num_pairs: int, device) -> float:
    """Fraction of query answers predicted exactly, on a fixed test set."""
    gen = torch.Generator().manual_seed(10_000 + 97 * seq_len + num_pairs)  # not a train seed
    model.eval()
    correct = total = 0
    remaining = s.test_examples
    while remaining > 0:
        b = min(remaining, s.eval_batch_size)
        inputs, labels = make_batch(b, seq_len, num_pairs, s.vocab_size, s.power_a, gen, device)
        logits, answers = _answer_logits(model, inputs, labels)
        correct += (logits.argmax(dim=-1) == answers).sum().item()
        total += answers.numel()
        remaining -= b
    model.train()
    return correct / total


# ---------------------------------------------------------------------------------- report
def state_size(mixer: str, s: MQARSettings) -> str:
    """Recurrent state per layer, in floats (attention: its KV cache grows with length)."""
    pattern, mom = mixer_pattern_and_mom(mixer, s)
    if "M" not in pattern:
        return "KV cache (grows with L)"
    memories = f"{mom.num_memory_weights} x {mom.num_heads * mom.key_dim * mom.value_dim}"
    return memories + (" + KV cache" if "A" in pattern else "")


def table(results: dict, s: MQARSettings) -> str:
    cols = [(L, N) for L in s.seq_lens for N in s.num_pairs if 4 * N <= L]
    head = "| mixer | state per layer (floats) | steps | " + " | ".join(
        f"L={L} N={N}" for L, N in cols) + " |"
    lines = [head, "|" + "---|" * (3 + len(cols))]
    for mixer, entry in results.items():
        steps = "/".join(str(r["steps"]) for r in entry["train"].values())
        accs = [entry["accuracy"].get(f"{L}/{N}") for L, N in cols]
        lines.append(f"| {mixer} | {state_size(mixer, s)} | {steps} | "
                     + " | ".join("-" if a is None else f"{a:.3f}" for a in accs) + " |")
    return "\n".join(lines)


def plot(results: dict, s: MQARSettings, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, len(s.seq_lens), figsize=(4.5 * len(s.seq_lens), 3.8),
                             squeeze=False)
    for ax, L in zip(axes[0], s.seq_lens):
        for mixer, entry in results.items():
            points = [(N, entry["accuracy"][f"{L}/{N}"]) for N in s.num_pairs
                      if f"{L}/{N}" in entry["accuracy"]]
            if points:
                ax.plot(*zip(*points), "o-", label=mixer)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("key-value pairs N")
        ax.set_ylabel("query accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"MQAR, sequence length {L}")
        ax.grid(alpha=0.3)
        ax.legend()
    from megatron_mom.train.plot import save_figure
    save_figure(fig, path)
    return True


def _write_outputs(results: dict, s: MQARSettings, out: Path) -> Tuple[str, str]:
    """Writes the outputs; returns the table and what was written."""
    text = table(results, s)
    (out / "results.json").write_text(json.dumps(
        {"settings": dataclasses.asdict(s), "results": results}, indent=1))
    (out / "results.md").write_text(text + "\n")
    png = out / "mqar.png"
    drawn = plot(results, s, png)
    written = f"written: {out / 'results.md'}, {out / 'results.json'}"
    return text, (f"{written}, {png}" if drawn else f"{written}; {not_drawn(png)}")


def run(preset: str = "tiny", out: str = "runs/mqar", overrides: Optional[dict] = None,
        mixers: Optional[Sequence[str]] = None, device: Optional[str] = None,
        log=print) -> dict:
    """Train and test every mixer at every sequence length; write and return the results.
    Outputs are rewritten after every model, so a stopped run keeps what it finished."""
    from megatron_mom.train.build import init_process_groups
    s = settings_for(preset, overrides)
    if preset == "tiny":
        log(TINY_NOTE)
    mixers = list(mixers or MIXERS)
    for m in mixers:
        if m not in ALL_MIXERS:
            raise ConfigError(f"unknown mixer {m!r}; choose from {', '.join(ALL_MIXERS)}")
    init_process_groups(1, 1, s.seed)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = s.tf32
        torch.backends.cudnn.allow_tf32 = s.tf32
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if s.budget_minutes > 0:
        fit_steps_to_budget(s, mixers, dev, log)
    results: Dict[str, dict] = {}
    for mixer in mixers:
        results[mixer] = {"train": {}, "accuracy": {}}
        for L in s.seq_lens:
            torch.manual_seed(s.seed)
            model = build_model(mixer, s, dev)
            n_params = sum(p.numel() for p in model.parameters())
            log(f"mqar: {mixer}, L={L}, {n_params / 1e3:.0f}k parameters, on {dev}")
            results[mixer]["train"][str(L)] = train_model(model, s, L, dev, log)
            for N in s.num_pairs:
                if 4 * N <= L:
                    acc = test_accuracy(model, s, L, N, dev)
                    results[mixer]["accuracy"][f"{L}/{N}"] = acc
                    log(f"    test L={L} N={N}: accuracy {acc:.3f}")
            results[mixer]["parameters"] = n_params
            _write_outputs(results, s, out_dir)
    text, written = _write_outputs(results, s, out_dir)
    log("\n" + text + "\n\n" + written + (f"\n{TINY_NOTE}" if preset == "tiny" else ""))
    return results
