"""Sinusoid regression tasks (Finn et al. 2017), generated on the device."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import jax
import jax.numpy as jnp

from metarun.data.tasks import Examples, Sampler, Task
from metarun.errors import UserError
from metarun.registry import register


def make_sinusoid_sampler(shots: int, queries: int, amplitude=(0.1, 5.0), phase=(0.0, jnp.pi),
                          x_range=(-5.0, 5.0), min_shots: Optional[int] = None) -> Sampler:
    """y = A sin(x - phase) with A, phase and x uniform; `data` is unused (pass an empty dict).

    min_shots: None gives exactly `shots` support points; otherwise the support size is drawn from
    U{min_shots..shots} per task and the support carries a mask (1 for the used points).
    """

    def sample(data, key: jax.Array) -> Task:
        del data
        amp_key, phase_key, x_key, n_key = jax.random.split(key, 4)
        amp = jax.random.uniform(amp_key, (), minval=amplitude[0], maxval=amplitude[1])
        ph = jax.random.uniform(phase_key, (), minval=phase[0], maxval=phase[1])
        x = jax.random.uniform(x_key, (shots + queries, 1), minval=x_range[0], maxval=x_range[1])
        y = amp * jnp.sin(x - ph)
        mask = None
        if min_shots is not None:
            used = jax.random.randint(n_key, (), min_shots, shots + 1)
            mask = (jnp.arange(shots) < used).astype(jnp.float32)
        return Task(Examples(x[:shots], y[:shots], mask), Examples(x[shots:], y[shots:]))

    return sample


@dataclass
class SinusoidConfig:
    name: str = "sinusoid"
    kind: str = "regression"
    amplitude: List[float] = field(default_factory=lambda: [0.1, 5.0])
    phase: List[float] = field(default_factory=lambda: [0.0, math.pi])
    x_range: List[float] = field(default_factory=lambda: [-5.0, 5.0])
    # The test split's input range (support and query points), None: x_range. The DKT paper's out-of-range
    # test draws a task's every point from [-5, 10] after training on [-5, 5] (its sines code). Train and val
    # keep x_range. `eval.x_range` sets it for a training run's test or for mode=eval.
    test_x_range: Optional[List[float]] = None


def check_range(key: str, value) -> tuple:
    """(low, high) from a config list; one line unless it is two numbers with low < high."""
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise UserError(f"{key}={value} must be [low, high] (two numbers)") from None
    if not low < high:
        raise UserError(f"{key}={[low, high]} must be [low, high] with low < high")
    return low, high


@register("dataset", "sinusoid", schema=SinusoidConfig, family="regression")
def load(cfg, seed: int = 0):
    """Every split draws from the same distribution of functions (fresh draws per key); the test split's
    inputs from dataset.test_x_range when set (sampler_for.x_ranges: split -> (low, high))."""
    del seed
    x_range = check_range("dataset.x_range", cfg.x_range)
    test = cfg.get("test_x_range")
    x_ranges = {"train": x_range, "val": x_range,
                "test": x_range if test is None else check_range("dataset.test_x_range", test)}

    def sampler_for(split, shots, queries, min_shots=None):
        return make_sinusoid_sampler(shots, queries, tuple(cfg.amplitude), tuple(cfg.phase), x_ranges[split],
                                     min_shots)

    sampler_for.x_ranges = x_ranges
    return sampler_for
