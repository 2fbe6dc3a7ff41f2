"""The predictions.png record of a regression algorithm that predicts at any input (DKT, MAML, Feature Transfer).

The regression family draws predictions.png from per-task `_plot_*` arrays an evaluation build returns among
its metrics (metarun.families.regression.PLOT_KEYS; `_` keeps them out of the summary). The Neural Processes
record them through np_common; this is the same record, with the same grid, for the other algorithms.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import jax

from metarun.algos.np_common import context_of, grid_for, plot_record


def regression_record(support, query, predict: Callable[[jax.Array], Tuple[jax.Array, Optional[jax.Array]]]
                      ) -> Dict[str, jax.Array]:
    """The `_plot_*` arrays of one task: its support (context) and query (targets) points and the model's
    predictive mean (and standard deviation, when it has one) on a grid spanning them.

    predict: x_grid [G, 1] -> (mean [G, dy], std [G, dy] or [G] or None): the adapted model at the grid.
    """
    ctx, tgt = context_of(support), context_of(query)
    x_grid = grid_for(ctx, tgt)
    mean, std = predict(x_grid)
    mean = mean.reshape(x_grid.shape[0], -1)
    if std is not None:
        std = std.reshape(x_grid.shape[0], -1)
    return plot_record(ctx, tgt, x_grid, mean, std)
