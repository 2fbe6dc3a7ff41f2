"""Neural Process models (CNP, latent NP, ANP, attentive CNP, ConvCNP) and their objectives: invariances, shapes, a short fit."""
from __future__ import annotations

import functools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metarun.algos import np_objectives as _obj
from metarun.data.function_tasks import make_function_sampler
from metarun.data.tasks import sample_batch
from metarun.learners.neural_process import (ANP, CNP, LATENT_RNG, AttentiveCNP, ConvCNP, LatentNP, LatentOutput,
                                             Normal)

# Compiles many small programs (tens of seconds on 2 cores): run in CI's second pass (--runslow).
pytestmark = pytest.mark.slow

# Small widths: the properties tested do not depend on size, and compiles stay short.
MODELS = {
    "cnp": CNP(hidden=32),
    "np": LatentNP(hidden=32, latent_dim=8),
    "anp": ANP(hidden=32, latent_dim=8, num_heads=2, attention_layers=1),
    "acnp": AttentiveCNP(hidden=32, num_heads=2, attention_layers=1),
    "convcnp": ConvCNP(points_per_unit=16, grid_size=128, channels=8, num_layers=2, kernel_size=5),
}
LATENT_KEY = jax.random.key(7)


class obj:  # noqa: N801  the objectives, jitted (one compile each instead of op-by-op dispatch)
    gaussian_nll = staticmethod(jax.jit(_obj.gaussian_nll))
    neg_elbo = staticmethod(jax.jit(_obj.neg_elbo))
    neg_ml = staticmethod(jax.jit(_obj.neg_ml))
    neg_importance_weighted = staticmethod(jax.jit(_obj.neg_importance_weighted))


def context(n_slots=12, n_real=7, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2, 2, (n_slots, 1)).astype(np.float32)
    y = np.sin(3 * x).astype(np.float32)
    mask = (np.arange(n_slots) < n_real).astype(np.float32)
    return x, y, mask


X_TGT = np.linspace(-2.5, 2.5, 9, dtype=np.float32)[:, None]


@functools.lru_cache(maxsize=None)
def built(name):
    """(module, variables, jitted predict(x_ctx, y_ctx, ctx_mask, x_tgt, tgt_mask) -> (loc, scale)), once per model."""
    module = MODELS[name]
    x, y, mask = context()
    variables = jax.jit(module.init)({"params": jax.random.key(0), LATENT_RNG: LATENT_KEY}, x, y, mask, X_TGT)

    @jax.jit
    def predict(x_ctx, y_ctx, ctx_mask, x_tgt, tgt_mask):
        out = module.apply(variables, x_ctx, y_ctx, ctx_mask, x_tgt, tgt_mask, rngs={LATENT_RNG: LATENT_KEY})
        return out.predictive if isinstance(out, LatentOutput) else out

    return module, variables, predict


@pytest.fixture(params=list(MODELS))
def model(request):
    """(name, predict)."""
    return request.param, built(request.param)[2]


def assert_same(a, b, atol=1e-5):
    for u, v in zip(a, b):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=atol)


def test_shapes_and_positive_scale(model):
    name, predict = model
    loc, scale = predict(*context(), X_TGT, None)
    want = (1, 9, 1) if name in ("np", "anp") else (9, 1)
    assert loc.shape == want and scale.shape == want
    assert np.all(np.asarray(scale) > 0) and np.all(np.isfinite(loc))


def test_context_permutation_invariance(model):
    _, predict = model
    x, y, mask = context()
    perm = np.random.default_rng(1).permutation(12)
    assert_same(predict(x, y, mask, X_TGT, None), predict(x[perm], y[perm], mask[perm], X_TGT, None))


def test_padding_junk_and_padding_length_do_not_matter(model):
    _, predict = model
    x, y, mask = context()
    ref = predict(x, y, mask, X_TGT, None)
    junk_x, junk_y = x.copy(), y.copy()
    junk_x[7:] = np.r_[1e4, -3.0, 0.5, np.nan, np.inf][:, None]
    junk_y[7:] = np.r_[-1e3, 7.0, np.nan, 2.0, -np.inf][:, None]
    assert_same(ref, predict(junk_x, junk_y, mask, X_TGT, None), atol=0)  # padding is zeroed: bitwise equal
    # The same 7 real points in 20 slots (junk interleaved, a different compiled shape).
    x20 = np.random.default_rng(2).normal(size=(20, 1)).astype(np.float32) * 50
    y20, m20 = x20 * 3, np.zeros(20, np.float32)
    slots = [0, 3, 4, 9, 12, 17, 19]
    x20[slots], y20[slots], m20[slots] = x[:7], y[:7], 1.0
    assert_same(ref, predict(x20, y20, m20, X_TGT, None))
    # An empty context: whatever the padding holds.
    empty = np.zeros(12, np.float32)
    a, b = predict(x, y, empty, X_TGT, None), predict(junk_x * 3, junk_y - 1, empty, X_TGT, None)
    assert_same(a, b, atol=0)
    assert np.all(np.isfinite(a[0])) and not np.allclose(a[0], ref[0])  # the context does matter


