"""Bayesian MAML (Yoon et al. 2018): M particles adapted by SVGD in the inner loop, the chaser loss outside.

The particles are M copies of the learner's weights, meta-learned as their initial values. `adapt` runs
`inner_steps` SVGD steps on the support set (the chaser); in training `loss` runs `leader_steps` more SVGD
steps from the chaser on support + query (the leader, a fixed target) and returns the chaser loss
(mean over particles of the squared distance to the leader). Predictions average over the particles —
the ensemble is the posterior: class probabilities are averaged (uncertainty.predictive_log_probs),
regression predictions are the particles' mean.

log p is the negative mean loss of a particle on the data (the family's objective): so with one particle
SVGD is exactly MAML's SGD step with the same inner_lr (the kernel is 1 and the repulsion 0), which the
tests check through the algorithm. The paper's Gaussian weight prior with a Gamma hyperprior is not
included: the meta-learned initial particles play the prior's part, as in MAML.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from metarun.algos.base import Collaborators, MetaAlgorithm
from metarun.algos.dkt import check_family
from metarun.algos.maml import check_inner
from metarun.algos.prediction_record import regression_record
from metarun.algos.svgd import chaser_loss, svgd_steps
from metarun.core import map_copies
from metarun.data.tasks import Examples
from metarun.errors import UserError
from metarun.learners import Net
from metarun.registry import register
from metarun.uncertainty import predictive_log_probs


def concat_examples(a: Examples, b: Examples) -> Examples:
    """Support and query as one set (the leader's data); masks kept when either has one."""
    mask = None
    if a.mask is not None or b.mask is not None:
        ones = lambda e: jnp.ones(e.y.shape[:1], jnp.float32) if e.mask is None else e.mask.astype(jnp.float32)  # noqa: E731
        mask = jnp.concatenate([ones(a), ones(b)])
    return Examples(jnp.concatenate([a.x, b.x]), jnp.concatenate([a.y, b.y]), mask)


def ensemble_metrics(family, outputs, query):
    """The family's metrics of the ensemble's prediction from per-member outputs [M, q, ...]: classification
    averages probabilities (the posterior predictive), regression averages predictions."""
    if family.kind == "classification":
        return family.objective(predictive_log_probs(outputs), query.y, query.mask)
    return family.objective(outputs.mean(0), query.y, query.mask)


def ensemble_record(net: Net, members, support, query) -> dict:
    """predictions.png's `_plot_*` arrays of an ensemble (particles, weight samples) on a regression task: the
    members' mean on the grid and their spread (standard deviation over members) as the band. The spread is
    the ensemble's disagreement about the function, not a predictive noise (neither algorithm models noise)."""
    def predict(x):
        outputs = map_copies(lambda p: net.apply_query(p, x, support.x), members)
        return outputs.mean(0), outputs.std(0)
    return regression_record(support, query, predict)


def bmaml(net: Net, family, particles: int, inner_lr: float, inner_steps: int, leader_steps: int = 1,
          first_order: bool = False, info=None, record: bool = False) -> MetaAlgorithm:
    """Builds Bayesian MAML over a learner in a mode.

    meta_params = {"particles": the learner's params stacked M times on axis 0 (independent inits)};
    algo_state = {}.

    Args:
      net: the learner and its mode.
      family: the task family (its objective is each particle's loss; its kind picks the ensemble rule).
      particles: M.
      inner_lr: the SVGD step size (MAML's alpha with one particle).
      inner_steps: chaser steps on the support set (the eval build passes the test-time count).
      leader_steps: the leader's further steps on support + query (training only).
      first_order: no second derivatives through the chaser's steps.
      record: (regression, evaluation) also return predictions.png's `_plot_*` arrays (ensemble_record).
    """
    objective = family.objective

    def grad_logp(examples: Examples):
        def logp(p):
            return -objective(net.apply(p, examples.x), examples.y, examples.mask)[0]
        return lambda stacked: map_copies(jax.grad(logp), stacked)

    def init(key, task):
        stacked = jax.vmap(lambda k: net.init(k, task.support.x)[0])(jax.random.split(key, particles))
        return {"particles": stacked}, {}

    def adapt(meta_params, algo_state, support, key):
        del key, algo_state
        chaser = svgd_steps(meta_params["particles"], grad_logp(support), inner_lr, inner_steps, first_order)
        return {"particles": chaser, "support": support}

    def loss(meta_params, algo_state, task_state, query, key):
        del key, algo_state
        chaser, support = task_state["particles"], task_state["support"]
        outputs = map_copies(lambda p: net.apply_query(p, query.x, support.x), chaser)
        _, metrics = ensemble_metrics(family, outputs, query)
        if not net.train:
            if record:
                metrics = {**metrics, **ensemble_record(net, chaser, support, query)}
            return metrics["loss"], metrics
        # The leader is a target: it starts from the chaser held constant, so no gradient is built for it.
        leader = svgd_steps(jax.lax.stop_gradient(chaser), grad_logp(concat_examples(support, query)), inner_lr,
                            leader_steps, first_order=True)
        total = chaser_loss(chaser, leader)
        return total, {**metrics, "predictive_loss": metrics["loss"], "loss": total}

    return MetaAlgorithm(init=init, adapt=adapt, loss=loss, info=info or {})


@dataclass
class BMAMLConfig:
    name: str = "bmaml"
    particles: int = 5
    inner_lr: float = 0.4
    inner_steps: int = 1
    eval_inner_steps: int = 3
    leader_steps: int = 1
    first_order: bool = False


@register("algo", "bmaml", schema=BMAMLConfig)
def build(a, c: Collaborators) -> MetaAlgorithm:
    """BMAML from its config; the eval build uses the test-time inner steps and averages the particles."""
    check_family("bmaml", c)
    check_inner(a)
    if a.particles < 1:
        raise UserError(f"algo.particles={a.particles} must be >= 1")
    if a.leader_steps < 1:
        raise UserError(f"algo.leader_steps={a.leader_steps} must be >= 1")
    steps = c.inner_steps_for(a)
    info = {"name": "bmaml", "particles": a.particles, "inner_lr": a.inner_lr, "inner_steps": a.inner_steps,
            "eval_inner_steps": a.eval_inner_steps, "leader_steps": a.leader_steps,
            "first_order": bool(a.first_order), "kernel": "rbf, median bandwidth", "weight_prior": "none"}
    net = Net(c.learner(c.family.head_dim(c.phase)), c.train, c.transductive)
    return bmaml(net, c.family, a.particles, a.inner_lr, steps, a.leader_steps, a.first_order, info,
                 record=c.records_regression)
