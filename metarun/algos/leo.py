"""LEO (Rusu et al. 2019, "Meta-Learning with Latent Embedding Optimization") on the features of a frozen body.

LEO never trains the image network: it meta-learns, on fixed embeddings, a generator of classifier weights.
Per episode (the authors' deepmind/leo `model.py`, in the names used here):

  embed     x = the frozen body's features, each scaled to unit norm (the authors' data pipeline does)
  encode    support embeddings x_i [n, d] -> h_i = x_i E [n, L] (linear, no bias) -> relation net g over every
            pair (h_i, h_j) of the episode, mean over j -> [n, 2L] -> mean per class -> (mu_z, log sigma_z) [N, L]
  sample    z = mu_z + sigma_z eps (training; the mean at evaluation), sigma = max(exp(s) - 1 + offset, 1e-10)
            from the raw output s (the authors' rule; offset 0 for z, sqrt(2 / (d + N)) for w)
  decode    w ~ N(mu_w, sigma_w) from [mu_w, s_w] = z D, D [L, 2d] (linear, no bias); logits = x w^T
  adapt     `inner_steps` gradient steps on z of the support cross-entropy (decoding at every step), then
            `finetune_steps` steps on the decoded w directly; both step sizes are meta-learned per dimension
            (the authors' code: variables of shape [L] and [d] initialised to inner_lr and finetune_lr)
  dropout   (meta-training) on the embeddings at every use: the encoder's input, each inner step's support
            loss and the query loss draw their own masks, as the authors' code does
  outer     query cross-entropy + kl_weight KL(q(z|support) || N(0, I)) + encoder_penalty |sg(z_T) - z_0|^2
            + orthogonality_penalty mean((corr(D) - I)^2) + l2_penalty sum(|W|^2) / 2 over E, g, D

The body is the learner without its head, run in evaluation mode and behind stop_gradient: `init.from=RUN`
(a pretrain run, as the pipeline does) gives it pre-trained weights, otherwise it keeps its random
initialisation. It stays under meta_params["net"] so that `init.from`, `mode=eval ckpt=` and the fine-tuning
algorithms find it where they find every learner; its gradient is exactly zero, so Adam and SGD leave it
unchanged (decoupled weight decay — regularize.weight_decay, meta_opt=adamw — would not: see docs/pipeline.md).

Both inner loops are the one inner loop (metarun.inner.inner_loop) with Meta-SGD's learned-rate transform.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metarun.algos.base import Collaborators, MetaAlgorithm, default_meta_step
from metarun.algos.protonet import class_means
from metarun.errors import UserError
from metarun.inner import inner_loop, scale_by_learned_rates
from metarun.learners import Net
from metarun.registry import register

RELATION_LAYERS = 3  # the authors' relation net: an MLP of three layers of width 2L, ReLU between them


class LEOSettings(NamedTuple):
    latent_dim: int = 64
    inner_steps: int = 5
    finetune_steps: int = 5
    inner_lr: float = 1.0
    finetune_lr: float = 1e-3
    learn_rates: bool = True
    dropout: float = 0.307651
    kl_weight: float = 0.756143
    encoder_penalty: float = 5.756821e-6
    orthogonality_penalty: float = 0.188103
    l2_penalty: float = 3.623413e-10
    grad_clip_value: float = 0.1
    grad_clip_norm: float = 0.1


# ---- the pieces, as pure functions ---------------------------------------------------------------------------

def init_leo_params(key, embedding_dim: int, latent_dim: int) -> dict:
    """Encoder [d, L], relation net 3 x [2L, 2L], decoder [L, 2d]: Glorot uniform, no biases (the authors')."""
    glorot = jax.nn.initializers.glorot_uniform()
    keys = jax.random.split(key, 2 + RELATION_LAYERS)
    two_l = 2 * latent_dim
    return {"encoder": {"kernel": glorot(keys[0], (embedding_dim, latent_dim))},
            "relation": {f"layer{i}": {"kernel": glorot(keys[1 + i], (two_l, two_l))} for i in range(RELATION_LAYERS)},
            "decoder": {"kernel": glorot(keys[-1], (latent_dim, 2 * embedding_dim))}}


def relation_net(relation: dict, codes: jax.Array) -> jax.Array:
    """[n, 2L]: for each code, the mean over every code j of the MLP applied to the pair (h_i, h_j)."""
    n = codes.shape[0]
    pairs = jnp.concatenate([jnp.broadcast_to(codes[:, None], (n, n, codes.shape[1])),
                             jnp.broadcast_to(codes[None, :], (n, n, codes.shape[1]))], axis=-1)
    out = pairs
    for i in range(RELATION_LAYERS):
        out = out @ relation[f"layer{i}"]["kernel"]
        if i < RELATION_LAYERS - 1:
            out = jax.nn.relu(out)
    return out.mean(axis=1)


def encode(leo: dict, features: jax.Array, labels: jax.Array, ways: int):
    """(mu_z, sigma_z), each [ways, L], from the support features [n, d] and labels [n]."""
    codes = features @ leo["encoder"]["kernel"]
    per_class = class_means(relation_net(leo["relation"], codes), labels, ways)
    mean, raw = jnp.split(per_class, 2, axis=-1)
    return mean, stddev(raw)


def decode(leo: dict, z: jax.Array, w_offset: float):
    """(mu_w, sigma_w), each [ways, d]: the Gaussian over the per-class classifier weights decoded from z."""
    mean, raw = jnp.split(z @ leo["decoder"]["kernel"], 2, axis=-1)
    return mean, stddev(raw, w_offset)


def weight_scale(embedding_dim: int, ways: int) -> float:
    """sqrt(2 / (d + N)): the authors' offset that makes a fresh decoder's weight spread Glorot's."""
    return float(np.sqrt(2.0 / (embedding_dim + ways)))


def stddev(raw: jax.Array, offset: float = 0.0) -> jax.Array:
    """The authors' standard deviation of a Gaussian from the network's raw output s:
    max(exp(s) - 1 + offset, 1e-10), so that s = 0 gives `offset` (0 for latents, Glorot's for weights)."""
    return jnp.maximum(jnp.exp(raw) - (1.0 - offset), 1e-10)


def sample_gaussian(mean, sigma, key):
    """mean + sigma eps (reparameterised); key None: the mean (evaluation, as the authors)."""
    if key is None:
        return mean
    return mean + sigma * jax.random.normal(key, mean.shape, mean.dtype)


def kl_to_standard_normal(mean, sigma) -> jax.Array:
    """KL(N(mean, sigma^2) || N(0, 1)) in closed form, averaged over the elements (the authors' reduce_mean of
    their one-sample estimate of the same quantity)."""
    return jnp.mean(0.5 * (jnp.square(mean) + jnp.square(sigma) - 1.0) - jnp.log(sigma))


def orthogonality_penalty(kernel: jax.Array) -> jax.Array:
    """mean((C - I)^2) with C the correlation matrix of the kernel's rows (the decoder: one row per latent)."""
    norms = jnp.linalg.norm(kernel, axis=1, keepdims=True) + 1e-32
    correlation = (kernel @ kernel.T) / (norms @ norms.T)
    return jnp.mean(jnp.square(correlation - jnp.eye(kernel.shape[0], dtype=kernel.dtype)))


def l2_penalty(leo: dict) -> jax.Array:
    """sum(|W|^2) / 2 over every LEO kernel (TensorFlow's l2_regularizer, which the authors' weight multiplies)."""
    return sum(0.5 * jnp.sum(jnp.square(w)) for w in jax.tree.leaves(leo))


def l2_normalize(features: jax.Array) -> jax.Array:
    """Each embedding to unit norm (tf.nn.l2_normalize, as the authors' data pipeline feeds LEO)."""
    return features * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(features), -1, keepdims=True), 1e-12))


