"""MAML (Finn et al. 2017) and first-order MAML: inner SGD on the support set, outer loss on the query."""
from __future__ import annotations

import jax

from metarun.algos.base import MetaAlgorithm


def maml(learner, objective, inner_lr: float, inner_steps: int, first_order: bool = False) -> MetaAlgorithm:
    """Builds MAML over a Flax learner.

    Args:
      learner: a Flax module mapping inputs to outputs; its params are the meta-parameters.
      objective: (outputs, y) -> (loss, metrics).
      inner_lr: the inner SGD step size alpha.
      inner_steps: inner SGD steps on the support set (a lax.scan, so the step compiles once).
      first_order: treat inner gradients as constants (FOMAML): no second derivatives.
    """

    def apply_fn(params, x):
        return learner.apply({"params": params}, x)

    def init(key, task):
        return learner.init(key, task.support.x)["params"]

    def support_loss(params, support):
        return objective(apply_fn(params, support.x), support.y)[0]

    def adapt(meta_params, support, key):
        del key

        def inner_step(params, _):
            grads = jax.grad(support_loss)(params, support)
            if first_order:
                grads = jax.lax.stop_gradient(grads)
            return jax.tree.map(lambda p, g: p - inner_lr * g, params, grads), None

        adapted, _ = jax.lax.scan(inner_step, meta_params, None, length=inner_steps)
        return adapted

    def loss(meta_params, adapted, query, key):
        del meta_params, key
        return objective(apply_fn(adapted, query.x), query.y)

    return MetaAlgorithm(init=init, adapt=adapt, loss=loss)


def from_config(cfg, learner, objective, phase: str) -> MetaAlgorithm:
    """MAML from `cfg.algo`; phase 'eval' uses the test-time inner steps."""
    steps = cfg.algo.eval_inner_steps if phase == "eval" else cfg.algo.inner_steps
    return maml(learner, objective, cfg.algo.inner_lr, steps, cfg.algo.first_order)
