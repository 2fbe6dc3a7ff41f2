"""MAML for reinforcement learning (Finn et al. 2017, §5.3) with policy-gradient inner and outer steps.

adapt: `inner_steps` REINFORCE steps through `metarun.inner.inner_loop` with `optax.sgd(inner_lr)`;
  step i rolls out the current fast policy (`fast_batch` trajectories, keys `split(key, steps)[i]`),
  fits the linear feature baseline (Duan et al. 2016) on that batch, computes GAE advantages
  (normalised) and takes the gradient of −mean(log π · A).
loss: rolls out the adapted policy (the query rollouts) and returns the same REINFORCE surrogate.
outer: "reinforce" — the meta-gradient of that surrogate goes to `meta_opt` (Adam by default; the default
  meta-step). "trpo" — the paper's outer step (pytorch-maml-rl's MAMLTRPO, metarun.rl.trpo): this
  algorithm's own meta_step samples the support and query rollouts once, then maximises the
  importance-weighted advantage of the adapted policy on the query rollouts inside a KL trust region
  around the adapted policy at sampling time (conjugate gradient on Hessian-vector products of the KL,
  backtracking line search; every candidate re-adapts from the same support rollouts). It returns
  "grads" = minus the parameter change it chose, so `meta_opt=sgd` with lr 1.0 applies that change
  unchanged (the builder refuses any other meta_opt: an optimiser cannot see that its input is already
  a step; metarun.algos.own_step).

Gradients flow only through log π of recorded actions (the rollouts use stop_gradient(params)), as
pytorch-maml-rl. With `inner_estimator="reinforce"` (the default, pytorch-maml-rl's) the dependence of the
inner rollout's sampling distribution on θ is therefore not differentiated; `inner_estimator="lvc"` makes
the inner objective ProMP's low-variance curvature surrogate (metarun.rl.policy_gradient.lvc_loss): the
same inner step, and a meta-gradient that adds the per-step score-function term — credit for the
pre-update policy's exploration. `first_order=True` drops the inner step's second derivatives (and with
them any difference between the two estimators).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from metarun.algos.base import Collaborators, MetaAlgorithm, mean_over_tasks
from metarun.algos.maml import check_inner
from metarun.algos.own_step import META_OPT_VIEW, WEIGHT_DECAY_VIEW, check_applies_step_unchanged
from metarun.errors import UserError
from metarun.inner import inner_loop
from metarun.registry import register
from metarun.rl.policy_gradient import INNER_ESTIMATORS, clipped_surrogate_loss, masked_mean, reinforce_loss
from metarun.rl.rollout import Trajectories, policy_log_probs
from metarun.rl.trpo import (TRPOSettings, kl_divergence, kl_hessian_vector_product, line_search,
                             natural_gradient_step, tree_axpy)

OUTERS = ("reinforce", "trpo", "ppo")


class TRPOBatch(NamedTuple):
    """One task's rollouts as sampled by the meta-policy: what TRPO's surrogate and KL are computed on.

    support: the recorded inner-step batches (Trajectories, advantages), stacked over the inner steps;
      replaying the inner steps on them re-adapts any candidate meta-parameters (pytorch-maml-rl's
      `adapt(train_futures)`).
    query: the adapted policy's rollouts; advantages: theirs (linear baseline + GAE, as sampled);
    old: the adapted policy's action distribution on the query observations at sampling time.
    """
    support: Tuple[Trajectories, jax.Array]
    query: Trajectories
    advantages: jax.Array
    old: Any


def maml_rl(policy, family, inner_lr: float, inner_steps: int, first_order: bool = False,
            baseline_reg: float = 1e-5, normalize_advantages: bool = True, record: bool = False,
            info=None, outer: str = "reinforce", trpo: Optional[TRPOSettings] = None,
            inner_estimator: str = "reinforce", ppo: Optional["PPOSettings"] = None) -> MetaAlgorithm:
    """Builds MAML-RL over a feed-forward policy module (obs -> distribution) and an `rl` family.

    meta_params: the policy's params; algo_state: {} ({"ppo_opt": Adam state, "inner_kl_coef": η} with outer="ppo").
    Metrics per task: `return` (the adapted policy's query rollouts), `return_before` (the first
    support rollout, i.e. the meta-policy before adaptation), `loss` (the outer surrogate).
    record (evaluation): also `_task` (the task's parameters as a vector: the family's reference rows,
    e.g. navigation2d's oracle, are computed on the very tasks evaluated) and, when the family draws
    paths, `_paths` [steps + 1, T, obs] (the first trajectory of every support rollout and of the query
    rollout, NaN after its end) for its trajectory plot. "_" keeps both out of the summaries.
    outer: "reinforce" (the default meta-step), "trpo" (`trpo_meta_step`, with `trpo` settings) or "ppo"
    (`ppo_meta_step`, with `ppo` settings); trpo's and ppo's meta-steps return −step: apply it with
    optax.sgd(1.0). Adaptation and evaluation are the same for all three.
    inner_estimator: the inner step's surrogate, "reinforce" or "lvc" (ProMP); both take the same step.
    """
    inner_surrogate = inner_estimator_loss(inner_estimator)
    record_paths = record and family.draws_paths

    def apply(params, obs):
        return policy.apply({"params": params}, obs)

    def pg_loss(params, traj, surrogate=reinforce_loss):
        """Surrogate with the per-batch linear baseline and GAE; its gradient is the PG estimate."""
        adv = family.advantages(traj, baseline_reg, normalize_advantages)
        return surrogate(policy_log_probs(apply, params, traj), adv, traj.valid)

    def first_path(traj):
        return jnp.where(traj.valid[:, 0, None] > 0, traj.obs[:, 0], jnp.nan)

    ppo = ppo or PPOSettings()

    def init(key, task):
        del task
        params = policy.init(key, jnp.zeros((1, family.env.obs_size), jnp.float32))["params"]
        if outer != "ppo":
            return params, {}
        return params, {"ppo_opt": optax.adam(ppo.lr).init(params),
                        "inner_kl_coef": jnp.asarray(ppo.inner_kl_coef, jnp.float32)}

    def adapt(meta_params, algo_state, support, key):
        del algo_state

        def step_loss(fast, step, step_key):
            del step
            # Actions are data: sample with the current fast weights, differentiate only log π.
            traj = family.rollout(apply, jax.lax.stop_gradient(fast), support.env_params, step_key)
            return pg_loss(fast, traj, inner_surrogate), (family.mean_return(traj),
                                                          first_path(traj) if record_paths else None)

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

    if outer == "reinforce":
        return MetaAlgorithm(init=init, adapt=adapt, loss=loss, info=info or {})
    if outer not in ("trpo", "ppo"):
        raise ValueError(f"outer={outer!r}: expected one of {OUTERS}")
    pieces = trpo_pieces(apply, family, inner_lr, inner_steps, first_order, baseline_reg, normalize_advantages,
                         inner_estimator)
    if outer == "ppo":
        return MetaAlgorithm(init=init, adapt=adapt, loss=loss, info=info or {},
                             meta_step=ppo_meta_step(pieces, apply, ppo))
    return MetaAlgorithm(init=init, adapt=adapt, loss=loss, info=info or {},
                         meta_step=trpo_meta_step(pieces, trpo or TRPOSettings()))


def inner_estimator_loss(name: str) -> Callable:
    """The inner step's surrogate by name (metarun.rl.policy_gradient.INNER_ESTIMATORS)."""
    if name not in INNER_ESTIMATORS:
        raise ValueError(f"inner_estimator={name!r}: expected one of {tuple(INNER_ESTIMATORS)}")
    return INNER_ESTIMATORS[name]


class TRPOPieces(NamedTuple):
    """MAML-TRPO's per-task functions (pytorch-maml-rl's MAMLTRPO), built by `trpo_pieces`.

    sample(meta_params, task, key) -> (TRPOBatch, metrics): adapt + loss's rollouts, recorded (the keys of
      metarun.algos.base.task_loss, so the data are the ones outer=reinforce would see).
    adapt_on(meta_params, support) -> adapted params: the inner steps replayed on recorded support batches.
    surrogate_and_kl(meta_params, batch) -> (−mean(π_new/π_old · A), mean KL(π_old ‖ π_new)) over the
      task's valid query steps, π_new the policy adapted from meta_params.
    kl_hvp(meta_params, batch, vector) -> ∇²_θ KL · vector at meta_params = the sampling meta-parameters.
    Second order through the replayed inner step unless `first_order` (then both the surrogate's gradient
    and the KL's curvature see the adapted weights as a shifted copy of the meta-parameters).
    """
    sample: Callable
    adapt_on: Callable
    surrogate_and_kl: Callable
    kl_hvp: Callable


def trpo_pieces(apply: Callable, family, inner_lr: float, inner_steps: int, first_order: bool = False,
                baseline_reg: float = 1e-5, normalize_advantages: bool = True,
                inner_estimator: str = "reinforce") -> TRPOPieces:
    """The per-task pieces of MAML-TRPO for a policy `apply(params, obs) -> distribution` and an `rl` family."""
    inner_opt = optax.sgd(inner_lr)
    inner_surrogate = inner_estimator_loss(inner_estimator)

    def inner_objective(fast, batch):
        traj, adv = batch
        # Recorded behaviour log π: a replay from other parameters is importance-weighted under lvc (ProMP).
        return inner_surrogate(policy_log_probs(apply, fast, traj), adv, traj.valid, traj.log_probs)

    def outer_objective(fast, batch):
        traj, adv = batch
        return reinforce_loss(policy_log_probs(apply, fast, traj), adv, traj.valid)

    def sample(meta_params, task, key):
        adapt_key, loss_key = jax.random.split(key)

        def step_loss(fast, step, step_key):
            del step
            traj = family.rollout(apply, jax.lax.stop_gradient(fast), task.support.env_params, step_key)
            adv = family.advantages(traj, baseline_reg, normalize_advantages)
            return inner_objective(fast, (traj, adv)), ((traj, adv), family.mean_return(traj))

        keys = jax.random.split(adapt_key, max(inner_steps, 1))[:inner_steps]
        # Values only here (the gradients come from replays of the recorded batches): first order is cheaper.
        fast, _, (support, returns), _ = inner_loop(step_loss, meta_params, inner_opt, inner_steps, xs=keys,
                                                    first_order=True)
        query = family.rollout(apply, fast, task.query.env_params, loss_key)
        adv = family.advantages(query, baseline_reg, normalize_advantages)
        after = family.mean_return(query)
        metrics = {"loss": outer_objective(fast, (query, adv)), "return": after,
                   "return_before": returns[0] if inner_steps > 0 else after}
        return TRPOBatch(support, query, adv, apply(fast, query.obs)), metrics

    def adapt_on(meta_params, support):
        def step_loss(fast, step, batch):
            del step
            return inner_objective(fast, batch), None

        return inner_loop(step_loss, meta_params, inner_opt, inner_steps, xs=support, first_order=first_order)[0]

    def new_dist(meta_params, batch: TRPOBatch):
        return apply(adapt_on(meta_params, batch.support), batch.query.obs)

    def mean_kl(batch: TRPOBatch, dist):
        return masked_mean(kl_divergence(jax.lax.stop_gradient(batch.old), dist), batch.query.valid)

    def surrogate_and_kl(meta_params, batch: TRPOBatch):
        new = new_dist(meta_params, batch)
        old = jax.lax.stop_gradient(batch.old)
        actions, valid = batch.query.actions, batch.query.valid
        ratio = jnp.exp(new.log_prob(actions) - old.log_prob(actions))
        return -masked_mean(ratio * batch.advantages, valid), mean_kl(batch, new)

    def kl_hvp(meta_params, batch: TRPOBatch, vector):
        return kl_hessian_vector_product(lambda p: new_dist(p, batch), lambda d: mean_kl(batch, d),
                                         meta_params)(vector)

    return TRPOPieces(sample, adapt_on, surrogate_and_kl, kl_hvp)


def trpo_meta_step(pieces: TRPOPieces, settings: TRPOSettings) -> Callable:
    """pytorch-maml-rl's MAMLTRPO.step as a MetaAlgorithm.meta_step: sample the meta-batch once with the
    current meta-parameters θ; g = ∇ of the mean surrogate, s = (H + damping·I)⁻¹g by CG on the mean KL's
    Hessian-vector products, the full step s·√(2·max_kl / sᵀHs), then the first of the line-search
    candidates θ − β_k·step that lowers the surrogate and keeps the mean KL under max_kl (each candidate
    re-adapts from the same support rollouts); none: no move.

    Returns ("grads" = β·step, algo_state, metrics): optax.sgd(1.0) turns it into θ − β·step. The tasks are
    mapped with `map_tasks` for every pass (sampling, gradient, each CG product, the candidates).
    """
    def meta_step(meta_params, algo_state, tasks, key, map_tasks):
        keys = jax.random.split(key, jax.tree.leaves(tasks)[0].shape[0])
        batches, metrics = map_tasks(lambda t, k: pieces.sample(meta_params, t, k), tasks, keys)

        def over_tasks(fn):
            """Mean over the meta-batch of fn(batch), mapped in the run's batching mode."""
            return mean_over_tasks(map_tasks(lambda b, k: fn(b), batches, keys))

        old_loss, grads = over_tasks(
            lambda b: jax.value_and_grad(lambda p: pieces.surrogate_and_kl(p, b)[0])(meta_params))

        def damped_hvp(vector):
            return tree_axpy(settings.cg_damping, vector, over_tasks(lambda b: pieces.kl_hvp(meta_params, b, vector)))

        step, shs = natural_gradient_step(grads, damped_hvp, settings.max_kl, settings.cg_iters,
                                          settings.cg_residual_tol)

        def evaluate(fraction):
            candidate = jax.tree.map(lambda p, s: p - fraction * s, meta_params, step)
            return over_tasks(lambda b: pieces.surrogate_and_kl(candidate, b))

        search = line_search(evaluate, old_loss, settings.max_kl, settings.ls_max_steps, settings.ls_backtrack_ratio)
        metrics = {**mean_over_tasks(metrics), "trpo_surrogate_before": old_loss, "trpo_surrogate_after": search.loss,
                   "trpo_kl": search.kl, "trpo_step_fraction": search.fraction,
                   "trpo_accepted": search.accepted.astype(jnp.float32),
                   "trpo_candidate": search.candidate.astype(jnp.float32), "trpo_shs": shs}
        return jax.tree.map(lambda s: search.fraction * s, step), algo_state, metrics

    return meta_step


class PPOSettings(NamedTuple):
    """ProMP's outer step (Rothfuss et al. 2019; jonasrothfuss/ProMP's defaults): `epochs` Adam steps (lr `lr`)
    of the PPO-clip surrogate (clip `clip_eps`) on one sampled meta-batch, plus η·KL(π_θold ‖ π_θ) of the
    pre-update policy on the first support batch, η adapted after each meta-step towards `inner_kl_target`
    (halved below target/1.5, doubled above target·1.5) unless `adaptive_kl` is off."""
    epochs: int = 5
    lr: float = 1e-3
    clip_eps: float = 0.2
    inner_kl_coef: float = 1e-2
    inner_kl_target: float = 0.01
    adaptive_kl: bool = True


def ppo_meta_step(pieces: TRPOPieces, apply: Callable, settings: PPOSettings) -> Callable:
    """ProMP's meta-step as a MetaAlgorithm.meta_step: sample the meta-batch once with the current θ_old
    (`pieces.sample`: support batches, query rollouts of the adapted policy, their advantages and action
    distributions), then `epochs` Adam steps on the mean over tasks of

        −mean(min(r·A, clip(r, 1 ± ε)·A)) + η · mean KL(π_θold(·|s) ‖ π_θ(·|s)),

    r = π_θ'(a|s) / π_θ'old(a|s) on the query rollouts, θ' = the inner steps replayed from θ on the recorded
    support batches (second order, and importance-weighted under inner_estimator=lvc), the KL on the first
    support batch's observations. Returns ("grads" = θ_old − θ_new, algo_state, metrics): optax.sgd(1.0) lands
    on θ_new. Adam's moments persist in algo_state["ppo_opt"] across meta-steps (one PPO optimiser).
    """
    optimizer = optax.adam(settings.lr)

    def meta_step(meta_params, algo_state, tasks, key, map_tasks):
        keys = jax.random.split(key, jax.tree.leaves(tasks)[0].shape[0])
        batches, metrics = map_tasks(lambda t, k: pieces.sample(meta_params, t, k), tasks, keys)
        coef = algo_state["inner_kl_coef"]

        def task_loss(params, batch: TRPOBatch):
            fast = pieces.adapt_on(params, batch.support)
            query = batch.query
            surrogate, clipped = clipped_surrogate_loss(apply(fast, query.obs).log_prob(query.actions),
                                                        batch.old.log_prob(query.actions), batch.advantages,
                                                        query.valid, settings.clip_eps)
            first = jax.tree.map(lambda x: x[0], batch.support[0])  # the pre-update policy's support batch
            old_pre = apply(jax.lax.stop_gradient(meta_params), first.obs)
            inner_kl = masked_mean(kl_divergence(old_pre, apply(params, first.obs)), first.valid)
            return surrogate + coef * inner_kl, (surrogate, clipped, inner_kl)

        def epoch(carry, _):
            params, opt_state = carry
            (value, aux), grads = mean_over_tasks(map_tasks(
                lambda b, k: jax.value_and_grad(task_loss, has_aux=True)(params, b), batches, keys))
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), (value, *aux)

        (params, opt_state), (values, surrogates, clipped, inner_kls) = jax.lax.scan(
            epoch, (meta_params, algo_state["ppo_opt"]), None, length=settings.epochs)
        inner_kl = inner_kls[-1]
        if settings.adaptive_kl:  # ProMP's _adapt_kl_coeff, on the last epoch's KL
            coef = jnp.where(inner_kl < settings.inner_kl_target / 1.5, coef / 2,
                             jnp.where(inner_kl > settings.inner_kl_target * 1.5, coef * 2, coef))
        step = jax.tree.map(lambda before, after: before - after, meta_params, params)
        metrics = {**mean_over_tasks(metrics), "ppo_loss_first": values[0], "ppo_loss_last": values[-1],
                   "ppo_surrogate_last": surrogates[-1], "ppo_clip_fraction": clipped[-1],
                   "ppo_inner_kl": inner_kl, "ppo_inner_kl_coef": coef}
        return step, {**algo_state, "ppo_opt": opt_state, "inner_kl_coef": coef}, metrics

    return meta_step


