"""Meta-SGD (Li et al. 2017): MAML whose inner step uses a learned learning rate per parameter, θ − α ∘ ∇L."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from metarun.algos.base import MetaAlgorithm


def metasgd(learner, objective, inner_steps: int, inner_lr_init: Sequence[float] = (0.005, 0.1),
            first_order: bool = False, learn_inner_lr: bool = True) -> MetaAlgorithm:
    """Builds Meta-SGD over a Flax learner.

    meta_params = {"net": params, "inner_lr": α}, α a tree shaped like params; both are meta-trained
    by the outer optimiser. The scan carry is the net params only, so its structure is fixed.

    Args:
      learner: a Flax module.
      objective: (outputs, y) -> (loss, metrics).
      inner_steps: inner steps (the paper uses one), all with the same α.
      inner_lr_init: [low, high]: α starts uniform in [low, high] per entry (the paper: [0.005, 0.1]);
        low == high gives a constant.
      first_order: treat the inner gradients as constants.
      learn_inner_lr: False freezes α (its meta-gradient is zero): with a constant α = c this is MAML
        with inner_lr = c.
    """
    low, high = float(inner_lr_init[0]), float(inner_lr_init[-1])

    def apply_fn(params, x):
        return learner.apply({"params": params}, x)

    def init(key, task):
        net_key, lr_key = jax.random.split(key)
        net = learner.init(net_key, task.support.x)["params"]
        leaves, treedef = jax.tree.flatten(net)
        keys = jax.random.split(lr_key, len(leaves))
        lrs = [jax.random.uniform(k, p.shape, p.dtype, low, high) for k, p in zip(keys, leaves)]
        return {"net": net, "inner_lr": jax.tree.unflatten(treedef, lrs)}

    def support_loss(params, support):
        return objective(apply_fn(params, support.x), support.y)[0]

    def adapt(meta_params, support, key):
        del key
        alpha = meta_params["inner_lr"]
        if not learn_inner_lr:
            alpha = jax.lax.stop_gradient(alpha)

        def inner_step(params, _):
            grads = jax.grad(support_loss)(params, support)
            if first_order:
                grads = jax.lax.stop_gradient(grads)
            return jax.tree.map(lambda p, a, g: p - a * g, params, alpha, grads), None

        adapted, _ = jax.lax.scan(inner_step, meta_params["net"], None, length=inner_steps)
        return adapted

    def loss(meta_params, adapted, query, key):
        del meta_params, key
        return objective(apply_fn(adapted, query.x), query.y)

    return MetaAlgorithm(init=init, adapt=adapt, loss=loss)


def mean_inner_lr(meta_params) -> jax.Array:
    """The mean learned α over all parameters (a diagnostic)."""
    leaves = jax.tree.leaves(meta_params["inner_lr"])
    return sum(jnp.sum(a) for a in leaves) / sum(a.size for a in leaves)


def from_config(cfg, learner, objective, phase: str) -> MetaAlgorithm:
    """Meta-SGD from `cfg.algo`; phase 'eval' uses the test-time inner steps."""
    a = cfg.algo
    steps = a.eval_inner_steps if phase == "eval" else a.inner_steps
    return metasgd(learner, objective, steps, tuple(a.inner_lr_init), a.first_order, a.learn_inner_lr)
