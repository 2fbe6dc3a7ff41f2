"""Incremental sine regression (Javed & White 2019, sec. 4; the mrcl code's `SampleSine`): functions learned one
after another, generated on the device.

A function is y = A sin(x + phase) with A ~ U[0.1, 5.1] (mrcl: `(rand() + 0.02) * 5`), phase ~ U[0, pi], x ~
U[-5, 5]. The network's input is [one-hot of the function's position in the trajectory (`slots` entries), x]:
mrcl's `x[:, task_id] = 1; x[:, capacity - 1] = x_samples` with capacity = 10 functions + 1. Meta-training
draws its trajectories from a fixed pool of functions (mrcl: 400 task ids, each drawn once); validation and
test functions are fresh draws from the key.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List

import jax
import jax.numpy as jnp
import numpy as np

from metarun.data.sinusoid import check_range
from metarun.data.tasks import Examples, Task
from metarun.errors import UserError
from metarun.registry import register


def sine_inputs(x: jax.Array, slot: jax.Array, slots: int) -> jax.Array:
    """[n, slots + 1]: the one-hot of each point's function slot, then x (mrcl's layout)."""
    return jnp.concatenate([jax.nn.one_hot(slot, slots), x[:, None]], axis=-1)


def sine_points(key, amplitude: jax.Array, phase: jax.Array, per_function: int, x_range, slots: int):
    """(inputs [F * per_function, slots + 1], targets [F * per_function, 1]): `per_function` uniform points of
    each function, function after function; function i takes slot i."""
    functions = amplitude.shape[0]
    x = jax.random.uniform(key, (functions, per_function), minval=x_range[0], maxval=x_range[1])
    y = amplitude[:, None] * jnp.sin(x + phase[:, None])
    slot = jnp.repeat(jnp.arange(functions), per_function)
    return sine_inputs(x.reshape(-1), slot, slots), y.reshape(-1, 1)


def draw_functions(key, count: int, amplitude, phase):
    """(amplitude [count], phase [count]) uniform in the given ranges."""
    a_key, p_key = jax.random.split(key)
    return (jax.random.uniform(a_key, (count,), minval=amplitude[0], maxval=amplitude[1]),
            jax.random.uniform(p_key, (count,), minval=phase[0], maxval=phase[1]))


def make_trajectory_sampler(functions: int, shots: int, queries: int, x_range, slots: int, fresh=None):
    """Trajectories of `functions` sines: support = `shots` points of each, function after function (the inner
    loop's order); query = `queries` other points of each (mrcl's x_rand: the outer loss after the whole
    trajectory). Functions come from `data`'s pool (`{"amplitude", "phase"}`, without replacement) or, with
    `fresh=(amplitude range, phase range)`, are drawn from the key."""

    def sample(data, key) -> Task:
        pick_key, support_key, query_key = jax.random.split(key, 3)
        if fresh is None:
            chosen = jax.random.choice(pick_key, data["amplitude"].shape[0], (functions,), replace=False)
            amplitude, phase = data["amplitude"][chosen], data["phase"][chosen]
        else:
            amplitude, phase = draw_functions(pick_key, functions, *fresh)
        support = sine_points(support_key, amplitude, phase, shots, x_range, slots)
        query = sine_points(query_key, amplitude, phase, queries, x_range, slots)
        return Task(Examples(*support), Examples(*query))

    return sample


@dataclass
class IncrementalSineConfig:
    name: str = "incremental_sine"
    kind: str = "regression"
    amplitude: List[float] = field(default_factory=lambda: [0.1, 5.1])
    phase: List[float] = field(default_factory=lambda: [0.0, math.pi])
    x_range: List[float] = field(default_factory=lambda: [-5.0, 5.0])
    train_functions: int = 400   # mrcl's pool of meta-training functions (`tasks = list(range(400))`)
    step_batch: int = 32         # points per inner SGD step (mrcl's sample_batch(..., 32)); task.shots points per function


class IncrementalSine:
    """The loader's result: the meta-training pool and the ranges the family's samplers draw from."""

    def __init__(self, cfg, seed: int):
        self.amplitude = check_range("dataset.amplitude", cfg.amplitude)
        self.phase = check_range("dataset.phase", cfg.phase)
        self.x_range = check_range("dataset.x_range", cfg.x_range)
        for key in ("train_functions", "step_batch"):
            if cfg[key] < 1:
                raise UserError(f"dataset.{key}={cfg[key]} must be >= 1")
        rng = np.random.default_rng([int(seed), 14])  # the pool is part of the dataset: fixed by the run's seed
        self.pool = {"amplitude": rng.uniform(*self.amplitude, int(cfg.train_functions)).astype(np.float32),
                     "phase": rng.uniform(*self.phase, int(cfg.train_functions)).astype(np.float32)}
        self.step_batch = int(cfg.step_batch)


@register("dataset", "incremental_sine", schema=IncrementalSineConfig, family="regression_stream")
def load(cfg, seed: int = 0) -> IncrementalSine:
    return IncrementalSine(cfg, seed)
