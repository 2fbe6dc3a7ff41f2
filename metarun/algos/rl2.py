"""RL² (Duan et al. 2016; Wang et al. 2016): adaptation in the hidden state of a recurrent policy.

adapt: run `fast_batch` trials of `episodes_per_trial` episodes of the task with the GRU policy
  (its hidden state carries across the trial's episodes; the env resets, the task stays). No gradient
  step: the trials are recorded as data (rolled out with stop_gradient(params)).
loss: REINFORCE over the whole trial (returns discounted across episode boundaries: the trial is one
  long episode, as in RL²), log π replayed from the trial's start with the meta-parameters; the
  baseline is `time` (the mean return-to-go over the task's trials at the same step, an A2C-like
  critic without a value head), `linear` (the linear feature baseline), `none`, or `value`: A2C's critic (Wang
  et al. 2016) — a linear value head on the GRU's hidden state (which it reads but does not train),
  advantages = GAE(γ, dataset.gae_lambda) on its values, and `value_coef` × its squared error to the
  λ-returns added to the loss; `entropy_coef` adds A2C's entropy bonus with any baseline.
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
from metarun.rl.policy_gradient import (clipped_surrogate_loss, discounted_returns, gae, masked_mean,
                                        normalize_advantages, reinforce_loss)
from metarun.rl.rollout import later_episodes_return, recurrent_replay

BASELINES = ("time", "linear", "none", "value")
OBJECTIVES = ("reinforce", "ppo")


def episode_returns(traj, episodes: int) -> jax.Array:
    """[episodes] mean undiscounted return of the i-th episode of the trials (episodes past the
    `episodes`-th, when some ended early, are not counted)."""
    index = jnp.cumsum(traj.dones, 0) - traj.dones  # episode index of each step: ends counted before it
    per = [jnp.sum(traj.rewards * (index == i), 0).mean() for i in range(episodes)]
    return jnp.stack(per)


def value_estimates(value_head, hidden, scale: float) -> jax.Array:
    """V(history up to t) [T, N]: a linear head {"kernel" [H], "bias" []} on the GRU's hidden states [T, N, H],
    times `scale` (rl2 passes Σ_t γ^t over a trial: the discounted return of a reward of 1 per step). Why: Adam
    moves each weight by about its learning rate per step, so an unscaled head needs thousands of steps to reach
    returns of ~50 (a 100-pull bandit trial); scaled, weights of order 1 do."""
    return (hidden @ value_head["kernel"] + value_head["bias"]) * scale


def critic_targets(traj, values, gamma: float, lam: float):
    """(advantages [T, N], λ-return targets [T, N]) from the critic's values, over whole trials (no cut at
    episode ends: the trial is one long episode, as the REINFORCE returns are); constants for the gradient."""
    values = jax.lax.stop_gradient(values)
    adv = gae(traj.rewards, values, traj.valid, gamma, lam)
    return jax.lax.stop_gradient(adv), jax.lax.stop_gradient((adv + values) * traj.valid)


def trial_advantages(traj, gamma: float, baseline: str, family) -> jax.Array:
    """Advantages over whole trials [T, N], normalised; constants for the gradient (not for baseline="value",
    whose advantages come from the critic: critic_targets)."""
    if baseline == "linear":
        adv = family.advantages(traj)
    else:
        returns = discounted_returns(traj.rewards, traj.valid, gamma)
        if baseline == "time":
            returns = returns - returns.mean(1, keepdims=True)
        adv = normalize_advantages(returns, traj.valid)
    return jax.lax.stop_gradient(adv)


def rl2(policy, family, episodes: int, baseline: str = "time", record: bool = False, info=None,
        objective: str = "reinforce", ppo_epochs: int = 4, ppo_lr: float = 1e-3, clip_eps: float = 0.2,
        value_coef: float = 0.5, entropy_coef: float = 0.0) -> MetaAlgorithm:
    """Builds RL² over a recurrent policy (metarun.learners.rl_policies.GRU) and an `rl` family.

    meta_params: the policy's params, or with baseline="value" {"policy": them, "value": a linear head on the
    GRU's hidden state} (A2C's critic, Wang et al. 2016: advantages = GAE(λ = dataset.gae_lambda) on its values,
    plus `value_coef` × the squared error to the λ-returns in the loss); `entropy_coef` × the policy's mean
    entropy is subtracted from the loss (A2C's exploration bonus; 0 = none).
    algo_state: {} ({"ppo_opt": Adam state} with objective="ppo").
    record (evaluation): also `_task`, the task's parameters as a vector, from which the family
    computes its reference rows (bandit: oracle, Thompson sampling, regrets) on the same tasks, and the
    family's `trial_draws` of the trials (bandit: their reward draws, which the references then replay).
    """
    env = family.env
    init_carry = policy.initial_carry()
    ppo_opt = optax.adam(ppo_lr)
    critic = baseline == "value"
    gamma, lam = family.settings.gamma, family.settings.gae_lambda
    policy_of = (lambda p: p["policy"]) if critic else (lambda p: p)
    trial_steps = episodes * family.settings.horizon
    value_scale = float(trial_steps if gamma == 1.0 else (1.0 - gamma ** trial_steps) / (1.0 - gamma))

    def apply(params, h, obs, prev_action, prev_reward, prev_done):
        return policy.apply({"params": params}, RL2Inputs(h, obs, prev_action, prev_reward, prev_done))

    def init(key, task):
        del task
        prev_action = jnp.zeros((1,), jnp.int32) if env.discrete else jnp.zeros((1, env.action_size), jnp.float32)
        x = RL2Inputs(policy.initial_carry((1,)), jnp.zeros((1, env.obs_size), jnp.float32), prev_action,
                      jnp.zeros((1,), jnp.float32), jnp.zeros((1,), jnp.float32))
        params = policy.init(key, x)["params"]
        if critic:  # a zero critic starts as baseline="none" (V = 0), and learns from the first step
            hidden = init_carry.shape[-1]
            params = {"policy": params, "value": {"kernel": jnp.zeros((hidden,)), "bias": jnp.zeros(())}}
        return params, ({"ppo_opt": ppo_opt.init(params)} if objective == "ppo" else {})

    def adapt(meta_params, algo_state, support, key):
        del algo_state
        traj = family.rollout_trial(apply, jax.lax.stop_gradient(policy_of(meta_params)), support.env_params, key,
                                    episodes, init_carry)
        return (traj, family.trial_draws(key, episodes)) if record else traj

    def replay(params, traj):
        """(log π [T, N], V [T, N] or None, entropy [T, N]) of the trial under `params`."""
        log_probs, hidden, entropy = recurrent_replay(apply, policy_of(params), traj, init_carry)
        # The critic reads the hidden state without training the GRU. Measured on experiment=rl2_bernoulli_bandit,
        # 200 steps (session 11): a shared torso trained by the critic's squared error reached 80.4 (scaled head)
        # or stayed at random play, 49.7 (unscaled, value_coef 0.5 or 0.005); the detached critic 89.05, as
        # baseline=time (89.1) and none (88.8).
        values = value_estimates(params["value"], jax.lax.stop_gradient(hidden), value_scale) if critic else None
        return log_probs, values, entropy

    def advantages_and_targets(traj, values):
        """(normalised advantages, λ-return targets or None): the critic's GAE, or trial_advantages."""
        if critic:
            adv, targets = critic_targets(traj, values, gamma, lam)
            return normalize_advantages(adv, traj.valid), targets
        return trial_advantages(traj, gamma, baseline, family), None

    def regularisers(values, targets, entropy, valid):
        """(value_coef · critic MSE − entropy_coef · mean entropy, their metrics)."""
        metrics, total = {}, 0.0
        if critic:
            value_loss = masked_mean((values - targets) ** 2, valid)
            total = total + value_coef * value_loss
            metrics["value_loss"] = value_loss
        if entropy_coef:
            mean_entropy = masked_mean(entropy, valid)
            total = total - entropy_coef * mean_entropy
            metrics["entropy"] = mean_entropy
        return total, metrics

    def trial_loss(meta_params, traj):
        """(REINFORCE loss + regularisers, metrics, (advantages, targets)) of one task's trials: one replay
        serves the loss and, for PPO's sampling, the advantages its epochs keep fixed."""
        log_probs, values, entropy = replay(meta_params, traj)
        adv, targets = advantages_and_targets(traj, values)
        extra, extra_metrics = regularisers(values, targets, entropy, traj.valid)
        total = reinforce_loss(log_probs, adv, traj.valid) + extra
        per_episode = episode_returns(traj, episodes)
        metrics = {"loss": total, "return": later_episodes_return(per_episode), **extra_metrics,
                   **{f"return_ep{i + 1}": r for i, r in enumerate(per_episode)}}
        return total, metrics, (adv, targets)

    def loss(meta_params, algo_state, traj, query, key):
        del algo_state, key  # the trial recorded in adapt is the data of the outer loss
        draws = {}
        if record:
            traj, draws = traj
        total, metrics, _ = trial_loss(meta_params, traj)
        if record:
            metrics["_task"] = family.task_vector(query.env_params)
            metrics.update(draws)
        return total, metrics

    if objective == "reinforce":
        return MetaAlgorithm(init=init, adapt=adapt, loss=loss, info=info or {})
    if objective != "ppo":
        raise ValueError(f"objective={objective!r}: expected one of {OBJECTIVES}")

    def ppo_loss(params, trial):
        """PPO-clip over a task's trials: r = π_params / π_old on the recorded actions, the trial's advantages
        (fixed at sampling), plus the critic / entropy terms on the replay under `params`."""
        traj, adv, targets = trial
        log_probs, values, entropy = replay(params, traj)
        # RL² trials are valid throughout (valid is all ones), so the masked means are plain means.
        surrogate, clipped = clipped_surrogate_loss(log_probs, traj.log_probs, adv, traj.valid, clip_eps)
        return surrogate + regularisers(values, targets, entropy, traj.valid)[0], clipped

    def ppo_meta_step(meta_params, algo_state, tasks, key, map_tasks):
        keys = jax.random.split(key, jax.tree.leaves(tasks)[0].shape[0])

        def sample(task, k):
            adapt_key, _ = jax.random.split(k)  # metarun.algos.base.task_loss's split (the loss takes no key)
            traj = adapt(meta_params, algo_state, task.support, adapt_key)
            _, metrics, (adv, targets) = trial_loss(meta_params, traj)
            return (traj, adv, targets), metrics

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
    baseline: str = "time"         # time | linear | none (see trial_advantages) | value (A2C's learned critic)
    value_coef: float = 0.5        # baseline=value: weight of the critic's squared error in the loss
    entropy_coef: float = 0.0      # weight of the policy's entropy bonus (A2C uses ~0.01; 0 = none)
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
    value_coef, entropy_coef = a.get("value_coef", 0.5), a.get("entropy_coef", 0.0)  # older configs: no such keys
    if not value_coef >= 0 or not entropy_coef >= 0:
        raise UserError(f"algo.value_coef={value_coef} and algo.entropy_coef={entropy_coef} must be >= 0")
    objective = a.get("objective", "reinforce")  # configs saved before objective= existed ran REINFORCE
    if objective not in OBJECTIVES:
        raise UserError(f"algo.objective={objective} is unknown; expected one of: {', '.join(OBJECTIVES)}")
    info = {"name": a.name, "episodes_per_trial": a.episodes_per_trial, "baseline": a.baseline,
            "outer": "REINFORCE over the trial through meta_opt", "inner_steps": None,
            "value_coef": value_coef if a.baseline == "value" else None, "entropy_coef": entropy_coef}
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
               clip_eps=a.get("clip_eps", 0.2), value_coef=value_coef, entropy_coef=entropy_coef)
