"""GP and sawtooth task samplers: shapes, masks, splits, determinism, and the GP draws' covariance."""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metarun import gaussian_process as gp
from metarun.data.function_tasks import (MaskedExamples, make_function_sampler, make_task_kernel, sample_gp_values,
                                         sawtooth)
from metarun.data.tasks import Task, sample_batch
from metarun.errors import UserError


def draw(sampler, n, seed=0):
    return jax.jit(partial(sample_batch, sampler, batch=n))({}, jax.random.key(seed))


# Compiling a sampler costs seconds on this machine; the tests share a few draws.
@pytest.fixture(scope="module")
def eq_tasks():
    return draw(make_function_sampler("gp", "interpolation", kernel="eq"), 12000, seed=2)


def test_gp_task_shapes_masks_and_ranges(eq_tasks):
    tasks = jax.tree.map(lambda a: a[:2000], eq_tasks)
    assert isinstance(tasks, Task) and isinstance(tasks.support, MaskedExamples)
    assert tasks.support.x.shape == (2000, 30, 1) and tasks.support.y.shape == (2000, 30, 1)
    assert tasks.support.mask.shape == (2000, 30) and tasks.query.x.shape == (2000, 50, 1)
    assert tasks.query.y.shape == (2000, 50, 1) and np.all(tasks.query.mask == 1)
    mask = np.asarray(tasks.support.mask)
    assert set(np.unique(mask)) <= {0.0, 1.0}
    assert np.all(np.diff(mask, axis=1) <= 0)  # the real points come first: mask is a prefix
    counts = np.bincount(mask.sum(1).astype(int), minlength=31)
    assert len(counts) == 31  # never more than 30
    # U{0..30}: each of the 31 sizes expected 2000/31 = 64.5 times (sd ~7.9); all present, none far off.
    assert counts.min() > 30 and counts.max() < 100
    for x in (tasks.support.x, tasks.query.x):
        assert float(x.min()) >= -2.0 and float(x.max()) <= 2.0 and float(x.max() - x.min()) > 3.9


def test_extrapolation_split_puts_targets_on_2_to_6_and_keys_determine_tasks():
    sampler = jax.jit(make_function_sampler("gp", "extrapolation", kernel="weakly_periodic"))
    a, b, c = sampler({}, jax.random.key(3)), sampler({}, jax.random.key(3)), sampler({}, jax.random.key(4))
    assert -2.0 <= float(a.support.x.min()) and float(a.support.x.max()) <= 2.0
    assert 2.0 <= float(a.query.x.min()) and float(a.query.x.max()) <= 6.0
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(u, v)
    assert not np.allclose(a.query.y, c.query.y)
    assert not np.allclose(a.query.x, c.query.x)


@pytest.mark.parametrize("kernel", ["eq", "matern52", "weakly_periodic"])
def test_gp_draws_at_fixed_inputs_have_the_kernel_covariance(kernel):
    x = jnp.asarray([[-1.0], [-0.9], [-0.7], [0.3], [0.35]])
    kernel_fn = make_task_kernel(kernel)
    n = 20000
    draw_one = jax.jit(jax.vmap(lambda k: sample_gp_values(kernel_fn, x, 0.05, k)[:, 0]))
    y = draw_one(jax.random.split(jax.random.key(1), n))
    emp = np.cov(np.asarray(y, np.float64), rowvar=False)
    want = np.asarray(kernel_fn(x, x)) + 0.05 * np.eye(5)
    # Sample covariance standard error is sqrt((K_ij^2 + K_ii K_jj) / n) <= ~0.0105 here: 4 sd = 0.042.
    np.testing.assert_allclose(emp, want, atol=0.042)
    np.testing.assert_allclose(np.asarray(y).mean(0), 0.0, atol=0.03)


