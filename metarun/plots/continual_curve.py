"""A score against the number of classes (or functions) learned one after another, with the 95% CI band, as a PNG:
accuracy for Omniglot streams, MSE for incremental regression."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np


def continual_curve(curves: Dict[str, Tuple[Sequence[int], Sequence[float], Sequence[float]]], path,
                    title: str = "Continual learning", reference: Optional[Dict[str, Dict[int, float]]] = None,
                    xlabel: str = "classes learned (one pass, one image per step)",
                    ylabel: str = "accuracy on their held-out images", ylim: Optional[Tuple[float, float]] = (0.0, 1.0),
                    legend_loc: str = "lower left") -> Path:
    """Writes the plot to `path` and returns it.

    Args:
      curves: {label: (classes learned K, mean accuracy after learning them, 95% CI half-width)}; one line
        and a shaded band per label (None entries, e.g. a diverged K, are left out).
      reference: {label: {K: accuracy}} published figures drawn as markers (optional).
      xlabel, ylabel, ylim, legend_loc: the axes (defaults: the Omniglot protocol's accuracy; ylim None = auto).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, (ks, mean, ci) in curves.items():
        keep = [i for i, m in enumerate(mean) if m is not None]
        k = np.asarray([ks[i] for i in keep], np.float64)
        m = np.asarray([mean[i] for i in keep], np.float64)
        c = np.asarray([ci[i] or 0.0 for i in keep], np.float64)
        line, = ax.plot(k, m, marker="o", markersize=3, label=label)
        ax.fill_between(k, m - c, m + c, color=line.get_color(), alpha=0.25, linewidth=0)
    for label, points in (reference or {}).items():
        ks = sorted(points)
        ax.plot(ks, [points[k] for k in ks], linestyle="none", marker="x", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc=legend_loc)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
