"""loss.png from metrics.jsonl (matplotlib, headless), written atomically."""
from __future__ import annotations

import json
import os
from pathlib import Path


def read_metrics(path: Path):
    """(steps, losses), [(step, val_loss)] from a metrics.jsonl file."""
    train, val = {}, []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if "loss" in record:
            train[record["step"]] = record["loss"]
        if "val_loss" in record:
            val.append((record["step"], record["val_loss"]))
    steps = sorted(train)
    return steps, [train[s] for s in steps], val


def _smooth(values, window: int):
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is missing
    (plots are optional: every caller says so instead of drawing)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def not_drawn(png_path: Path) -> str:
    """What to tell the user instead of a plot's path when matplotlib is missing."""
    return (f"{png_path.name} not drawn: matplotlib is not installed (pip install matplotlib, "
            f"or pip install 'megatron-mom[plot]')")


def loss_curve(metrics_path: Path, png_path: Path, title: str = "training loss") -> bool:
    """Draw the curve; returns False (and draws nothing) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    steps, losses, val = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=1, label="train (per step)")
    ax.plot(steps, _smooth(losses, 10), color="tab:blue", lw=2, label="train (10-step mean)")
    if val:
        ax.plot(*zip(*val), "o-", color="tab:orange", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, png_path)
    return True


def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure as PNG atomically (a reader never sees half a file)."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
