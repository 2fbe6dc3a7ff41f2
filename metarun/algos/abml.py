"""Amortized Bayesian meta-learning (Ravi & Beatson 2019): a Gaussian posterior over the weights per task.

The meta-parameters are a diagonal Gaussian prior over the learner's weights. `adapt` starts the task's
variational posterior q at the prior and takes `inner_steps` SGD steps on its negative ELBO on the support
set (abml_math.adapt_posterior: E_q[support loss] + kl_weight KL(q || prior), both q's mean and log-std
move); `loss` is E_q[query loss] + outer_kl_weight KL(q || prior), Monte Carlo over `samples` weight
draws. Predictions average over `eval_samples` draws (classification: averaged probabilities).

Reduction (tested through the algorithm): with kl_weight = outer_kl_weight = 0, one sample and a
point-mass prior (init_log_std -> -inf), adapt is MAML's inner loop on the prior's mean and loss is
MAML's query loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax

from metarun.algos.abml_math import adapt_posterior, diag_gaussian, kl_diag_gaussians, sample_weights
from metarun.algos.base import Collaborators, MetaAlgorithm
from metarun.algos.bmaml import ensemble_metrics, ensemble_record
from metarun.algos.dkt import check_family
from metarun.algos.maml import check_inner
from metarun.core import map_copies
from metarun.errors import UserError
from metarun.learners import Net
from metarun.registry import register


def _weight(w: float):
    # A zero weight as a Python 0 drops the KL from the graph (abml_math: no 0 * inf with a point-mass q).
    return 0 if w == 0 else float(w)


def abml(net: Net, family, inner_lr: float, inner_steps: int, samples: int = 1, eval_samples: int = 10,
         kl_weight: float = 1e-5, outer_kl_weight: float = 1e-5, init_log_std: float = -4.0,
         first_order: bool = False, info=None, record: bool = False) -> MetaAlgorithm:
    """Builds ABML over a learner in a mode.

    meta_params = {"prior": {"mean": the learner's params, "log_std": same shape}}; algo_state = {}.

    Args:
      net: the learner and its mode (its train flag picks `samples` or `eval_samples` in `loss`).
      family: the task family (its objective is the per-sample loss; its kind picks the averaging rule).
      inner_lr: the inner SGD step size on q's mean and log-std.
      inner_steps: inner steps (the eval build passes the test-time count).
      samples: weight samples per inner step and for the training query loss.
      eval_samples: weight samples for predictions at evaluation.
      kl_weight / outer_kl_weight: KL(q || prior)'s weight in the inner / the outer loss (ABML down-weights
        it; a per-example ELBO would use 1/number of examples).
      init_log_std: the prior's initial log standard deviation everywhere.
      record: (regression, evaluation) also return predictions.png's `_plot_*` arrays: the sampled networks'
        mean and spread on a grid (bmaml.ensemble_record), the same weight draws as the metrics.
    """
    objective = family.objective
    n_eval = samples if net.train else eval_samples
    inner_kl, outer_kl = _weight(kl_weight), _weight(outer_kl_weight)

    def init(key, task):
        params, _ = net.init(key, task.support.x)
        return {"prior": diag_gaussian(params, init_log_std)}, {}

    def adapt(meta_params, algo_state, support, key):
        del algo_state

        def nll(w):
            return objective(net.apply(w, support.x), support.y, support.mask)[0]

        q = adapt_posterior(meta_params["prior"], nll, key, inner_lr, inner_steps, samples, inner_kl, first_order)
        return {"q": q, "support": support}

    def loss(meta_params, algo_state, task_state, query, key):
        del algo_state
        q = task_state["q"]
        weights = sample_weights(q, key, n_eval)
        outputs = map_copies(lambda w: net.apply_query(w, query.x, task_state["support"].x), weights)
        expected = jax.vmap(lambda o: objective(o, query.y, query.mask)[0])(outputs).mean()
        _, metrics = ensemble_metrics(family, outputs, query)
        total = expected
        if outer_kl != 0:
            kl = kl_diag_gaussians(q, meta_params["prior"])
            total = expected + outer_kl * kl
            metrics = {**metrics, "kl": kl}
        if record:
            metrics = {**metrics, **ensemble_record(net, weights, task_state["support"], query)}
        return total, {**metrics, "predictive_loss": metrics["loss"], "loss": total}

    return MetaAlgorithm(init=init, adapt=adapt, loss=loss, info=info or {})


@dataclass
class ABMLConfig:
    name: str = "abml"
    inner_lr: float = 0.4
    inner_steps: int = 1
    eval_inner_steps: int = 3
    samples: int = 1
    eval_samples: int = 10
    kl_weight: float = 1.0e-5
    outer_kl_weight: float = 1.0e-5
    init_log_std: float = -4.0
    first_order: bool = False


@register("algo", "abml", schema=ABMLConfig)
def build(a, c: Collaborators) -> MetaAlgorithm:
    """ABML from its config; the eval build uses the test-time inner steps and eval_samples."""
    check_family("abml", c)
    check_inner(a)
    for key in ("samples", "eval_samples"):
        if a[key] < 1:
            raise UserError(f"algo.{key}={a[key]} must be >= 1")
    for key in ("kl_weight", "outer_kl_weight"):
        if a[key] < 0:
            raise UserError(f"algo.{key}={a[key]} must be >= 0")
    steps = c.inner_steps_for(a)
    info = {"name": "abml", "inner_lr": a.inner_lr, "inner_steps": a.inner_steps,
            "eval_inner_steps": a.eval_inner_steps, "samples": a.samples, "eval_samples": a.eval_samples,
            "kl_weight": a.kl_weight, "outer_kl_weight": a.outer_kl_weight, "init_log_std": a.init_log_std,
            "first_order": bool(a.first_order), "posterior": "diagonal Gaussian over all weights"}
    net = Net(c.learner(c.family.head_dim(c.phase)), c.train, c.transductive)
    return abml(net, c.family, a.inner_lr, steps, a.samples, a.eval_samples, a.kl_weight, a.outer_kl_weight,
                a.init_log_std, a.first_order, info, record=c.records_regression)
