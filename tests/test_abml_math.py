"""ABML's pieces: closed-form KL (numpy, distrax), reparameterised samples and gradients, the reduction to MAML."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metarun.algos.abml_math import (adapt_posterior, diag_gaussian, inner_step, kl_diag_gaussians, sample_weights,
                                     variational_loss)
from metarun.families.regression import regression_objective
from metarun.learners.mlp import MLP


def _two_gaussians():
    q = {"mean": {"w": jnp.array([[0.5, -1.0], [2.0, 0.0]]), "b": jnp.array([0.3])},
         "log_std": {"w": jnp.array([[-1.0, 0.2], [0.0, -0.5]]), "b": jnp.array([0.7])}}
    p = {"mean": {"w": jnp.array([[0.0, 0.0], [1.0, 1.0]]), "b": jnp.array([-0.2])},
         "log_std": {"w": jnp.array([[0.0, 0.0], [0.5, -0.3]]), "b": jnp.array([0.1])}}
    return q, p


def _np_kl(q, p):
    total = 0.0
    for k in ("w", "b"):
        mq, sq = np.asarray(q["mean"][k], np.float64), np.exp(np.asarray(q["log_std"][k], np.float64))
        mp, sp = np.asarray(p["mean"][k], np.float64), np.exp(np.asarray(p["log_std"][k], np.float64))
        total += np.sum(np.log(sp / sq) + (sq**2 + (mq - mp) ** 2) / (2 * sp**2) - 0.5)
    return total


def test_kl_matches_numpy_closed_form_and_is_zero_for_equal_gaussians():
    q, p = _two_gaussians()
    np.testing.assert_allclose(float(kl_diag_gaussians(q, p)), _np_kl(q, p), rtol=1e-5)
    assert float(kl_diag_gaussians(q, p)) > 0.5
    np.testing.assert_allclose(float(kl_diag_gaussians(q, q)), 0.0, atol=1e-6)


def test_kl_matches_distrax():
    distrax = pytest.importorskip("distrax")
    q, p = _two_gaussians()
    want = 0.0
    for k in ("w", "b"):
        dq = distrax.Normal(q["mean"][k], jnp.exp(q["log_std"][k]))
        dp = distrax.Normal(p["mean"][k], jnp.exp(p["log_std"][k]))
        want += float(dq.kl_divergence(dp).sum())
    np.testing.assert_allclose(float(kl_diag_gaussians(q, p)), want, rtol=1e-5)


def test_samples_have_the_posterior_moments():
    q, _ = _two_gaussians()
    w = jax.jit(lambda key: sample_weights(q, key, 20_000))(jax.random.PRNGKey(0))
    assert w["w"].shape == (20_000, 2, 2) and w["b"].shape == (20_000, 1)
    for k in ("w", "b"):
        np.testing.assert_allclose(np.asarray(w[k].mean(0)), np.asarray(q["mean"][k]), atol=0.04)
        np.testing.assert_allclose(np.asarray(w[k].std(0)), np.exp(np.asarray(q["log_std"][k])), rtol=0.03)


def test_inner_step_is_the_reparameterised_gradient_of_the_sampled_loss():
    # nll(w) = 0.5 |w - c|^2: with the step's own samples w_s = m + s * eps_s, the gradient is
    # d/dm = mean_s(w_s - c) and d/dlog_std = mean_s((w_s - c) * s * eps_s); kl_weight 0.
    q, _ = _two_gaussians()
    c = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]]), "b": jnp.array([-1.0])}

    def nll_fn(w):
        return 0.5 * sum(jnp.sum((w[k] - c[k]) ** 2) for k in ("w", "b"))

    key, lr, s = jax.random.PRNGKey(1), 0.1, 4
    out = inner_step(q, q, nll_fn, key, lr, s, kl_weight=0.0)
    w = sample_weights(q, key, s)
    for k in ("w", "b"):
        resid = w[k] - c[k]
        eps = (w[k] - q["mean"][k]) / jnp.exp(q["log_std"][k])
        np.testing.assert_allclose(np.asarray(out["mean"][k]), np.asarray(q["mean"][k] - lr * resid.mean(0)),
                                   rtol=1e-5, atol=1e-6)
        want_ls = q["log_std"][k] - lr * (resid * jnp.exp(q["log_std"][k]) * eps).mean(0)
        np.testing.assert_allclose(np.asarray(out["log_std"][k]), np.asarray(want_ls), rtol=1e-5, atol=1e-6)


def test_kl_gradient_pulls_the_posterior_to_the_prior():
    # With a constant NLL the step is -lr * grad KL: d/dm_q = (m_q - m_p) / s_p^2, d/dlog s_q = s_q^2 / s_p^2 - 1.
    q, p = _two_gaussians()
    lr = 0.05
    out = inner_step(q, p, lambda w: jnp.zeros(()), jax.random.PRNGKey(2), lr, 1, kl_weight=1.0)
    for k in ("w", "b"):
        sp2 = jnp.exp(2 * p["log_std"][k])
        np.testing.assert_allclose(np.asarray(out["mean"][k]),
                                   np.asarray(q["mean"][k] - lr * (q["mean"][k] - p["mean"][k]) / sp2), rtol=1e-5)
        want = q["log_std"][k] - lr * (jnp.exp(2 * q["log_std"][k]) / sp2 - 1)
        np.testing.assert_allclose(np.asarray(out["log_std"][k]), np.asarray(want), rtol=1e-5)
    loss, metrics = variational_loss(q, p, lambda w: jnp.zeros(()), jax.random.PRNGKey(2), 1, 0.5)
    np.testing.assert_allclose(float(loss), 0.5 * _np_kl(q, p), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["kl"]), _np_kl(q, p), rtol=1e-5)


def _sinusoid_problem():
    learner = MLP(hidden=(8,), out_dim=1)
    xs = jnp.linspace(-3, 3, 10)[:, None]
    xq = jnp.linspace(-2.5, 2.5, 7)[:, None]
    params = jax.jit(learner.init)(jax.random.PRNGKey(0), xs)["params"]

    def loss_on(x, y):
        return lambda w: regression_objective(learner.apply({"params": w}, x), y)[0]

    return params, loss_on(xs, 2 * jnp.sin(xs + 0.5)), loss_on(xq, 2 * jnp.sin(xq + 0.5))


def _maml_adapt(params, support_loss, lr, steps):
    """MAML's inner loop (maml.py): `steps` plain SGD steps on the support loss."""
    for _ in range(steps):
        params = jax.tree.map(lambda p, g: p - lr * g, params, jax.grad(support_loss)(params))
    return params


