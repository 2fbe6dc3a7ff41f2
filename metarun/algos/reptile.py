"""Reptile (Nichol et al. 2018): k steps of Adam/SGD on the task, then move the initialisation toward the result."""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import optax

from metarun.algos.base import MetaAlgorithm


def minibatch_indices(key, n: int, batch: Optional[int], steps: int) -> jax.Array:
    """[steps, batch] indices into n examples: shuffled passes without replacement (supervised-reptile's
    `_mini_batches`); batch=None or >= n gives the whole set at every step."""
    if batch is None or batch >= n:
        return jnp.broadcast_to(jnp.arange(n), (steps, n))
    passes = math.ceil(steps * batch / n)
    perms = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, passes))
    return perms.reshape(-1)[: steps * batch].reshape(steps, batch)


def reptile(learner, objective, inner_lr: float, inner_steps: int, inner_opt: str = "adam",
            inner_beta1: float = 0.0, inner_batch: Optional[int] = None, transductive: bool = True) -> MetaAlgorithm:
    """Builds Reptile over a Flax learner.

    `meta_grad` returns θ − φ (θ: the initialisation, φ: the weights after `inner_steps` of the
    inner optimiser on the support set). The trainer averages it over the meta-batch and an
    `optax.sgd(ε)` outer step then gives θ + ε·mean(φ − θ), Reptile's batched interpolation; the
    paper's ε annealed linearly from 1 to 0 is meta_opt=sgd, lr=1.0, schedule=linear, end_lr_fraction=0.

    Args:
      learner: a Flax module; its params are the meta-parameters.
      objective: (outputs, y) -> (loss, metrics).
      inner_lr: step size of the inner optimiser.
      inner_steps: inner optimiser steps (a lax.scan, so it compiles once).
      inner_opt: 'adam' (the paper's; with beta1=inner_beta1) or 'sgd'. Its state starts afresh per
        task (supervised-reptile's TF Adam kept its moments across tasks; here the interface has no
        place for them).
      inner_batch: examples per inner step, drawn in shuffled passes over the support set; None = all.
      transductive: score the query set as one batch (batch-norm statistics over the queries, the
        paper's "transductive" setting); False scores each query example in a batch with the support
        set only, one at a time (the paper's non-transductive evaluation). Without batch norm the two agree.
    """
    if inner_opt == "adam":
        opt = optax.adam(inner_lr, b1=inner_beta1)
    elif inner_opt == "sgd":
        opt = optax.sgd(inner_lr)
    else:
        raise ValueError(f"inner_opt={inner_opt!r}: expected 'adam' or 'sgd'")

    def apply_fn(params, x):
        return learner.apply({"params": params}, x)

    def init(key, task):
        return learner.init(key, task.support.x)["params"]

    def adapt(meta_params, support, key):
        idx = minibatch_indices(key, support.y.shape[0], inner_batch, inner_steps)

        def inner_step(carry, batch_idx):
            params, opt_state = carry
            batch = jax.tree.map(lambda a: a[batch_idx], support)
            grads = jax.grad(lambda p: objective(apply_fn(p, batch.x), batch.y)[0])(params)
            updates, opt_state = opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        (adapted, _), _ = jax.lax.scan(inner_step, (meta_params, opt.init(meta_params)), idx)
        return {"params": adapted, "support": support}

    def loss(meta_params, state, query, key):
        del meta_params, key
        params = state["params"]
        if transductive:
            return objective(apply_fn(params, query.x), query.y)
        support_x = state["support"].x
        one = lambda x: apply_fn(params, jnp.concatenate([support_x, x[None]]))[-1]  # noqa: E731
        return objective(jax.vmap(one)(query.x), query.y)

    def meta_grad(meta_params, task, key):
        adapt_key, loss_key = jax.random.split(key)
        state = adapt(meta_params, task.support, adapt_key)
        _, metrics = loss(meta_params, state, task.query, loss_key)
        return jax.tree.map(lambda t, p: t - p, meta_params, state["params"]), metrics

    return MetaAlgorithm(init=init, adapt=adapt, loss=loss, meta_grad=meta_grad)


def from_config(cfg, learner, objective, phase: str) -> MetaAlgorithm:
    """Reptile from `cfg.algo`; phase 'eval' uses the test-time inner steps and batch."""
    a = cfg.algo
    steps, batch = (a.eval_inner_steps, a.eval_inner_batch) if phase == "eval" else (a.inner_steps, a.inner_batch)
    return reptile(learner, objective, a.inner_lr, steps, a.inner_opt, a.inner_beta1, batch, a.transductive)
