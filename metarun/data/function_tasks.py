"""1D function regression tasks (GP draws, sawtooths) of fixed shape with context masks, generated on the device."""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from metarun import gaussian_process as gp
from metarun.data.tasks import Sampler, Task
from metarun.errors import UserError


class MaskedExamples(NamedTuple):
    """A padded set of regression examples: x [n, dx], y [n, dy], mask [n] (1 = real point, 0 = padding)."""
    x: jax.Array
    y: jax.Array
    mask: jax.Array


# (context input range, target input range) per evaluation protocol, as in the ConvCNP / `neuralprocesses`
# benchmark: train and interpolate on [-2, 2]; extrapolate from contexts on [-2, 2] to targets on [2, 6];
# interpolate on [2, 6], a range never seen in training (tests translation equivariance).
SPLITS = {
    "interpolation": ((-2.0, 2.0), (-2.0, 2.0)),
    "extrapolation": ((-2.0, 2.0), (2.0, 6.0)),
    "interpolation_beyond": ((2.0, 6.0), (2.0, 6.0)),
}

# The benchmark's GP hyperparameters: EQ and Matern-5/2 of lengthscale 0.25; weakly periodic is
# EQ(0.5) x periodic(0.25) (the kernel's own defaults).
TASK_KERNEL_DEFAULTS = {
    "eq": {"lengthscale": 0.25},
    "matern52": {"lengthscale": 0.25},
    "weakly_periodic": {},
    "periodic": {"period": 0.25},
}

# Per family: noise variance, maximum context size, number of targets.
FAMILY_DEFAULTS = {
    "gp": {"noise_var": 0.05, "max_context": 30, "num_targets": 50},
    "sawtooth": {"noise_var": 0.0, "max_context": 75, "num_targets": 100},
}


# Options only one family has.
_FAMILY_KEYS = {"gp": {"kernel", "kernel_params"}, "sawtooth": {"freq_range"}}


def make_task_kernel(kernel: str, **hyper):
    """The kernel_fn the GP tasks are drawn from: `kernel` with the benchmark defaults, overridden by `hyper`.

    Evaluation uses the same kernel_fn for the exact GP posterior (KL per target, reference predictors).
    """
    fn = gp.get_kernel(kernel)
    return partial(fn, **{**TASK_KERNEL_DEFAULTS.get(kernel, {}), **hyper})


def _context_mask(key, min_context, max_context):
    """mask [max_context]: the first n slots are real, n ~ U{min_context..max_context}."""
    n = jax.random.randint(key, (), min_context, max_context + 1)
    return (jnp.arange(max_context) < n).astype(jnp.float32)


def _inputs(key, max_context, num_targets, x_range_context, x_range_target):
    ctx_key, tgt_key = jax.random.split(key)
    x_ctx = jax.random.uniform(ctx_key, (max_context, 1), minval=x_range_context[0], maxval=x_range_context[1])
    x_tgt = jax.random.uniform(tgt_key, (num_targets, 1), minval=x_range_target[0], maxval=x_range_target[1])
    return x_ctx, x_tgt


def _task(x_ctx, x_tgt, y, ctx_mask):
    n = x_ctx.shape[0]
    return Task(MaskedExamples(x_ctx, y[:n], ctx_mask),
                MaskedExamples(x_tgt, y[n:], jnp.ones((x_tgt.shape[0],), jnp.float32)))


def sample_gp_values(kernel_fn, x, noise_var, key):
    """y [n, 1] ~ N(0, K(x, x) + noise_var I): one GP draw observed with Gaussian noise at inputs x [n, d]."""
    # A small jitter keeps the float32 Cholesky alive when noise_var is 0 (a noiseless GP draw).
    cov = kernel_fn(x, x) + (noise_var + 1e-6) * jnp.eye(x.shape[0], dtype=x.dtype)
    return jnp.linalg.cholesky(cov) @ jax.random.normal(key, (x.shape[0], 1), x.dtype)


