"""Convolutional Conditional Neural Process (Gordon et al. 2020): `algo=convcnp`. 1D: SetConv onto a uniform grid,
a CNN, SetConv back to the targets (metarun/learners/neural_process.py). On image completion (family.input_dim 2):
the on-the-grid model of the paper's sec. 4 (metarun/learners/grid_convcnp.py). Shared parts in np_common.py."""
from __future__ import annotations

from dataclasses import dataclass

from metarun.algos.base import Collaborators, MetaAlgorithm
from metarun.algos.np_common import NPBaseConfig, check_common, conditional_np
from metarun.errors import UserError
from metarun.families.base import check_positive
from metarun.learners.grid_convcnp import GridConvCNP
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
    # On-the-grid (images): the CNN's kernel and the positive first ("SetConv") kernel; channels and num_layers
    # (residual blocks there) are shared with the 1D model.
    image_kernel_size: int = 5
    setconv_size: int = 9


@register("algo", "convcnp", schema=ConvCNPConfig)
def build(a, c: Collaborators) -> MetaAlgorithm:
    check_common(a, c)
    input_dim = getattr(c.family, "input_dim", 1)
    if input_dim == 2 and getattr(c.family, "image_size", None):  # pixel coordinates: the on-the-grid model
        return _on_the_grid(a, c)
    if input_dim != 1:
        raise UserError(f"algo=convcnp reads 1D inputs or pixel coordinates; dataset={c.family.name} has "
                        f"{input_dim}-D inputs: use algo=cnp, np or anp")
    check_positive("algo", a, ("points_per_unit", "grid_size", "channels", "num_layers", "kernel_size"))
    model = ConvCNP(points_per_unit=a.points_per_unit, grid_size=a.grid_size, channels=a.channels,
                    num_layers=a.num_layers, kernel_size=a.kernel_size, min_std=a.min_std)
    info = {"name": "convcnp", "model": "ConvCNP (Gordon et al. 2020), 1D", "points_per_unit": a.points_per_unit,
            "grid_size": a.grid_size, "grid_width": a.grid_size / a.points_per_unit, "channels": a.channels,
            "num_layers": a.num_layers, "kernel_size": a.kernel_size, "min_std": a.min_std,
            "learner": "none (model from algo.*)", "metric": a.metric}
    return conditional_np(model, c.family, c.phase, info)


def _on_the_grid(a, c: Collaborators) -> MetaAlgorithm:
    check_positive("algo", a, ("channels", "num_layers", "image_kernel_size", "setconv_size"))
    model = GridConvCNP(image_size=c.family.image_size, channels=a.channels, num_layers=a.num_layers,
                        kernel_size=a.image_kernel_size, setconv_size=a.setconv_size, min_std=a.min_std)
    info = {"name": "convcnp", "model": "ConvCNP on the grid (Gordon et al. 2020, sec. 4)",
            "image_size": c.family.image_size, "channels": a.channels, "residual_blocks": a.num_layers,
            "image_kernel_size": a.image_kernel_size, "setconv_size": a.setconv_size, "min_std": a.min_std,
            "learner": "none (model from algo.*)", "metric": a.metric}
    return conditional_np(model, c.family, c.phase, info)