def dropout(x, rate: float, key):
    """Inverted dropout of the embeddings (training only: key None or rate 0 returns x)."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


def clip_gradients(grads, value: float, norm: float):
    """The authors' outer clipping: each element to [-value, value], then each tensor to norm <= `norm` (0: off)."""
    if value:
        grads = jax.tree.map(lambda g: jnp.clip(g, -value, value), grads)
    if norm:
        grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, norm / jnp.maximum(jnp.linalg.norm(g), 1e-12)), grads)
    return grads


def adapt_latents(leo: dict, z: jax.Array, features, labels, objective, rates, steps: int, key=None,
                  w_offset: float = 0.0, dropout_rate: float = 0.0):
    """z after `steps` learned-rate gradient steps on the support loss of its decoded weights (the one inner
    loop). key None: the weights are the decoder means and no dropout (evaluation); else every step draws its
    own weights and its own dropout mask of the support embeddings (the authors' code samples at each call)."""

    def step_loss(latents, step, _):
        mean, sigma = decode(leo, latents, w_offset)
        w_key, drop_key = (None, None) if key is None else jax.random.split(jax.random.fold_in(key, step))
        x = dropout(features, dropout_rate, drop_key)
        return objective(x @ sample_gaussian(mean, sigma, w_key).T, labels)[0], None

    adapted, *_ = inner_loop(step_loss, z, scale_by_learned_rates(rates), steps)
    return adapted