def test_the_context_changes_the_prediction(model):
    _, predict = model
    x, y, mask = context()
    a = predict(x, y, mask, X_TGT, None)
    b = predict(x, -y, mask, X_TGT, None)
    assert np.abs(np.asarray(a[0]) - np.asarray(b[0])).max() > 1e-4


def test_convcnp_ignores_padded_targets_and_is_translation_equivariant():
    module, variables, predict = built("convcnp")
    x, y, mask = context()
    ref = predict(x, y, mask, X_TGT, None)
    x_t = np.concatenate([X_TGT, [[40.0], [-35.0]]]).astype(np.float32)
    t_mask = np.r_[np.ones(9), 0, 0].astype(np.float32)
    padded = predict(x, y, mask, x_t, t_mask)
    assert_same(ref, (padded.loc[:9], padded.scale[:9]))
    # Shifting every input by a whole number of grid spacings shifts the grid with it (1.5 = 24 / 16).
    shifted = predict(x + 1.5, y, mask, X_TGT + 1.5, None)
    assert_same(ref, shifted, atol=1e-4)
    with pytest.raises(ValueError, match="1D"):
        module.apply(variables, np.zeros((3, 2), np.float32), y[:3], mask[:3], X_TGT)


@pytest.mark.parametrize("name", ["np", "anp"])
def test_latent_models_prior_posterior_and_samples(name):
    module, variables, _ = built(name)
    x, y, mask = context()
    y_t = np.cos(X_TGT).astype(np.float32)
    t_mask = np.r_[np.ones(6), 0, 0, 0].astype(np.float32)

    @partial(jax.jit, static_argnames="with_targets")
    def run(y_tgt, with_targets=True):
        return module.apply(variables, x, y, mask, X_TGT, t_mask, y_tgt if with_targets else None, 5,
                            rngs={LATENT_RNG: LATENT_KEY})

    out = run(y_t)
    assert out.predictive.loc.shape == (5, 9, 1) and out.z.shape == (5, 8)
    assert out.prior.loc.shape == (8,) and out.posterior.scale.shape == (8,)
    assert np.all((np.asarray(out.prior.scale) > 0.1) & (np.asarray(out.prior.scale) < 1.0))
    # The samples differ, and so do their predictions.
    assert np.asarray(out.z).std(0).min() > 1e-3 and np.asarray(out.predictive.loc).std(0).max() > 1e-4
    # The targets inform the posterior, but padded targets do not.
    assert not np.allclose(out.posterior.loc, out.prior.loc)
    junk = y_t.copy()
    junk[6:] = np.nan
    assert_same(run(junk).posterior, out.posterior)
    if name == "np":  # ANP inherits this code path unchanged; spare it a compile
        # Without y_tgt: no posterior, and the same noise scales the prior instead.
        prior_only = run(y_t, with_targets=False)
        assert prior_only.posterior is None
        assert_same(prior_only.prior, out.prior)
        np.testing.assert_allclose((prior_only.z - prior_only.prior.loc) / prior_only.prior.scale,
                                   (out.z - out.posterior.loc) / out.posterior.scale, rtol=1e-4, atol=1e-5)
        assert not np.allclose(prior_only.z, out.z)


def np_normal_logpdf(y, loc, scale):
    return -0.5 * ((y - loc) / scale) ** 2 - np.log(scale) - 0.5 * np.log(2 * np.pi)


def test_gaussian_nll_matches_numpy_with_mask():
    rng = np.random.default_rng(3)
    loc, scale, y = rng.normal(size=(6, 2)), rng.uniform(0.2, 2, (6, 2)), rng.normal(size=(6, 2))
    mask = np.array([1, 1, 0, 1, 0, 1.0])
    junk = np.where(mask[:, None] > 0, y, np.nan)
    junk_loc = np.where(mask[:, None] > 0, loc, np.inf)  # a padded target's prediction may be junk too
    got = obj.gaussian_nll(Normal(jnp.asarray(junk_loc), jnp.asarray(scale)), jnp.asarray(junk), jnp.asarray(mask))
    want = -np_normal_logpdf(y, loc, scale).sum(-1)[mask > 0].mean()
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_normal_kl_matches_closed_form():
    mu_p, s_p, mu_q, s_q = np.array([0.3, -1.0]), np.array([0.5, 2.0]), np.array([0.0, 1.0]), np.array([1.0, 0.7])
    p, q = Normal(jnp.asarray(mu_p), jnp.asarray(s_p)), Normal(jnp.asarray(mu_q), jnp.asarray(s_q))
    want = np.log(s_q / s_p) + (s_p ** 2 + (mu_p - mu_q) ** 2) / (2 * s_q ** 2) - 0.5
    np.testing.assert_allclose(p.kl_divergence(q), want, rtol=1e-5)
    np.testing.assert_allclose(p.kl_divergence(p), 0.0, atol=1e-7)