def make_gp_sampler(kernel_fn, noise_var=0.05, min_context=0, max_context=30, num_targets=50,
                    x_range_context=(-2.0, 2.0), x_range_target=(-2.0, 2.0)) -> Sampler:
    """GP regression tasks: context and targets drawn jointly from one GP (plus noise), disjoint inputs.

    The context has max_context slots of which n ~ U{min_context..max_context} are real (mask); the
    padding slots hold valid-looking draws too, which a model must ignore. `data` is unused (pass {}).
    """

    def sample(data, key: jax.Array) -> Task:
        del data
        x_key, n_key, y_key = jax.random.split(key, 3)
        x_ctx, x_tgt = _inputs(x_key, max_context, num_targets, x_range_context, x_range_target)
        y = sample_gp_values(kernel_fn, jnp.concatenate([x_ctx, x_tgt]), noise_var, y_key)
        return _task(x_ctx, x_tgt, y, _context_mask(n_key, min_context, max_context))

    return sample


def sawtooth(x, freq, direction, offset):
    """(freq (direction x - offset)) mod 1: a sawtooth in [0, 1) of the given frequency, rising or falling."""
    return jnp.mod(freq * (direction * x - offset), 1.0)


def make_sawtooth_sampler(freq_range=(2.0, 4.0), noise_var=0.0, min_context=0, max_context=75,
                          num_targets=100, x_range_context=(-2.0, 2.0), x_range_target=(-2.0, 2.0)) -> Sampler:
    """Sawtooth tasks as in `neuralprocesses`' SawtoothGenerator (1D): frequency ~ U[freq_range], direction
    +-1 with equal probability, offset ~ U[0, 1) / frequency, no noise by default. `data` is unused."""

    def sample(data, key: jax.Array) -> Task:
        del data
        x_key, n_key, f_key, d_key, o_key, noise_key = jax.random.split(key, 6)
        x_ctx, x_tgt = _inputs(x_key, max_context, num_targets, x_range_context, x_range_target)
        freq = jax.random.uniform(f_key, (), minval=freq_range[0], maxval=freq_range[1])
        direction = jnp.where(jax.random.bernoulli(d_key), 1.0, -1.0)
        offset = jax.random.uniform(o_key, ()) / freq
        x = jnp.concatenate([x_ctx, x_tgt])
        y = sawtooth(x, freq, direction, offset) + jnp.sqrt(noise_var) * jax.random.normal(noise_key, x.shape)
        return _task(x_ctx, x_tgt, y, _context_mask(n_key, min_context, max_context))

    return sample


def make_function_sampler(name: str, split: str = "interpolation", **cfg) -> Sampler:
    """A regression task sampler by family name ("gp" or "sawtooth") and evaluation split.

    Args:
        name: "gp" (cfg `kernel`: eq, matern52, weakly_periodic, ...; `kernel_params`: overrides of the
            benchmark hyperparameters) or "sawtooth" (cfg `freq_range`).
        split: a key of SPLITS; picks the input ranges unless cfg gives `x_range_context`/`x_range_target`.
        **cfg: also `noise_var`, `min_context`, `max_context`, `num_targets` (defaults: FAMILY_DEFAULTS).

    Raises:
        UserError: unknown family, split, option or kernel; a context size range that is empty or negative.
    """
    if name not in FAMILY_DEFAULTS:
        raise UserError(f"dataset.name={name!r} is not a function task family; expected one of "
                        f"{', '.join(FAMILY_DEFAULTS)}")
    if split not in SPLITS:
        raise UserError(f"dataset.split={split!r} is not a function task split; expected one of {', '.join(SPLITS)}")
    allowed = set(FAMILY_DEFAULTS[name]) | {"min_context", "x_range_context", "x_range_target"} | _FAMILY_KEYS[name]
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise UserError(f"dataset.{unknown[0]} is not an option of the {name} tasks; expected one of "
                        f"{', '.join(sorted(allowed))}")
    cfg = {**FAMILY_DEFAULTS[name], "min_context": 0, **cfg}
    x_range_context, x_range_target = SPLITS[split]
    cfg.setdefault("x_range_context", x_range_context)
    cfg.setdefault("x_range_target", x_range_target)
    if not 0 <= cfg["min_context"] <= cfg["max_context"]:
        raise UserError(f"dataset.min_context={cfg['min_context']} must be between 0 and "
                        f"dataset.max_context={cfg['max_context']}")
    if cfg["num_targets"] < 1:
        raise UserError(f"dataset.num_targets={cfg['num_targets']} must be at least 1")
    if name == "gp":
        kernel = cfg.pop("kernel", "eq")
        kernel_fn = make_task_kernel(kernel, **dict(cfg.pop("kernel_params", None) or {}))
        return make_gp_sampler(kernel_fn, **cfg)
    return make_sawtooth_sampler(**cfg)
