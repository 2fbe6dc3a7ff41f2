"""Reptile (Nichol et al. 2018): k steps of Adam/SGD on the task, then move the initialisation toward the result."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import jax

from metarun.algos.base import Collaborators, MetaAlgorithm, mean_over_tasks
from metarun.algos.maml import check_inner
from metarun.errors import UserError
from metarun.inner import inner_loop, make_inner_opt, minibatch_indices
from metarun.learners import Net
from metarun.registry import register

INNER_STATES = ("carry", "fresh")


def reptile(net: Net, objective, inner_lr: float, inner_steps: int, inner_opt: str = "adam",
            inner_beta1: float = 0.0, inner_batch: Optional[int] = None, inner_state: str = "carry",
            info=None) -> MetaAlgorithm:
    """Builds Reptile over a learner in a mode.

    The meta-gradient is θ − φ (θ: the initialisation, φ: the weights after `inner_steps` of the
    inner optimiser on the support set); an `optax.sgd(ε)` outer step then gives θ + ε·mean(φ − θ),
    Reptile's batched interpolation (the paper's ε annealed linearly from 1 to 0 is meta_opt=sgd,
    lr=1.0, schedule=linear, end_lr_fraction=0).

    inner_state="carry" is the authors' code (supervised-reptile): one inner Adam whose moments and
    step count live on across tasks — the tasks of a meta-batch are adapted one after another, each
    starting from the moments the previous one left — and evaluation starts every test task from the
    trained moments (its changes are not kept). The moments are algo_state["inner_opt"].
    inner_state="fresh" starts the optimiser afresh per task (the tasks of a meta-batch in parallel).

    Args:
      inner_opt: 'adam' (the paper's; with beta1=inner_beta1) or 'sgd'.
      inner_batch: examples per inner step, drawn in shuffled passes over the support set; None = all.
    """
    opt = make_inner_opt(inner_opt, inner_lr, inner_beta1)
    carry = inner_state == "carry"

    def init(key, task):
        params, _ = net.init(key, task.support.x)
        return {"net": params}, ({"inner_opt": opt.init(params)} if carry else {})

    def run_inner(theta, opt_state, support, key):
        idx = minibatch_indices(key, support.y.shape[0], inner_batch, inner_steps)

        def step_loss(params, step, batch_idx):
            batch = jax.tree.map(lambda a: None if a is None else a[batch_idx], support)
            return objective(net.apply(params, batch.x, step=step), batch.y, batch.mask)[0], None

        phi, opt_state, *_ = inner_loop(step_loss, theta, opt, inner_steps, opt_state=opt_state, xs=idx,
                                        first_order=True)
        return phi, opt_state

    def adapt(meta_params, algo_state, support, key):
        phi, _ = run_inner(meta_params["net"], algo_state.get("inner_opt"), support, key)
        return {"params": phi, "support_x": support.x}

    def loss(meta_params, algo_state, task_state, query, key):
        del meta_params, algo_state, key
        out = net.apply_query(task_state["params"], query.x, task_state["support_x"])
        return objective(out, query.y, query.mask)

    def one_task(theta, opt_state, task, key):
        adapt_key, _ = jax.random.split(key)
        phi, opt_state = run_inner(theta, opt_state, task.support, adapt_key)
        _, metrics = objective(net.apply(phi, task.query.x), task.query.y, task.query.mask)
        return jax.tree.map(lambda t, p: t - p, theta, phi), opt_state, metrics

    def meta_step(meta_params, algo_state, tasks, key, map_tasks):
        theta = meta_params["net"]
        keys = jax.random.split(key, jax.tree.leaves(tasks)[0].shape[0])
        if carry:
            def body(opt_state, task_key):
                diff, opt_state, metrics = one_task(theta, opt_state, *task_key)
                return opt_state, (diff, metrics)
            opt_state, (diffs, metrics) = jax.lax.scan(body, algo_state["inner_opt"], (tasks, keys))
            algo_state = {**algo_state, "inner_opt": opt_state}
        else:
            diffs, _, metrics = map_tasks(lambda t, k: one_task(theta, None, t, k), tasks, keys)
        return {"net": mean_over_tasks(diffs)}, algo_state, mean_over_tasks(metrics)

    return MetaAlgorithm(init=init, adapt=adapt, loss=loss, meta_step=meta_step, info=info or {})


@dataclass
class ReptileConfig:
    name: str = "reptile"
    inner_opt: str = "adam"                   # adam | sgd
    inner_lr: float = 1e-3
    inner_beta1: float = 0.0                  # supervised-reptile's Adam has beta1=0
    inner_state: str = "carry"                # carry (the authors' code: moments live across tasks) | fresh
    inner_steps: int = 5
    inner_batch: Optional[int] = 10           # examples per inner step; null = the whole support set
    eval_inner_steps: int = 50
    eval_inner_batch: Optional[int] = 5


@register("algo", "reptile", schema=ReptileConfig)
def build(a, c: Collaborators) -> MetaAlgorithm:
    check_inner(a)
    if a.inner_opt not in ("adam", "sgd"):
        raise UserError(f"algo.inner_opt={a.inner_opt} is unknown; expected adam or sgd")
    if a.inner_state not in INNER_STATES:
        raise UserError(f"algo.inner_state={a.inner_state} is unknown; expected one of: {', '.join(INNER_STATES)}")
    if getattr(c.learner_cfg.get("batch_norm"), "value", c.learner_cfg.get("batch_norm")) == "running":
        raise UserError("algo=reptile supports learner.batch_norm=transductive or none (running statistics: algo=maml)")
    if c.train:
        steps, batch = a.inner_steps, a.inner_batch
    else:
        steps, batch = a.eval_inner_steps, a.eval_inner_batch
    if c.inner_steps is not None:
        steps = c.inner_steps
    info = {"name": "reptile", "inner_optimizer": a.inner_opt, "inner_lr": a.inner_lr, "inner_beta1": a.inner_beta1,
            "inner_state": a.inner_state, "inner_steps": a.inner_steps, "inner_batch": a.inner_batch,
            "eval_inner_steps": a.eval_inner_steps, "eval_inner_batch": a.eval_inner_batch}
    net = Net(c.learner(c.family.head_dim(c.phase)), c.train, c.transductive)
    return reptile(net, c.family.objective, a.inner_lr, steps, a.inner_opt, a.inner_beta1, batch, a.inner_state, info)
