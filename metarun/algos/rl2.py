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

objective: "reinforce" — the surrogate above, one gradient per meta-batch through `meta_opt` (the default
  meta-step). "ppo" — PPO-clip (Schulman et al. 2017) with the same advantages (the `baseline` above; no
  value head): this algorithm's own meta-step samples the trials once, then takes `ppo_epochs` Adam steps
  (lr `ppo_lr`, moments carried in algo_state["ppo_opt"] across meta-steps, as one PPO optimiser) on
  −mean(min(r·A, clip(r, 1 ± clip_eps)·A)), r = π_θ/π_old replayed over the whole trial, and returns
  θ_before − θ_after, which `meta_opt=sgd` with lr 1.0 applies (metarun.algos.own_step).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax

from metarun.algos.base import Collaborators, MetaAlgorithm, mean_over_tasks
from metarun.algos.own_step import META_OPT_VIEW, WEIGHT_DECAY_VIEW, check_applies_step_unchanged
from metarun.errors import UserError
from metarun.learners.rl_policies import RL2Inputs
from metarun.registry import register
from metarun.rl.policy_gradient import (clipped_surrogate_loss, discounted_returns, normalize_advantages,
                                        reinforce_loss)
from metarun.rl.rollout import recurrent_log_probs

BASELINES = ("time", "linear", "none")
OBJECTIVES = ("reinforce", "ppo")


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


def rl2(policy, family, episodes: int, baseline: str = "time", record: bool = False, info=None,
        objective: str = "reinforce", ppo_epochs: int = 4, ppo_lr: float = 1e-3, clip_eps: float = 0.2) -> MetaAlgorithm:
    """Builds RL² over a recurrent policy (metarun.learners.rl_policies.GRU) and an `rl` family.

    meta_params: the policy's params; algo_state: {} ({"ppo_opt": Adam state} with objective="ppo").
    record (evaluation): also `_task`, the task's parameters as a vector, from which the family
    computes its reference rows (bandit: oracle, Thompson sampling, regrets) on the same tasks, and the
    family's `trial_draws` of the trials (bandit: their reward draws, which the references then replay).
    """
    env = family.env
    init_carry = policy.initial_carry()
    ppo_opt = optax.adam(ppo_lr)

    def apply(params, h, obs, prev_action, prev_reward, prev_done):
        return policy.apply({"params": params}, RL2Inputs(h, obs, prev_action, prev_reward, prev_done))

    def init(key, task):
        del task
        prev_action = jnp.zeros((1,), jnp.int32) if env.discrete else jnp.zeros((1, env.action_size), jnp.float32)
        x = RL2Inputs(policy.initial_carry((1,)), jnp.zeros((1, env.obs_size), jnp.float32), prev_action,
                      jnp.zeros((1,), jnp.float32), jnp.zeros((1,), jnp.float32))
        params = policy.init(key, x)["params"]
        return params, ({"ppo_opt": ppo_opt.init(params)} if objective == "ppo" else {})

    def adapt(meta_params, algo_state, support, key):
        del algo_state
        traj = family.rollout_trial(apply, jax.lax.stop_gradient(meta_params), support.env_params, key, episodes,
                                    init_carry)
        return (traj, family.trial_draws(key, episodes)) if record else traj

    def loss(meta_params, algo_state, traj, query, key):
        del algo_state, key  # the trial recorded in adapt is the data of the outer loss
        draws = {}
        if record:
            traj, draws = traj
        log_probs = recurrent_log_probs(apply, meta_params, traj, init_carry)
        total = reinforce_loss(log_probs, trial_advantages(traj, family.settings.gamma, baseline, family), traj.valid)
        per_episode = episode_returns(traj, episodes)
        later = per_episode[1:].mean() if episodes > 1 else per_episode[0]
        metrics = {"loss": total, "return": later, **{f"return_ep{i + 1}": r for i, r in enumerate(per_episode)}}
        if record:
            metrics["_task"] = family.task_vector(query.env_params)
            metrics.update(draws)
        return total, metrics

    if objective == "reinforce":
        return MetaAlgorithm(init=init, adapt=adapt, loss=loss, info=info or {})
    if objective != "ppo":
        raise ValueError(f"objective={objective!r}: expected one of {OBJECTIVES}")

    def ppo_loss(params, trial):
        """PPO-clip over a task's trials: r = π_params / π_old on the recorded actions, the trial's advantages."""
        traj, adv = trial
        # RL² trials are valid throughout (valid is all ones), so the masked means are plain means.
        return clipped_surrogate_loss(recurrent_log_probs(apply, params, traj, init_carry), traj.log_probs, adv,
                                      traj.valid, clip_eps)

    def ppo_meta_step(meta_params, algo_state, tasks, key, map_tasks):
        keys = jax.random.split(key, jax.tree.leaves(tasks)[0].shape[0])

        def sample(task, k):
            adapt_key, loss_key = jax.random.split(k)  # metarun.algos.base.task_loss's split
            traj = adapt(meta_params, algo_state, task.support, adapt_key)
            _, metrics = loss(meta_params, algo_state, traj, task.query, loss_key)
            return (traj, trial_advantages(traj, family.settings.gamma, baseline, family)), metrics

        trials, metrics = map_tasks(sample, tasks, keys)

        def epoch(carry, _):
            params, opt_state = carry
            (value, clipped), grads = mean_over_tasks(map_tasks(
                lambda b, k: jax.value_and_grad(ppo_loss, has_aux=True)(params, b), trials, keys))
            updates, opt_state = ppo_opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), (value, clipped)

        (params, opt_state), (values, clipped) = jax.lax.scan(epoch, (meta_params, algo_state["ppo_opt"]), None,
                                                              length=ppo_epochs)
        step = jax.tree.map(lambda before, after: before - after, meta_params, params)  # sgd(1.0) lands on `params`
        metrics = {**mean_over_tasks(metrics), "ppo_loss_first": values[0], "ppo_loss_last": values[-1],
                   "ppo_clip_fraction": clipped[-1]}
        return step, {**algo_state, "ppo_opt": opt_state}, metrics

    return MetaAlgorithm(init=init, adapt=adapt, loss=loss, meta_step=ppo_meta_step, info=info or {})


