"""Learning curves of a meta-RL run: returns by meta-step from its metrics.jsonl, as a PNG."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import numpy as np

# (metrics.jsonl key, legend label), in drawing order; `return` is the algorithm's primary return
# (maml_rl: after adaptation; rl2: the trial's later episodes)
CURVES = (("train/return_before", "train, before adaptation"), ("train/return", "train"),
          ("val/return", "validation"))


def return_curves(rows: List[dict], path, title: str = "returns") -> Optional[Path]:
    """Writes the return curves found in `rows` (metrics.jsonl rows) to `path`; None when there are none.

    Validation rows carry a 95% CI (`val/return_ci95`), drawn as a band.
    """
    series = {key: [(r["step"], r[key], r.get(key + "_ci95")) for r in rows if r.get(key) is not None]
              for key, _ in CURVES}
    if not any(series.values()):
        return None
    # Figure + the Agg canvas directly, not pyplot: no global backend switch, no figure left open.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for key, label in CURVES:
        points = series[key]
        if not points:
            continue
        steps, values = np.array([p[0] for p in points]), np.array([p[1] for p in points], np.float64)
        line = ax.plot(steps, values, "-o" if len(steps) < 30 else "-", markersize=3, label=label)[0]
        ci = np.array([np.nan if p[2] is None else p[2] for p in points], np.float64)
        if np.isfinite(ci).any():
            ax.fill_between(steps, values - ci, values + ci, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("meta-step")
    ax.set_ylabel("return per episode")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
