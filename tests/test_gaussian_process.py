"""Kernels and exact GP math against direct numpy computations (float64), masks, gradients and KL."""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metarun import gaussian_process as gp
from metarun.errors import UserError


# Jitted once per kernel: whole-function compiles are much faster here than op-by-op dispatch.
posterior = jax.jit(gp.posterior, static_argnums=0)
diagonal_posterior = jax.jit(gp.diagonal_posterior, static_argnums=0)
log_marginal_likelihood = jax.jit(gp.log_marginal_likelihood, static_argnums=0)
kl_per_target = jax.jit(gp.kl_per_target)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def np_dist2(a, b):
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def np_eq(a, b, ell, var=1.0):
    return var * np.exp(-0.5 * np_dist2(a, b) / ell ** 2)


def np_posterior(k, x_c, y_c, x_t, noise):
    """Textbook GP regression (Rasmussen & Williams eq. 2.22-2.24) plus noise on the predicted targets."""
    kcc = k(x_c, x_c) + noise * np.eye(len(x_c))
    kct = k(x_c, x_t)
    mean = kct.T @ np.linalg.solve(kcc, y_c)
    cov = k(x_t, x_t) - kct.T @ np.linalg.solve(kcc, kct) + noise * np.eye(len(x_t))
    return mean, cov


def np_mvn_logpdf(y, mean, cov):
    d = y - mean
    return -0.5 * (d @ np.linalg.solve(cov, d) + np.linalg.slogdet(cov)[1] + len(y) * np.log(2 * np.pi))


def np_kl_to_diag(mp, cp, mq, vq):
    m = len(mp)
    return 0.5 * (np.sum(np.diag(cp) / vq) + np.sum((mq - mp) ** 2 / vq) - m + np.sum(np.log(vq))
                  - np.linalg.slogdet(cp)[1]) / m


def test_kernels_match_closed_forms():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 2)), rng.normal(size=(4, 2))
    r = np.sqrt(np_dist2(a, b)) / 0.7
    diff = a[:, None, :] - b[None, :, :]
    per = 1.5 * np.exp(-2 * (np.sin(np.pi * diff / 0.3) ** 2).sum(-1) / 0.8 ** 2)
    wp = np_eq(a, b, 0.5) * np.exp(-2 * (np.sin(np.pi * diff / 0.25) ** 2).sum(-1))
    w, mu, v = np.array([0.6, 0.4]), np.array([[0.0, 0.5], [1.0, 0.2]]), np.array([[0.3, 0.1], [0.05, 0.2]])
    sm = sum(w[q] * np.prod(np.exp(-2 * np.pi ** 2 * diff ** 2 * v[q]) * np.cos(2 * np.pi * diff * mu[q]), -1)
             for q in range(2))
    expected = {
        "eq": (gp.eq(a, b, lengthscale=0.7, variance=2.0), np_eq(a, b, 0.7, 2.0)),
        "matern52": (gp.matern52(a, b, lengthscale=0.7), (1 + 5 ** 0.5 * r + 5 * r ** 2 / 3) * np.exp(-(5 ** 0.5) * r)),
        "periodic": (gp.periodic(a, b, period=0.3, lengthscale=0.8, variance=1.5), per),
        "weakly_periodic": (gp.weakly_periodic(a, b), wp),
        "spectral_mixture": (gp.spectral_mixture(a, b, weights=w, means=mu, variances=v), sm),
        "linear": (gp.linear(a, b, variance=0.5, bias=0.1), 0.5 * a @ b.T + 0.1),
    }
    assert set(expected) == set(gp.KERNELS)
    for name, (got, want) in expected.items():
        assert got.shape == (5, 4), name
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_ard_lengthscale_and_spectral_mixture_reduces_to_eq():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 2)), rng.normal(size=(3, 2))
    ell = np.array([0.5, 2.0])
    np.testing.assert_allclose(gp.eq(a, b, lengthscale=ell), np.exp(-0.5 * np_dist2(a / ell, b / ell)), rtol=1e-5)
    # One component at frequency 0 with v = 1 / (4 pi^2 l^2) is an EQ of lengthscale l.
    sm = gp.spectral_mixture(a, b, weights=[1.0], means=[[0.0]], variances=[[1 / (4 * np.pi ** 2 * 0.6 ** 2)]])
    np.testing.assert_allclose(sm, np_eq(a, b, 0.6), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["eq", "matern52", "periodic", "weakly_periodic", "spectral_mixture"])
