"""Prototypical Networks (Snell et al. 2017): class means of support embeddings; logits = -squared distance."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from metarun.algos.base import MetaAlgorithm
from metarun.errors import UserError


def phase_ways(cfg, phase: str) -> int:
    """Classes per episode: task.ways in training, task.test_ways (or ways) in evaluation."""
    return (cfg.task.test_ways or cfg.task.ways) if phase == "eval" else cfg.task.ways


def check_classification(cfg) -> None:
    if cfg.dataset.kind != "classification":
        raise UserError(f"algo={cfg.algo.name} is a metric learner for classification; "
                        f"dataset={cfg.dataset.name} is {cfg.dataset.kind}")


def class_means(embeddings: jax.Array, labels: jax.Array, ways: int) -> jax.Array:
    """[ways, ...] mean of the embeddings of each label 0..ways-1 (a one-hot matmul: no dynamic shapes)."""
    one_hot = jax.nn.one_hot(labels, ways, dtype=embeddings.dtype)           # [n, ways]
    sums = jnp.tensordot(one_hot, embeddings, axes=(0, 0))                  # [ways, ...]
    counts = one_hot.sum(0).reshape((ways,) + (1,) * (embeddings.ndim - 1))
    return sums / jnp.maximum(counts, 1.0)


def squared_distances(a: jax.Array, b: jax.Array) -> jax.Array:
    """[n, m] squared Euclidean distances between rows of a [n, d] and b [m, d]."""
    return jnp.square(a[:, None, :] - b[None, :, :]).sum(-1)


def protonet(embedding, objective, ways: int) -> MetaAlgorithm:
    """Builds a Prototypical Network over an embedding network; no inner gradient steps.

    `adapt` embeds the support set and averages each class (the prototypes); `loss` is the
    objective (cross-entropy) on logits = minus the squared Euclidean distance of each query
    embedding to each prototype. With the Conv-4 embedding's transductive BatchNorm, support
    and query are each normalised with their own batch statistics (no running statistics).

    Args:
      embedding: a Flax module mapping images [n, H, W, C] to embeddings [n, d] (no head).
      objective: (logits, labels) -> (loss, metrics), e.g. the classification objective.
      ways: classes per episode in this phase; labels are 0..ways-1. Training ways may exceed
        test ways (the paper trains 60-way for 5- and 20-way tests): build one per phase.
    """

    def embed(params, x):
        return embedding.apply({"params": params}, x)

    def init(key, task):
        return embedding.init(key, task.support.x)["params"]

    def adapt(meta_params, support, key):
        del key
        return class_means(embed(meta_params, support.x), support.y, ways)

    def loss(meta_params, prototypes, query, key):
        del key
        logits = -squared_distances(embed(meta_params, query.x), prototypes)
        return objective(logits, query.y)

    return MetaAlgorithm(init=init, adapt=adapt, loss=loss)


def from_config(cfg, learner, objective, phase: str) -> MetaAlgorithm:
    """ProtoNet over the head-less learner (an embedding); `ways` follows the phase's episodes."""
    check_classification(cfg)
    return protonet(learner, objective, phase_ways(cfg, phase))
