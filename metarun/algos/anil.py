"""ANIL (Raghu et al. 2020): MAML whose inner loop adapts only the final linear `head`; the body is learned outside."""
from __future__ import annotations

import jax

from metarun.algos.base import MetaAlgorithm

HEAD = "head"


def anil(learner, objective, inner_lr: float, inner_steps: int, first_order: bool = False) -> MetaAlgorithm:
    """Builds ANIL over a Flax learner with a final Dense module named `head` (Conv4, MLP).

    meta_params is the learner's own param tree (checkpoints match MAML's). The body (every
    module but `head`) embeds the support and query sets once per task; the inner loop then runs
    plain SGD on the head alone over those fixed features, so an inner step costs one small matmul.
    The meta-gradient reaches the body through the query features and, via the adapted head,
    through the support features (second order unless first_order).

    Args:
      learner: a Flax module with `out_dim` and a `head` submodule.
      objective: (outputs, y) -> (loss, metrics).
      inner_lr: the inner SGD step size.
      inner_steps: inner steps on the head (a lax.scan).
      first_order: treat the inner gradients as constants.
    """
    body = learner.clone(out_dim=None)

    def split(params):
        return {k: v for k, v in params.items() if k != HEAD}, params[HEAD]

    def embed(params, x):
        return body.apply({"params": split(params)[0]}, x)

    def head_apply(head, features):
        return features @ head["kernel"] + head["bias"]

    def init(key, task):
        params = learner.init(key, task.support.x)["params"]
        if HEAD not in params:
            raise ValueError(f"ANIL needs a learner with a final Dense named '{HEAD}'")
        return params

    def adapt(meta_params, support, key):
        del key
        features = embed(meta_params, support.x)

        def inner_step(head, _):
            grads = jax.grad(lambda h: objective(head_apply(h, features), support.y)[0])(head)
            if first_order:
                grads = jax.lax.stop_gradient(grads)
            return jax.tree.map(lambda p, g: p - inner_lr * g, head, grads), None

        head, _ = jax.lax.scan(inner_step, split(meta_params)[1], None, length=inner_steps)
        return head

    def loss(meta_params, head, query, key):
        del key
        return objective(head_apply(head, embed(meta_params, query.x)), query.y)

    return MetaAlgorithm(init=init, adapt=adapt, loss=loss)


def from_config(cfg, learner, objective, phase: str) -> MetaAlgorithm:
    """ANIL from `cfg.algo`; phase 'eval' uses the test-time inner steps."""
    a = cfg.algo
    steps = a.eval_inner_steps if phase == "eval" else a.inner_steps
    return anil(learner, objective, a.inner_lr, steps, a.first_order)
