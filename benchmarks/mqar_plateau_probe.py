"""Probe of an MQAR run on the loss plateau (docs/results.md): one mixer of the Zoology sweep's
models at one width, L = 64 with 16 pairs, vocabulary 8192, 32 sequences a step, the sweep's
optimizer and schedule, on the CPU (torch kernels, 16-token chunks). Every 25 steps it prints
the loss, the gradient norm before clipping, each MoM layer's mean beta and per-token decay
(from its input projection's b and a rows, memory 0), the mixer's output RMS over its input's,
A = exp(A_log), dt = softplus(dt_bias) and out_proj's norm, as JSON lines.

    python benchmarks/mqar_plateau_probe.py LR STEPS [MIXER=single] [WIDTH=64]
"""
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_mom.apps import mqar, mqar_sweep  # noqa: E402
from megatron_mom.layer import metrics  # noqa: E402
from megatron_mom.train.build import init_process_groups  # noqa: E402

SEQ_LEN, PAIRS, SEQUENCES = 64, 16, 32


def watch(mixers, stats: dict) -> None:
    """Forward hooks that put each MoM layer's gate statistics into `stats`."""
    def gates(i, m):
        def hook(mod, inp, out):
            y, off, rows = (out[0] if isinstance(out, tuple) else out), 0, {}
            for name, n in m.sections:
                rows[name] = y[..., off:off + n].detach()
                off += n
            beta = torch.sigmoid(rows["b.0"])
            dt = F.softplus(rows["a.0"] + m.dt_bias.detach())
            decay = torch.exp(-m.A_log.detach().exp() * dt)
            stats.update({f"L{i}_beta_mean": beta.mean().item(),
                          f"L{i}_decay_mean": decay.mean().item(),
                          f"L{i}_decay_below_half": (decay < 0.5).float().mean().item()})
        return hook

    def read_out(i):
        def hook(mod, inp, out):
            x, y = inp[0].float(), (out[0] if isinstance(out, tuple) else out).float()
            stats[f"L{i}_mix_out/in_rms"] = (y.pow(2).mean() / x.pow(2).mean()).sqrt().item()
        return hook

    for i, m in enumerate(mixers):
        m.in_proj.register_forward_hook(gates(i, m))
        m.register_forward_hook(read_out(i))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    lr, steps = float(argv[0]), int(argv[1])
    mixer = argv[2] if len(argv) > 2 else "single"
    width = int(argv[3]) if len(argv) > 3 else 64
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    init_process_groups(1, 1, 0)
    s = mqar_sweep.settings_for("zoology", {"chunk_size": 16})
    ms = mqar_sweep.model_settings(s, width, lr, steps)
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    model = mqar.build_model(mixer, ms, torch.device("cpu"))
    metrics.set_router_loss_scale(device=torch.device("cpu"))
    opt = mqar.adamw(model, lr, s.weight_decay, s.decay_1d, betas=(0.9, 0.98))
    mixers = [m for m in model.modules() if type(m).__name__ == "MixtureOfMemories"]
    stats: dict = {}
    watch(mixers, stats)
    gen, start = torch.Generator().manual_seed(1), time.time()
    for step in range(steps):
        x, y = mqar.make_batch(SEQUENCES, SEQ_LEN, PAIRS, s.vocab_size, s.power_a, gen)
        for group in opt.param_groups:
            group["lr"] = mqar._lr(step, ms)
        logits, targets = mqar._answer_logits(model, x, y)
        loss = F.cross_entropy(logits.float(), targets)
        opt.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        opt.step()
        if step % 25 and step != steps - 1:
            continue
        rec = dict(step=step, loss=round(loss.item(), 4), grad_norm=round(grad_norm, 4),
                   seconds=round(time.time() - start, 1),
                   **{k: round(v, 4) for k, v in stats.items()})
        for i, m in enumerate(mixers):
            rec[f"L{i}_A"] = [round(a, 3) for a in m.A_log.exp().tolist()]
            rec[f"L{i}_dt"] = [round(a, 4) for a in F.softplus(m.dt_bias).tolist()]
            rec[f"L{i}_outproj_norm"] = round(m.out_proj.weight.norm().item(), 3)
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