def test_stationary_kernels_are_psd_with_unit_diagonal(name):
    x = jnp.linspace(-2, 2, 25)[:, None]
    k = np.asarray(gp.get_kernel(name)(x, x), np.float64)
    np.testing.assert_allclose(np.diag(k), 1.0, rtol=1e-6)
    assert np.linalg.eigvalsh(k).min() > -1e-4


def test_get_kernel_unknown_name_is_a_one_line_user_error():
    assert gp.get_kernel("matern52") is gp.matern52
    with pytest.raises(UserError) as err:
        gp.get_kernel("rbf")
    msg = str(err.value)
    assert "dataset.kernel" in msg and "'rbf'" in msg and "weakly_periodic" in msg and "\n" not in msg


def _problem(seed=0, n=7, m=5):
    rng = np.random.default_rng(seed)
    x_c, x_t = rng.uniform(-2, 2, (n, 1)), rng.uniform(-2, 2, (m, 1))
    y_c = np.sin(3 * x_c[:, 0]) + 0.1 * rng.normal(size=n)
    return x_c, y_c, x_t


def test_posterior_matches_numpy(x64):
    x_c, y_c, x_t = _problem()
    k = partial(gp.eq, lengthscale=0.4)
    mean, cov = posterior(k, jnp.asarray(x_c), jnp.asarray(y_c)[:, None], jnp.ones(7), jnp.asarray(x_t), 0.05)
    want_mean, want_cov = np_posterior(lambda a, b: np_eq(a, b, 0.4), x_c, y_c, x_t, 0.05)
    assert mean.shape == (5,) and cov.shape == (5, 5)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(cov, want_cov, rtol=1e-9, atol=1e-10)


def test_masked_context_points_have_no_effect(x64):
    x_c, y_c, x_t = _problem(1)
    k = partial(gp.matern52, lengthscale=0.3)
    ref = posterior(k, x_c, y_c, jnp.ones(7), x_t, 0.05)
    rng = np.random.default_rng(2)
    # Junk padding, some of it on top of real inputs and targets, interleaved with the real points.
    junk_x = np.concatenate([x_t[:2], rng.normal(size=(3, 1)) * 100])
    xp = np.concatenate([junk_x[:2], x_c, junk_x[2:]])
    yp = np.concatenate([[50.0, -50.0], y_c, rng.normal(size=3) * 1e3])
    mask = np.r_[0, 0, np.ones(7), 0, 0, 0]
    got = posterior(k, xp, yp, mask, x_t, 0.05)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)
    # No context at all: the prior predictive.
    mean, cov = posterior(k, xp, yp, np.zeros(12), x_t, 0.05)
    np.testing.assert_allclose(mean, 0.0, atol=1e-12)
    np.testing.assert_allclose(cov, k(x_t, x_t) + 0.05 * np.eye(5), atol=1e-12)


