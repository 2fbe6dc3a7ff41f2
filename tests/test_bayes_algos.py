"""BMAML and ABML through the MetaAlgorithm interface: their stated reductions to MAML, and their refusals."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import compose, stand_in_family
from metarun.data.tasks import Examples, Task
from metarun.errors import UserError

# Compiles many small programs (tens of seconds on 2 cores): run in CI's second pass (--runslow).
pytestmark = pytest.mark.slow

TINY = ["dataset=synthetic", "dataset.image_size=8", "learner.filters=4", "learner.blocks=2", "task.ways=5",
        "algo.inner_lr=0.3", "algo.inner_steps=2"]


def _algos(name, extra=()):
    """(the algorithm `name`, MAML) built for training from the same tiny config, and a task."""
    from metarun.build import make_algo

    cfg = compose(TINY + [f"algo={name}"] + list(extra))
    family = stand_in_family(cfg)
    maml_cfg = compose(TINY + ["algo=maml"])
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((10, 8, 8, 1)), jnp.float32)
    y = jnp.tile(jnp.arange(5, dtype=jnp.int32), 2)
    task = Task(Examples(x[:5], y[:5]), Examples(x[5:], y[5:]))
    return make_algo(cfg, family, "train"), make_algo(maml_cfg, family, "train"), task


def _close(a, b, **kw):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), **kw)


def test_bmaml_with_one_particle_adapts_exactly_as_maml():
    bmaml, maml, task = _algos("bmaml", ["algo.particles=1"])
    params, _ = maml.init(jax.random.PRNGKey(0), task)
    key = jax.random.PRNGKey(1)
    want = maml.adapt(params, {}, task.support, key)["params"]
    got = bmaml.adapt({"particles": jax.tree.map(lambda a: a[None], params["net"])}, {}, task.support, key)
    moved = max(float(jnp.abs(u - v).max()) for u, v in zip(jax.tree.leaves(want), jax.tree.leaves(params["net"])))
    assert moved > 1e-3  # the inner steps did something
    _close(jax.tree.map(lambda a: a[0], got["particles"]), want, rtol=1e-4, atol=1e-6)


def test_bmaml_chaser_loss_gives_finite_nonzero_meta_gradients():
    bmaml, _, task = _algos("bmaml", ["algo.particles=3"])
    params, _ = bmaml.init(jax.random.PRNGKey(0), task)
    loss, grads = jax.jit(jax.value_and_grad(
        lambda p: bmaml.loss(p, {}, bmaml.adapt(p, {}, task.support, None), task.query, None)[0]))(params)
    assert float(loss) > 0 and all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 0


def test_abml_without_kl_and_with_a_point_mass_prior_is_maml():
    extra = ["algo.kl_weight=0", "algo.outer_kl_weight=0", "algo.samples=1", "algo.init_log_std=-30"]
    abml, maml, task = _algos("abml", extra)
    params, _ = maml.init(jax.random.PRNGKey(0), task)
    prior = {"mean": params["net"], "log_std": jax.tree.map(lambda a: jnp.full_like(a, -30.0), params["net"])}
    key = jax.random.PRNGKey(1)
    maml_state = maml.adapt(params, {}, task.support, key)
    abml_state = abml.adapt({"prior": prior}, {}, task.support, key)
    _close(abml_state["q"]["mean"], maml_state["params"], rtol=1e-4, atol=1e-6)
    want = maml.loss(params, {}, maml_state, task.query, key)[0]
    got = abml.loss({"prior": prior}, {}, abml_state, task.query, key)[0]
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    # With weight noise the posterior mean no longer follows MAML: the reduction is not vacuous.
    noisy = abml.adapt({"prior": {**prior, "log_std": jax.tree.map(lambda a: jnp.full_like(a, -1.0), params["net"])}},
                       {}, task.support, key)
    with pytest.raises(AssertionError):
        _close(noisy["q"]["mean"], maml_state["params"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("algo, override, message", [
    ("bmaml", "algo.particles=0", "algo.particles=0 must be >= 1"),
    ("bmaml", "algo.inner_lr=0", "algo.inner_lr=0.0 must be > 0"),
    ("abml", "algo.eval_samples=0", "algo.eval_samples=0 must be >= 1"),
    ("abml", "algo.kl_weight=-1", "algo.kl_weight=-1.0 must be >= 0"),
    ("abml", "learner.batch_norm=running", "algo=abml supports learner.batch_norm=transductive or none"),
])
def test_bad_input_gets_one_line(algo, override, message):
    from metarun.build import make_algo

    cfg = compose(TINY + [f"algo={algo}", override])
    with pytest.raises(UserError, match=message) as info:
        make_algo(cfg, stand_in_family(cfg), "train")
    assert "\n" not in str(info.value)
