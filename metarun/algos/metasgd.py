"""Meta-SGD (Li et al. 2017): MAML whose inner step uses a learned learning rate per parameter, θ − α ∘ ∇L."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence

import jax
import jax.numpy as jnp

from metarun.algos.base import Collaborators, MetaAlgorithm
from metarun.algos.maml import check_inner
from metarun.errors import UserError
from metarun.inner import inner_loop, scale_by_learned_rates
from metarun.learners import Net
from metarun.registry import register


def metasgd(net: Net, objective, inner_steps: int, inner_lr_init: Sequence[float] = (0.005, 0.1),
            first_order: bool = False, learn_inner_lr: bool = True, info=None) -> MetaAlgorithm:
    """Builds Meta-SGD over a learner in a mode.

    meta_params = {"net": params, "inner_lr": α}, α a tree shaped like params; both are meta-trained
    by the outer optimiser. The inner update is `scale_by_learned_rates(α)` run by the one inner loop.

    Args:
      inner_steps: inner steps (the paper uses one), all with the same α.
      inner_lr_init: [low, high]: α starts uniform in [low, high] per entry (the paper: [0.005, 0.1]).
      first_order: treat the inner gradients as constants.
      learn_inner_lr: False freezes α (zero meta-gradient): with a constant α = c this is MAML with inner_lr = c.
    """
    low, high = float(inner_lr_init[0]), float(inner_lr_init[-1])

    def init(key, task):
        net_key, lr_key = jax.random.split(key)
        params, stats = net.init(net_key, task.support.x)
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(lr_key, len(leaves))
        lrs = [jax.random.uniform(k, p.shape, p.dtype, low, high) for k, p in zip(keys, leaves)]
        return {"net": params, "inner_lr": jax.tree.unflatten(treedef, lrs)}, {}

    def adapt(meta_params, algo_state, support, key):
        del key, algo_state
        alpha = meta_params["inner_lr"] if learn_inner_lr else jax.lax.stop_gradient(meta_params["inner_lr"])

        def step_loss(params, step, _):
            return objective(net.apply(params, support.x, step=step), support.y, support.mask)[0], None

        adapted, *_ = inner_loop(step_loss, meta_params["net"], scale_by_learned_rates(alpha), inner_steps,
                                 first_order=first_order)
        return {"params": adapted, "support_x": support.x}

    def loss(meta_params, algo_state, task_state, query, key):
        del meta_params, algo_state, key
        out = net.apply_query(task_state["params"], query.x, task_state["support_x"])
        return objective(out, query.y, query.mask)

    return MetaAlgorithm(init=init, adapt=adapt, loss=loss, info=info or {})


def mean_inner_lr(meta_params) -> jax.Array:
    """The mean learned α over all parameters (a diagnostic)."""
    leaves = jax.tree.leaves(meta_params["inner_lr"])
    return sum(jnp.sum(a) for a in leaves) / sum(a.size for a in leaves)


@dataclass
class MetaSGDConfig:
    name: str = "metasgd"
    inner_lr_init: List[float] = field(default_factory=lambda: [0.005, 0.1])  # uniform [low, high]
    learn_inner_lr: bool = True
    inner_steps: int = 1
    eval_inner_steps: int = 1
    first_order: bool = False


@register("algo", "metasgd", schema=MetaSGDConfig)
def build(a, c: Collaborators) -> MetaAlgorithm:
    check_inner(a)
    if len(a.inner_lr_init) not in (1, 2) or min(a.inner_lr_init) < 0:
        raise UserError(f"algo.inner_lr_init={list(a.inner_lr_init)}: expected [low, high] with 0 <= low <= high")
    if c.learner_cfg.get("batch_norm") is not None and getattr(c.learner_cfg.batch_norm, "value", c.learner_cfg.batch_norm) == "running":
        raise UserError("algo=metasgd supports learner.batch_norm=transductive or none (running statistics: algo=maml)")
    steps = c.inner_steps_for(a)
    info = {"name": "metasgd", "first_order": bool(a.first_order), "learn_inner_lr": bool(a.learn_inner_lr),
            "inner_lr_init": list(a.inner_lr_init), "inner_steps": a.inner_steps,
            "eval_inner_steps": a.eval_inner_steps, "inner_optimizer": "learned per-parameter rates"}
    net = Net(c.learner(c.family.head_dim(c.phase)), c.train, c.transductive)
    return metasgd(net, c.family.objective, steps, tuple(a.inner_lr_init), a.first_order, a.learn_inner_lr, info)
