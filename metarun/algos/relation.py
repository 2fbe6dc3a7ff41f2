"""Relation Networks (Sung et al. 2018): a learned relation score per (query, class) pair, MSE to one-hot."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from metarun.algos.base import MetaAlgorithm
from metarun.algos.protonet import check_classification, phase_ways
from metarun.errors import UserError
from metarun.learners import resolve_conv_impl
from metarun.learners.relation import RelationEmbedding, RelationModule


def class_features(maps: jax.Array, labels: jax.Array, ways: int, reduce: str = "sum") -> jax.Array:
    """[ways, h, w, C]: the sum (the paper's K-shot rule) or mean of each class's support feature maps."""
    one_hot = jax.nn.one_hot(labels, ways, dtype=maps.dtype)
    sums = jnp.tensordot(one_hot, maps, axes=(0, 0))
    if reduce == "mean":
        sums = sums / jnp.maximum(one_hot.sum(0), 1.0)[:, None, None, None]
    return sums


def pair_up(classes: jax.Array, queries: jax.Array) -> jax.Array:
    """[q * ways, h, w, 2C]: each query's maps after each class's maps, along channels (query-major)."""
    q, ways = queries.shape[0], classes.shape[0]
    left = jnp.broadcast_to(classes[None], (q,) + classes.shape)
    right = jnp.broadcast_to(queries[:, None], (q, ways) + queries.shape[1:])
    return jnp.concatenate([left, right], axis=-1).reshape((q * ways,) + classes.shape[1:-1] + (-1,))


def relation_scores(embedding, relation, params, classes: jax.Array, x: jax.Array) -> jax.Array:
    """[q, ways] relation scores in (0, 1) of query images x against class feature maps [ways, h, w, C]."""
    queries = embedding.apply({"params": params["embed"]}, x)
    pairs = pair_up(classes, queries)
    return relation.apply({"params": params["relation"]}, pairs).reshape(queries.shape[0], classes.shape[0])


def relationnet(embedding, relation, ways: int, reduce: str = "sum") -> MetaAlgorithm:
    """Builds a Relation Network; no inner gradient steps.

    `adapt` embeds the support set into feature maps and sums them per class; `loss` embeds the
    queries, scores every (query, class) pair with the relation module (sigmoid, in (0, 1)) and
    returns the mean squared error to the one-hot targets; accuracy is the argmax score. Both
    networks use transductive BatchNorm (batch statistics of support, query or pair batches).

    Args:
      embedding: a Flax module mapping images [n, H, W, C] to feature maps [n, h, w, C].
      relation: a Flax module mapping pairs [m, h, w, 2C] to scores [m].
      ways: classes per episode in this phase (labels 0..ways-1).
      reduce: 'sum' (the paper) or 'mean' of the K support maps of a class.
    """

    def init(key, task):
        k_embed, k_rel = jax.random.split(key)
        embed_params = embedding.init(k_embed, task.support.x)["params"]
        maps = embedding.apply({"params": embed_params}, task.support.x)
        return {"embed": embed_params, "relation": relation.init(k_rel, pair_up(maps, maps))["params"]}

    def adapt(meta_params, support, key):
        del key
        maps = embedding.apply({"params": meta_params["embed"]}, support.x)
        return class_features(maps, support.y, ways, reduce)

    def loss(meta_params, classes, query, key):
        del key
        s = relation_scores(embedding, relation, meta_params, classes, query.x)
        mse = jnp.square(s - jax.nn.one_hot(query.y, ways)).mean()
        accuracy = (jnp.argmax(s, -1) == query.y).mean()
        return mse, {"loss": mse, "accuracy": accuracy}

    return MetaAlgorithm(init=init, adapt=adapt, loss=loss)


def from_config(cfg, learner, objective, phase: str) -> MetaAlgorithm:
    """Relation Network from `cfg.algo` (hidden, class_feature) and the conv4 learner's settings."""
    del learner, objective  # its own embedding (feature maps, not vectors) and its own MSE loss
    check_classification(cfg)
    if cfg.algo.class_feature not in ("sum", "mean"):
        raise UserError(f"algo.class_feature={cfg.algo.class_feature} is unknown; expected sum or mean")
    lc = cfg.learner
    if lc.name != "conv4":
        raise UserError(f"algo=relationnet builds its own Conv-4-style embedding: use learner=conv4 "
                        f"(got learner={lc.name})")
    bn, impl = getattr(lc.batch_norm, "value", lc.batch_norm), resolve_conv_impl(lc.conv_impl)
    return relationnet(RelationEmbedding(lc.filters, bn, impl),
                       RelationModule(lc.filters, cfg.algo.hidden, bn, impl),
                       phase_ways(cfg, phase), cfg.algo.class_feature)
