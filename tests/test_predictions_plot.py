"""The regression predictions plot (±2σ bands) writes a PNG from per-task arrays, padding and no-variance included."""
from __future__ import annotations

import numpy as np

from metarun.plots.predictions import predictions_plot


def test_writes_a_png_with_and_without_bands(tmp_path):
    rng = np.random.default_rng(0)
    qx = rng.uniform(-5, 5, (3, 50))
    sx = rng.uniform(-5, 5, (3, 5))
    sx[0, -1] = np.nan  # a padded support point is skipped, not drawn at NaN
    truth = lambda x: 2 * np.sin(x)  # noqa: E731
    args = (sx, truth(sx), qx, truth(qx), truth(qx) + 0.1)
    for name, std in (("bands.png", np.full(qx.shape, 0.3)), ("no_bands.png", None)):
        path = predictions_plot(*args, std, tmp_path / name, title="sinusoid test")
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert (tmp_path / "bands.png").read_bytes() != (tmp_path / "no_bands.png").read_bytes()