def test_posterior_jits_and_vmaps_over_tasks():
    x_c, y_c, x_t = _problem(3)
    xs = jnp.stack([x_c, x_c + 0.5]).astype(jnp.float32)
    ys = jnp.stack([y_c, -y_c]).astype(jnp.float32)
    masks = jnp.asarray([[1, 1, 1, 0, 0, 1, 1], [1] * 7], jnp.float32)
    k = partial(gp.eq, lengthscale=0.25)
    f = jax.jit(jax.vmap(lambda a, b, c: posterior(k, a, b, c, jnp.asarray(x_t, jnp.float32), 0.05)))
    means, covs = f(xs, ys, masks)
    for i in range(2):
        m_i, c_i = posterior(k, xs[i], ys[i], masks[i], jnp.asarray(x_t, jnp.float32), 0.05)
        np.testing.assert_allclose(means[i], m_i, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(covs[i], c_i, rtol=1e-4, atol=1e-5)


def test_log_marginal_likelihood_matches_numpy_and_ignores_padding(x64):
    x_c, y_c, _ = _problem(4)
    k = partial(gp.weakly_periodic)
    got = log_marginal_likelihood(k, x_c, y_c, np.ones(7), 0.05)
    kxx = np.asarray(k(x_c, x_c)) + 0.05 * np.eye(7)
    np.testing.assert_allclose(got, np_mvn_logpdf(y_c, np.zeros(7), kxx), rtol=1e-10)
    mask = np.r_[1, 0, 1, 1, 0, 1, 1]
    sub = mask > 0
    want = np_mvn_logpdf(y_c[sub], np.zeros(5), kxx[np.ix_(sub, sub)])
    junk_y = np.where(sub, y_c, 1e4)
    np.testing.assert_allclose(log_marginal_likelihood(k, x_c, junk_y, mask, 0.05), want, rtol=1e-10)
    np.testing.assert_allclose(log_marginal_likelihood(k, x_c, y_c, np.zeros(7), 0.05), 0.0, atol=1e-12)


def test_log_marginal_likelihood_gradient_matches_finite_differences(x64):
    x_c, y_c, _ = _problem(5)
    mask = jnp.asarray([1, 1, 1, 1, 0, 1, 1.0])

    def lml(theta):  # (log lengthscale, log noise variance, log variance)
        k = partial(gp.matern52, lengthscale=jnp.exp(theta[0]), variance=jnp.exp(theta[2]))
        return log_marginal_likelihood(k, x_c, y_c, mask, jnp.exp(theta[1]))

    theta = jnp.asarray([np.log(0.3), np.log(0.05), np.log(1.3)])
    grad = jax.grad(lml)(theta)
    h = 1e-5
    fd = [(lml(theta.at[i].add(h)) - lml(theta.at[i].add(-h))) / (2 * h) for i in range(3)]
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-8)
    assert np.all(np.abs(grad) > 1e-3)  # a non-trivial point: every direction matters


def test_mvn_log_prob_matches_numpy_with_mask(x64):
    rng = np.random.default_rng(6)
    a = rng.normal(size=(4, 4))
    cov, mean, y = a @ a.T + 0.5 * np.eye(4), rng.normal(size=4), rng.normal(size=4)
    np.testing.assert_allclose(gp.mvn_log_prob(y, mean, cov), np_mvn_logpdf(y, mean, cov), rtol=1e-10)
    mask = np.array([1, 0, 1, 1.0])
    s = mask > 0
    np.testing.assert_allclose(gp.mvn_log_prob(np.where(s, y, 99.0), mean, cov, mask),
                               np_mvn_logpdf(y[s], mean[s], cov[np.ix_(s, s)]), rtol=1e-10)


