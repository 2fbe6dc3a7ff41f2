"""On-device rollouts: lax.scan over time, vmap over trajectories of one task (feed-forward and RL² recurrent)."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from metarun.rl.envs import Env


class Trajectories(NamedTuple):
    """A batch of N trajectories of T steps, time-major.

    obs [T, N, obs_size]: the observation each action was taken on.
    actions [T, N] int32 (discrete) or [T, N, action_size] (continuous, as sampled, before env clipping).
    rewards [T, N]: zero where not valid.
    dones [T, N] float: 1 where that step ended an episode (valid steps only).
    valid [T, N] float: 1 for steps up to and including the terminal one, 0 after it
        (all ones for RL² trials, which reset and continue).
    log_probs [T, N]: log π(a_t | ·) under the behaviour policy (differentiable w.r.t. its params).
    """

    obs: jax.Array
    actions: jax.Array
    rewards: jax.Array
    dones: jax.Array
    valid: jax.Array
    log_probs: jax.Array


def _where(cond: jax.Array, x: Any, y: Any) -> Any:
    """Per-trajectory select between pytrees with leading axis N."""
    return jax.tree.map(lambda a, b: jnp.where(cond.reshape(cond.shape + (1,) * (a.ndim - cond.ndim)), a, b), x, y)


def rollout(env: Env, policy_apply: Callable, policy_params: Any, env_params: Any, key: jax.Array,
            horizon: int, n_traj: int) -> Trajectories:
    """Run n_traj episodes of one task for `horizon` steps with a feed-forward policy.

    Steps after an episode's termination are still computed (fixed shapes) but masked: valid = 0,
    reward = 0, done = 0.

    Args:
        env: the environment.
        policy_apply: (policy_params, obs [N, obs_size]) -> distribution with .sample(key), .log_prob(a).
        policy_params: the policy's variables.
        env_params: one task (from env.sample_task); shared by all trajectories.
        key: PRNG key; the result is a deterministic function of it.
        horizon: T, number of steps (static).
        n_traj: N, number of trajectories (static).

    Returns:
        Trajectories with leading axes [T, N].
    """
    reset_key, scan_key = jax.random.split(key)
    obs, state = jax.vmap(env.reset, (0, None))(jax.random.split(reset_key, n_traj), env_params)
    env_step = jax.vmap(env.step, (0, 0, 0, None))

    def body(carry, step_key):
        obs, state, alive = carry
        act_key, env_key = jax.random.split(step_key)
        dist = policy_apply(policy_params, obs)
        # Actions are data for REINFORCE: gradients flow through log_prob (score function), not the env.
        action = jax.lax.stop_gradient(dist.sample(act_key))
        log_prob = dist.log_prob(action)
        next_obs, next_state, reward, done = env_step(jax.random.split(env_key, n_traj), state, action, env_params)
        done = done & alive
        valid = alive.astype(jnp.float32)
        out = Trajectories(obs, action, reward * valid, done.astype(jnp.float32), valid, log_prob)
        return (next_obs, next_state, alive & ~done), out

    alive = jnp.ones(n_traj, bool)
    _, traj = jax.lax.scan(body, (obs, state, alive), jax.random.split(scan_key, horizon))
    return traj


def _initial_prev(env: Env, n_traj: int):
    """RL² inputs before the first step of a trial: zero action, zero reward, not done."""
    if env.discrete:
        prev_action = jnp.zeros(n_traj, jnp.int32)
    else:
        prev_action = jnp.zeros((n_traj, env.action_size), jnp.float32)
    return prev_action, jnp.zeros(n_traj, jnp.float32), jnp.zeros(n_traj, jnp.float32)


def _broadcast_carry(init_carry: Any, n_traj: int) -> Any:
    return jax.tree.map(lambda c: jnp.broadcast_to(c, (n_traj, *c.shape)), init_carry)


def rollout_recurrent(env: Env, policy_apply: Callable, policy_params: Any, env_params: Any, key: jax.Array,
                      horizon: int, n_traj: int, init_carry: Any) -> Trajectories:
    """Run n_traj RL² trials of one task: `horizon` steps, resetting the env (same task) whenever an
    episode ends while the policy's hidden state carries on across episodes.

    Args:
        env: the environment.
        policy_apply: (policy_params, carry, obs, prev_action, prev_reward, prev_done) -> (carry, dist),
            all batched over N (e.g. GRUPolicy.apply).
        policy_params: the policy's variables.
        env_params: one task; shared by all trajectories and all episodes of a trial.
        key: PRNG key; the result is a deterministic function of it.
        horizon: T, steps per trial (e.g. n_episodes * env.max_steps); static.
        n_traj: N, number of trials; static.
        init_carry: the hidden state of ONE trial at its start (e.g. GRUPolicy.initial_carry()).

    Returns:
        Trajectories [T, N] with valid = 1 everywhere and dones marking episode ends inside the trial.
    """
    reset_key, step_keys = _trial_keys(key, horizon)
    obs, state = jax.vmap(env.reset, (0, None))(jax.random.split(reset_key, n_traj), env_params)
    env_reset = jax.vmap(env.reset, (0, None))
    env_step = jax.vmap(env.step, (0, 0, 0, None))

    def body(carry, step_key):
        h, obs, state, prev_action, prev_reward, prev_done = carry
        act_key, env_key, new_ep_key = _split_trial_step_key(step_key)
        h, dist = policy_apply(policy_params, h, obs, prev_action, prev_reward, prev_done)
        action = jax.lax.stop_gradient(dist.sample(act_key))
        log_prob = dist.log_prob(action)
        next_obs, next_state, reward, done = env_step(jax.random.split(env_key, n_traj), state, action, env_params)
        reset_obs, reset_state = env_reset(jax.random.split(new_ep_key, n_traj), env_params)
        next_obs, next_state = _where(done, (reset_obs, reset_state), (next_obs, next_state))
        done = done.astype(jnp.float32)
        out = Trajectories(obs, action, reward, done, jnp.ones_like(reward), log_prob)
        return (h, next_obs, next_state, action, reward, done), out

    carry = (_broadcast_carry(init_carry, n_traj), obs, state, *_initial_prev(env, n_traj))
    _, traj = jax.lax.scan(body, carry, step_keys)
    return traj


def _trial_keys(key: jax.Array, horizon: int):
    """(the reset key, [T] per-step keys) of `rollout_recurrent` for its key."""
    reset_key, scan_key = jax.random.split(key)
    return reset_key, jax.random.split(scan_key, horizon)


def _split_trial_step_key(step_key: jax.Array):
    """(action key, env-step key, new-episode key) of one step of `rollout_recurrent`."""
    return jax.random.split(step_key, 3)


def trial_env_keys(key: jax.Array, horizon: int, n_traj: int) -> jax.Array:
    """[T, N] the keys `rollout_recurrent(..., key, horizon, n_traj, ...)` hands `env.step` at step t of trial n.

    An env whose step draws its outcome from its key alone (the Bernoulli bandit) can be replayed from these:
    the reference players of metarun.rl.references then meet the very draws the algorithm's trials met.
    """
    _, step_keys = _trial_keys(key, horizon)
    return jax.vmap(lambda k: jax.random.split(_split_trial_step_key(k)[1], n_traj))(step_keys)


def later_episodes_return(per_episode: jax.Array) -> jax.Array:
    """RL²'s score of a trial from its per-episode returns [episodes]: the mean over the episodes after the
    first (what the hidden state could learn from), or the first when the trial has one episode. rl2's
    `return` and the bandit references scored on its draws (families/rl.py) both use it."""
    return per_episode[1:].mean() if per_episode.shape[0] > 1 else per_episode[0]


def policy_log_probs(policy_apply: Callable, policy_params: Any, traj: Trajectories) -> jax.Array:
    """log π_θ(a_t|s_t) [T, N] of a feed-forward policy on recorded trajectories (e.g. after adaptation)."""
    return policy_apply(policy_params, traj.obs).log_prob(traj.actions)


def recurrent_replay(policy_apply: Callable, policy_params: Any, traj: Trajectories, init_carry: Any):
    """Replays the trial's inputs from its start: (log π_θ(a_t|history) [T, N], the hidden state after reading
    step t's inputs [T, N, ...] — what the action distribution of step t was computed from, so a value head
    on it is V(history up to t) — and the distributions' entropies [T, N])."""
    n_traj = traj.rewards.shape[1]
    prev_action, prev_reward, prev_done = _initial_prev_like(traj)
    shift = lambda x, x0: jnp.concatenate([x0[None], x[:-1]], 0)  # input at t is what happened at t-1
    inputs = (traj.obs, shift(traj.actions, prev_action), shift(traj.rewards, prev_reward),
              shift(traj.dones, prev_done), traj.actions)

    def body(h, xs):
        obs, pa, pr, pd, action = xs
        h, dist = policy_apply(policy_params, h, obs, pa, pr, pd)
        return h, (dist.log_prob(action), h, dist.entropy())

    _, out = jax.lax.scan(body, _broadcast_carry(init_carry, n_traj), inputs)
    return out


def _initial_prev_like(traj: Trajectories):
    zeros = jnp.zeros_like(traj.rewards[0])
    return jnp.zeros_like(traj.actions[0]), zeros, zeros
