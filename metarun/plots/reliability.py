"""Reliability diagram: per-bin accuracy against the diagonal of perfect calibration, as a PNG."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def reliability_diagram(bin_counts, bin_conf, bin_acc, path, title: str = "Reliability") -> Path:
    """Writes a reliability diagram (Guo et al. 2017, fig. 1) to `path` and returns the path.

    Args:
      bin_counts: [M] queries per equal-width confidence bin.
      bin_conf: [M] mean confidence per bin (uncertainty.bin_means); ignored where the count is 0.
      bin_acc: [M] accuracy per bin (uncertainty.bin_means); ignored where the count is 0.
      path: the PNG to write; parent directories are made.
      title: the plot title; the ECE of these bins is appended to it.
    """
    # Figure + the Agg canvas directly, not pyplot: no global backend switch, no figure left open.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(bin_counts, np.float64)
    conf = np.asarray(bin_conf, np.float64)
    acc = np.asarray(bin_acc, np.float64)
    m = counts.size
    n = counts.sum()
    ece = float((counts * np.abs(acc - conf)).sum() / max(n, 1.0))
    edges = np.linspace(0.0, 1.0, m + 1)
    filled = counts > 0

    fig = Figure(figsize=(4.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(edges[:-1][filled], acc[filled], width=1.0 / m, align="edge", color="tab:blue",
           edgecolor="black", linewidth=0.5, label="accuracy")
    # The gap to each bin's mean confidence is what ECE weighs by the bin's share of queries.
    ax.bar(edges[:-1][filled], conf[filled] - acc[filled], bottom=acc[filled], width=1.0 / m, align="edge",
           color="tab:red", alpha=0.3, edgecolor="tab:red", linewidth=0.5, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title} (ECE {100 * ece:.2f}%, n={int(n)})")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path
