"""Loss curves from metrics.jsonl files (one run, or several side by side for compare), and the sweep's plots."""

from __future__ import annotations

import json
import math
import os
from typing import Any

# x -> the values over seeds at x (a run that diverged holds NaN or inf): one line of a `plot_spread` panel
Series = list[tuple[float, list[float]]]


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _pyplot() -> Any:
    import matplotlib  # here, not at import: only the rank that draws pays for it

    matplotlib.use("Agg")  # files only, never a window: runs on headless machines and under torchrun
    import matplotlib.pyplot as plt

    return plt


def plot_runs(runs: dict[str, list[dict[str, Any]]], path: str | os.PathLike, *, title: str) -> None:
    """Train loss (thin line) and validation loss (dots) against the step, one color per run."""
    plt = _pyplot()
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


def plot_spread(
    panels: dict[str, dict[str, Series]],
    path: str | os.PathLike,
    *,
    title: str,
    xlabel: str,
    ylabel: str = "final validation loss (nats per char)",
    logx: bool = True,
    curve: bool = False,
) -> None:
    """One panel per key of `panels`, one color per label: the mean over seeds against x, and its spread.

    `curve=False` (a few x values: lrs, batch sizes) marks each seed's value and the min-max bar; `curve=True`
    (a loss curve) shades min-max. Non-finite values (diverged runs) are left out of the means and the axes.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels) + 1, 4.5), dpi=120, sharey=True, squeeze=False)
    colors = {label: f"C{i}" for i, label in enumerate(dict.fromkeys(k for p in panels.values() for k in p))}
    for ax, (panel, series) in zip(axes[0], panels.items(), strict=True):
        for label, points in series.items():
            kept = [(x, [v for v in vs if math.isfinite(v)]) for x, vs in points]
            kept = [(x, vs) for x, vs in kept if vs]
            if not kept:
                continue
            xs = [x for x, _ in kept]
            means = [sum(vs) / len(vs) for _, vs in kept]
            lows, highs = [min(vs) for _, vs in kept], [max(vs) for _, vs in kept]
            color = colors[label]
            if curve:
                ax.plot(xs, means, color=color, label=label)
                ax.fill_between(xs, lows, highs, color=color, alpha=0.2, linewidth=0)
            else:
                below = [m - lo for m, lo in zip(means, lows, strict=True)]
                bars = [below, [h - m for m, h in zip(means, highs, strict=True)]]
                ax.errorbar(xs, means, yerr=bars, color=color, marker="o", capsize=3, label=label)
                seeds = [(x, v) for x, vs in kept for v in vs]
                ax.scatter(*zip(*seeds, strict=True), color=color, s=10, alpha=0.5)
        if logx:
            ax.set_xscale("log")
        if not curve:  # a few grid values: label exactly those
            xs = sorted({x for points in series.values() for x, _ in points})
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
            ax.minorticks_off()
        ax.set_title(panel)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
