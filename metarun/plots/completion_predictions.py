"""predictions.png for image completion: per test image and context size, the context pixels (the unobserved
ones in a neutral blue-grey), the predictive mean and standard deviation; the true image last."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

UNOBSERVED_RGB = (0.45, 0.55, 0.75)  # neither ink (white) nor background (black)


def context_rgb(image: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """[S, S, 3]: the image's intensity at the observed pixels (flat indices), UNOBSERVED_RGB elsewhere."""
    rgb = np.broadcast_to(np.asarray(UNOBSERVED_RGB, np.float32), image.shape + (3,)).copy()
    flat = rgb.reshape(-1, 3)
    flat[pixels] = np.clip(image.reshape(-1)[pixels], 0.0, 1.0)[:, None]
    return rgb


def completion_figure(images: np.ndarray, means: np.ndarray, stds: np.ndarray, context_pixels: Sequence[np.ndarray],
                      path, title: str = "test images") -> Path:
    """Writes the grid to `path` (PNG) and returns the path.

    images [n, S, S] in [0, 1]; means, stds [n, C, S, S] for C context sizes; context_pixels: C arrays of the
    flat pixel indices observed at each size. Rows: images; columns: per size context / mean / std, then truth.
    Intensities are drawn on a fixed [0, 1] scale; stds on [0, max std of the figure] (stated in the title).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n, sizes = images.shape[0], len(context_pixels)
    cols = 3 * sizes + 1
    std_max = float(max(np.max(stds), 1e-6))
    fig = Figure(figsize=(1.1 * cols, 1.2 * n + 0.6))
    FigureCanvasAgg(fig)
    for r in range(n):
        panels = []
        for c, pixels in enumerate(context_pixels):
            k = len(pixels)
            panels += [(context_rgb(images[r], np.asarray(pixels)), None, f"context {k}"),
                       (means[r, c], (0.0, 1.0), f"mean ({k})"),
                       (stds[r, c], (0.0, std_max), f"std ({k})")]
        panels.append((images[r], (0.0, 1.0), "truth"))
        for c, (img, lim, label) in enumerate(panels):
            ax = fig.add_subplot(n, cols, r * cols + c + 1)
            if lim is None:
                ax.imshow(img, interpolation="nearest")
            else:
                ax.imshow(img, cmap="gray", vmin=lim[0], vmax=lim[1], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=7)
    fig.suptitle(f"{title} (std scale 0..{std_max:.2f})", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    return path