@dataclass
class RL2Config:
    name: str = "rl2"
    episodes_per_trial: int = 2    # episodes of one task the hidden state carries across
    baseline: str = "time"         # time | linear | none (see trial_advantages)
    objective: str = "reinforce"   # reinforce (one gradient through meta_opt) | ppo (PPO-clip epochs; meta_opt=sgd, lr 1.0)
    ppo_epochs: int = 4            # objective=ppo: Adam steps on each meta-batch's trials
    ppo_lr: float = 1e-3
    clip_eps: float = 0.2
    # Read-only views of the run's outer optimiser for objective=ppo's check (metarun.algos.own_step).
    outer_meta_opt: Any = META_OPT_VIEW
    outer_weight_decay: Any = WEIGHT_DECAY_VIEW


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
    objective = a.get("objective", "reinforce")  # configs saved before objective= existed ran REINFORCE
    if objective not in OBJECTIVES:
        raise UserError(f"algo.objective={objective} is unknown; expected one of: {', '.join(OBJECTIVES)}")
    info = {"name": a.name, "episodes_per_trial": a.episodes_per_trial, "baseline": a.baseline,
            "outer": "REINFORCE over the trial through meta_opt", "inner_steps": None}
    if objective == "ppo":
        for key, ok, expected in (("ppo_epochs", a.ppo_epochs >= 1, ">= 1"), ("ppo_lr", a.ppo_lr > 0, "> 0"),
                                  ("clip_eps", a.clip_eps > 0, "> 0")):
            if not ok:
                raise UserError(f"algo.{key}={a[key]} must be {expected} (algo.objective=ppo)")
        if c.train:
            check_applies_step_unchanged(a, "algo.objective=ppo")
        info.update({"outer": f"PPO-clip: {a.ppo_epochs} Adam epochs per meta-batch (lr {a.ppo_lr}, clip "
                              f"{a.clip_eps}), {a.baseline} baseline, applied by meta_opt=sgd lr 1.0",
                     "ppo_epochs": a.ppo_epochs, "ppo_lr": a.ppo_lr, "clip_eps": a.clip_eps})
    policy = c.learner(c.family.head_dim(c.phase), discrete=c.family.env.discrete)
    return rl2(policy, c.family, a.episodes_per_trial, a.baseline, record=not c.train, info=info,
               objective=objective, ppo_epochs=a.get("ppo_epochs", 4), ppo_lr=a.get("ppo_lr", 1e-3),
               clip_eps=a.get("clip_eps", 0.2))
