"""Matching Networks (Vinyals et al. 2016): softmax cosine attention over the support set, optional FCE."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dataclasses import dataclass

from metarun.algos.base import Collaborators, MetaAlgorithm
from metarun.algos.protonet import check_metric_learner, squared_distances
from metarun.errors import UserError
from metarun.learners import Net
from metarun.registry import register

DISTANCES = ("cosine", "l2")
NORMALIZE = ("both", "support")


def attention_logits(queries: jax.Array, support: jax.Array, distance: str = "cosine",
                     eps: float = 1e-8, normalize: str = "both", scale=1.0) -> jax.Array:
    """[q, n] similarities whose row softmax is the attention a(x̂, x_i).

    cosine: scale · cos(f(x̂), g(x_i)); the paper's form is scale 1 with both sides normalised. Cosines of
    post-ReLU embeddings lie in [0, 1], so at scale 1 a 5-way softmax can give at most e/(e + 4) ≈ 0.40 to
    the right support example, and the gradient stays weak. Two ways out: `scale` > 1 (fixed, or learned
    by the caller), or normalize="support": f(x̂) · g(x_i)/|g(x_i)|, the support-only normalisation of the
    widely copied reference implementations, where the query's norm acts as a per-query temperature.
    l2: −|f(x̂) − g(x_i)|², which re-implementations found to train much better on Omniglot.
    """
    if distance == "l2":
        return -squared_distances(queries, support)
    unit = lambda v: v * jax.lax.rsqrt(jnp.square(v).sum(-1, keepdims=True) + eps)  # noqa: E731
    return scale * ((unit(queries) if normalize == "both" else queries) @ unit(support).T)


def cosine_attention(queries: jax.Array, support: jax.Array) -> jax.Array:
    """[q, n] attention a(x̂, x_i) = softmax_i cos(f(x̂), g(x_i)); each row sums to one."""
    return jax.nn.softmax(attention_logits(queries, support, "cosine"), axis=-1)


def class_log_probs(logits: jax.Array, support_one_hot: jax.Array) -> jax.Array:
    """log P(y=c|x̂) = log Σ_{i: y_i=c} a(x̂, x_i), computed in log space so that sharp (l2)
    attention cannot underflow to log 0. [q, n], [n, ways] -> [q, ways]."""
    in_class = support_one_hot.T.astype(bool)[None]                       # [1, ways, n]
    per_class = jax.nn.logsumexp(jnp.where(in_class, logits[:, None, :], -jnp.inf), axis=-1)
    return per_class - jax.nn.logsumexp(logits, axis=-1, keepdims=True)


class SupportContext(nn.Module):
    """FCE's g: a bidirectional LSTM over the support embeddings, g = h_fwd + h_bwd + g'(x_i)."""

    @nn.compact
    def __call__(self, support):                       # [n, d] -> [n, d]
        d = support.shape[-1]
        bi = nn.Bidirectional(nn.RNN(nn.OptimizedLSTMCell(d)), nn.RNN(nn.OptimizedLSTMCell(d)),
                              merge_fn=lambda a, b: a + b)
        return bi(support[None])[0] + support


class QueryContext(nn.Module):
    """FCE's f: an attention LSTM run `steps` times with the query embedding as its input.

    h_k = ĥ_k + f'(x̂); r_k = Σ_i softmax(h_k·g(x_i)) g(x_i); ĥ_{k+1}, c = LSTM(f'(x̂), (h_k + r_k, c)).
    The paper concatenates [h, r] as the LSTM state; adding them (as common re-implementations do)
    keeps the state at the embedding width.
    """
    steps: int

    @nn.compact
    def __call__(self, queries, support):              # [q, d], [n, d] -> [q, d]
        cell = nn.OptimizedLSTMCell(queries.shape[-1], name="lstm")
        h_hat, c = jnp.zeros_like(queries), jnp.zeros_like(queries)
        for _ in range(self.steps):
            h = h_hat + queries
            readout = jax.nn.softmax(h @ support.T, axis=-1) @ support
            (c, h_hat), _ = cell((c, h + readout), queries)
        return h_hat + queries


def matchingnet(embedding: Net, objective, ways: int, fce: bool = False, fce_steps: int = 5,
                distance: str = "cosine", info=None, normalize: str = "both", cosine_scale: float = 1.0,
                learn_scale: bool = False) -> MetaAlgorithm:
    """Builds Matching Networks over an embedding network; no inner gradient steps.

    `adapt` embeds the support set (the support bank; with FCE, re-embedded by a bidirectional
    LSTM in the context of the whole set); `loss` attends from each query embedding over the
    bank with a softmax of cosine similarities (or negative squared distances), predicts
    P(y|x̂) = Σ_i a(x̂, x_i) onehot(y_i), and applies the objective (cross-entropy) to log P,
    i.e. the NLL. The shared embedding's
    transductive BatchNorm normalises support and query each with their own batch statistics.

    Args:
      embedding: a learner in a mode mapping images [n, H, W, C] to embeddings [n, d] (no head).
      objective: (logits, labels) -> (loss, metrics); it receives log-probabilities.
      ways: classes per episode in this phase (labels 0..ways-1).
      fce: full context embeddings (Vinyals et al. appendix A.2).
      fce_steps: processing steps K of the attention LSTM.
      distance: "cosine" (the paper) or "l2".
      normalize: cosine only; "both" (the paper) or "support" (support-only, see attention_logits).
      cosine_scale: cosine only; the logits' scale (the paper: 1). learn_scale: meta-learn it, starting there,
        as meta_params["log_scale"] (a scalar), the learned temperature of Baseline++ / TADAM.
    """
    if distance not in DISTANCES:
        raise UserError(f"algo.distance={distance} is unknown; expected one of {', '.join(DISTANCES)}")
    if normalize not in NORMALIZE:
        raise UserError(f"algo.normalize={normalize} is unknown; expected one of {', '.join(NORMALIZE)}")
    if not cosine_scale > 0:
        raise UserError(f"algo.cosine_scale={cosine_scale} must be > 0")
    if distance != "cosine" and (normalize != "both" or cosine_scale != 1.0 or learn_scale):
        raise UserError(f"algo.normalize, algo.cosine_scale and algo.learn_scale shape cosine attention; "
                        f"algo.distance={distance} does not use them (leave them at both / 1.0 / false)")
    support_context, query_context = SupportContext(), QueryContext(fce_steps)

    def init(key, task):
        k_embed, k_g, k_f = jax.random.split(key, 3)
        params = {"net": embedding.init(k_embed, task.support.x)[0]}
        if learn_scale:
            params["log_scale"] = jnp.log(jnp.asarray(cosine_scale, jnp.float32))
        if fce:
            z = embedding.apply(params["net"], task.support.x)
            params["fce_g"] = support_context.init(k_g, z)["params"]
            params["fce_f"] = query_context.init(k_f, z, z)["params"]
        return params, {}

    def adapt(meta_params, algo_state, support, key):
        del key, algo_state
        bank = embedding.apply(meta_params["net"], support.x)
        if fce:
            bank = support_context.apply({"params": meta_params["fce_g"]}, bank)
        return {"bank": bank, "support_one_hot": jax.nn.one_hot(support.y, ways), "support_x": support.x}

    def loss(meta_params, algo_state, task_state, query, key):
        del key, algo_state
        bank = task_state["bank"]
        queries = embedding.apply_query(meta_params["net"], query.x, task_state["support_x"])
        if fce:
            queries = query_context.apply({"params": meta_params["fce_f"]}, queries, bank)
        scale = jnp.exp(meta_params["log_scale"]) if learn_scale else cosine_scale
        logits = attention_logits(queries, bank, distance, normalize=normalize, scale=scale)
        log_probs = class_log_probs(logits, task_state["support_one_hot"])
        return objective(log_probs, query.y)

    return MetaAlgorithm(init=init, adapt=adapt, loss=loss, info=info or {})


@dataclass
class MatchingNetConfig:
    name: str = "matchingnet"
    fce: bool = False        # full context embeddings (bidirectional LSTM + attention LSTM)
    fce_steps: int = 5       # processing steps K of the attention LSTM (used only when fce)
    distance: str = "cosine" # cosine (the paper) | l2 (negative squared Euclidean distance)
    normalize: str = "both"  # cosine: both sides (the paper) | support (support-only, as reference implementations)
    cosine_scale: float = 1.0  # cosine: logits' scale (the paper: 1); the initial value when learn_scale
    learn_scale: bool = False  # cosine: meta-learn the scale (meta_params["log_scale"])


@register("algo", "matchingnet", schema=MatchingNetConfig)
def build(a, c: Collaborators) -> MetaAlgorithm:
    """Matching Networks over the head-less learner, with `algo.fce`, `algo.fce_steps`, `algo.distance`."""
    check_metric_learner("matchingnet", c)
    if a.fce_steps < 1:
        raise UserError(f"algo.fce_steps={a.fce_steps} must be >= 1")
    net = Net(c.learner(None), c.train, c.transductive)
    # .get: configs saved before these keys existed ran the paper's form
    normalize, scale, learn = a.get("normalize", "both"), float(a.get("cosine_scale", 1.0)), bool(a.get("learn_scale", False))
    info = {"name": "matchingnet", "distance": a.distance, "fce": bool(a.fce), "fce_steps": a.fce_steps,
            "normalize": normalize, "cosine_scale": scale, "learn_scale": learn}
    return matchingnet(net, c.family.objective, c.family.ways(c.phase), a.fce, a.fce_steps, a.distance, info,
                       normalize, scale, learn)
