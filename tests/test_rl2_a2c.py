"""rl2's baseline=value (A2C's critic): its advantages and targets against their definitions, a zero critic
against baseline=none, the critic's gradient against numpy, the entropy bonus, learning, and refusals."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import compose
from metarun.algos.rl2 import critic_targets
from metarun.build import load_family, make_algo
from metarun.errors import UserError
from metarun.rl.rollout import Trajectories, recurrent_replay

GAMMA = 0.9


def tiny(*overrides):
    return compose(["experiment=rl2_bernoulli_bandit", "dataset.horizon=12", "dataset.fast_batch=4",
                    f"dataset.gamma={GAMMA}", "learner.hidden_size=8", "train.progress=false", *overrides])


def fake_traj(rewards):
    T, N = rewards.shape
    zeros = jnp.zeros((T, N))
    return Trajectories(jnp.zeros((T, N, 1)), jnp.zeros((T, N), jnp.int32), jnp.asarray(rewards), zeros,
                        jnp.ones((T, N)), zeros)


def numpy_returns(rewards, gamma):
    out, running = np.zeros_like(rewards), np.zeros(rewards.shape[1])
    for t in reversed(range(rewards.shape[0])):
        running = rewards[t] + gamma * running
        out[t] = running
    return out


def test_critic_targets_are_returns_minus_values_at_lambda_1_and_td_errors_at_lambda_0():
    rng = np.random.default_rng(0)
    rewards, values = rng.normal(size=(7, 3)).astype(np.float32), rng.normal(size=(7, 3)).astype(np.float32)
    traj = fake_traj(rewards)
    adv, targets = critic_targets(traj, jnp.asarray(values), GAMMA, 1.0)
    returns = numpy_returns(rewards.astype(np.float64), GAMMA)
    np.testing.assert_allclose(adv, returns - values, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(targets, returns, rtol=1e-5, atol=1e-5)
    adv0, _ = critic_targets(traj, jnp.asarray(values), GAMMA, 0.0)
    next_values = np.concatenate([values[1:], np.zeros((1, 3), np.float32)])  # V past the trial's end is 0
    np.testing.assert_allclose(adv0, rewards + GAMMA * next_values - values, rtol=1e-5, atol=1e-5)


def sample_trial(cfg, algo, params, seed=3):
    family = load_family(cfg)
    task = family.sampler("train")({}, jax.random.PRNGKey(seed))
    return task, algo.adapt(params, {}, task.support, jax.random.PRNGKey(seed + 1))


def test_a_zero_critic_gives_baseline_none_policy_gradient_and_the_critic_gradient_matches_numpy():
    """V = 0 at init: with λ = 1 the advantages are the returns, as baseline=none's, so the policy gradients agree
    (the critic does not train the GRU); the critic's own gradient is value_coef · 2 · scale · mean((V − G) h)."""
    cfg = tiny("algo.baseline=value", "algo.value_coef=0.5", "dataset.gae_lambda=1.0")
    family = load_family(cfg)
    critic = make_algo(cfg, family, "train")
    none = make_algo(tiny("algo.baseline=none"), family, "train")
    params, _ = critic.init(jax.random.PRNGKey(0), None)
    assert set(params) == {"policy", "value"} and float(jnp.abs(params["value"]["kernel"]).sum()) == 0.0
    task, traj = sample_trial(cfg, critic, params)
    g_critic = jax.grad(lambda p: critic.loss(p, {}, traj, task.query, None)[0])(params)
    g_none = jax.grad(lambda p: none.loss(p, {}, traj, task.query, None)[0])(params["policy"])
    for a, b in zip(jax.tree.leaves(g_critic["policy"]), jax.tree.leaves(g_none)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # the critic's gradient against numpy, from the replayed hidden states
    apply = lambda p, h, o, pa, pr, pd: critic_policy_apply(cfg, family)(p, h, o, pa, pr, pd)  # noqa: E731
    _, hidden, _ = recurrent_replay(apply, params["policy"], traj, jnp.zeros((8,)))
    h, G = np.asarray(hidden, np.float64), numpy_returns(np.asarray(traj.rewards, np.float64), GAMMA)
    scale = (1 - GAMMA ** 12) / (1 - GAMMA)
    expected_kernel = 0.5 * 2 * scale * np.mean((0.0 - G)[..., None] * h, axis=(0, 1))
    np.testing.assert_allclose(g_critic["value"]["kernel"], expected_kernel, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g_critic["value"]["bias"], 0.5 * 2 * scale * np.mean(-G), rtol=1e-4)


def critic_policy_apply(cfg, family):
    from metarun.learners import build_learner
    from metarun.learners.rl_policies import RL2Inputs

    policy = build_learner(cfg.learner, family.head_dim("train"), discrete=True)
    return lambda p, h, o, pa, pr, pd: policy.apply({"params": p}, RL2Inputs(h, o, pa, pr, pd))


def test_the_entropy_bonus_lowers_the_loss_by_its_weighted_mean_entropy():
    cfg = tiny("algo.baseline=time")
    family = load_family(cfg)
    plain, bonus = make_algo(cfg, family, "train"), make_algo(tiny("algo.entropy_coef=0.1"), family, "train")
    params, _ = plain.init(jax.random.PRNGKey(0), None)
    task, traj = sample_trial(cfg, plain, params)
    loss_plain, _ = plain.loss(params, {}, traj, task.query, None)
    loss_bonus, metrics = bonus.loss(params, {}, traj, task.query, None)
    _, _, entropy = recurrent_replay(critic_policy_apply(cfg, family), params, traj, jnp.zeros((8,)))
    assert float(metrics["entropy"]) == pytest.approx(float(entropy.mean()), rel=1e-5)
    assert float(loss_bonus) == pytest.approx(float(loss_plain) - 0.1 * float(entropy.mean()), rel=1e-5, abs=1e-6)
    assert 0.0 < float(entropy.mean()) <= np.log(2) + 1e-6  # two arms


@pytest.mark.slow  # trains 60 meta-steps (~30 s here)
def test_a2c_learns_the_bandit_and_its_critic_fits_the_returns():
    from metarun.build import initial_state
    from metarun.core import make_eval_batch, make_train_chunk

    cfg = compose(["experiment=rl2_bernoulli_bandit", "dataset.horizon=20", "learner.hidden_size=16",
                   "dataset.fast_batch=8", "train.meta_batch=8", "meta_opt.lr=0.01", "algo.baseline=value",
                   "train.progress=false"])
    family = load_family(cfg)
    algo, optimizer, state = initial_state(cfg, family)
    eval_batch = make_eval_batch(make_algo(cfg, family, "eval"), family.sampler("test"))
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(1234), i))(jnp.arange(40))
    before = float(np.mean(jax.device_get(eval_batch(state.params, state.algo_state, {}, keys))["return"]))
    chunk = make_train_chunk(algo, optimizer, family.sampler("train"), cfg.train.meta_batch, 60)
    state, metrics = chunk(state, {})
    after = float(np.mean(jax.device_get(eval_batch(state.params, state.algo_state, {}, keys))["return"]))
    # 20 pulls: random play earns 10, always pulling the better arm 18 (baseline=time: 11.4 -> 16.2)
    assert after > 13.0 and after > before + 2.0, (before, after)
    value_loss = np.asarray(metrics["value_loss"]).ravel()
    # the critic learns the returns: its error falls well below the zero critic's of the first step (E[G²])
    assert value_loss[-10:].mean() < 0.6 * value_loss[0], value_loss


@pytest.mark.parametrize("overrides, expected", [
    (["algo.value_coef=-1"], "algo.value_coef=-1.0 and algo.entropy_coef=0.0 must be >= 0"),
    (["algo.entropy_coef=-0.1"], "algo.value_coef=0.5 and algo.entropy_coef=-0.1 must be >= 0"),
    (["algo.baseline=critic"], "algo.baseline=critic is unknown; expected one of: time, linear, none, value"),
])
def test_a2c_refusals_are_one_line(overrides, expected):
    cfg = tiny(*overrides)
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")) as e:
        make_algo(cfg, load_family(cfg), "train")
    assert "\n" not in str(e.value)
