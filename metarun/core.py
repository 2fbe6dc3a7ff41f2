"""Pure, jitted steps: meta-training chunks and evaluation batches. No I/O here."""
from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metarun.algos.base import MetaAlgorithm, meta_step, task_loss
from metarun.data.tasks import Sampler, sample_batch


class TrainState(NamedTuple):
    step: jax.Array        # int32 scalar: meta-steps done
    params: object         # meta-parameters (trained by the outer optimiser)
    opt_state: object
    algo_state: object     # the algorithm's own state (MetaAlgorithm.init), checkpointed with the rest
    key: jax.Array         # base PRNG key; step s uses fold_in(key, s), so resuming needs only `step`
    best_score: jax.Array  # float32: best validation score so far (higher is better; -inf: none yet)
    best_step: jax.Array   # int32: the step it was reached at (-1: none yet)


def resolve_task_batching(task_batching: str = "auto", sharded: bool = False) -> str:
    """'auto' is 'map' on CPU (one task's activations stay in cache; a vmapped meta-batch of
    per-task weights allocates gigabytes of temporaries) and 'vmap' elsewhere or when the
    task batch is sharded over devices."""
    mode = getattr(task_batching, "value", task_batching)
    if mode not in ("auto", "vmap", "map"):
        raise ValueError(f"task_batching={mode!r}: expected auto, vmap or map")
    if mode == "auto":
        return "map" if jax.default_backend() == "cpu" and not sharded else "vmap"
    return mode


def task_mapper(task_batching: str = "vmap", task_chunk: int = 1) -> Callable:
    """`map_tasks(fn, tasks, keys)`: `fn(task, key)` over a batch of tasks, as one vmap or a lax.map
    over chunks of `task_chunk` tasks (vmapped inside a chunk). Same values either way, stacked on axis 0."""
    if resolve_task_batching(task_batching) == "vmap":
        return lambda fn, tasks, keys: jax.vmap(fn)(tasks, keys)
    return lambda fn, tasks, keys: jax.lax.map(lambda tk: fn(*tk), (tasks, keys),
                                               batch_size=task_chunk if task_chunk > 1 else None)


def map_copies(fn: Callable, stacked):
    """`fn` over the leading axis of `stacked` (weight samples, particles, ensemble copies): a lax.map on
    CPU, where vmapping per-copy weights turns every convolution into a grouped one (a Conv-4 loss +
    gradient over 5 copies: 1.82 CPU s vmapped, 0.79 mapped, docs/bayesian.md), a vmap elsewhere.
    Same values either way, stacked on axis 0."""
    if resolve_task_batching("auto") == "map":
        return jax.lax.map(fn, stacked)
    return jax.vmap(fn)(stacked)


def init_state(algo: MetaAlgorithm, optimizer: optax.GradientTransformation, sampler: Sampler, data,
               seed: int) -> TrainState:
    key = jax.random.PRNGKey(seed)
    init_key, task_key, run_key = jax.random.split(key, 3)
    params, algo_state = algo.init(init_key, sampler(data, task_key))
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), algo_state, run_key,
                      jnp.array(-jnp.inf, jnp.float32), jnp.array(-1, jnp.int32))


def finite(tree) -> jax.Array:
    """True when every leaf of `tree` is finite (a scalar bool)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_chunk(algo: MetaAlgorithm, optimizer: optax.GradientTransformation, sampler: Sampler,
                     meta_batch: int, steps: int, shard_tasks: Callable | None = None,
                     task_batching: str = "auto", task_chunk: int = 1, skip_nonfinite: bool = False,
                     sample_tasks: Callable | None = None) -> Callable:
    """A jitted `(state, data) -> (state, metrics)` running `steps` meta-steps in one lax.scan.

    Tasks are sampled inside the step from the device-resident `data`, so a chunk makes no host
    round trip; `metrics` has a leading axis of length `steps` and always holds `nonfinite` (1.0
    where that step's loss, gradient or new parameters were not finite). skip_nonfinite=True keeps
    the previous state for such a step (train.on_nonfinite=skip_step); otherwise the step is
    applied and the host stops the run at the next sync. `shard_tasks` places the sampled task
    batch over several devices; `task_batching`/`task_chunk` choose how the meta-batch is batched.
    `sample_tasks(sampler, data, key, meta_batch)` replaces `sample_batch` (sharding.shard_sampling:
    each device draws its own slice of the same meta-batch).
    """
    sample_tasks = sample_batch if sample_tasks is None else sample_tasks
    map_tasks = task_mapper(resolve_task_batching(task_batching, sharded=shard_tasks is not None), task_chunk)

    def one_step(data, state: TrainState, _):
        step_key = jax.random.fold_in(state.key, state.step)
        task_key, algo_key = jax.random.split(step_key)
        tasks = sample_tasks(sampler, data, task_key, meta_batch)
        if shard_tasks is not None:
            tasks = shard_tasks(tasks)
        step_algo = algo.at_step(state.step) if algo.at_step is not None else algo
        grads, algo_state, metrics = meta_step(step_algo, state.params, state.algo_state, tasks, algo_key, map_tasks)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ok = finite((metrics.get("loss"), grads, params, algo_state))
        new = state._replace(step=state.step + 1, params=params, opt_state=opt_state, algo_state=algo_state)
        if skip_nonfinite:
            new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state._replace(step=state.step + 1))
        return new, {**metrics, "nonfinite": 1.0 - ok.astype(jnp.float32)}

    @partial(jax.jit, donate_argnums=0)
    def train_chunk(state: TrainState, data):
        return jax.lax.scan(partial(one_step, data), state, None, length=steps)

    return train_chunk


def make_eval_batch(algo: MetaAlgorithm, sampler: Sampler, task_batching: str = "auto",
                    task_chunk: int = 1) -> Callable:
    """A jitted `(params, algo_state, data, keys) -> metrics`, one task per key ([batch] arrays).

    Episode i is sampled from keys[i] alone, so the fixed test episodes do not depend on how
    many are evaluated per call."""
    map_tasks = task_mapper(resolve_task_batching(task_batching), task_chunk)

    @jax.jit
    def eval_batch(params, algo_state, data, keys):
        def per_task(key, _):
            task_key, algo_key = jax.random.split(key)
            task = sampler(data, task_key)
            return task_loss(algo, params, algo_state, task, algo_key)[1]

        return map_tasks(per_task, keys, keys)

    return eval_batch