def finetune_weights(w: jax.Array, features, labels, objective, rates, steps: int, key=None,
                     dropout_rate: float = 0.0) -> jax.Array:
    """w after `steps` learned-rate gradient steps on the support loss, directly in weight space (key: a fresh
    dropout mask of the support embeddings per step; None: no dropout)."""

    def step_loss(weights, step, _):
        x = dropout(features, dropout_rate, None if key is None else jax.random.fold_in(key, step))
        return objective(x @ weights.T, labels)[0], None

    fitted, *_ = inner_loop(step_loss, w, scale_by_learned_rates(rates), steps)
    return fitted


# ---- the algorithm --------------------------------------------------------------------------------------------

def leo(body: Net, objective, ways: int, settings: LEOSettings, train: bool, info=None) -> MetaAlgorithm:
    """LEO as a MetaAlgorithm over a frozen embedding network `body` (a learner without a head).

    meta_params = {"net": the body (never changed: zero gradient), "leo": encoder, relation net, decoder,
    "rates": {"latent" [L], "finetune" [d]} when learned}; algo_state = {"batch_stats"} of the body when it
    keeps running statistics (used, never updated). train=False: no sampling, no dropout, no penalties.
    """
    s = settings

    def features_of(meta_params, algo_state, x, support_x=None):
        net = jax.lax.stop_gradient(meta_params["net"])
        stats = algo_state.get("batch_stats")
        raw = body.apply(net, x, stats) if support_x is None else body.apply_query(net, x, support_x, stats)
        return l2_normalize(raw)

    def rates_of(meta_params, dim):
        if s.learn_rates:
            return meta_params["rates"]
        return {"latent": jnp.full((s.latent_dim,), s.inner_lr), "finetune": jnp.full((dim,), s.finetune_lr)}

    def init(key, task):
        body_key, leo_key = jax.random.split(key)
        params, stats = body.init(body_key, task.support.x)
        dim = jax.eval_shape(lambda x: body.apply(params, x, stats), task.support.x).shape[-1]
        meta_params = {"net": params, "leo": init_leo_params(leo_key, dim, s.latent_dim)}
        if s.learn_rates:
            meta_params["rates"] = {"latent": jnp.full((s.latent_dim,), s.inner_lr, jnp.float32),
                                    "finetune": jnp.full((dim,), s.finetune_lr, jnp.float32)}
        return meta_params, ({"batch_stats": stats} if stats else {})

    def adapt(meta_params, algo_state, support, key):
        keys = jax.random.split(key, 5) if train else [None] * 5
        leo_params = meta_params["leo"]
        features = features_of(meta_params, algo_state, support.x)
        dim = features.shape[-1]
        rates = rates_of(meta_params, dim)
        w_offset = weight_scale(dim, ways)
        mean, sigma = encode(leo_params, dropout(features, s.dropout, keys[0]), support.y, ways)
        z0 = sample_gaussian(mean, sigma, keys[1])
        z = adapt_latents(leo_params, z0, features, support.y, objective, rates["latent"], s.inner_steps, keys[2],
                          w_offset, s.dropout)
        w = sample_gaussian(*decode(leo_params, z, w_offset), keys[3])
        w = finetune_weights(w, features, support.y, objective, rates["finetune"], s.finetune_steps, keys[4],
                             s.dropout)
        state = {"weights": w, "support_x": support.x}
        if train:
            state["kl"] = kl_to_standard_normal(mean, sigma)
            state["encoder_penalty"] = jnp.mean(jnp.square(jax.lax.stop_gradient(z) - z0))
        return state

    def loss(meta_params, algo_state, task_state, query, key):
        features = features_of(meta_params, algo_state, query.x, task_state["support_x"])
        features = dropout(features, s.dropout, key if train else None)
        value, metrics = objective(features @ task_state["weights"].T, query.y, query.mask)
        if not train:
            return value, metrics
        leo_params = meta_params["leo"]
        terms = {"kl": task_state["kl"], "encoder_penalty": task_state["encoder_penalty"],
                 "orthogonality": orthogonality_penalty(leo_params["decoder"]["kernel"]),
                 "l2": l2_penalty(leo_params)}
        total = (value + s.kl_weight * terms["kl"] + s.encoder_penalty * terms["encoder_penalty"]
                 + s.orthogonality_penalty * terms["orthogonality"] + s.l2_penalty * terms["l2"])
        return total, {**metrics, **terms, "total_loss": total}

    plain = MetaAlgorithm(init=init, adapt=adapt, loss=loss, info=info or {})

    def meta_step(meta_params, algo_state, tasks, key, map_tasks):
        grads, algo_state, metrics = default_meta_step(plain, meta_params, algo_state, tasks, key, map_tasks)
        return clip_gradients(grads, s.grad_clip_value, s.grad_clip_norm), algo_state, metrics

    return plain._replace(meta_step=meta_step)


