"""Time to a validation threshold, from metrics.jsonl rows: `metarun-report PATH --time-to 0.95,0.97,0.98`.

The figure a user of a 2-core machine cares about is not seconds per step but the wall time until the
validation metric first reaches a level. Each metrics.jsonl row carries `wall_s`: seconds since the run
started, validation and checkpoint time included, carried across `resume=true` (train.py adds the previous
segments' time), so a resumed run reports the same clock as an uninterrupted one.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union


def validation_key(rows: Sequence[dict]) -> Optional[str]:
    """The run's validation metric: the first `val/*` key (sorted) that is not a CI column."""
    keys = sorted({k for r in rows for k in r if k.startswith("val/") and not k.endswith("_ci95")})
    return keys[0] if keys else None


def validation_curve(rows: Sequence[dict], key: str) -> List[tuple]:
    """(wall_s, step, value) of every row holding a finite `key`, in step order."""
    points = [(float(r["wall_s"]), int(r["step"]), float(r[key])) for r in rows
              if r.get(key) is not None and r.get("wall_s") is not None and math.isfinite(r[key])]
    return sorted(points, key=lambda p: p[1])


def first_reach(rows: Sequence[dict], key: str, threshold: float, higher_is_better: bool = True) -> Optional[dict]:
    """The first validation row whose `key` reaches `threshold` (>= if higher is better, else <=):
    {"wall_s", "step", "value"}, or None if no row does."""
    for wall, step, value in validation_curve(rows, key):
        if (value >= threshold) if higher_is_better else (value <= threshold):
            return {"wall_s": wall, "step": step, "value": value}
    return None


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def time_to_table(runs: Dict[str, Sequence[dict]], thresholds: Sequence[float], key: Optional[str] = None,
                  higher_is_better: Union[bool, Dict[str, bool]] = True) -> str:
    """Markdown: one row per run, one column per threshold ("12.3 min (step 2000)" or "not reached"),
    then the best validation value and when it was reached. `higher_is_better`: one for all, or per run
    (a run whose metric is lower-is-better reaches a threshold from above)."""
    header = "| run | " + " | ".join(f"{key or 'val'} reaches {t:g}" for t in thresholds)
    lines = [header + " | best (when) |", "|---" * (len(thresholds) + 2) + "|"]
    for name, rows in runs.items():
        higher = higher_is_better.get(name, True) if isinstance(higher_is_better, dict) else higher_is_better
        k = key or validation_key(rows)
        curve = validation_curve(rows, k) if k else []
        if not curve:
            lines.append(f"| {name} | " + " | ".join("no validation rows" for _ in thresholds) + " | – |")
            continue
        cells = []
        for t in thresholds:
            hit = first_reach(rows, k, t, higher)
            cells.append("not reached" if hit is None else f"{_minutes(hit['wall_s'])} (step {hit['step']})")
        best = (max if higher else min)(curve, key=lambda p: p[2])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {best[2]:.4g} ({_minutes(best[0])}, step {best[1]}) |")
    return "\n".join(lines)


def plot_against_wall(runs: Dict[str, Sequence[dict]], path: Path, thresholds: Sequence[float] = (),
                      key: Optional[str] = None) -> Optional[Path]:
    """The validation metric against wall-clock minutes, one line per run, thresholds as dotted lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    drawn = 0
    for name, rows in runs.items():
        k = key or validation_key(rows)
        curve = validation_curve(rows, k) if k else []
        if curve:
            ax.plot([p[0] / 60 for p in curve], [p[2] for p in curve], marker="o", markersize=3, label=name)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    for t in thresholds:
        ax.axhline(t, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="wall time (min, validation included)", ylabel=key or "validation metric",
           title="validation metric against wall time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
