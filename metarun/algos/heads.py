"""Classifier heads on a body's features, and the optimiser that fits them (Chen et al. 2019, "A Closer Look
at Few-shot Classification": Baseline = linear head, Baseline++ = cosine head), as pure functions.

A head is a dict of arrays (a pytree the inner loop can fit); `head_logits` reads its kind from its keys:
  linear: {"kernel" [d, C], "bias" [C]}                logits = f W + b
  cosine: {"direction" [d, C]} (+ "norm" [C])          logits = s * (f / (|f| + eps)) . (v_c / |v_c|) (* g_c)
The authors' code (their distLinear) weight-normalises the class vectors and keeps a learned norm g_c per
class, initialised to |v_c| (their issues #4 and #8); the paper's equation is the plain cosine
(learnable_norm=False). The scale s is fixed: 2 up to 200 classes, 10 above (their Omniglot setting).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from metarun.errors import UserError

HEAD_KINDS = ("linear", "cosine")
FEATURE_EPS = 1e-5  # distLinear's x / (|x| + 1e-5)


def default_cosine_scale(classes: int) -> float:
    """Closer Look's fixed scale of the cosine logits: 2 for up to 200 classes, 10 above (Omniglot's 4112)."""
    return 2.0 if classes <= 200 else 10.0


def check_head(kind: str, key: str = "algo.head") -> str:
    if kind not in HEAD_KINDS:
        raise UserError(f"{key}={kind} is unknown; expected one of: {', '.join(HEAD_KINDS)}")
    return kind


def init_head(key: jax.Array, dim: int, classes: int, kind: str, learnable_norm: bool = True) -> dict:
    """A fresh head: PyTorch nn.Linear's default draw, U(-1/sqrt(d), 1/sqrt(d)) for weights and bias (the
    new classifier of Closer Look); the cosine head has no bias and, with learnable_norm, g_c = |v_c|."""
    w_key, b_key = jax.random.split(key)
    bound = 1.0 / jnp.sqrt(dim)
    kernel = jax.random.uniform(w_key, (dim, classes), jnp.float32, -bound, bound)
    if kind == "linear":
        return {"kernel": kernel, "bias": jax.random.uniform(b_key, (classes,), jnp.float32, -bound, bound)}
    head = {"direction": kernel}
    if learnable_norm:
        head["norm"] = jnp.linalg.norm(kernel, axis=0)
    return head


def head_logits(head: dict, features: jax.Array, scale: Optional[float] = None) -> jax.Array:
    """[n, C] logits of features [n, d]; `scale` is the cosine head's (None: default_cosine_scale)."""
    if "kernel" in head:
        return features @ head["kernel"] + head["bias"]
    v = head["direction"]
    s = default_cosine_scale(v.shape[1]) if scale is None else scale
    unit_features = features / (jnp.linalg.norm(features, axis=-1, keepdims=True) + FEATURE_EPS)
    cosines = unit_features @ (v / jnp.linalg.norm(v, axis=0, keepdims=True))
    if "norm" in head:
        cosines = cosines * head["norm"]
    return s * cosines


class DampenedMomentum(NamedTuple):
    buffer: object
    count: jax.Array


def torch_sgd(lr: float, momentum: float = 0.0, dampening: float = 0.0,
              weight_decay: float = 0.0) -> optax.GradientTransformation:
    """torch.optim.SGD's update (Closer Look fits its heads with lr 0.01, momentum 0.9, dampening 0.9, weight
    decay 1e-3): d = g + wd p; buf = d at the first step, then momentum buf + (1 - dampening) d; p -= lr buf.

    optax.sgd has no dampening (optax.trace is the dampening-0 case), hence this one transform in the chain."""

    def init(params):
        return DampenedMomentum(jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.int32))

    def update(grads, state, params=None):
        first = state.count == 0
        buffer = jax.tree.map(lambda b, g: jnp.where(first, g, momentum * b + (1.0 - dampening) * g),
                              state.buffer, grads)
        return buffer, DampenedMomentum(buffer, state.count + 1)

    steps = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
    if momentum:
        steps.append(optax.GradientTransformation(init, update))
    return optax.chain(*steps, optax.scale(-lr))


def epoch_minibatches(key: jax.Array, n: int, batch: Optional[int], epochs: int):
    """(indices [epochs * b, batch], mask [epochs * b, batch]) with b = ceil(n / batch): each epoch a fresh
    permutation of the n examples cut into minibatches, the last one partial (mask 0 on its padding) — the
    loop of Closer Look's fine-tuning (100 epochs, batch 4). batch None or >= n: the whole set each step."""
    batch = n if batch is None or batch >= n else batch
    per_epoch = -(-n // batch)
    perms = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, epochs))
    padded = jnp.pad(perms, ((0, 0), (0, per_epoch * batch - n)))
    mask = jnp.broadcast_to(jnp.arange(per_epoch * batch) < n, padded.shape).astype(jnp.float32)
    return padded.reshape(-1, batch), mask.reshape(-1, batch)


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean cross-entropy over the real examples (mask 1) of a minibatch."""
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return (per_example * mask).sum() / jnp.maximum(mask.sum(), 1.0)
