"""SVGD's defining properties: one particle is gradient ascent (so MAML's SGD step), repulsion, a numpy reference."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from metarun.families.regression import regression_objective
from metarun.algos.svgd import (chaser_loss, flatten_particles, median_bandwidth, rbf_kernel, svgd_direction,
                                svgd_step, svgd_steps)
from metarun.learners.mlp import MLP


def _numpy_svgd(x, g):
    """phi_i = (1/M) sum_j [k(x_j, x_i) g_j + grad_{x_j} k(x_j, x_i)], written out pair by pair."""
    m = x.shape[0]
    d2 = np.array([[np.sum((x[i] - x[j]) ** 2) for j in range(m)] for i in range(m)])
    h = np.median(d2) / np.log(m + 1)
    phi = np.zeros_like(x)
    for i in range(m):
        for j in range(m):
            k = np.exp(-d2[j, i] / h)
            phi[i] += k * g[j] - 2.0 / h * (x[j] - x[i]) * k
    return phi / m, h


def test_three_particles_2d_match_numpy_reference():
    x = np.array([[0.0, 0.0], [1.0, 0.5], [-0.5, 2.0]])
    g = np.array([[1.0, -1.0], [0.5, 0.2], [-0.3, 0.7]])
    want, h = _numpy_svgd(x, g)
    # Squared distances 1.25, 4.25, 4.5; the 9 entries sorted are 0,0,0,1.25,1.25,4.25,... so the median
    # (the 5th) is the smallest pairwise one.
    np.testing.assert_allclose(h, 1.25 / np.log(4))
    np.testing.assert_allclose(float(median_bandwidth(jnp.asarray(x, jnp.float32))), h, rtol=1e-6)
    got = svgd_direction(jnp.asarray(x, jnp.float32), jnp.asarray(g, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    # The kernel's x_j-gradient the formula uses is autodiff's.
    k_fn = lambda a, b: jnp.exp(-jnp.sum((a - b) ** 2) / h)  # noqa: E731
    xs = jnp.asarray(x, jnp.float32)
    repulsion = sum(jax.grad(k_fn)(xs[j], xs[0]) for j in range(3)) / 3
    driving = sum(k_fn(xs[j], xs[0]) * g[j] for j in range(3)) / 3
    np.testing.assert_allclose(np.asarray(driving + repulsion), want[0], rtol=1e-5, atol=1e-6)


def test_one_particle_direction_is_the_gradient():
    x = jnp.array([[0.3, -1.2, 2.0]])
    g = jnp.array([[0.5, 4.0, -2.5]])
    k, _ = rbf_kernel(x)
    np.testing.assert_array_equal(np.asarray(k), [[1.0]])
    np.testing.assert_allclose(np.asarray(svgd_direction(x, g)), np.asarray(g), rtol=1e-7)


def test_one_particle_svgd_step_on_minus_loss_is_a_maml_sgd_step():
    learner = MLP(hidden=(8,), out_dim=1)
    x = jnp.linspace(-2, 2, 10)[:, None]
    y = jnp.sin(x)
    params = jax.jit(learner.init)(jax.random.PRNGKey(0), x)["params"]

    def loss(p):
        return regression_objective(learner.apply({"params": p}, x), y)[0]

    lr = 0.05
    g = jax.grad(loss)(params)
    maml_step = jax.tree.map(lambda p, gi: p - lr * gi, params, g)  # MAML's inner update (maml.py)
    particles = jax.tree.map(lambda a: a[None], params)
    grad_logp = jax.tree.map(lambda a: -a[None], g)
    out = svgd_step(particles, grad_logp, lr)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(maml_step)):
        np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_repulsion_pushes_particles_with_identical_gradients_apart():
    x = jnp.array([[0.0, 0.0], [0.3, 0.1]])
    g = jnp.array([[1.0, 2.0], [1.0, 2.0]])
    stepped = x + 0.1 * svgd_direction(x, g)
    before = float(jnp.linalg.norm(x[0] - x[1]))
    after = float(jnp.linalg.norm(stepped[0] - stepped[1]))
    assert after > before + 1e-3


def test_zero_gradient_direction_is_pure_antisymmetric_repulsion():
    x = jnp.array([[0.2, -0.4, 1.0], [1.0, 0.5, 0.0]])
    phi = svgd_direction(x, jnp.zeros_like(x))
    np.testing.assert_allclose(np.asarray(phi[0]), -np.asarray(phi[1]), rtol=1e-6)
    # Along x_0 - x_1, pointing away from the other particle: (2/h) k (x_0 - x_1) / 2.
    d2 = float(jnp.sum((x[0] - x[1]) ** 2))
    h = (d2 / 2) / np.log(3)  # median of [0, d2, d2, 0]
    np.testing.assert_allclose(np.asarray(phi[0]), (2 / h) * np.exp(-d2 / h) * np.asarray(x[0] - x[1]) / 2,
                               rtol=1e-5)


def test_flatten_unflatten_round_trip_and_order():
    tree = {"a": jnp.arange(6.0).reshape(3, 2), "b": {"c": jnp.arange(9.0).reshape(3, 3) + 100}}
    flat, unflatten = flatten_particles(tree)
    assert flat.shape == (3, 5)
    np.testing.assert_array_equal(np.asarray(flat[1]), [2, 3, 103, 104, 105])
    back = unflatten(flat)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_svgd_particles_recover_a_1d_gaussian():
    mu, sigma = 1.5, 0.7
    x0 = {"w": jnp.linspace(-3.0, -1.0, 40)[:, None]}
    grad_logp = lambda p: jax.tree.map(lambda w: -(w - mu) / sigma**2, p)  # noqa: E731
    out = jax.jit(lambda p: svgd_steps(p, grad_logp, 0.05, 2000))(x0)["w"][:, 0]
    np.testing.assert_allclose(float(out.mean()), mu, atol=0.02)
    np.testing.assert_allclose(float(out.std()), sigma, rtol=0.1)


def test_svgd_steps_equals_repeated_svgd_step():
    x = {"w": jnp.array([[0.0, 1.0], [1.0, -1.0], [2.0, 0.5]])}
    grad_logp = lambda p: jax.tree.map(lambda w: -w**3, p)  # noqa: E731
    manual = x
    for _ in range(3):
        manual = svgd_step(manual, grad_logp(manual), 0.1)
    np.testing.assert_allclose(np.asarray(svgd_steps(x, grad_logp, 0.1, 3)["w"]), np.asarray(manual["w"]),
                               rtol=1e-5, atol=1e-6)


def test_chaser_loss_value_and_stop_gradient_on_leader():
    chaser = {"a": jnp.array([[1.0, 2.0], [0.0, 0.0]]), "b": jnp.array([[1.0], [3.0]])}
    leader = {"a": jnp.array([[0.0, 0.0], [1.0, 1.0]]), "b": jnp.array([[0.0], [1.0]])}
    # particle 0: 1 + 4 + 1 = 6; particle 1: 1 + 1 + 4 = 6; mean 6.
    np.testing.assert_allclose(float(chaser_loss(chaser, leader)), 6.0)
    g_leader = jax.grad(lambda lead: chaser_loss(chaser, lead))(leader)
    assert all(float(jnp.abs(v).max()) == 0.0 for v in jax.tree.leaves(g_leader))
    g_chaser = jax.grad(lambda c: chaser_loss(c, leader))(chaser)
    np.testing.assert_allclose(np.asarray(g_chaser["a"]), 2 * (chaser["a"] - leader["a"]) / 2)
