"""RL² (Duan et al. 2016; Wang et al. 2016): adaptation in the hidden state of a recurrent policy.

adapt: run `fast_batch` trials of `episodes_per_trial` episodes of the task with the GRU policy
  (its hidden state carries across the trial's episodes; the env resets, the task stays). No gradient
  step: the trials are recorded as data (rolled out with stop_gradient(params)).
loss: REINFORCE over the whole trial (returns discounted across episode boundaries: the trial is one
  long episode, as in RL²), log π replayed from the trial's start with the meta-parameters; the
  baseline is `time` (the mean return-to-go over the task's trials at the same step, an A2C-like
  critic without a value head), `linear` (the linear feature baseline) or `none`.
Metrics: `return` = mean per-episode return over the episodes after the first (all of them when a
trial has one episode, e.g. a 100-pull bandit), `return_ep{i}` per episode, `loss`.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from metarun.algos.base import Collaborators, MetaAlgorithm
from metarun.errors import UserError
from metarun.learners.rl_policies import RL2Inputs
from metarun.registry import register
from metarun.rl.policy_gradient import discounted_returns, normalize_advantages, reinforce_loss
from metarun.rl.rollout import recurrent_log_probs

BASELINES = ("time", "linear", "none")


def episode_returns(traj, episodes: int) -> jax.Array:
    """[episodes] mean undiscounted return of the i-th episode of the trials (episodes past the
    `episodes`-th, when some ended early, are not counted)."""
    index = jnp.cumsum(traj.dones, 0) - traj.dones  # episode index of each step: ends counted before it
    per = [jnp.sum(traj.rewards * (index == i), 0).mean() for i in range(episodes)]
    return jnp.stack(per)


def trial_advantages(traj, gamma: float, baseline: str, family) -> jax.Array:
    """Advantages over whole trials [T, N], normalised; constants for the gradient."""
    if baseline == "linear":
        adv = family.advantages(traj)
    else:
        returns = discounted_returns(traj.rewards, traj.valid, gamma)
        if baseline == "time":
            returns = returns - returns.mean(1, keepdims=True)
        adv = normalize_advantages(returns, traj.valid)
    return jax.lax.stop_gradient(adv)


def rl2(policy, family, episodes: int, baseline: str = "time", record: bool = False, info=None) -> MetaAlgorithm:
    """Builds RL² over a recurrent policy (metarun.learners.rl_policies.GRU) and an `rl` family.

    meta_params: the policy's params; algo_state: {}.
    record (evaluation): also `_task`, the task's parameters as a vector, from which the family
    computes its reference rows (bandit: oracle, Thompson sampling, regrets) on the same tasks.
    """
    env = family.env
    init_carry = policy.initial_carry()

    def apply(params, h, obs, prev_action, prev_reward, prev_done):
        return policy.apply({"params": params}, RL2Inputs(h, obs, prev_action, prev_reward, prev_done))

    def init(key, task):
        del task
        prev_action = jnp.zeros((1,), jnp.int32) if env.discrete else jnp.zeros((1, env.action_size), jnp.float32)
        x = RL2Inputs(policy.initial_carry((1,)), jnp.zeros((1, env.obs_size), jnp.float32), prev_action,
                      jnp.zeros((1,), jnp.float32), jnp.zeros((1,), jnp.float32))
        return policy.init(key, x)["params"], {}

    def adapt(meta_params, algo_state, support, key):
        del algo_state
        return family.rollout_trial(apply, jax.lax.stop_gradient(meta_params), support.env_params, key, episodes,
                                    init_carry)

    def loss(meta_params, algo_state, traj, query, key):
        del algo_state, key  # the trial recorded in adapt is the data of the outer loss
        log_probs = recurrent_log_probs(apply, meta_params, traj, init_carry)
        total = reinforce_loss(log_probs, trial_advantages(traj, family.settings.gamma, baseline, family), traj.valid)
        per_episode = episode_returns(traj, episodes)
        later = per_episode[1:].mean() if episodes > 1 else per_episode[0]
        metrics = {"loss": total, "return": later, **{f"return_ep{i + 1}": r for i, r in enumerate(per_episode)}}
        if record:
            metrics["_task"] = family.task_vector(query.env_params)
        return total, metrics

    return MetaAlgorithm(init=init, adapt=adapt, loss=loss, info=info or {})


@dataclass
class RL2Config:
    name: str = "rl2"
    episodes_per_trial: int = 2    # episodes of one task the hidden state carries across
    baseline: str = "time"         # time | linear | none (see trial_advantages)


@register("algo", "rl2", schema=RL2Config)
def build(a, c: Collaborators) -> MetaAlgorithm:
    if getattr(c.family, "kind", None) != "rl":
        raise UserError(f"algo=rl2 needs an RL environment (dataset=bernoulli_bandit, navigation2d, ...); "
                        f"dataset={c.family.name} is {c.family.kind}")
    if c.learner_cfg.name != "gru":
        raise UserError(f"algo=rl2 adapts in a recurrent policy's hidden state: use learner=gru "
                        f"(got learner={c.learner_cfg.name})")
    if a.episodes_per_trial < 1:
        raise UserError(f"algo.episodes_per_trial={a.episodes_per_trial} must be >= 1")
    if a.baseline not in BASELINES:
        raise UserError(f"algo.baseline={a.baseline} is unknown; expected one of: {', '.join(BASELINES)}")
    info = {"name": a.name, "episodes_per_trial": a.episodes_per_trial, "baseline": a.baseline,
            "outer": "REINFORCE over the trial through meta_opt", "inner_steps": None}
    policy = c.learner(c.family.head_dim(c.phase), discrete=c.family.env.discrete)
    return rl2(policy, c.family, a.episodes_per_trial, a.baseline, record=not c.train, info=info)
