"""Loss curves from metrics.jsonl files: one PNG for a run or for several runs side by side (compare)."""

from __future__ import annotations

import json
import os
from typing import Any


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_runs(runs: dict[str, list[dict[str, Any]]], path: str | os.PathLike, *, title: str) -> None:
    """Train loss (thin line) and validation loss (dots) against the step, one color per run."""
    import matplotlib  # here, not at import: only the rank that draws pays for it

    matplotlib.use("Agg")  # files only, never a window: runs on headless machines and under torchrun
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for i, (label, records) in enumerate(runs.items()):
        color = f"C{i}"
        train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
        val = [(r["step"], r["val_loss"]) for r in records if r["kind"] == "val"]
        if train:
            ax.plot(*zip(*train, strict=True), color=color, alpha=0.5, linewidth=1, label=f"{label} train")
        if val:
            ax.plot(*zip(*val, strict=True), color=color, marker="o", markersize=4, label=f"{label} val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats per char)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