def test_kl_per_target_exact_diagonal_trivial_and_wrong(x64):
    x_c, y_c, x_t = _problem(7, n=8, m=6)
    k = partial(gp.eq, lengthscale=0.25)
    mean, cov = posterior(k, x_c, y_c, np.ones(8), x_t, 0.05)
    np.testing.assert_allclose(kl_per_target(mean, cov, mean, np.diag(cov)[:, None]),
                               np_kl_to_diag(*map(np.asarray, (mean, cov, mean, np.diag(cov)))), rtol=1e-10)
    # Exact joint vs itself (a diagonal covariance): 0.
    diag_cov = np.diag(np.diag(cov))
    np.testing.assert_allclose(kl_per_target(mean, diag_cov, mean, np.diag(cov)), 0.0, atol=1e-12)
    # The diagonal GP's KL is the correlation term only; it is the floor, and positive (targets correlate).
    d_mean, d_var = diagonal_posterior(k, x_c, y_c, np.ones(8), x_t, 0.05)
    floor = kl_per_target(mean, cov, d_mean, d_var)
    np.testing.assert_allclose(floor, 0.5 * (np.log(np.diag(cov)).sum() - np.linalg.slogdet(cov)[1]) / 6, rtol=1e-10)
    assert floor > 1e-3
    wrong_mean, wrong_var = np.asarray(d_mean) + 0.3, np.asarray(d_var) * 1.5
    wrong = kl_per_target(mean, cov, wrong_mean, wrong_var)
    want = np_kl_to_diag(np.asarray(mean), np.asarray(cov), wrong_mean, wrong_var)
    np.testing.assert_allclose(wrong, want, rtol=1e-10)
    t_mean, t_var = gp.trivial_predictive(k, x_t, 0.05)
    np.testing.assert_allclose(t_var, 1.05, rtol=1e-12)
    assert kl_per_target(mean, cov, t_mean, t_var) > wrong > floor
    # Masked targets drop out of both the sum and the count.
    mask = np.array([1, 1, 0, 1, 0, 1.0])
    s = mask > 0
    np.testing.assert_allclose(
        kl_per_target(mean, cov, np.where(s, wrong_mean, 1e3), np.where(s, wrong_var, 1e-3), mask),
        np_kl_to_diag(np.asarray(mean)[s], np.asarray(cov)[np.ix_(s, s)], wrong_mean[s], wrong_var[s]), rtol=1e-10)


def test_kl_is_zero_for_exact_gp_marginals_when_targets_are_independent(x64):
    # Targets far apart (EQ 0.1) are independent under the posterior, so the diagonal GP is exact there.
    x_c, y_c, _ = _problem(8)
    x_t = np.array([[-10.0], [0.0], [10.0]])
    k = partial(gp.eq, lengthscale=0.1)
    mean, cov = posterior(k, x_c, y_c, np.ones(7), x_t, 0.05)
    np.testing.assert_allclose(kl_per_target(mean, cov, *diagonal_posterior(k, x_c, y_c, np.ones(7), x_t, 0.05)),
                               0.0, atol=1e-12)
    assert kl_per_target(mean, cov, mean + 0.1, np.diag(cov)) > 1e-3


def test_posterior_matches_tinygp(x64):
    tinygp = pytest.importorskip("tinygp")
    x_c, y_c, x_t = _problem(9)
    ell, noise = 0.35, 0.05

    @jax.jit  # tinygp's GaussianProcess is an equinox module: it traces under jit (and vmap) fine
    def theirs(x_c, y_c, x_t):
        model = tinygp.GaussianProcess(tinygp.kernels.Matern52(scale=ell), x_c[:, 0], diag=noise)
        cond = model.condition(y_c, x_t[:, 0]).gp
        return cond.loc, cond.covariance + noise * jnp.eye(x_t.shape[0]), model.log_probability(y_c)

    loc, cov, lml = theirs(x_c, y_c, x_t)
    ours = posterior(partial(gp.matern52, lengthscale=ell), x_c, y_c, np.ones(7), x_t, noise)
    np.testing.assert_allclose(ours[0], loc, rtol=1e-8, atol=1e-10)
    # tinygp's Matern distance is computed slightly differently at 0 (its diagonal is 1.5e-8 off).
    np.testing.assert_allclose(ours[1], cov, rtol=1e-8, atol=1e-7)
    np.testing.assert_allclose(log_marginal_likelihood(partial(gp.matern52, lengthscale=ell), x_c, y_c,
                                                       np.ones(7), noise), lml, rtol=1e-10)
