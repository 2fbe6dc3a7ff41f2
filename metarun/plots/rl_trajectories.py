"""2D navigation: one trajectory per adaptation stage for a few test goals, as a PNG."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def navigation_paths(paths, goals, path, title: str = "navigation2d", panels: int = 4) -> Path:
    """Writes one panel per test task: the agent's positions after 0, 1, ... inner steps, and the goal.

    Args:
      paths: [tasks, stages, T, 2] positions of one trajectory per adaptation stage (stage 0: before
        adaptation, last stage: after all inner steps); NaN after the episode ended.
      goals: [tasks, 2] goal positions.
      path: the PNG to write; parent directories are made.
      title: the figure's title.
      panels: how many tasks to draw (the first ones).
    """
    # Figure + the Agg canvas directly, not pyplot: no global backend switch, no figure left open.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    paths, goals = np.asarray(paths, np.float64), np.asarray(goals, np.float64)
    n = min(panels, paths.shape[0])
    stages = paths.shape[1]
    fig = Figure(figsize=(3.2 * n, 3.4))
    FigureCanvasAgg(fig)
    colors = [f"C{i}" for i in range(stages)]
    for i in range(n):
        ax = fig.add_subplot(1, n, i + 1)
        for s in range(stages):
            # the start (the origin) is prepended: observations are positions after each move (then the goal,
            # with dataset.observe_goal)
            xy = np.concatenate([np.zeros((1, 2)), paths[i, s, :, :2]])
            ax.plot(xy[:, 0], xy[:, 1], "-", color=colors[s], linewidth=1.2,
                    label=f"{s} step{'s' if s != 1 else ''}" if i == 0 else None)
        ax.plot(*goals[i], marker="*", color="k", markersize=12, linestyle="none", label="goal" if i == 0 else None)
        ax.plot(0, 0, marker="o", color="grey", markersize=4)
        ax.set_xlim(-0.6, 0.6)
        ax.set_ylim(-0.6, 0.6)
        ax.set_aspect("equal")
        ax.set_title(f"task {i}", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.legend(loc="lower center", ncol=stages + 1, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
