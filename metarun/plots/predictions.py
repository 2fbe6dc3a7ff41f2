"""Regression predictions with ±2σ bands: a few test tasks, their support points, truth and predictive."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np


def predictions_plot(support_x, support_y, query_x, query_y, mean, std: Optional[np.ndarray], path,
                     title: str = "Predictions", tasks: int = 4) -> Path:
    """Writes one panel per task (up to `tasks`) to `path` (PNG) and returns the path.

    Args:
      support_x, support_y: [T, K] (1-D inputs) support points per task (NaN for padding is skipped).
      query_x, query_y: [T, Q] the query inputs and true values.
      mean: [T, Q] the predictive mean at the queries.
      std: [T, Q] the predictive standard deviation (the band is mean ± 2 std), or None (no band).
      path: the PNG to write; parent directories are made.
      title: the figure title.
      tasks: panels drawn (the first `tasks` tasks).
    """
    # Figure + the Agg canvas directly, not pyplot: no global backend switch, no figure left open.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    arrays = [np.asarray(a, np.float64) for a in (support_x, support_y, query_x, query_y, mean)]
    sx, sy, qx, qy, mu = arrays
    sd = None if std is None else np.asarray(std, np.float64)
    n = min(tasks, qx.shape[0])
    fig = Figure(figsize=(3.2 * n, 3.0))
    FigureCanvasAgg(fig)
    for t in range(n):
        ax = fig.add_subplot(1, n, t + 1)
        order = np.argsort(qx[t])  # queries are drawn at random: sort them to draw lines and bands
        x = qx[t][order]
        ax.plot(x, qy[t][order], "k-", linewidth=1, label="truth")
        ax.plot(x, mu[t][order], "tab:blue", linewidth=1.5, label="mean")
        if sd is not None:
            ax.fill_between(x, (mu[t] - 2 * sd[t])[order], (mu[t] + 2 * sd[t])[order], color="tab:blue",
                            alpha=0.25, label="±2σ")
        real = np.isfinite(sx[t]) & np.isfinite(sy[t])
        ax.plot(sx[t][real], sy[t][real], "o", color="tab:red", markersize=4, label="support")
        ax.set_title(f"task {t}", fontsize=9)
        if t == 0:
            ax.legend(loc="best", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path