@dataclass
class MAMLRLConfig:
    name: str = "maml_rl"
    inner_lr: float = 0.1          # Finn et al. 2017 (2D navigation), pytorch-maml-rl's fast_lr
    inner_steps: int = 1
    eval_inner_steps: int = 1
    first_order: bool = False
    baseline_reg: float = 1e-5     # ridge λ of the linear feature baseline
    normalize_advantages: bool = True
    outer: str = "reinforce"       # reinforce (meta-gradient to meta_opt) | trpo (the paper's; needs meta_opt=sgd, lr 1.0)
    # outer=ppo (ProMP's outer step; jonasrothfuss/ProMP's defaults; needs meta_opt=sgd, lr 1.0)
    ppo_epochs: int = 5
    ppo_lr: float = 1e-3
    clip_eps: float = 0.2
    inner_kl_coef: float = 1e-2    # initial η of the pre-update policy's KL penalty
    inner_kl_target: float = 0.01  # adaptive η aims at this KL (halve below target/1.5, double above 1.5x)
    adaptive_kl: bool = True
    # The inner step's surrogate: reinforce (pytorch-maml-rl's) | lvc (ProMP's low-variance curvature: the same
    # step, plus credit in the meta-gradient for the pre-update policy's exploration; second order only)
    inner_estimator: str = "reinforce"
    # outer=trpo (pytorch-maml-rl's 2D-navigation values)
    max_kl: float = 0.01
    cg_iters: int = 10
    cg_damping: float = 1e-5
    ls_max_steps: int = 15
    ls_backtrack_ratio: float = 0.8
    # Read-only views of the run's outer optimiser (not settings): outer=trpo returns its finished step as the
    # "gradient", which only meta_opt=sgd with lr 1.0 applies unchanged; the builder checks (algos/own_step.py).
    outer_meta_opt: Any = META_OPT_VIEW
    outer_weight_decay: Any = WEIGHT_DECAY_VIEW


