"""Prototypical Networks (Snell et al. 2017): class means of support embeddings; logits = -squared distance."""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from metarun.algos.base import Collaborators, MetaAlgorithm
from metarun.errors import UserError
from metarun.learners import Net, dropout_rngs
from metarun.registry import register


def check_metric_learner(name: str, c: Collaborators) -> None:
    """Metric learners classify by comparing embeddings: classification families, no running statistics."""
    if c.family.kind != "classification":
        raise UserError(f"algo={name} is a metric learner for classification; dataset={c.family.name} is {c.family.kind}")
    if getattr(c.learner_cfg.get("batch_norm"), "value", c.learner_cfg.get("batch_norm")) == "running":
        raise UserError(f"algo={name} supports learner.batch_norm=transductive or none")


def class_means(embeddings: jax.Array, labels: jax.Array, ways: int) -> jax.Array:
    """[ways, ...] mean of the embeddings of each label 0..ways-1 (a one-hot matmul: no dynamic shapes)."""
    one_hot = jax.nn.one_hot(labels, ways, dtype=embeddings.dtype)           # [n, ways]
    sums = jnp.tensordot(one_hot, embeddings, axes=(0, 0))                  # [ways, ...]
    counts = one_hot.sum(0).reshape((ways,) + (1,) * (embeddings.ndim - 1))
    return sums / jnp.maximum(counts, 1.0)


def squared_distances(a: jax.Array, b: jax.Array) -> jax.Array:
    """[n, m] squared Euclidean distances between rows of a [n, d] and b [m, d]."""
    return jnp.square(a[:, None, :] - b[None, :, :]).sum(-1)


def protonet(embedding: Net, objective, ways: int, info=None) -> MetaAlgorithm:
    """Builds a Prototypical Network over an embedding network; no inner gradient steps.

    `adapt` embeds the support set and averages each class (the prototypes); `loss` is the
    objective (cross-entropy) on logits = minus the squared Euclidean distance of each query
    embedding to each prototype. With transductive BatchNorm, support and query are each
    normalised with their own batch statistics.

    Args:
      embedding: a learner in a mode mapping images [n, H, W, C] to embeddings [n, d] (no head).
      objective: (logits, labels, mask) -> (loss, metrics), from the task family.
      ways: classes per episode in this phase; training ways may exceed test ways (the paper
        trains 60-way for 5- and 20-way tests): one build per phase.
    """

    def init(key, task):
        params, _ = embedding.init(key, task.support.x)
        return {"net": params}, {}

    def adapt(meta_params, algo_state, support, key):
        del algo_state
        # The key reaches the learner's dropout (learner.dropout; training passes only).
        embedded = embedding.apply(meta_params["net"], support.x, rngs=dropout_rngs(key))
        return {"prototypes": class_means(embedded, support.y, ways), "support_x": support.x}

    def loss(meta_params, algo_state, task_state, query, key):
        del algo_state
        queries = embedding.apply_query(meta_params["net"], query.x, task_state["support_x"], rngs=dropout_rngs(key))
        return objective(-squared_distances(queries, task_state["prototypes"]), query.y)

    return MetaAlgorithm(init=init, adapt=adapt, loss=loss, info=info or {})


@dataclass
class ProtoNetConfig:
    """Prototypical Networks: no hyperparameters beyond the episode shapes (task.ways > test_ways is fine)."""
    name: str = "protonet"


@register("algo", "protonet", schema=ProtoNetConfig, dropout_keys=True)
def build(a, c: Collaborators) -> MetaAlgorithm:
    check_metric_learner("protonet", c)
    net = Net(c.learner(None), c.train, c.transductive)
    return protonet(net, c.family.objective, c.family.ways(c.phase), {"name": "protonet", "distance": "squared l2"})