def test_gp_sampler_pairs_follow_the_benchmark_kernel(eq_tasks):
    """Over many tasks, E[y_ctx0 y_tgt0 - k(x_ctx0, x_tgt0)] = 0 for the benchmark EQ(0.25), not for EQ(0.5)."""
    tasks = eq_tasks
    xc, xt = tasks.support.x[:, 0], tasks.query.x[:, 0]
    prod = np.asarray(tasks.support.y[:, 0, 0] * tasks.query.y[:, 0, 0], np.float64)
    k_true = np.asarray(jax.vmap(lambda a, b: gp.eq(a[None], b[None], lengthscale=0.25)[0, 0])(xc, xt))
    k_wrong = np.asarray(jax.vmap(lambda a, b: gp.eq(a[None], b[None], lengthscale=0.5)[0, 0])(xc, xt))
    se = prod.std() / np.sqrt(len(prod))
    assert abs((prod - k_true).mean()) < 4 * se
    assert abs((prod - k_wrong).mean()) > 8 * se
    var = np.asarray(tasks.support.y[:, :3, 0], np.float64).var()
    assert abs(var - 1.05) < 0.05  # prior variance 1 plus noise 0.05


def test_sawtooth_tasks_are_sawtooths_with_frequency_in_2_to_4():
    tasks = draw(make_function_sampler("sawtooth"), 400)
    assert tasks.support.x.shape == (400, 75, 1) and tasks.query.y.shape == (400, 100, 1)
    assert int(tasks.support.mask.sum(1).max()) <= 75
    y = np.asarray(tasks.query.y[..., 0])
    assert y.min() >= 0.0 and y.max() < 1.0
    assert abs(y.mean() - 0.5) < 0.02 and abs(y.var() - 1 / 12) < 0.01  # offset uniform: y ~ U[0, 1)
    signs = []
    for x_i, y_i in zip(np.asarray(tasks.query.x[..., 0]), y):
        order = np.argsort(x_i)
        dx, dy = np.diff(x_i[order]), np.diff(y_i[order])
        # Closer than 1/8 (half the shortest period): |dy| = freq dx < 0.5 without a wrap, > 0.5 with one.
        keep = (dx > 1e-3) & (dx < 0.125) & (np.abs(dy) < 0.5)
        slope = dy[keep] / dx[keep]
        assert np.all(np.abs(np.abs(slope) - np.median(np.abs(slope))) < 1e-2)  # one linear piece per period
        assert 2.0 - 1e-2 <= np.median(np.abs(slope)) <= 4.0 + 1e-2
        signs.append(np.sign(np.median(slope)))
    assert 0.4 < np.mean(np.asarray(signs) > 0) < 0.6  # rising and falling equally often


def test_sawtooth_function():
    x = jnp.asarray([0.0, 0.1, 0.25, 0.5, 0.6])
    np.testing.assert_allclose(sawtooth(x, 2.0, 1.0, 0.0), [0.0, 0.2, 0.5, 0.0, 0.2], atol=1e-6)
    np.testing.assert_allclose(sawtooth(x, 2.0, -1.0, 0.0), [0.0, 0.8, 0.5, 0.0, 0.8], atol=1e-6)
    np.testing.assert_allclose(sawtooth(x, 2.0, 1.0, 0.05), [0.9, 0.1, 0.4, 0.9, 0.1], atol=1e-6)


def test_config_overrides_reach_the_sampler():
    s = make_function_sampler("gp", "interpolation", kernel="eq", kernel_params={"lengthscale": 1.0},
                              min_context=5, max_context=8, num_targets=3, x_range_context=(0.0, 1.0))
    tasks = draw(s, 300)
    assert tasks.support.x.shape == (300, 8, 1) and tasks.query.x.shape == (300, 3, 1)
    counts = np.asarray(tasks.support.mask.sum(1))
    assert counts.min() == 5 and counts.max() == 8
    assert float(tasks.support.x.max()) <= 1.0


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(name="gp", kernel="rbf"), "dataset.kernel='rbf'"),
    (dict(name="gp", min_context=31), "dataset.min_context=31"),
    (dict(name="sawtooth", min_context=-1), "dataset.min_context=-1"),
    (dict(name="gp", num_targets=0), "dataset.num_targets=0"),
    (dict(name="gp", split="train"), "dataset.split='train'"),
    (dict(name="gps"), "dataset.name='gps'"),
    (dict(name="sawtooth", kernel="eq"), "dataset.kernel is not an option of the sawtooth tasks"),
])
def test_user_errors_are_one_line(kwargs, fragment):
    with pytest.raises(UserError) as err:
        make_function_sampler(**kwargs)
    assert fragment in str(err.value) and "\n" not in str(err.value)
