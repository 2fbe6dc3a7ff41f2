"""Several processes, one run: joining `jax.distributed` from the `distributed` config section or SLURM.

Every process runs the same command; after `initialize`, `jax.devices()` lists every process's
devices, so `sharding.task_mesh` spans them all and the jitted step all-reduces the meta-gradient
across processes. Process 0 is the primary: it alone writes the run directory's files (metrics,
results, configs, the lock); checkpoints are written by all of them together through orbax.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Optional

import jax

from metarun.errors import UserError

log = logging.getLogger(__name__)

_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_HOST_PORT = re.compile(r"^\[?[A-Za-z0-9_.:-]+\]?:\d{1,5}$")
_NEEDS = ("a multi-process run needs distributed.coordinator=HOST:PORT (process 0's address), "
          "distributed.num_processes=N and distributed.process_id=I (0..N-1) on every process")


def _slurm_tasks() -> int:
    """The task count of the SLURM job step this process runs in (srun), 0 outside one."""
    if not all(v in os.environ for v in _SLURM_VARS):
        return 0
    try:
        return int(os.environ["SLURM_NTASKS"])
    except ValueError:
        return 0


def settings(dist_cfg) -> Optional[dict]:
    """The keyword arguments of `jax.distributed.initialize` for this process, or None for a
    single-process run.

    Explicit keys win: coordinator, num_processes and process_id must be given together (num_processes=1
    forces a single process). With none of them set, a SLURM job step with more than one task
    (`srun`, or submitit with nodes x tasks_per_node > 1) is joined from SLURM's variables by JAX itself.
    """
    get = (lambda k: dist_cfg.get(k)) if dist_cfg is not None else (lambda k: None)
    coordinator, n, pid, timeout = get("coordinator"), get("num_processes"), get("process_id"), get("timeout_s")
    timeout = 300 if timeout is None else int(timeout)
    if timeout < 1:
        raise UserError(f"distributed.timeout_s={timeout} must be >= 1")
    if n is not None and n < 1:
        raise UserError(f"distributed.num_processes={n} must be >= 1")
    if n == 1:
        return None
    if coordinator is None and n is None and pid is None:
        return {"initialization_timeout": timeout} if _slurm_tasks() > 1 else None
    for key, value in (("coordinator", coordinator), ("num_processes", n), ("process_id", pid)):
        if value is None:
            raise UserError(f"distributed.{key} is not set: {_NEEDS}")
    if not _HOST_PORT.match(str(coordinator)):
        raise UserError(f"distributed.coordinator={coordinator} is not HOST:PORT (e.g. 10.0.0.1:12345, the "
                        f"address of process 0 and a free port)")
    if not 0 <= pid < n:
        raise UserError(f"distributed.process_id={pid} must be in 0..{n - 1} (distributed.num_processes={n})")
    return {"coordinator_address": str(coordinator), "num_processes": int(n), "process_id": int(pid),
            "initialization_timeout": timeout}


def initialize(dist_cfg) -> None:
    """Join the run's processes before any JAX computation; nothing for a single-process run.

    CPU processes exchange their collectives through gloo (TCP), unless the environment chose another
    implementation (JAX_CPU_COLLECTIVES_IMPLEMENTATION=mpi). Waits up to distributed.timeout_s for the
    other processes; a process that cannot join raises a UserError naming the coordinator.
    """
    args = settings(dist_cfg)
    if args is None or jax.distributed.is_initialized():
        return
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where = args.get("coordinator_address", "SLURM's first node")
    try:
        jax.distributed.initialize(**args)
    except RuntimeError as e:
        if "before any JAX" in str(e) or "must be called before" in str(e):
            raise RuntimeError("jax.distributed must be initialised before JAX starts: metarun.distributed."
                               "initialize has to run before any jax.devices() or computation") from e
        raise UserError(f"could not join the run's processes through {where} "
                        f"({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}); {_NEEDS}, "
                        f"and process 0 must be reachable") from None
    except Exception as e:  # a refused or timed-out connection surfaces as XlaRuntimeError or similar
        raise UserError(f"could not join the run's processes through {where} "
                        f"({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}) within "
                        f"distributed.timeout_s={args['initialization_timeout']}; {_NEEDS}") from None
    log.info("process %d of %d joined (%d local / %d global devices)", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())


def is_primary() -> bool:
    """True in the process that writes the run directory's files (process 0; the only one when single)."""
    return jax.process_index() == 0


def require_same(key: str, value: str) -> None:
    """Refuse (UserError, in every process) when the processes were given different `value`s of `key`,
    e.g. different run directories: orbax would write each process's part of a checkpoint elsewhere."""
    if jax.process_count() == 1:
        return
    import hashlib

    import numpy as np
    from jax.experimental import multihost_utils

    digest = np.frombuffer(hashlib.sha1(value.encode()).digest()[:8], np.int32).copy()
    try:
        multihost_utils.assert_equal(digest, f"{key} differs between processes")
    except AssertionError:
        raise UserError(f"{key}={value} (process {jax.process_index()}) differs between the run's processes: "
                        f"give every process the same {key}") from None


def agree(value: float) -> float:
    """Process 0's `value`, on every process (a decision that drives a collective, e.g. which
    checkpoint is the best, must be the same everywhere even if the hosts' floats differ)."""
    if jax.process_count() == 1:
        return value
    import numpy as np
    from jax.experimental import multihost_utils

    return float(multihost_utils.broadcast_one_to_all(np.asarray(value, np.float32)))
