"""rl2's objective=ppo (PPO-clip epochs inside its own meta-step): the first epoch against its definition,
the default objective unchanged, and one-line refusals."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import compose
from metarun.algos.base import default_meta_step
from metarun.build import load_family, make_algo
from metarun.errors import UserError


def tiny(*overrides):
    return compose(["experiment=rl2_bernoulli_bandit", "dataset.horizon=12", "dataset.fast_batch=4",
                    "learner.hidden_size=8", "train.progress=false", "meta_opt=sgd", "meta_opt.lr=1.0", *overrides])


@pytest.mark.slow  # compiles two GRU meta-steps (~15 s here)
def test_one_ppo_epoch_is_one_adam_step_on_the_reinforce_gradient():
    """At the sampling parameters the ratio is 1, inside the clip, so the clipped surrogate's gradient is the
    REINFORCE gradient of objective=reinforce on the same trials; Adam's first step is −lr·g/(|g| + ε)."""
    cfg = tiny("algo.objective=ppo", "algo.ppo_epochs=1", "algo.ppo_lr=0.01")
    family = load_family(cfg)
    ppo, reinforce = make_algo(cfg, family, "train"), make_algo(tiny(), family, "train")
    tasks = jax.vmap(lambda k: family.sampler("train")({}, k))(jax.random.split(jax.random.PRNGKey(1), 3))
    params, state = ppo.init(jax.random.PRNGKey(0), None)
    key = jax.random.PRNGKey(2)
    vmap_tasks = lambda fn, t, k: jax.vmap(fn)(t, k)  # noqa: E731
    step, new_state, metrics = jax.jit(lambda p, s: ppo.meta_step(p, s, tasks, key, vmap_tasks))(params, state)
    grads, _, reinforce_metrics = jax.jit(lambda p: default_meta_step(reinforce, p, {}, tasks, key, vmap_tasks))(params)
    for got, g in zip(jax.tree.leaves(step), jax.tree.leaves(grads)):
        np.testing.assert_allclose(got, 0.01 * g / (jnp.abs(g) + 1e-8), rtol=1e-3, atol=1e-5)
    assert float(metrics["return"]) == pytest.approx(float(reinforce_metrics["return"]))  # the same trials
    assert int(new_state["ppo_opt"][0].count) == 1 and float(metrics["ppo_clip_fraction"]) == 0.0
    # optax.sgd(1.0) on the returned step lands on the Adam-updated parameters
    updates, _ = optax.sgd(1.0).update(step, optax.sgd(1.0).init(params))
    moved = optax.apply_updates(params, updates)
    for a, p, g in zip(jax.tree.leaves(moved), jax.tree.leaves(params), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, p - 0.01 * g / (jnp.abs(g) + 1e-8), rtol=1e-4, atol=1e-5)


def test_the_default_objective_is_unchanged_reinforce():
    cfg = tiny()
    algo = make_algo(cfg, load_family(cfg), "train")
    assert cfg.algo.objective == "reinforce" and algo.meta_step is None
    assert algo.init(jax.random.PRNGKey(0), None)[1] == {}


@pytest.mark.parametrize("overrides, expected", [
    (["algo.objective=ppo", "meta_opt=adam"], "algo.objective=ppo makes the whole step itself"),
    (["algo.objective=ppo", "meta_opt.lr=0.003"], "lr=0.003"),
    (["algo.objective=a3c"], "algo.objective=a3c is unknown"),
    (["algo.objective=ppo", "algo.ppo_epochs=0"], "algo.ppo_epochs=0 must be >= 1"),
])
def test_ppo_refusals_are_one_line(overrides, expected):
    cfg = tiny(*overrides)
    with pytest.raises(UserError) as err:
        make_algo(cfg, load_family(cfg), "train")
    assert expected in str(err.value) and "\n" not in str(err.value)