def test_point_mass_posterior_without_kl_is_maml():
    """The reduction tested: kl_weight = 0 (a Python 0, which drops the KL term), S = 1 sample and the
    prior's log_std = -inf (zero noise, w = mean exactly). Then (a) each inner step moves the mean exactly as
    MAML's SGD step on the weights, log_std stays -inf; (b) the meta-gradient of the query loss at the
    adapted mean, with respect to the prior mean, is MAML's meta-gradient (second order, through 2 steps)."""
    params, support_loss, query_loss = _sinusoid_problem()
    lr, steps = 0.05, 2
    prior = diag_gaussian(params, -jnp.inf)

    q = jax.jit(lambda p: adapt_posterior(p, support_loss, jax.random.PRNGKey(5), lr, steps, num_samples=1,
                                          kl_weight=0.0))(prior)
    want = jax.jit(lambda p: _maml_adapt(p, support_loss, lr, steps))(params)
    for a, b in zip(jax.tree.leaves(q["mean"]), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert all(bool(jnp.all(ls == -jnp.inf)) for ls in jax.tree.leaves(q["log_std"]))
    # And the steps did move the mean (the equality above is not the trivial one).
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(params)))
    assert moved > 1e-3

    def abml_meta(mean):
        p = {"mean": mean, "log_std": prior["log_std"]}
        return query_loss(adapt_posterior(p, support_loss, jax.random.PRNGKey(5), lr, steps, 1, 0.0)["mean"])

    g_abml = jax.jit(jax.grad(abml_meta))(params)
    g_maml = jax.jit(jax.grad(lambda p: query_loss(_maml_adapt(p, support_loss, lr, steps))))(params)
    for a, b in zip(jax.tree.leaves(g_abml), jax.tree.leaves(g_maml)):
        assert bool(jnp.all(jnp.isfinite(a)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_small_noise_makes_the_mean_step_differ_from_maml():
    # The converse: with a finite posterior scale the sampled weights differ from the mean, and so does the step.
    params, support_loss, _ = _sinusoid_problem()
    q = jax.jit(lambda p: adapt_posterior(p, support_loss, jax.random.PRNGKey(5), 0.05, 1, 1, 0.0))(
        diag_gaussian(params, -1.0))
    want = jax.jit(lambda p: _maml_adapt(p, support_loss, 0.05, 1))(params)
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(q["mean"]), jax.tree.leaves(want)))
    assert diff > 1e-4
