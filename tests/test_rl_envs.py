"""Meta-RL environments: navigation2d against hand computations, gymnax wrappers, the registry."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metarun.errors import UserError
from metarun.rl.envs import ENVS, GYMNAX_TASK_FIELDS, NavigationParams, get_env

# Compiles many small programs (tens of seconds on 2 cores): run in CI's second pass (--runslow).
pytestmark = pytest.mark.slow

KEY = jax.random.PRNGKey(0)


def test_navigation_reward_is_minus_distance_after_clipped_move():
    env = get_env("navigation2d")
    task = NavigationParams(goal=jnp.array([0.3, -0.2]))
    obs, state = env.reset(KEY, task)
    np.testing.assert_array_equal(obs, [0.0, 0.0])
    # (0.05, 0.5) is clipped to (0.05, 0.1).
    obs, state, reward, done = env.step(KEY, state, jnp.array([0.05, 0.5]), task)
    np.testing.assert_allclose(obs, [0.05, 0.1], atol=1e-7)
    np.testing.assert_allclose(reward, -np.hypot(0.25, 0.3), rtol=1e-6)
    assert not done
    # (-3, -0.02) is clipped to (-0.1, -0.02): position (-0.05, 0.08).
    obs, state, reward, done = env.step(KEY, state, jnp.array([-3.0, -0.02]), task)
    np.testing.assert_allclose(obs, [-0.05, 0.08], atol=1e-7)
    np.testing.assert_allclose(reward, -np.hypot(0.35, 0.28), rtol=1e-6)


def test_navigation_ends_within_001_of_goal_or_at_100_steps():
    env = get_env("navigation2d")
    task = NavigationParams(goal=jnp.array([0.1, -0.095]))
    _, state = env.reset(KEY, task)
    _, _, reward, done = env.step(KEY, state, jnp.array([0.1, -0.1]), task)
    assert bool(done) and float(reward) == pytest.approx(-0.005, abs=1e-6)
    _, _, _, done = env.step(KEY, state, jnp.array([0.1, -0.08]), task)  # 0.015 off in y
    assert not bool(done)
    far = NavigationParams(goal=jnp.array([0.5, 0.5]))
    _, state = env.reset(KEY, far)
    step = jax.jit(env.step)
    dones = []
    for _ in range(env.max_steps):
        _, state, _, done = step(KEY, state, jnp.array([0.0, 0.0]), far)
        dones.append(bool(done))
    assert env.max_steps == 100 and dones[-1] and not any(dones[:-1])


def test_navigation_goals_uniform_on_the_square():
    env = get_env("navigation2d")
    goals = jax.jit(jax.vmap(env.sample_task))(jax.random.split(KEY, 4000)).goal
    assert goals.shape == (4000, 2)
    assert float(goals.min()) >= -0.5 and float(goals.max()) <= 0.5
    # U[-0.5, 0.5]: mean 0 (se 0.0046), variance 1/12.
    np.testing.assert_allclose(goals.mean(0), [0.0, 0.0], atol=0.02)
    np.testing.assert_allclose(goals.var(0), [1 / 12, 1 / 12], rtol=0.08)


@pytest.mark.parametrize("name", sorted(GYMNAX_TASK_FIELDS))
def test_gymnax_wrapper_steps_keeps_its_task_and_tasks_differ(name):
    env = get_env(name)
    tasks = jax.jit(jax.vmap(env.sample_task))(jax.random.split(KEY, 64))
    flat = np.concatenate([np.asarray(x).reshape(64, -1) for x in jax.tree.leaves(tasks)], axis=1)
    distinct = np.unique(flat, axis=0)
    # BernoulliBandit has two tasks only (probabilities (0.1, 0.9) or (0.9, 0.1)); the others are continuous
    # or have many maze cells.
    assert len(distinct) >= (2 if name == "BernoulliBandit-misc" else 10)
    task = jax.tree.map(lambda x: x[3], tasks)
    obs, state = jax.jit(env.reset)(KEY, task)
    assert obs.shape == (env.obs_size,) and obs.dtype == jnp.float32
    action = jnp.int32(1) if env.discrete else jnp.array([0.05, 0.05])

    @jax.jit
    def run(state):
        def body(state, key):
            obs, state, reward, done = env.step(key, state, action, task)
            return state, (obs, reward, done, {f: getattr(state, f) for f in task})
        return jax.lax.scan(body, state, jax.random.split(KEY, env.max_steps))[1]

    obs, rewards, dones, task_seen = run(state)
    assert obs.shape == (env.max_steps, env.obs_size)
    for field, value in task.items():  # no auto-reset: the task never changes inside the episode
        np.testing.assert_array_equal(task_seen[field], jnp.broadcast_to(value, task_seen[field].shape))
    dones = np.asarray(dones)
    assert dones[-1] and not dones[:-1].any()  # none of these four terminates before its time limit here
    assert np.all(np.isfinite(rewards))


def _pulls(env, task, arm, n):
    """Rewards of n independent first pulls of `arm`."""
    @jax.jit
    def pull(keys):
        _, state = env.reset(KEY, task)
        return jax.vmap(lambda k: env.step(k, state, jnp.int32(arm), task)[2])(keys)
    return pull(jax.random.split(KEY, n))


def test_bandit_tasks_set_the_rewards():
    bern = get_env("BernoulliBandit-misc")
    tasks = jax.jit(jax.vmap(bern.sample_task))(jax.random.split(KEY, 400))
    p0 = np.asarray(tasks["reward_probs"][:, 0])
    np.testing.assert_allclose(np.unique(p0), [0.1, 0.9], rtol=1e-6)
    assert abs(np.mean(p0 > 0.5) - 0.5) < 0.1
    task = {"reward_probs": jnp.array([0.9, 0.1]), "exp_reward_best": jnp.array(0.9)}
    assert float(_pulls(bern, task, 0, 2000).mean()) == pytest.approx(0.9, abs=0.03)  # se 0.0067

    gauss = get_env("GaussianBandit-misc")
    mus = jax.jit(jax.vmap(gauss.sample_task))(jax.random.split(KEY, 2000))["mu"]
    assert float(mus.mean()) == pytest.approx(-1.0, abs=0.1) and float(mus.std()) == pytest.approx(1.0, abs=0.1)
    task = {"mu": jnp.array(2.5)}
    assert float(_pulls(gauss, task, 1, 500).mean()) == pytest.approx(2.5, abs=0.03)  # sigma_l = 0.1
    np.testing.assert_array_equal(_pulls(gauss, task, 0, 10), 0.0)


def test_point_robot_pays_when_the_goal_is_reached():
    env = get_env("PointRobot-misc")
    task = {"goal": jnp.array([0.0, 1.0])}
    _, state = env.reset(KEY, task)
    state = state.replace(pos=jnp.array([0.0, 0.9]))  # within goal_radius 0.2
    _, _, reward, _ = env.step(KEY, state, jnp.zeros(2), task)
    assert float(reward) == 1.0
    state = state.replace(pos=jnp.array([0.0, 0.5]))
    _, _, reward, _ = env.step(KEY, state, jnp.zeros(2), task)
    assert float(reward) == 0.0


def test_get_env_rejects_unknown_names_listing_valid_ones():
    with pytest.raises(UserError, match="navigation2d") as err:
        get_env("Navigation-v9")
    assert "Navigation-v9" in str(err.value) and "MetaMaze-misc" in str(err.value)
    assert set(ENVS) == {"navigation2d", *GYMNAX_TASK_FIELDS}
