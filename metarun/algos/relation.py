"""Relation Networks (Sung et al. 2018): a learned relation score per (query, class) pair, MSE to one-hot."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dataclasses import dataclass

from metarun.algos.base import Collaborators, MetaAlgorithm
from metarun.algos.protonet import check_metric_learner
from metarun.errors import UserError
from metarun.learners import Net
from metarun.learners.conv4 import resolve_conv_impl
from metarun.learners.relation import RelationEmbedding, RelationModule
from metarun.registry import register


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


def relation_scores(embedding: Net, relation: Net, params, classes: jax.Array, x: jax.Array,
                    support_x=None) -> jax.Array:
    """[q, ways] relation scores in (0, 1) of query images x against class feature maps [ways, h, w, C]."""
    queries = embedding.apply_query(params["embed"], x, support_x)
    pairs = pair_up(classes, queries)
    return relation.apply(params["relation"], pairs).reshape(queries.shape[0], classes.shape[0])


def relationnet(embedding: Net, relation: Net, ways: int, reduce: str = "sum", info=None) -> MetaAlgorithm:
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
        embed_params, _ = embedding.init(k_embed, task.support.x)
        maps = embedding.apply(embed_params, task.support.x)
        return {"embed": embed_params, "relation": relation.init(k_rel, pair_up(maps, maps))[0]}, {}

    def adapt(meta_params, algo_state, support, key):
        del key, algo_state
        maps = embedding.apply(meta_params["embed"], support.x)
        return {"classes": class_features(maps, support.y, ways, reduce), "support_x": support.x}

    def loss(meta_params, algo_state, task_state, query, key):
        del key, algo_state
        s = relation_scores(embedding, relation, meta_params, task_state["classes"], query.x, task_state["support_x"])
        mse = jnp.square(s - jax.nn.one_hot(query.y, ways)).mean()
        accuracy = (jnp.argmax(s, -1) == query.y).mean()
        return mse, {"loss": mse, "accuracy": accuracy}

    return MetaAlgorithm(init=init, adapt=adapt, loss=loss, info=info or {})


@dataclass
class RelationNetConfig:
    name: str = "relationnet"
    hidden: int = 8              # the relation module's FC width (8 in the paper)
    class_feature: str = "sum"   # sum (the paper's K-shot rule) | mean of a class's support maps


@register("algo", "relationnet", schema=RelationNetConfig)
def build(a, c: Collaborators) -> MetaAlgorithm:
    """Relation Network from its config (hidden, class_feature) and the conv4 learner's settings."""
    check_metric_learner("relationnet", c)
    if a.class_feature not in ("sum", "mean"):
        raise UserError(f"algo.class_feature={a.class_feature} is unknown; expected sum or mean")
    if a.hidden < 1:
        raise UserError(f"algo.hidden={a.hidden} must be >= 1")
    lc = c.learner_cfg
    if lc.name != "conv4":
        raise UserError(f"algo=relationnet builds its own Conv-4-style embedding: use learner=conv4 "
                        f"(got learner={lc.name})")
    bn, impl = getattr(lc.batch_norm, "value", lc.batch_norm), resolve_conv_impl(lc.conv_impl)
    filters = max(1, round(lc.filters * lc.get("width_factor", 1.0)))
    info = {"name": "relationnet", "hidden": a.hidden, "class_feature": a.class_feature}
    return relationnet(Net(RelationEmbedding(filters, bn, impl), c.train, c.transductive),
                       Net(RelationModule(filters, a.hidden, bn, impl), c.train),
                       c.family.ways(c.phase), a.class_feature, info)
