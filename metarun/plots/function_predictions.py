"""predictions.png for function regression: predictive on a dense grid per task (context, targets, mean, ±2σ when the
model has a variance, sampled functions of latent models, the exact GP posterior). Every regression algorithm that
records `_plot_*` arrays (Neural Processes, DKT, MAML, Feature Transfer) is drawn by this one figure."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np


def predictions_figure(tasks: List[Dict[str, np.ndarray]], path, title: str = "test tasks") -> Path:
    """Writes one panel per task to `path` (PNG) and returns the path.

    Each task dict holds x_context [n, 1], y_context [n, 1], mask_context [n] (1 = real point), x_target
    [m, 1], y_target [m, 1], x_grid [G], mean [G]; optionally std [G] (the ±2σ band; a point prediction such
    as MAML's has none), samples [S, G] (functions of a latent model) and exact_mean / exact_std [G] (the
    exact GP posterior of the tasks' kernel).
    """
    # Figure + the Agg canvas directly, not pyplot: no global backend switch, no figure left open.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.0 * len(tasks), 3.4))
    FigureCanvasAgg(fig)
    for i, t in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), i + 1)
        order = np.argsort(t["x_grid"])
        g, mean = t["x_grid"][order], t["mean"][order]
        if "std" in t:
            std = t["std"][order]
            ax.fill_between(g, mean - 2 * std, mean + 2 * std, color="tab:blue", alpha=0.2, linewidth=0,
                            label="model ±2σ")
        for j, s in enumerate(t.get("samples", ())):
            ax.plot(g, s[order], color="tab:blue", alpha=0.5, linewidth=0.7, label="sampled functions" if j == 0 else None)
        ax.plot(g, mean, color="tab:blue", linewidth=1.5, label="model mean")
        if "exact_mean" in t:
            em, es = t["exact_mean"][order], t["exact_std"][order]
            ax.plot(g, em, "k--", linewidth=1, label="exact GP mean ±2σ")
            ax.plot(g, em - 2 * es, "k:", linewidth=0.8)
            ax.plot(g, em + 2 * es, "k:", linewidth=0.8)
        ax.scatter(t["x_target"][:, 0], t["y_target"][:, 0], s=8, color="tab:gray", alpha=0.7, label="targets")
        real = np.asarray(t["mask_context"]) > 0
        ax.scatter(t["x_context"][real, 0], t["y_context"][real, 0], s=22, color="black", zorder=3,
                   label=f"context ({int(real.sum())})")
        ax.set_title(f"task {i}: {int(real.sum())} context points", fontsize=9)
        ax.set_xlabel("x")
        if i == 0:
            ax.legend(fontsize=6, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path