def check_outer(a) -> None:
    """One-line refusals of a bad outer step: an unknown name, TRPO settings out of range, and for TRPO a
    meta_opt that would not apply its step unchanged (metarun.algos.own_step)."""
    if a.outer not in OUTERS:
        raise UserError(f"algo.outer={a.outer} is unknown; expected one of: {', '.join(OUTERS)}")
    if a.inner_estimator not in INNER_ESTIMATORS:
        raise UserError(f"algo.inner_estimator={a.inner_estimator} is unknown; expected one of: "
                        f"{', '.join(INNER_ESTIMATORS)}")
    if a.outer == "ppo":
        for key, ok, expected in (("ppo_epochs", a.ppo_epochs >= 1, ">= 1"), ("ppo_lr", a.ppo_lr > 0, "> 0"),
                                  ("clip_eps", 0 < a.clip_eps < 1, "in (0, 1)"),
                                  ("inner_kl_coef", a.inner_kl_coef >= 0, ">= 0"),
                                  ("inner_kl_target", a.inner_kl_target > 0, "> 0")):
            if not ok:
                raise UserError(f"algo.{key}={a[key]} must be {expected} (algo.outer=ppo)")
        check_applies_step_unchanged(a, "algo.outer=ppo")
        return
    if a.outer != "trpo":
        return
    for key, ok, expected in (("max_kl", a.max_kl > 0, "> 0"), ("cg_iters", a.cg_iters >= 1, ">= 1"),
                              ("cg_damping", a.cg_damping >= 0, ">= 0"), ("ls_max_steps", a.ls_max_steps >= 1, ">= 1"),
                              ("ls_backtrack_ratio", 0 < a.ls_backtrack_ratio < 1, "in (0, 1)")):
        if not ok:
            raise UserError(f"algo.{key}={a[key]} must be {expected} (algo.outer=trpo)")
    check_applies_step_unchanged(a, "algo.outer=trpo")


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
    outer = a.get("outer", "reinforce")  # configs saved before outer= existed ran REINFORCE
    inner_estimator = a.get("inner_estimator", "reinforce")  # likewise before inner_estimator= existed
    if c.train:
        check_outer(a)
    steps = c.inner_steps_for(a)
    info = {"name": a.name, "variant": "fo-maml-rl" if a.first_order else "maml-rl",
            "first_order": bool(a.first_order), "inner_lr": a.inner_lr, "inner_steps": a.inner_steps,
            "eval_inner_steps": a.eval_inner_steps, "inner_optimizer": "sgd (REINFORCE, linear baseline, GAE)",
            "outer": "REINFORCE through meta_opt (not TRPO)", "baseline_reg": a.baseline_reg,
            "normalize_advantages": bool(a.normalize_advantages), "inner_estimator": inner_estimator}
    trpo = None
    if outer == "trpo":
        trpo = TRPOSettings(max_kl=a.max_kl, cg_iters=a.cg_iters, cg_damping=a.cg_damping,
                            ls_max_steps=a.ls_max_steps, ls_backtrack_ratio=a.ls_backtrack_ratio)
        info["outer"] = ("TRPO (pytorch-maml-rl's MAMLTRPO): CG on the KL's Hessian-vector products, "
                         "backtracking line search; applied by meta_opt=sgd lr 1.0")
        info.update({k: getattr(trpo, k) for k in ("max_kl", "cg_iters", "cg_damping", "ls_max_steps",
                                                     "ls_backtrack_ratio")})
    ppo = None
    if outer == "ppo":
        ppo = PPOSettings(epochs=a.ppo_epochs, lr=a.ppo_lr, clip_eps=a.clip_eps, inner_kl_coef=a.inner_kl_coef,
                          inner_kl_target=a.inner_kl_target, adaptive_kl=bool(a.adaptive_kl))
        info["outer"] = (f"PPO-clip as ProMP: {a.ppo_epochs} Adam epochs per meta-batch (lr {a.ppo_lr}, clip "
                         f"{a.clip_eps}) + η·KL of the pre-update policy; applied by meta_opt=sgd lr 1.0")
        info.update({"ppo_epochs": a.ppo_epochs, "ppo_lr": a.ppo_lr, "clip_eps": a.clip_eps,
                     "inner_kl_coef": a.inner_kl_coef, "inner_kl_target": a.inner_kl_target,
                     "adaptive_kl": bool(a.adaptive_kl)})
    policy = c.learner(c.family.head_dim(c.phase))
    return maml_rl(policy, c.family, a.inner_lr, steps, a.first_order, a.baseline_reg, a.normalize_advantages,
                   record=not c.train, info=info, outer=outer, trpo=trpo, inner_estimator=inner_estimator, ppo=ppo)
