"""Reference policies computed by our own code on the tasks evaluated: reference rows for results.json.

navigation_oracle_return: the policy that knows the goal (navigation2d).
bernoulli_thompson_*: Thompson sampling with independent Beta(1, 1) priors per arm, and
bernoulli_ucb_*: UCB1 (Auer et al. 2002) — the classical bandit learners RL² is compared with
  (Wang et al. 2016, Duan et al. 2016); `*_rewards` play given reward draws (the algorithm's own, from
  bernoulli_reward_uniforms), `*_return` their own.
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


def bernoulli_reward_uniforms(env_keys: jax.Array) -> jax.Array:
    """The uniforms behind the Bernoulli bandit's rewards on these env-step keys (any shape of keys).

    gymnax's BernoulliBandit `step_env` pays `jax.random.bernoulli(key, p[arm])`, which is
    `uniform(key) < p[arm]`: one uniform per step decides the reward of *every* arm. A player handed the
    uniforms of the algorithm's trials (metarun.rl.rollout.trial_env_keys) meets the same draws
    (common random numbers), so the return difference between them is a paired comparison.
    """
    flat = env_keys.reshape(-1, env_keys.shape[-1])
    return jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(flat).reshape(env_keys.shape[:-1])


def bernoulli_thompson_rewards(probs: jax.Array, uniforms: jax.Array, key: jax.Array) -> jax.Array:
    """[T] rewards of Thompson sampling (independent Beta(1, 1) priors) on arms paying 1 with probabilities
    `probs` [K], the arm pulled at step t paying `uniforms[t] < probs[arm]`; `key` draws the posterior samples.

    Each step draws θ_k ~ Beta(1 + wins_k, 1 + losses_k), pulls argmax θ, and updates that arm's counts.
    """
    arms = probs.shape[0]

    def body(carry, inputs):
        wins, losses = carry
        u, theta_key = inputs
        arm = jnp.argmax(jax.random.beta(theta_key, 1.0 + wins, 1.0 + losses))
        reward = (u < probs[arm]).astype(jnp.float32)
        hit = jax.nn.one_hot(arm, arms)
        return (wins + hit * reward, losses + hit * (1.0 - reward)), reward

    start = (jnp.zeros(arms), jnp.zeros(arms))
    return jax.lax.scan(body, start, (uniforms, jax.random.split(key, uniforms.shape[0])))[1]


def bernoulli_ucb_rewards(probs: jax.Array, uniforms: jax.Array) -> jax.Array:
    """[T] rewards of UCB1 (Auer et al. 2002) on the same terms: every arm once (in index order), then
    argmax of mean_k + sqrt(2 ln t / n_k). Deterministic given the uniforms."""
    arms = probs.shape[0]

    def body(carry, inputs):
        sums, counts = carry
        t, u = inputs
        bonus = jnp.sqrt(2.0 * jnp.log(jnp.maximum(t, 1).astype(jnp.float32)) / jnp.maximum(counts, 1.0))
        score = jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0) + bonus, jnp.inf)
        arm = jnp.argmax(score)  # untried arms (score inf) first, in index order
        reward = (u < probs[arm]).astype(jnp.float32)
        hit = jax.nn.one_hot(arm, arms)
        return (sums + hit * reward, counts + hit), reward

    start = (jnp.zeros(arms), jnp.zeros(arms))
    return jax.lax.scan(body, start, (jnp.arange(uniforms.shape[0]), uniforms))[1]


def bernoulli_thompson_return(probs: jax.Array, key: jax.Array, horizon: int, runs: int = 20) -> jax.Array:
    """Mean return over `runs` runs of `horizon` pulls of Thompson sampling, on its own reward draws."""
    draw_key, theta_key = jax.random.split(key)
    uniforms = jax.random.uniform(draw_key, (runs, horizon))
    rewards = jax.vmap(bernoulli_thompson_rewards, (None, 0, 0))(probs, uniforms, jax.random.split(theta_key, runs))
    return rewards.sum(1).mean()


def bernoulli_ucb_return(probs: jax.Array, key: jax.Array, horizon: int, runs: int = 20) -> jax.Array:
    """Mean return over `runs` runs of `horizon` pulls of UCB1, on its own reward draws."""
    uniforms = jax.random.uniform(key, (runs, horizon))
    return jax.vmap(bernoulli_ucb_rewards, (None, 0))(probs, uniforms).sum(1).mean()
