"""The meta-batch of tasks split over every device (a 1-D mesh axis "tasks"); parameters replicated."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from metarun.errors import UserError

TASK_AXIS = "tasks"


def task_mesh(meta_batch: int, devices: Optional[Sequence[jax.Device]] = None) -> Optional[Mesh]:
    """A 1-D mesh over `devices` (default: all of them, every host's), or None for a single device.

    Raises UserError when `meta_batch` does not split evenly over the devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if n <= 1:
        return None
    if meta_batch % n:
        platform = devices[0].platform
        fewer = {"gpu": "CUDA_VISIBLE_DEVICES=0 for one GPU", "cuda": "CUDA_VISIBLE_DEVICES=0 for one GPU",
                 "cpu": "XLA_FLAGS without --xla_force_host_platform_device_count"}.get(platform, "")
        raise UserError(
            f"train.meta_batch={meta_batch} does not split over the {n} {platform} devices: "
            f"use a multiple of {n} (e.g. train.meta_batch={n * max(1, round(meta_batch / n))})"
            + (f", or show fewer devices ({fewer})" if fewer else ""))
    return Mesh(np.asarray(devices), (TASK_AXIS,))


def replicate(tree, mesh: Optional[Mesh]):
    """Place every leaf of `tree` whole on every device of `mesh` (unchanged when mesh is None)."""
    if mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def task_constraint(mesh: Optional[Mesh]) -> Optional[Callable]:
    """`tasks -> tasks` pinning the leading (task) axis of every leaf to the mesh's "tasks" axis.

    Called inside the jitted step on the sampled task batch; XLA then partitions the vmapped
    adaptation and meta-gradient over the devices and all-reduces the mean gradient. None for
    a single device, so the one-device program is exactly the unsharded one.
    """
    if mesh is None:
        return None
    sharding = NamedSharding(mesh, PartitionSpec(TASK_AXIS))
    return lambda tasks: jax.lax.with_sharding_constraint(tasks, sharding)


def describe(mesh: Optional[Mesh]) -> str:
    if mesh is None:
        return "1 device"
    return f"meta-batch sharded over {mesh.size} {mesh.devices.flat[0].platform} devices (mesh axis '{TASK_AXIS}')"
