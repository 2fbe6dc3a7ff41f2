"""Sinusoid regression tasks (Finn et al. 2017), generated on the device."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from metarun.data.tasks import Examples, Sampler, Task


def make_sinusoid_sampler(shots: int, queries: int, amplitude=(0.1, 5.0), phase=(0.0, jnp.pi),
                          x_range=(-5.0, 5.0)) -> Sampler:
    """y = A sin(x - phase) with A, phase and x uniform; `data` is unused (pass an empty dict)."""

    def sample(data, key: jax.Array) -> Task:
        del data
        amp_key, phase_key, x_key = jax.random.split(key, 3)
        amp = jax.random.uniform(amp_key, (), minval=amplitude[0], maxval=amplitude[1])
        ph = jax.random.uniform(phase_key, (), minval=phase[0], maxval=phase[1])
        x = jax.random.uniform(x_key, (shots + queries, 1), minval=x_range[0], maxval=x_range[1])
        y = amp * jnp.sin(x - ph)
        return Task(Examples(x[:shots], y[:shots]), Examples(x[shots:], y[shots:]))

    return sample
