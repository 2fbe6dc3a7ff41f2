"""Reference policies computed by our own code on the tasks evaluated: reference rows for results.json.

navigation_oracle_return: the policy that knows the goal (navigation2d).
bernoulli_thompson_return: Thompson sampling with independent Beta(1, 1) priors per arm, and
bernoulli_ucb_return: UCB1 (Auer et al. 2002) — the classical bandit learners RL² is compared with
  (Wang et al. 2016, Duan et al. 2016).
Pure JAX, vmappable over tasks.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from metarun.rl.envs import Env, NavigationParams


def navigation_oracle_return(env: Env, goal: jax.Array) -> jax.Array:
    """The return over one episode of the policy action = goal − position (the env clips it to the
    maximum speed), through the env's own dynamics: the best any policy can do on this goal."""
    params = NavigationParams(goal=goal)
    key = jax.random.PRNGKey(0)  # navigation2d is deterministic; the key is unused
    _, state = env.reset(key, params)

    def body(carry, _):
        state, alive, total = carry
        _, state, reward, done = env.step(key, state, goal - state.pos, params)
        return (state, alive & ~done, total + reward * alive), None

    carry = (state, jnp.array(True), jnp.zeros((), jnp.float32))
    return jax.lax.scan(body, carry, None, length=env.max_steps)[0][2]


def bernoulli_thompson_return(probs: jax.Array, key: jax.Array, horizon: int, runs: int = 20) -> jax.Array:
    """Mean return over `runs` runs of Thompson sampling on arms paying 1 with probabilities `probs` [K].

    Each step draws θ_k ~ Beta(1 + wins_k, 1 + losses_k), pulls argmax θ, and updates that arm's counts.
    """
    arms = probs.shape[0]

    def one_run(run_key):
        def body(carry, step_key):
            wins, losses = carry
            theta_key, reward_key = jax.random.split(step_key)
            arm = jnp.argmax(jax.random.beta(theta_key, 1.0 + wins, 1.0 + losses))
            reward = jax.random.bernoulli(reward_key, probs[arm]).astype(jnp.float32)
            hit = jax.nn.one_hot(arm, arms)
            return (wins + hit * reward, losses + hit * (1.0 - reward)), reward

        start = (jnp.zeros(arms), jnp.zeros(arms))
        return jax.lax.scan(body, start, jax.random.split(run_key, horizon))[1].sum()

    return jax.vmap(one_run)(jax.random.split(key, runs)).mean()


def bernoulli_ucb_return(probs: jax.Array, key: jax.Array, horizon: int, runs: int = 20) -> jax.Array:
    """Mean return over `runs` runs of UCB1 on arms paying 1 with probabilities `probs` [K]: every arm
    once, then argmax of mean_k + sqrt(2 ln t / n_k)."""
    arms = probs.shape[0]

    def one_run(run_key):
        def body(carry, inputs):
            sums, counts = carry
            t, step_key = inputs
            bonus = jnp.sqrt(2.0 * jnp.log(jnp.maximum(t, 1).astype(jnp.float32)) / jnp.maximum(counts, 1.0))
            score = jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0) + bonus, jnp.inf)
            arm = jnp.argmax(score)  # untried arms (score inf) first, in index order
            reward = jax.random.bernoulli(step_key, probs[arm]).astype(jnp.float32)
            hit = jax.nn.one_hot(arm, arms)
            return (sums + hit * reward, counts + hit), reward

        start = (jnp.zeros(arms), jnp.zeros(arms))
        return jax.lax.scan(body, start, (jnp.arange(horizon), jax.random.split(run_key, horizon)))[1].sum()

    return jax.vmap(one_run)(jax.random.split(key, runs)).mean()
