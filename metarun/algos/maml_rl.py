"""MAML for reinforcement learning (Finn et al. 2017, §5.3) with policy-gradient inner and outer steps.

adapt: `inner_steps` REINFORCE steps through `metarun.inner.inner_loop` with `optax.sgd(inner_lr)`;
  step i rolls out the current fast policy (`fast_batch` trajectories, keys `split(key, steps)[i]`),
  fits the linear feature baseline (Duan et al. 2016) on that batch, computes GAE advantages
  (normalised) and takes the gradient of −mean(log π · A).
loss: rolls out the adapted policy (the query rollouts) and returns the same REINFORCE surrogate;
  the outer update is plain policy gradient through `meta_opt` (Adam by default). The paper uses
  TRPO outside; this does not.

Gradients flow only through log π of recorded actions (the rollouts use stop_gradient(params)), as
pytorch-maml-rl: the dependence of the inner rollout's sampling distribution on θ (DiCE / ProMP's
extra term) is not differentiated. `first_order=True` drops the inner step's second derivatives.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

from metarun.algos.base import Collaborators, MetaAlgorithm
from metarun.algos.maml import check_inner
from metarun.errors import UserError
from metarun.inner import inner_loop
from metarun.registry import register
from metarun.rl.policy_gradient import reinforce_loss
from metarun.rl.rollout import policy_log_probs


def maml_rl(policy, family, inner_lr: float, inner_steps: int, first_order: bool = False,
            baseline_reg: float = 1e-5, normalize_advantages: bool = True, record: bool = False,
            info=None) -> MetaAlgorithm:
    """Builds MAML-RL over a feed-forward policy module (obs -> distribution) and an `rl` family.

    meta_params: the policy's params; algo_state: {}.
    Metrics per task: `return` (the adapted policy's query rollouts), `return_before` (the first
    support rollout, i.e. the meta-policy before adaptation), `loss` (the outer surrogate).
    record (evaluation): also `_task` (the task's parameters as a vector: the family's reference rows,
    e.g. navigation2d's oracle, are computed on the very tasks evaluated) and, when the family draws
    paths, `_paths` [steps + 1, T, obs] (the first trajectory of every support rollout and of the query
    rollout, NaN after its end) for its trajectory plot. "_" keeps both out of the summaries.
    """
    record_paths = record and family.draws_paths

    def apply(params, obs):
        return policy.apply({"params": params}, obs)

    def pg_loss(params, traj):
        """REINFORCE surrogate with the per-batch linear baseline and GAE; its gradient is the PG estimate."""
        adv = family.advantages(traj, baseline_reg, normalize_advantages)
        return reinforce_loss(policy_log_probs(apply, params, traj), adv, traj.valid)

    def first_path(traj):
        return jnp.where(traj.valid[:, 0, None] > 0, traj.obs[:, 0], jnp.nan)

    def init(key, task):
        del task
        return policy.init(key, jnp.zeros((1, family.env.obs_size), jnp.float32))["params"], {}

    def adapt(meta_params, algo_state, support, key):
        del algo_state

        def step_loss(fast, step, step_key):
            del step
            # Actions are data: sample with the current fast weights, differentiate only log π.
            traj = family.rollout(apply, jax.lax.stop_gradient(fast), support.env_params, step_key)
            return pg_loss(fast, traj), (family.mean_return(traj), first_path(traj) if record_paths else None)

        keys = jax.random.split(key, max(inner_steps, 1))[:inner_steps]  # [0, 2] when 0: the scan still traces
        fast, _, (returns, paths), _ = inner_loop(step_loss, meta_params, optax.sgd(inner_lr), inner_steps,
                                                  xs=keys, first_order=first_order)
        return {"params": fast, "support_returns": returns, "support_paths": paths}

    def loss(meta_params, algo_state, task_state, query, key):
        del meta_params, algo_state
        fast = task_state["params"]
        traj = family.rollout(apply, jax.lax.stop_gradient(fast), query.env_params, key)
        total = pg_loss(fast, traj)
        after = family.mean_return(traj)
        # With no inner step the query rollout IS the meta-policy's: before = after.
        before = task_state["support_returns"][0] if inner_steps > 0 else after
        metrics = {"loss": total, "return": after, "return_before": before}
        if record:
            metrics["_task"] = family.task_vector(query.env_params)
        if record_paths:
            metrics["_paths"] = jnp.concatenate([task_state["support_paths"], first_path(traj)[None]])
        return total, metrics

    return MetaAlgorithm(init=init, adapt=adapt, loss=loss, info=info or {})


@dataclass
class MAMLRLConfig:
    name: str = "maml_rl"
    inner_lr: float = 0.1          # Finn et al. 2017 (2D navigation), pytorch-maml-rl's fast_lr
    inner_steps: int = 1
    eval_inner_steps: int = 1
    first_order: bool = False
    baseline_reg: float = 1e-5     # ridge λ of the linear feature baseline
    normalize_advantages: bool = True


@register("algo", "maml_rl", schema=MAMLRLConfig)
def build(a, c: Collaborators) -> MetaAlgorithm:
    """MAML-RL from its config section; the eval build uses the test-time inner steps."""
    check_inner(a)
    if getattr(c.family, "kind", None) != "rl":
        raise UserError(f"algo=maml_rl needs an RL environment (dataset=navigation2d, bernoulli_bandit, ...); "
                        f"dataset={c.family.name} is {c.family.kind}")
    if c.learner_cfg.name == "gru":
        raise UserError("algo=maml_rl adapts a feed-forward policy: use learner=gaussian_mlp or "
                        "learner=categorical_mlp (learner=gru is for algo=rl2)")
    steps = c.inner_steps_for(a)
    info = {"name": a.name, "variant": "fo-maml-rl" if a.first_order else "maml-rl",
            "first_order": bool(a.first_order), "inner_lr": a.inner_lr, "inner_steps": a.inner_steps,
            "eval_inner_steps": a.eval_inner_steps, "inner_optimizer": "sgd (REINFORCE, linear baseline, GAE)",
            "outer": "REINFORCE through meta_opt (not TRPO)", "baseline_reg": a.baseline_reg,
            "normalize_advantages": bool(a.normalize_advantages)}
    policy = c.learner(c.family.head_dim(c.phase))
    return maml_rl(policy, c.family, a.inner_lr, steps, a.first_order, a.baseline_reg, a.normalize_advantages,
                   record=not c.train, info=info)
