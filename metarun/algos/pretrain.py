"""Whole-class pre-training (Chen et al. 2019's Baseline / Baseline++ training stage): the learner's body and a
linear or cosine head over every training class, cross-entropy on minibatches of labelled images.

Training does not see episodes: the algorithm registers with train_tasks="batches", so the classification
family's training sampler yields single labelled images (label = the class's index in the training split)
and the trainer stacks `train.meta_batch` of them per step; `meta_step` treats them as one minibatch
(BatchNorm over the whole batch, running statistics updated when learner.batch_norm=running, dropout keys
passed). augment= and regularize= apply as for any algorithm (augmented training images, weight decay,
label smoothing).

Validation and test are the few-shot protocol on the body's features, so the best checkpoint is chosen on
the few-shot metric: the eval build fine-tunes a new head per episode on the frozen body (`eval_head`
linear = Baseline's, cosine = Baseline++'s, Closer Look's settings, metarun.algos.finetune) or, cheaper,
classifies by the nearest class mean of the support features (centroid, ProtoNet-style).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import jax

from metarun.algos.base import Collaborators, MetaAlgorithm
from metarun.algos.finetune import FitSettings, finetune
from metarun.algos.heads import check_head, head_logits, init_head
from metarun.algos.protonet import class_means, squared_distances
from metarun.data.tasks import Examples
from metarun.errors import UserError
from metarun.learners import Net, dropout_rngs
from metarun.registry import register

EVAL_HEADS = ("linear", "cosine", "centroid")


def pretrain(net: Net, objective, classes: int, head: str = "linear", scale: Optional[float] = None,
             learnable_norm: bool = True, info=None) -> MetaAlgorithm:
    """The training build: meta_params = {"net": the body's params, "head": the whole-class head}.

    `head` lives beside `net`, not in it: a later run's `init.from` takes the body alone, and fine-tuning
    reads params["net"] as a body. A "task" is one labelled image (Task.query); `meta_step` stacks the
    meta-batch into one minibatch.
    """

    def init(key, task):
        body_key, head_key = jax.random.split(key)
        params, stats = net.init(body_key, task.query.x)
        dim = jax.eval_shape(lambda x: net.apply(params, x, stats, rngs=dropout_rngs(head_key)),
                             task.query.x).shape[-1]
        return ({"net": params, "head": init_head(head_key, dim, classes, head, learnable_norm)},
                {"batch_stats": stats} if stats else {})

    def batch_loss(params, algo_state, batch: Examples, key):
        """(loss, (metrics, updated running statistics)) of one minibatch."""
        features, stats = net.apply_updating(params["net"], batch.x, algo_state.get("batch_stats"),
                                             rngs=dropout_rngs(key))
        loss, metrics = objective(head_logits(params["head"], features, scale), batch.y)
        return loss, (metrics, stats)

    def adapt(meta_params, algo_state, support, key):
        del meta_params, algo_state, support, key
        return {}

    def loss(meta_params, algo_state, task_state, query, key):
        del task_state
        loss_value, (metrics, _) = batch_loss(meta_params, algo_state, query, key)
        return loss_value, metrics

    def meta_step(params, algo_state, tasks, key, map_tasks):
        del map_tasks  # one minibatch, not a map over tasks
        x = tasks.query.x.reshape((-1,) + tasks.query.x.shape[2:])
        batch = Examples(x, tasks.query.y.reshape(-1))
        (_, (metrics, stats)), grads = jax.value_and_grad(batch_loss, has_aux=True)(params, algo_state, batch, key)
        if stats:
            algo_state = {**algo_state, "batch_stats": stats}
        return grads, algo_state, metrics

    return MetaAlgorithm(init=init, adapt=adapt, loss=loss, meta_step=meta_step, info=info or {})


def nearest_centroid(body: Net, objective, ways: int, info=None) -> MetaAlgorithm:
    """Few-shot episodes on the frozen body's features: logits = -squared distance to each class's mean
    support feature (a ProtoNet's classifier without its training; running statistics used when kept)."""

    def adapt(meta_params, algo_state, support, key):
        del key
        features = body.apply(meta_params["net"], support.x, algo_state.get("batch_stats"))
        return {"prototypes": class_means(features, support.y, ways), "support_x": support.x}

    def loss(meta_params, algo_state, task_state, query, key):
        del key
        features = body.apply_query(meta_params["net"], query.x, task_state["support_x"], algo_state.get("batch_stats"))
        return objective(-squared_distances(features, task_state["prototypes"]), query.y, query.mask)

    return MetaAlgorithm(init=None, adapt=adapt, loss=loss, info=info or {})


@dataclass
class PretrainConfig:
    """Whole-class pre-training; validated and tested on few-shot episodes with a head fitted per episode."""
    name: str = "pretrain"
    head: str = "linear"                # linear: Baseline; cosine: Baseline++ (Chen et al. 2019)
    scale: Optional[float] = None       # cosine logits' scale; null: 2 up to 200 classes, 10 above (their rule)
    learnable_norm: bool = True         # cosine: the authors' class-wise learned norm (false: the paper's plain cosine)
    eval_head: Optional[str] = None     # episodes: linear | cosine (a fine-tuned head) | centroid; null: as `head`
    eval_epochs: int = 100              # fine-tuning passes over the support set (Closer Look: 100, batch 4)
    eval_batch_size: Optional[int] = 4


@register("algo", "pretrain", schema=PretrainConfig, train_tasks="batches", dropout_keys=True)
def build(a, c: Collaborators) -> MetaAlgorithm:
    if c.family.kind != "classification" or getattr(c.family, "train_tasks", None) != "batches":
        raise UserError(f"algo=pretrain trains on labelled batches of an image classification dataset; "
                        f"dataset={c.family.name} feeds the {c.family.kind} family")
    head = check_head(a.head, "algo.head")
    eval_head = a.eval_head or head
    if eval_head not in EVAL_HEADS:
        raise UserError(f"algo.eval_head={eval_head} is unknown; expected one of: {', '.join(EVAL_HEADS)}")
    classes = c.family.num_classes["train"]
    info = {"name": "pretrain", "head": head, "classes": classes, "eval_head": eval_head,
            "scale": a.scale if head == "cosine" else None}
    if c.train:
        return pretrain(Net(c.learner(None), True), c.family.objective, classes, head, a.scale,
                        a.learnable_norm, info)
    body = Net(c.learner(None), train=False, transductive=c.transductive)
    ways = c.family.ways("eval")
    if eval_head == "centroid":
        built = nearest_centroid(body, c.family.objective, ways, info)
    else:
        settings = FitSettings(epochs=a.eval_epochs, batch_size=a.eval_batch_size).check("pretrain")
        info.update(eval_epochs=settings.epochs, eval_batch_size=settings.batch_size)
        built = finetune(body, c.family.objective, ways, settings, eval_head, info=info)
    # The eval build scores {"net", "head"} params restored from the training build: same init.
    return built._replace(init=pretrain(body, c.family.objective, classes, head, a.scale, a.learnable_norm).init)
