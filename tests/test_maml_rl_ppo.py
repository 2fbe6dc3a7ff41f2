"""maml_rl's outer=ppo (ProMP's outer step): one epoch against its definition (an Adam step on the REINFORCE
meta-gradient), several epochs lowering the clipped surrogate, the adaptive KL coefficient, one-line refusals."""
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
    return compose(["algo=maml_rl", "dataset=navigation2d", "learner=gaussian_mlp", "learner.hidden=[8]",
                    "dataset.horizon=10", "dataset.fast_batch=4", "train.progress=false", "algo.inner_estimator=lvc",
                    *overrides])


PPO = ("algo.outer=ppo", "meta_opt=sgd", "meta_opt.lr=1.0")
VMAP_TASKS = lambda fn, t, k: jax.vmap(fn)(t, k)  # noqa: E731


def setup(cfg):
    family = load_family(cfg)
    algo = make_algo(cfg, family, "train")
    tasks = jax.vmap(lambda k: family.sampler("train")({}, k))(jax.random.split(jax.random.PRNGKey(8), 3))
    params, state = algo.init(jax.random.PRNGKey(0), None)
    return family, algo, tasks, params, state


@pytest.mark.slow  # compiles two second-order meta-steps through rollouts (~20 s here)
def test_one_ppo_epoch_is_one_adam_step_on_the_reinforce_meta_gradient():
    """At θ_old every ratio is 1 (inside the clip) and the KL penalty's gradient is 0 (its minimum), so the
    first epoch's gradient is outer=reinforce's second-order meta-gradient on the same rollouts, and Adam's
    first step is −lr·g/(|g| + ε)."""
    cfg = tiny(*PPO, "algo.ppo_epochs=1", "algo.ppo_lr=0.01")
    family, ppo, tasks, params, state = setup(cfg)
    reinforce = make_algo(tiny(), family, "train")
    key = jax.random.PRNGKey(9)
    step, new_state, metrics = jax.jit(lambda p, s: ppo.meta_step(p, s, tasks, key, VMAP_TASKS))(params, state)
    grads, _, reinforce_metrics = jax.jit(lambda p: default_meta_step(reinforce, p, {}, tasks, key, VMAP_TASKS))(params)
    assert float(metrics["return"]) == pytest.approx(float(reinforce_metrics["return"]), rel=1e-5)  # same rollouts
    for got, g in zip(jax.tree.leaves(step), jax.tree.leaves(grads)):
        big = np.abs(np.asarray(g)) > 1e-5  # where |g| >> Adam's ε the step is lr·sign(g)
        np.testing.assert_allclose(np.asarray(got)[big], (0.01 * g / (jnp.abs(g) + 1e-8))[big], rtol=2e-3, atol=1e-5)
    assert int(new_state["ppo_opt"][0].count) == 1 and float(metrics["ppo_clip_fraction"]) == 0.0
    assert float(metrics["ppo_inner_kl"]) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.slow
def test_ppo_epochs_lower_the_clipped_surrogate_and_the_kl_coefficient_adapts():
    """Five epochs: the clipped surrogate recomputed at the new parameters on the same rollouts is below its value
    at θ_old; the pre-update KL stays far under target/1.5, so η halves (ProMP's rule); adaptive_kl=false keeps η."""
    from metarun.algos.maml_rl import trpo_pieces
    from metarun.learners import build_learner
    from metarun.rl.policy_gradient import clipped_surrogate_loss

    cfg = tiny(*PPO, "algo.ppo_lr=0.003")
    family, ppo, tasks, params, state = setup(cfg)
    key = jax.random.PRNGKey(9)
    step, new_state, metrics = jax.jit(lambda p, s: ppo.meta_step(p, s, tasks, key, VMAP_TASKS))(params, state)
    new = jax.tree.map(lambda p, s: p - s, params, step)

    module = build_learner(cfg.learner, family.head_dim("train"))
    apply = lambda p, o: module.apply({"params": p}, o)  # noqa: E731
    pieces = trpo_pieces(apply, family, cfg.algo.inner_lr, cfg.algo.inner_steps, inner_estimator="lvc")
    batches, _ = jax.vmap(lambda t, k: pieces.sample(params, t, k))(tasks, jax.random.split(key, 3))

    def surrogate(p):
        def one(b):
            fast = pieces.adapt_on(p, b.support)
            return clipped_surrogate_loss(apply(fast, b.query.obs).log_prob(b.query.actions),
                                          b.old.log_prob(b.query.actions), b.advantages, b.query.valid, 0.2)[0]
        return jnp.mean(jax.vmap(one)(batches))

    before, after = float(surrogate(params)), float(surrogate(new))
    assert after < before - 1e-3
    assert after == pytest.approx(float(metrics["ppo_surrogate_last"]), abs=0.02)  # last epoch's, one step earlier
    assert float(metrics["ppo_inner_kl"]) < 0.01 / 1.5
    assert float(new_state["inner_kl_coef"]) == pytest.approx(0.005)
    fixed = make_algo(tiny(*PPO, "algo.adaptive_kl=false"), family, "train")
    _, fixed_state, _ = jax.jit(lambda p, s: fixed.meta_step(p, s, tasks, key, VMAP_TASKS))(params, state)
    assert float(fixed_state["inner_kl_coef"]) == pytest.approx(0.01)


@pytest.mark.parametrize("overrides, expected", [
    (["algo.outer=ppo", "meta_opt=adam"], "algo.outer=ppo makes the whole step itself"),
    (["algo.outer=ppo", "meta_opt=sgd", "meta_opt.lr=0.5"], "lr=0.5"),
    (["algo.clip_eps=1.5", *PPO], "algo.clip_eps=1.5 must be in (0, 1)"),
    (["algo.ppo_epochs=0", *PPO], "algo.ppo_epochs=0 must be >= 1"),
    (["algo.inner_kl_target=0", *PPO], "algo.inner_kl_target=0.0 must be > 0"),
])
def test_ppo_refusals_are_one_line(overrides, expected):
    cfg = tiny(*overrides)
    with pytest.raises(UserError) as err:
        make_algo(cfg, load_family(cfg), "train")
    assert expected in str(err.value) and "\n" not in str(err.value)
