"""Pure, jitted steps: meta-training chunks and evaluation batches. No I/O here."""
from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from metarun.algos.base import MetaAlgorithm
from metarun.data.tasks import Sampler, Task, sample_batch


class TrainState(NamedTuple):
    step: jax.Array        # int32 scalar: meta-steps done
    params: object         # meta-parameters
    opt_state: object
    key: jax.Array         # base PRNG key; step s uses fold_in(key, s), so resuming needs only `step`


def task_loss(algo: MetaAlgorithm, params, task: Task, key):
    adapt_key, loss_key = jax.random.split(key)
    adapted = algo.adapt(params, task.support, adapt_key)
    return algo.loss(params, adapted, task.query, loss_key)


def task_grad(algo: MetaAlgorithm, params, task: Task, key):
    """(grads, metrics) for one task: the algorithm's own meta-gradient or grad of loss∘adapt."""
    if algo.meta_grad is not None:
        return algo.meta_grad(params, task, key)
    (_, metrics), grads = jax.value_and_grad(partial(task_loss, algo), has_aux=True)(params, task, key)
    return grads, metrics


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


def map_tasks(fn: Callable, params, tasks: Task, keys, task_batching: str = "vmap", task_chunk: int = 1):
    """`fn(params, task, key)` over a batch of tasks: one vmap, or a lax.map over chunks of
    `task_chunk` tasks (vmapped inside a chunk). Same values either way, stacked on axis 0."""
    if resolve_task_batching(task_batching) == "vmap":
        return jax.vmap(fn, in_axes=(None, 0, 0))(params, tasks, keys)
    one = lambda tk: fn(params, *tk)  # noqa: E731
    return jax.lax.map(one, (tasks, keys), batch_size=task_chunk if task_chunk > 1 else None)


def meta_gradient(algo: MetaAlgorithm, params, tasks: Task, key, task_batching: str = "vmap",
                  task_chunk: int = 1):
    """Mean meta-gradient and metrics over a batch of tasks (vmapped, or a lax.map: see map_tasks)."""
    keys = jax.random.split(key, jax.tree.leaves(tasks)[0].shape[0])
    grads, metrics = map_tasks(partial(task_grad, algo), params, tasks, keys, task_batching, task_chunk)
    mean = lambda t: jax.tree.map(lambda a: a.mean(0), t)  # noqa: E731
    return mean(grads), mean(metrics)


def init_state(algo: MetaAlgorithm, optimizer: optax.GradientTransformation, sampler: Sampler, data,
               seed: int) -> TrainState:
    key = jax.random.PRNGKey(seed)
    init_key, task_key, run_key = jax.random.split(key, 3)
    params = algo.init(init_key, sampler(data, task_key))
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), run_key)


def make_train_chunk(algo: MetaAlgorithm, optimizer: optax.GradientTransformation, sampler: Sampler,
                     meta_batch: int, steps: int, shard_tasks: Callable | None = None,
                     task_batching: str = "auto", task_chunk: int = 1) -> Callable:
    """A jitted `(state, data) -> (state, metrics)` running `steps` meta-steps in one lax.scan.

    Tasks are sampled inside the step from the device-resident `data`, so a chunk makes no
    host round trip; `metrics` has a leading axis of length `steps`. `shard_tasks` (from
    metarun.sharding) places the sampled task batch over several devices. `task_batching`
    (auto | vmap | map) and `task_chunk` choose how the meta-batch is batched (map_tasks);
    'auto' resolves per backend (resolve_task_batching).
    """
    batching = resolve_task_batching(task_batching, sharded=shard_tasks is not None)

    def one_step(data, state: TrainState, _):
        step_key = jax.random.fold_in(state.key, state.step)
        task_key, algo_key = jax.random.split(step_key)
        tasks = sample_batch(sampler, data, task_key, meta_batch)
        if shard_tasks is not None:
            tasks = shard_tasks(tasks)
        step_algo = algo.at_step(state.step) if algo.at_step is not None else algo
        grads, metrics = meta_gradient(step_algo, state.params, tasks, algo_key, batching, task_chunk)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, opt_state, state.key), metrics

    @partial(jax.jit, donate_argnums=0)
    def train_chunk(state: TrainState, data):
        return jax.lax.scan(partial(one_step, data), state, None, length=steps)

    return train_chunk


def make_eval_batch(algo: MetaAlgorithm, sampler: Sampler, batch: int, task_batching: str = "auto",
                    task_chunk: int = 1) -> Callable:
    """A jitted `(params, data, key) -> metrics` with one value per task ([batch] arrays)."""
    batching = resolve_task_batching(task_batching)

    @jax.jit
    def eval_batch(params, data, key):
        task_key, algo_key = jax.random.split(key)
        tasks = sample_batch(sampler, data, task_key, batch)
        keys = jax.random.split(algo_key, batch)
        _, metrics = map_tasks(partial(task_loss, algo), params, tasks, keys, batching, task_chunk)
        return metrics

    return eval_batch
