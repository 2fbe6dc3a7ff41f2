"""Feature Transfer (the Deep Kernel Transfer paper's baseline, Patacchiola et al. 2020): no meta-learning.

Training: one network regresses every task's points jointly — the loss is the MSE on each task's support
and query points pooled (no inner loop), averaged over the meta-batch: plain multi-task regression.
Evaluation: a copy of the trained network (its trained head included) is fine-tuned on the support set with
an optax optimiser for `eval_inner_steps` steps, then scores the query set. The authors' sines code
(BayesWatch/deep-kernel-transfer, sines/train_FT.py) fine-tunes every weight with Adam at 1e-2 for 100
steps, so `finetune: all` and Adam 1e-2 are the defaults; `finetune: head` adapts the last layer only.
Regression only: a joint head over all training classes is what classification would need, not built.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import optax

from metarun.algos.base import Collaborators, MetaAlgorithm
from metarun.algos.bmaml import concat_examples
from metarun.algos.maml import check_inner
from metarun.algos.prediction_record import regression_record
from metarun.errors import UserError
from metarun.inner import inner_loop
from metarun.learners import Net
from metarun.registry import register

FINETUNE = ("all", "head")
OPTIMIZERS = {"adam": optax.adam, "sgd": optax.sgd}
HEAD = "head"  # the learners' last layer's parameter name


def feature_transfer(net: Net, family, finetune: str, optimizer: str, lr: float, steps: int, info=None,
                     record: bool = False) -> MetaAlgorithm:
    """Builds Feature Transfer over a learner with a head, in a mode.

    meta_params = {"net": the learner's params}; algo_state = {}.

    Args:
      net: the learner (with its head) and its mode; the training build pools support and query.
      family: the regression family (its objective is the MSE).
      finetune: "all" (every weight) or "head" (the last layer, the body fixed) at evaluation.
      optimizer, lr: the fine-tuning optax optimiser ("adam" | "sgd") and its step size.
      steps: fine-tuning steps on the support set (evaluation only; 0 scores the trained network).
      record: record the `_plot_*` arrays of predictions.png (the regression family's plots).
    """
    objective = family.objective
    opt = OPTIMIZERS[optimizer](lr)

    def init(key, task):
        params, _ = net.init(key, task.support.x)
        if finetune == "head" and HEAD not in params:
            raise UserError(f"algo.finetune=head: learner has no layer named {HEAD!r} (its layers: {', '.join(params)})")
        return {"net": params}, {}

    def adapt(meta_params, algo_state, support, key):
        del algo_state, key
        params = meta_params["net"]
        if net.train or steps == 0:
            return {"params": params, "support": support}
        if finetune == "all":
            def step_loss(p, step, _):
                return objective(net.apply(p, support.x), support.y, support.mask)[0], None
            tuned, _, _, _ = inner_loop(step_loss, params, opt, steps)
        else:
            def step_loss(head, step, _):
                return objective(net.apply({**params, HEAD: head}, support.x), support.y, support.mask)[0], None
            head, _, _, _ = inner_loop(step_loss, params[HEAD], opt, steps)
            tuned = {**params, HEAD: head}
        return {"params": tuned, "support": support}

    def loss(meta_params, algo_state, task_state, query, key):
        del meta_params, algo_state, key
        params, support = task_state["params"], task_state["support"]
        if net.train:  # every point of the task is training data: support and query pooled
            pooled = concat_examples(support, query)
            return objective(net.apply(params, pooled.x), pooled.y, pooled.mask)
        total, metrics = objective(net.apply_query(params, query.x, support.x), query.y, query.mask)
        if record:
            metrics = {**metrics, **regression_record(
                support, query, lambda x: (net.apply_query(params, x, support.x), None))}
        return total, metrics

    return MetaAlgorithm(init=init, adapt=adapt, loss=loss, info=info or {})


@dataclass
class FeatureTransferConfig:
    name: str = "feature_transfer"
    finetune: str = "all"        # all | head: the weights fine-tuned on the support set at evaluation
    optimizer: str = "adam"      # adam | sgd: the fine-tuning optimiser (optax)
    finetune_lr: float = 0.01
    eval_inner_steps: int = 100  # fine-tuning steps (the DKT paper reports 1 and 100)


@register("algo", "feature_transfer", schema=FeatureTransferConfig)
def build(a, c: Collaborators) -> MetaAlgorithm:
    """Feature Transfer from its config; the eval build fine-tunes for the test-time steps."""
    if c.family.kind != "regression":
        raise UserError(f"algo=feature_transfer serves regression datasets (sinusoid, gp, sawtooth); "
                        f"dataset={c.family.name} is {c.family.kind}")
    check_inner(a)
    if a.finetune not in FINETUNE:
        raise UserError(f"algo.finetune={a.finetune} is unknown; expected one of: {', '.join(FINETUNE)}")
    if a.optimizer not in OPTIMIZERS:
        raise UserError(f"algo.optimizer={a.optimizer} is unknown; expected one of: {', '.join(OPTIMIZERS)}")
    if not a.finetune_lr > 0:
        raise UserError(f"algo.finetune_lr={a.finetune_lr} must be > 0")
    steps = 0 if c.train else (c.inner_steps if c.inner_steps is not None else a.eval_inner_steps)
    info = {"name": "feature_transfer", "training": "joint regression on every task's support + query, no inner loop",
            "finetune": a.finetune, "head": "the trained one", "optimizer": a.optimizer,
            "finetune_lr": a.finetune_lr, "eval_inner_steps": a.eval_inner_steps}
    net = Net(c.learner(c.family.head_dim(c.phase)), c.train, c.transductive)
    return feature_transfer(net, c.family, a.finetune, a.optimizer, a.finetune_lr, steps, info,
                            record=not c.train)