@dataclass
class LEOConfig:
    """LEO (Rusu et al. 2019) on a frozen body's features; defaults: the authors' miniImageNet 5-way 1-shot."""
    name: str = "leo"
    latent_dim: int = 64
    inner_steps: int = 5
    eval_inner_steps: int = 5
    finetune_steps: int = 5
    inner_lr: float = 1.0
    finetune_lr: float = 1.0e-3
    learn_rates: bool = True
    dropout: float = 0.307651
    kl_weight: float = 0.756143
    encoder_penalty: float = 5.756821e-6
    orthogonality_penalty: float = 0.188103
    l2_penalty: float = 3.623413e-10
    grad_clip_value: float = 0.1
    grad_clip_norm: float = 0.1


def settings_of(a, inner_steps: int) -> LEOSettings:
    """The checked settings of an `algo` section (one-line UserError naming the key otherwise)."""
    if a.latent_dim < 1:
        raise UserError(f"algo.latent_dim={a.latent_dim} must be >= 1")
    for key in ("inner_steps", "eval_inner_steps", "finetune_steps"):
        if a[key] < 0:
            raise UserError(f"algo.{key}={a[key]} must be >= 0")
    for key in ("inner_lr", "finetune_lr", "kl_weight", "encoder_penalty", "orthogonality_penalty", "l2_penalty",
                "grad_clip_value", "grad_clip_norm"):
        if not a[key] >= 0:
            raise UserError(f"algo.{key}={a[key]} must be >= 0")
    if not 0 <= a.dropout < 1:
        raise UserError(f"algo.dropout={a.dropout} must be in [0, 1)")
    return LEOSettings(int(a.latent_dim), int(inner_steps), int(a.finetune_steps), float(a.inner_lr),
                       float(a.finetune_lr), bool(a.learn_rates), float(a.dropout), float(a.kl_weight),
                       float(a.encoder_penalty), float(a.orthogonality_penalty), float(a.l2_penalty),
                       float(a.grad_clip_value), float(a.grad_clip_norm))


@register("algo", "leo", schema=LEOConfig)
def build(a, c: Collaborators) -> MetaAlgorithm:
    settings = settings_of(a, c.inner_steps_for(a))
    if c.family.kind != "classification":
        raise UserError(f"algo=leo generates classifier weights; dataset={c.family.name} is {c.family.kind}")
    info = {"name": "leo", **{k: getattr(settings, k) for k in LEOSettings._fields},
            "inner_steps": int(a.inner_steps), "eval_inner_steps": int(a.eval_inner_steps),
            "inner_optimizer": "sgd with learned per-dimension rates" if settings.learn_rates else "sgd",
            "embeddings": "the learner's body, frozen (init.from's pre-trained body, else its initialisation)"}
    body = Net(c.learner(None), train=False, transductive=c.transductive)
    return leo(body, c.family.objective, c.family.ways(c.phase), settings, c.train, info)
