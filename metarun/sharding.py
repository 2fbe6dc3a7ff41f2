"""The meta-batch of tasks split over every device (a 1-D mesh axis "tasks"); parameters replicated.

Under several processes (metarun.distributed) the mesh spans every process's devices: each device
samples its own slice of the meta-batch (`shard_sampling`), replicated state is assembled from each
process's identical host copy (`replicate`), and evaluation runs on a process-local copy (`local_copy`).
"""
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
    """Place every leaf of `tree` whole on every device of `mesh` (unchanged when mesh is None).

    Several processes: each contributes its own copy of the leaf (the same in every process: same seed,
    same data) to its own devices through `jax.make_array_from_process_local_data`; no cross-process
    transfer or equality check. Leaves already replicated on `mesh` are kept as they are.
    """
    if mesh is None:
        return tree
    target = NamedSharding(mesh, PartitionSpec())
    if jax.process_count() == 1:
        return jax.device_put(tree, target)

    def put(x):
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(target, x.ndim):
            return x
        return jax.make_array_from_process_local_data(target, np.asarray(x))

    return jax.tree.map(put, tree)


def local_copy(tree):
    """`tree` on this process's first device (unchanged in a single process), for work that every
    process does alone on identical inputs: validation and the final evaluation. A replicated leaf
    reads from the local shard, with no communication."""
    if jax.process_count() == 1:
        return tree
    return jax.device_put(jax.device_get(tree), jax.local_devices()[0])


def shard_sampling(mesh: Optional[Mesh]) -> Optional[Callable]:
    """`(sampler, data, key, meta_batch) -> tasks` drawing each device's slice of the meta-batch on
    that device (a shard_map over "tasks"), the result sharded over the mesh; None for one device.

    Device i draws tasks i*m .. (i+1)*m - 1 (m = meta_batch / devices) from the same per-task keys
    as `data.tasks.sample_batch` (`jax.random.split(key, meta_batch)[j]` for task j), so the meta-batch
    is the same for any number of devices and processes, and a process never samples another's tasks.
    """
    if mesh is None:
        return None
    n = mesh.size

    def sample(sampler, data, key, meta_batch: int):
        per_device = meta_batch // n

        def local(data, key):
            keys = jax.random.split(key, meta_batch)  # [meta_batch, 2] uint32: cheap to make whole here
            mine = jax.lax.dynamic_slice_in_dim(keys, jax.lax.axis_index(TASK_AXIS) * per_device, per_device)
            return jax.vmap(sampler, in_axes=(None, 0))(data, mine)

        return jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec()),
                             out_specs=PartitionSpec(TASK_AXIS))(data, key)

    return sample


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
    processes = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    return (f"meta-batch sharded over {mesh.size} {mesh.devices.flat[0].platform} devices{processes} "
            f"(mesh axis '{TASK_AXIS}')")
