"""Rollouts: shapes, determinism from the key, masking after termination, RL² trials and log-prob replays."""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metarun.rl.envs import Env, NavigationParams, get_env
from metarun.rl.policies import Categorical, CategoricalMLPPolicy, DiagGaussian, GaussianMLPPolicy, GRUPolicy
from metarun.rl.rollout import policy_log_probs, recurrent_replay, rollout, rollout_recurrent

# Compiles many small programs (tens of seconds on 2 cores): run in CI's second pass (--runslow).
pytestmark = pytest.mark.slow

KEY = jax.random.PRNGKey(0)


def countdown_env(episode_len: int) -> Env:
    """Deterministic toy: obs = [step count], reward = action + 10 * task, done after episode_len steps."""

    def reset(key, env_params):
        return jnp.zeros(1), jnp.zeros((), jnp.int32)

    def step(key, t, action, env_params):
        t = t + 1
        return t.astype(jnp.float32)[None], t, action.astype(jnp.float32) + 10.0 * env_params, t >= episode_len

    return Env("countdown", reset, step, lambda key: jnp.float32(1.0), obs_size=1, action_size=3, discrete=True,
               max_steps=episode_len)


def test_gaussian_rollout_shapes_determinism_and_log_probs():
    env = get_env("navigation2d")
    policy = GaussianMLPPolicy(action_size=2)
    params = policy.init(KEY, jnp.zeros((1, 2)))
    assert params["params"]["dense0"]["kernel"].shape == (2, 100) and params["params"]["dense1"]["kernel"].shape == (100, 100)
    task = NavigationParams(goal=jnp.array([0.2, -0.3]))
    run = jax.jit(partial(rollout, env, policy.apply), static_argnums=(3, 4))
    traj = run(params, task, jax.random.PRNGKey(1), 100, 8)
    assert traj.obs.shape == (100, 8, 2) and traj.actions.shape == (100, 8, 2)
    for x in (traj.rewards, traj.dones, traj.valid, traj.log_probs):
        assert x.shape == (100, 8)
    again = run(params, task, jax.random.PRNGKey(1), 100, 8)
    other = run(params, task, jax.random.PRNGKey(2), 100, 8)
    for a, b in zip(traj, again):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(traj.actions, other.actions)
    # The recorded log-probs are the policy's, and the rewards match the env's on the recorded positions.
    np.testing.assert_allclose(traj.log_probs, policy_log_probs(policy.apply, params, traj), rtol=1e-5, atol=1e-5)
    next_pos = traj.obs[0] + jnp.clip(traj.actions[0], -0.1, 0.1)
    np.testing.assert_allclose(traj.rewards[0], -jnp.linalg.norm(next_pos - task.goal, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(traj.obs[1], next_pos, atol=1e-6)
    # Time limit: the last step is done, nothing before it (the goal tolerance 0.01 is hard to hit at random).
    np.testing.assert_array_equal(traj.dones[-1], 1.0)
    np.testing.assert_array_equal(traj.valid, 1.0)


def test_rollout_masks_steps_after_termination():
    env = countdown_env(episode_len=3)
    policy = CategoricalMLPPolicy(n_actions=3, hidden_sizes=(8,))
    params = policy.init(KEY, jnp.zeros((1, 1)))
    traj = jax.jit(partial(rollout, env, policy.apply), static_argnums=(3, 4))(params, jnp.float32(1.0), KEY, 6, 4)
    assert traj.actions.shape == (6, 4) and traj.actions.dtype == jnp.int32
    np.testing.assert_array_equal(traj.valid, np.repeat([[1], [1], [1], [0], [0], [0]], 4, axis=1))
    np.testing.assert_array_equal(traj.dones, np.repeat([[0], [0], [1], [0], [0], [0]], 4, axis=1))
    np.testing.assert_array_equal(traj.rewards, (traj.actions + 10.0) * traj.valid)
    np.testing.assert_array_equal(traj.obs[:3, :, 0], np.repeat([[0], [1], [2]], 4, axis=1))


def test_rl2_trial_resets_env_but_carries_hidden_state():
    env = countdown_env(episode_len=4)
    policy = GRUPolicy(action_size=3, discrete=True, hidden_size=16)
    carry0 = policy.initial_carry()
    params = policy.init(KEY, carry0[None], jnp.zeros((1, 1)), jnp.zeros(1, jnp.int32), jnp.zeros(1), jnp.zeros(1))
    run = jax.jit(partial(rollout_recurrent, env, policy.apply), static_argnums=(3, 4))
    traj = run(params, jnp.float32(1.0), KEY, 10, 5, carry0)
    assert traj.obs.shape == (10, 5, 1) and traj.actions.shape == (10, 5)
    # Episodes of 4 steps inside a trial of 10: the env restarts at 0 after each done.
    np.testing.assert_array_equal(traj.obs[:, 0, 0], [0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    np.testing.assert_array_equal(traj.dones[:, 0], [0, 0, 0, 1, 0, 0, 0, 1, 0, 0])
    np.testing.assert_array_equal(traj.valid, 1.0)
    np.testing.assert_array_equal(traj.rewards, traj.actions + 10.0)
    again = run(params, jnp.float32(1.0), KEY, 10, 5, carry0)
    np.testing.assert_array_equal(traj.actions, again.actions)
    # Replaying the inputs (obs, previous action, reward, done) from the trial's start gives the same log-probs.
    replay = recurrent_replay(policy.apply, params, traj, carry0)[0]
    np.testing.assert_allclose(replay, traj.log_probs, rtol=1e-5, atol=1e-6)
    # The hidden state is not reset at the episode boundary: the same step-4 inputs (first step of the
    # second episode) from a zero hidden state give other action probabilities.
    _, fresh = policy.apply(params, jnp.broadcast_to(carry0, (5, 16)), traj.obs[4], traj.actions[3],
                            traj.rewards[3], traj.dones[3])
    assert not np.allclose(fresh.log_prob(traj.actions[4]), traj.log_probs[4], atol=1e-4)


def test_gru_policy_reads_previous_reward_and_continuous_head():
    policy = GRUPolicy(action_size=2, discrete=False, hidden_size=8)
    carry = policy.initial_carry((3,))
    args = (jnp.zeros((3, 2)), jnp.zeros((3, 2)), jnp.zeros(3), jnp.zeros(3))
    params = policy.init(KEY, carry, *args)
    h0, d0 = policy.apply(params, carry, *args)
    h1, d1 = policy.apply(params, carry, args[0], args[1], jnp.ones(3), args[3])
    assert isinstance(d0, DiagGaussian) and d0.mean.shape == (3, 2) and h0.shape == (3, 8)
    assert not np.allclose(h0, h1)
    np.testing.assert_array_equal(d0.log_std, 0.0)


def test_distributions_log_probs_match_closed_forms():
    g = DiagGaussian(jnp.array([[0.5, -1.0]]), jnp.log(jnp.array([[2.0, 0.5]])))
    a = jnp.array([[1.5, -1.0]])
    expected = sum(-0.5 * ((x - m) / s) ** 2 - np.log(s) - 0.5 * np.log(2 * np.pi)
                   for x, m, s in [(1.5, 0.5, 2.0), (-1.0, -1.0, 0.5)])
    np.testing.assert_allclose(g.log_prob(a), [expected], rtol=1e-6)
    c = Categorical(jnp.log(jnp.array([[0.2, 0.3, 0.5]])))
    np.testing.assert_allclose(c.log_prob(jnp.array([2])), [np.log(0.5)], rtol=1e-6)
    np.testing.assert_allclose(c.entropy(), [-(0.2 * np.log(0.2) + 0.3 * np.log(0.3) + 0.5 * np.log(0.5))], rtol=1e-6)
    draws = jax.vmap(lambda k: c.sample(k))(jax.random.split(KEY, 20000))[:, 0]
    np.testing.assert_allclose(np.bincount(np.asarray(draws), minlength=3) / 20000, [0.2, 0.3, 0.5], atol=0.015)
    gd = jax.vmap(lambda k: g.sample(k))(jax.random.split(KEY, 20000))[:, 0]
    np.testing.assert_allclose(gd.mean(0), [0.5, -1.0], atol=0.05)
    np.testing.assert_allclose(gd.std(0), [2.0, 0.5], rtol=0.03)


def test_rl2_rollout_vmaps_over_gymnax_bandit_tasks():
    bandit = get_env("BernoulliBandit-misc")
    tasks = jax.jit(jax.vmap(bandit.sample_task))(jax.random.split(KEY, 3))
    gru = GRUPolicy(action_size=2, discrete=True, hidden_size=8)
    carry0 = gru.initial_carry()
    params = jax.jit(gru.init)(KEY, carry0[None], jnp.zeros((1, bandit.obs_size)), jnp.zeros(1, jnp.int32), jnp.zeros(1),
                      jnp.zeros(1))
    traj = jax.jit(jax.vmap(lambda task, key: rollout_recurrent(bandit, gru.apply, params, task, key, 100, 2, carry0)))(
        tasks, jax.random.split(KEY, 3))
    assert traj.rewards.shape == (3, 100, 2) and set(np.unique(traj.rewards)) <= {0.0, 1.0}
    np.testing.assert_array_equal(traj.dones[:, -1], 1.0)  # the 100-pull trial is one episode
    np.testing.assert_array_equal(traj.dones[:, :-1], 0.0)


def test_trial_env_keys_replay_the_bandit_rewards_of_a_recurrent_rollout():
    """The reward of every step equals uniform(its env key) < p[pulled arm]: the references can replay the
    very draws of the algorithm's trials (metarun.rl.references.bernoulli_reward_uniforms)."""
    from metarun.rl.references import bernoulli_reward_uniforms
    from metarun.rl.rollout import trial_env_keys

    bandit = get_env("BernoulliBandit-misc")
    task = {"reward_probs": jnp.array([0.3, 0.6], jnp.float32), "exp_reward_best": jnp.float32(0.6)}
    gru = GRUPolicy(action_size=2, discrete=True, hidden_size=8)
    carry0 = gru.initial_carry()
    params = gru.init(KEY, carry0[None], jnp.zeros((1, bandit.obs_size)), jnp.zeros(1, jnp.int32), jnp.zeros(1),
                      jnp.zeros(1))
    key = jax.random.PRNGKey(7)
    traj = jax.jit(lambda k: rollout_recurrent(bandit, gru.apply, params, task, k, 60, 3, carry0))(key)
    uniforms = np.asarray(bernoulli_reward_uniforms(trial_env_keys(key, 60, 3)))
    assert uniforms.shape == (60, 3)
    arms = np.asarray(traj.actions)
    assert 0 < arms.mean() < 1  # both arms pulled: the check covers each arm's threshold
    expected = (uniforms < np.array([0.3, 0.6], np.float32)[arms]).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(traj.rewards), expected)
