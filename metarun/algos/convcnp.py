"""Convolutional Conditional Neural Process (Gordon et al. 2020), 1D: `algo=convcnp`. SetConv onto a uniform grid,
a CNN, SetConv back to the targets (metarun/learners/neural_process.py); shared parts in np_common.py."""
from __future__ import annotations

from dataclasses import dataclass

from metarun.algos.base import Collaborators, MetaAlgorithm
from metarun.algos.np_common import NPBaseConfig, check_common, conditional_np
from metarun.errors import UserError
from metarun.learners.neural_process import ConvCNP
from metarun.registry import register


@dataclass
class ConvCNPConfig(NPBaseConfig):
    name: str = "convcnp"
    points_per_unit: int = 64  # grid density (Gordon et al.'s 1D experiments)
    # Grid points (fixed for jit): grid_size / points_per_unit units wide, centred on each task's inputs; it must
    # cover the context and the targets (10 units: the [-2, 6] extrapolation range with margin).
    grid_size: int = 640
    channels: int = 32
    num_layers: int = 4
    kernel_size: int = 15


@register("algo", "convcnp", schema=ConvCNPConfig)
def build(a, c: Collaborators) -> MetaAlgorithm:
    check_common(a, c)
    if getattr(c.family, "input_dim", 1) != 1:  # image completion: on-the-grid ConvCNP (2-D) is not built
        raise UserError(f"algo=convcnp is 1D (a SetConv on a line); dataset={c.family.name} has "
                        f"{c.family.input_dim}-D inputs: use algo=cnp, np or anp")
    for key in ("points_per_unit", "grid_size", "channels", "num_layers", "kernel_size"):
        if a[key] < 1:
            raise UserError(f"algo.{key}={a[key]} must be >= 1")
    model = ConvCNP(points_per_unit=a.points_per_unit, grid_size=a.grid_size, channels=a.channels,
                    num_layers=a.num_layers, kernel_size=a.kernel_size, min_std=a.min_std)
    info = {"name": "convcnp", "model": "ConvCNP (Gordon et al. 2020), 1D", "points_per_unit": a.points_per_unit,
            "grid_size": a.grid_size, "grid_width": a.grid_size / a.points_per_unit, "channels": a.channels,
            "num_layers": a.num_layers, "kernel_size": a.kernel_size, "min_std": a.min_std,
            "learner": "none (model from algo.*)", "metric": a.metric}
    return conditional_np(model, c.family, c.phase, info)
