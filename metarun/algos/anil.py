"""ANIL (Raghu et al. 2020): MAML whose inner loop adapts only the final linear `head`; the body is learned outside."""
from __future__ import annotations

from dataclasses import dataclass

import jax
import optax

from metarun.algos.base import Collaborators, MetaAlgorithm
from metarun.algos.maml import check_inner
from metarun.errors import UserError
from metarun.inner import inner_loop
from metarun.learners import Net
from metarun.registry import register

HEAD = "head"


def anil(net: Net, objective, inner_lr: float, inner_steps: int, first_order: bool = False, info=None) -> MetaAlgorithm:
    """Builds ANIL over a learner in a mode whose module has a final Dense named `head` (Conv4, MLP).

    meta_params = {"net": the learner's own params}. The body (every module but `head`) embeds
    the support and query sets once per task; the one inner loop then runs SGD on the head alone
    over those fixed features, so an inner step costs one small matmul. The meta-gradient reaches
    the body through the query features and, via the adapted head, through the support features
    (second order unless first_order).
    """
    body = net._replace(module=net.module.clone(out_dim=None))

    def split(params):
        return {k: v for k, v in params.items() if k != HEAD}, params[HEAD]

    def head_apply(head, features):
        return features @ head["kernel"] + head["bias"]

    def init(key, task):
        params, _ = net.init(key, task.support.x)
        if HEAD not in params:
            raise UserError(f"algo=anil needs a learner with a final Dense named '{HEAD}'")
        return {"net": params}, {}

    def adapt(meta_params, algo_state, support, key):
        del key, algo_state
        trunk, head = split(meta_params["net"])
        features = body.apply(trunk, support.x)

        def step_loss(h, step, _):
            return objective(head_apply(h, features), support.y, support.mask)[0], None

        head, *_ = inner_loop(step_loss, head, optax.sgd(inner_lr), inner_steps, first_order=first_order)
        return {"head": head, "support_x": support.x}

    def loss(meta_params, algo_state, task_state, query, key):
        del key, algo_state
        trunk, _ = split(meta_params["net"])
        features = body.apply_query(trunk, query.x, task_state["support_x"])
        return objective(head_apply(task_state["head"], features), query.y, query.mask)

    return MetaAlgorithm(init=init, adapt=adapt, loss=loss, info=info or {})


@dataclass
class ANILConfig:
    name: str = "anil"
    inner_lr: float = 0.4
    inner_steps: int = 1
    eval_inner_steps: int = 3
    first_order: bool = False


@register("algo", "anil", schema=ANILConfig)
def build(a, c: Collaborators) -> MetaAlgorithm:
    check_inner(a)
    if getattr(c.learner_cfg.get("batch_norm"), "value", c.learner_cfg.get("batch_norm")) == "running":
        raise UserError("algo=anil supports learner.batch_norm=transductive or none (running statistics: algo=maml)")
    steps = c.inner_steps_for(a)
    info = {"name": "anil", "first_order": bool(a.first_order), "inner_lr": a.inner_lr, "inner_steps": a.inner_steps,
            "eval_inner_steps": a.eval_inner_steps, "inner_optimizer": "sgd", "adapted": "head"}
    net = Net(c.learner(c.family.head_dim(c.phase)), c.train, c.transductive)
    return anil(net, c.family.objective, a.inner_lr, steps, a.first_order, info)
