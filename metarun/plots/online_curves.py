"""Online meta-learning curves: accuracy after k shots and shots to proficiency against the stream's task index."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import numpy as np

WINDOW = 5  # tasks in the trailing mean drawn over the per-task points (one task's accuracy is noisy)


def _trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
    out = np.full(values.shape, np.nan)
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1): i + 1]
        chunk = chunk[np.isfinite(chunk)]
        if chunk.size:
            out[i] = chunk.mean()
    return out


def online_curves(runs: Dict[str, dict], path, title: str = "online meta-learning") -> Optional[Path]:
    """Two panels for one or more runs on the same stream ({label: results.json's `online` section}):
    held-out accuracy after each k against task t, and shots to the proficiency threshold against t
    (a hollow marker at the top: not reached with the largest k). Points per task, a trailing mean over
    WINDOW tasks as the line; the second half's mean ± 95% CI in the legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    acc_ax, need_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    styles = ("-", "--", ":", "-.")
    colors = ("C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7")
    threshold, top, ticks = None, 0, set()
    for r, (label, s) in enumerate(runs.items()):
        threshold = s["threshold"]
        t = np.arange(s["tasks"])
        for i, (k, values) in enumerate(sorted(s["per_task"]["accuracy"].items(), key=lambda kv: int(kv[0]))):
            v = np.array([np.nan if x is None else x for x in values], np.float64)
            color = colors[i % len(colors)]
            half = s["second_half"]["accuracy"][k]
            tail = f" ({half['mean']:.3f} ± {half['ci95']:.3f})" if half["mean"] is not None else ""
            acc_ax.plot(t, v, ".", color=color, alpha=0.25, markersize=3)
            acc_ax.plot(t, _trailing_mean(v, WINDOW), styles[r % len(styles)], color=color,
                        label=f"{label}, k={k}{tail}")
        largest = max(s["shots"])
        top = max(top, largest)
        need = np.array([np.nan if x is None else x for x in s["per_task"]["shots_to_threshold"]], np.float64)
        censored = ~np.isfinite(need)
        color = colors[r % len(colors)]
        h = s["second_half"]["shots_to_threshold"]
        tail = f" ({h['mean']:.2f} ± {h['ci95']:.2f}, {h['censored']} censored)" if h["mean"] is not None else ""
        need_ax.plot(t[~censored], need[~censored], ".", color=color, alpha=0.35, markersize=4)
        # Not reached: drawn on a row of their own above the largest k; the mean counts them at the largest k.
        need_ax.plot(t[censored], np.full(censored.sum(), largest * 1.2), "o", mfc="none", color=color, alpha=0.5,
                     markersize=4)
        need_ax.plot(t, _trailing_mean(np.where(censored, largest, need), WINDOW), styles[r % len(styles)],
                     color=color, label=f"{label}{tail}")
        ticks.update(int(k) for k in s["shots"])
    acc_ax.set_xlabel("task t (scored before it joins the buffer)")
    acc_ax.set_ylabel("held-out accuracy after k shots")
    if threshold is not None:
        acc_ax.axhline(threshold, color="gray", linewidth=0.8, linestyle=":")
    acc_ax.legend(fontsize=7)
    if top:
        need_ax.set_yticks(sorted(ticks) + [top * 1.2], [str(k) for k in sorted(ticks)] + ["not\nreached"])
        need_ax.set_ylim(0, top * 1.3)
    need_ax.set_xlabel("task t")
    need_ax.set_ylabel(f"shots per class to reach {threshold:.0%}" if threshold is not None else "shots")
    need_ax.legend(fontsize=7)
    fig.suptitle(f"{title} (lines: trailing mean of {WINDOW} tasks; legend: second half, mean ± 95% CI)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