def _latent_output(loc, scale, prior, posterior, z):
    return LatentOutput(Normal(jnp.asarray(loc), jnp.asarray(scale)), prior, posterior, jnp.asarray(z))


def test_latent_objectives_match_numpy():
    rng = np.random.default_rng(4)
    S, m = 4, 5
    loc, scale, y = rng.normal(size=(S, m, 1)), rng.uniform(0.3, 1.5, (S, m, 1)), rng.normal(size=(m, 1))
    mask = np.array([1, 1, 1, 0, 1.0])
    prior = Normal(jnp.asarray(rng.normal(size=3)), jnp.asarray(rng.uniform(0.2, 1, 3)))
    post = Normal(jnp.asarray(rng.normal(size=3)), jnp.asarray(rng.uniform(0.2, 1, 3)))
    z = rng.normal(size=(S, 3))
    ll = (np_normal_logpdf(y, loc, scale)[..., 0] * mask).sum(-1)  # [S]
    n = mask.sum()
    kl = np.sum(np.asarray(post.kl_divergence(prior)))
    out = _latent_output(loc, scale, prior, post, z)
    np.testing.assert_allclose(obj.neg_elbo(out, y, mask), -(ll.mean() - kl) / n, rtol=1e-5)
    lme = lambda a: np.log(np.mean(np.exp(a - a.max()))) + a.max()  # noqa: E731
    np.testing.assert_allclose(obj.neg_ml(out._replace(posterior=None), y, mask), -lme(ll) / n, rtol=1e-5)
    log_w = ll + np_normal_logpdf(z, np.asarray(prior.loc), np.asarray(prior.scale)).sum(-1) \
        - np_normal_logpdf(z, np.asarray(post.loc), np.asarray(post.scale)).sum(-1)
    np.testing.assert_allclose(obj.neg_importance_weighted(out, y, mask), -lme(log_w) / n, rtol=1e-5)
    # With a single repeated sample, ML is that sample's NLL; posterior = prior makes the ELBO the mean NLL.
    same = _latent_output(np.repeat(loc[:1], S, 0), np.repeat(scale[:1], S, 0), prior, prior, z)
    np.testing.assert_allclose(obj.neg_ml(same, y, mask), -ll[0] / n, rtol=1e-5)
    np.testing.assert_allclose(obj.neg_elbo(same, y, mask), -ll[0] / n, rtol=1e-5)
    np.testing.assert_allclose(obj.neg_importance_weighted(same, y, mask), -ll[0] / n, rtol=1e-5)
    with pytest.raises(ValueError, match="y_tgt"):
        obj.neg_elbo(out._replace(posterior=None), y, mask)


def test_training_the_cnp_on_eq_gp_tasks_lowers_the_target_nll():
    model = CNP(hidden=64)
    sampler = make_function_sampler("gp", kernel="eq")
    opt = optax.adam(3e-3)

    def loss(params, batch):
        def one(t):
            pred = model.apply(params, t.support.x, t.support.y, t.support.mask, t.query.x)
            return obj.gaussian_nll(pred, t.query.y, t.query.mask)
        return jax.vmap(one)(batch).mean()

    @jax.jit  # one compiled program for the whole experiment: compiles dominate at this size
    def experiment(key):
        data_key, init_key = jax.random.split(key)
        tasks = sample_batch(sampler, {}, data_key, 1856)  # 100 meta-batches of 16 to train on, 256 held out
        train = jax.tree.map(lambda a: a[:1600].reshape((100, 16) + a.shape[1:]), tasks)
        held_out = jax.tree.map(lambda a: a[1600:], tasks)
        t0 = jax.tree.map(lambda a: a[0], held_out)
        params = model.init(init_key, t0.support.x, t0.support.y, t0.support.mask, t0.query.x)

        def step(carry, batch):
            p, state = carry
            updates, state = opt.update(jax.grad(loss)(p, batch), state, p)
            return (optax.apply_updates(p, updates), state), None

        trained = jax.lax.scan(step, (params, opt.init(params)), train)[0][0]
        # The prior predictive N(0, 1 + 0.05) ignores the context.
        prior_nll = 0.5 * jnp.log(2 * jnp.pi * 1.05) + 0.5 * jnp.mean(jnp.square(held_out.query.y)) / 1.05
        return loss(params, held_out), loss(trained, held_out), prior_nll

    before, after, prior_nll = map(float, experiment(jax.random.key(99)))
    # Measured: 1.76 -> 1.35 nats per target; the prior predictive scores 1.44.
    assert after < before - 0.25
    assert after < prior_nll  # it uses the context, not only the marginal scale
