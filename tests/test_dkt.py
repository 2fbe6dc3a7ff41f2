"""DKT's GP against numpy and finite differences; its class probabilities against Monte Carlo; its refusals."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import compose, stand_in_family
from metarun.algos.dkt import (argmax_log_probs, gp_neg_log_marginal_likelihood, gp_posterior, init_kernel,
                               kernel_fn, kernel_matrix)
from metarun.errors import UserError

RNG = np.random.default_rng(0)
XS, XQ = RNG.normal(size=(4, 2)), RNG.normal(size=(3, 2))
Y = RNG.normal(size=(4, 2))


def _np_rbf(a, b, ls=0.7, s=1.3):
    return s**2 * np.exp(-0.5 * np.square(a[:, None] - b[None]).sum(-1) / ls**2)


def _rbf_hp(ls=0.7, s=1.3):
    return {"log_lengthscale": jnp.log(ls), "log_outputscale": jnp.log(s)}


def test_posterior_mean_and_variance_match_numpy():
    noise = 0.05
    kss, kqs = _np_rbf(XS, XS), _np_rbf(XQ, XS)
    inv = np.linalg.inv(kss + noise * np.eye(4))
    want_mean = kqs @ inv @ Y
    want_var = np.diag(_np_rbf(XQ, XQ) - kqs @ inv @ kqs.T)
    k = kernel_fn("rbf", _rbf_hp())
    xs, xq, y = (jnp.asarray(a, jnp.float32) for a in (XS, XQ, Y))
    mean, var = gp_posterior(k, xs, y, xq, noise)
    np.testing.assert_allclose(np.asarray(mean), want_mean, rtol=2e-3, atol=2e-4)
    np.testing.assert_allclose(np.asarray(var), want_var, rtol=2e-3, atol=2e-4)
    # A padded support point (mask 0) is the same as no point at all.
    mask = jnp.array([1.0, 1.0, 1.0, 0.0])
    m3, _ = gp_posterior(k, xs, y, xq, noise, mask)
    inv3 = np.linalg.inv(kss[:3, :3] + noise * np.eye(3))
    np.testing.assert_allclose(np.asarray(m3), kqs[:, :3] @ inv3 @ Y[:3], rtol=2e-3, atol=2e-4)


def test_marginal_likelihood_matches_numpy_and_its_gradient_finite_differences():
    noise = 0.1
    k = _np_rbf(XS, XS) + noise * np.eye(4)
    _, logdet = np.linalg.slogdet(k)
    want = sum(0.5 * y @ np.linalg.solve(k, y) + 0.5 * logdet + 2 * np.log(2 * np.pi) for y in Y.T) / 8
    got = gp_neg_log_marginal_likelihood(kernel_fn("rbf", _rbf_hp()), jnp.asarray(XS, jnp.float32),
                                         jnp.asarray(Y, jnp.float32), noise)
    np.testing.assert_allclose(float(got), want, rtol=1e-4)

    with jax.enable_x64(True):
        xs, y = jnp.asarray(XS, jnp.float64), jnp.asarray(Y, jnp.float64)

        def f(theta):  # (log lengthscale, log outputscale, log noise) -> loss
            hp = {"log_lengthscale": theta[0], "log_outputscale": theta[1]}
            return gp_neg_log_marginal_likelihood(kernel_fn("rbf", hp), xs, y, jnp.exp(theta[2]))

        theta = jnp.array([np.log(0.7), np.log(1.3), np.log(0.1)], jnp.float64)
        grad = np.asarray(jax.grad(f)(theta))
        eps = 1e-6
        fd = np.array([(f(theta.at[i].add(eps)) - f(theta.at[i].add(-eps))) / (2 * eps) for i in range(3)])
        np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-8)
        assert np.abs(grad).min() > 1e-3  # every hyperparameter moves the loss: the check is not vacuous


def test_every_kernel_gives_a_positive_semidefinite_matrix():
    x = jnp.asarray(RNG.normal(size=(6, 3)), jnp.float32)
    for name in ("rbf", "spectral", "cosine"):
        k = np.asarray(kernel_matrix(name, init_kernel(name, jax.random.PRNGKey(0), 3), x, x), np.float64)
        np.testing.assert_allclose(k, k.T, atol=1e-5)
        assert np.linalg.eigvalsh(k).min() > -1e-4, name


def test_class_probabilities_are_the_monte_carlo_argmax_frequencies():
    mean = jnp.array([[0.8, -0.2, 0.1], [-1.0, -0.9, 0.9]])
    var = jnp.array([0.3, 0.05])
    draws = mean[None] + jnp.sqrt(var)[None, :, None] * jax.random.normal(jax.random.PRNGKey(0), (200_000, 2, 3))
    freq = np.asarray(jax.nn.one_hot(draws.argmax(-1), 3).mean(0))
    np.testing.assert_allclose(np.exp(np.asarray(argmax_log_probs(mean, var))), freq, atol=5e-3)


@pytest.mark.parametrize("override, message", [
    ("algo.kernel=matern", "algo.kernel=matern is unknown"),
    ("algo.mixtures=0", "algo.mixtures=0 must be >= 1"),
    ("learner.batch_norm=running", "algo=dkt supports learner.batch_norm=transductive or none"),
])
def test_bad_input_gets_one_line(override, message):
    from metarun.build import make_algo

    cfg = compose(["algo=dkt", "dataset=synthetic", override])
    with pytest.raises(UserError, match=message) as info:
        make_algo(cfg, stand_in_family(cfg), "train")
    assert "\n" not in str(info.value)


def test_a_family_it_cannot_serve_is_refused():
    from metarun.algos.base import Collaborators
    from metarun.algos.dkt import build

    class Stream:
        kind, name = "stream", "split_omniglot"

    cfg = compose(["algo=dkt", "dataset=synthetic"])
    with pytest.raises(UserError, match="algo=dkt serves classification and regression datasets; "
                                        "dataset=split_omniglot is stream"):
        build(cfg.algo, Collaborators(Stream(), lambda *a, **k: None, cfg.learner, "train"))


def test_gp_matches_tinygp():
    tinygp = pytest.importorskip("tinygp")
    noise, ls, s = 0.05, 0.7, 1.3
    with jax.enable_x64(True):
        xs, xq, y = (jnp.asarray(a, jnp.float64) for a in (XS, XQ, Y[:, 0]))
        gp = tinygp.GaussianProcess(s**2 * tinygp.kernels.ExpSquared(scale=ls), xs, diag=noise)
        cond = gp.condition(y, xq).gp
        hp = {"log_lengthscale": jnp.log(ls), "log_outputscale": jnp.log(s)}
        mean, var = gp_posterior(kernel_fn("rbf", hp), xs, y[:, None], xq, noise)
        np.testing.assert_allclose(np.asarray(mean[:, 0]), np.asarray(cond.loc), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.asarray(var), np.asarray(cond.variance), rtol=1e-4, atol=1e-6)
        nll = gp_neg_log_marginal_likelihood(kernel_fn("rbf", hp), xs, y[:, None], noise)
        # JITTER (1e-5) is added to our noise: compare with tinygp at the same total noise.
        want = -tinygp.GaussianProcess(s**2 * tinygp.kernels.ExpSquared(scale=ls), xs,
                                       diag=noise + 1e-5).log_probability(y) / 4
        np.testing.assert_allclose(float(nll), float(want), rtol=1e-6)
