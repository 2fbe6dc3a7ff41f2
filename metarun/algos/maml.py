"""MAML (Finn et al. 2017) and first-order MAML: inner SGD on the support set, outer loss on the query."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from metarun.algos.base import MetaAlgorithm


def maml(learner, objective, inner_lr: float, inner_steps: int, first_order: bool = False) -> MetaAlgorithm:
    """Builds MAML over a Flax learner.

    Args:
      learner: a Flax module mapping inputs to outputs; its params are the meta-parameters.
      objective: (outputs, y) -> (loss, metrics).
      inner_lr: the inner SGD step size alpha.
      inner_steps: inner SGD steps on the support set (a lax.scan, so the step compiles once).
      first_order: treat inner gradients as constants (FOMAML): no second derivatives.
    """

    def apply_fn(params, x):
        return learner.apply({"params": params}, x)

    def init(key, task):
        return learner.init(key, task.support.x)["params"]

    def support_loss(params, support):
        return objective(apply_fn(params, support.x), support.y)[0]

    def adapt(meta_params, support, key):
        del key

        def inner_step(params, _):
            grads = jax.grad(support_loss)(params, support)
            if first_order:
                grads = jax.lax.stop_gradient(grads)
            return jax.tree.map(lambda p, g: p - inner_lr * g, params, grads), None

        adapted, _ = jax.lax.scan(inner_step, meta_params, None, length=inner_steps)
        return adapted

    def loss(meta_params, adapted, query, key):
        del meta_params, key
        return objective(apply_fn(adapted, query.x), query.y)

    return MetaAlgorithm(init=init, adapt=adapt, loss=loss)


def msl_weights(inner_steps: int, meta_step, anneal_steps: int):
    """MAML++'s per-step loss weights: uniform at first, moving linearly to the last step over
    `anneal_steps` meta-steps, the others floored at 0.03/N (Antoniou et al.'s code, by steps not epochs)."""
    n = inner_steps
    progress = jnp.minimum(meta_step / anneal_steps, 1.0)
    floor = 0.03 / n
    rest = jnp.maximum((1.0 - progress) / n, floor)
    last = jnp.minimum((1.0 + (n - 1) * progress) / n, 1.0 - (n - 1) * floor)
    return jnp.full((n,), rest).at[-1].set(last)


def mamlpp(learner, objective, inner_lr: float, inner_steps: int, first_order: bool = False, msl: bool = False,
           msl_last_weight=None, lslr: bool = False, per_step_bn: bool = False, rate_steps=None,
           msl_anneal_steps: int = 0, first_order_steps: int = 0, meta_step=None) -> MetaAlgorithm:
    """MAML with MAML++ options (Antoniou et al. 2019); with every option off it computes what `maml` does.

    meta_params = {"net": params[, "lslr": rates][, "bn": per-step BN params]}.

    Args:
      msl: multi-step loss: the query loss after every inner step, weighted: fixed (uniform, or
        `msl_last_weight` on the last step and the rest shared by the others) or annealed by the
        meta-step (msl_anneal_steps).
      lslr: learned per-layer (per param tensor), per-step inner learning rates, initialised to inner_lr.
      per_step_bn: per-step BatchNorm scale/bias (BNWB), meta-learned and not adapted in the inner
        loop. Per-step running statistics (BNRS) do not apply: BatchNorm here always uses the
        statistics of the batch it sees.
      rate_steps: how many per-step rates / BN copies to hold (the training inner steps); a longer
        test-time inner loop reuses the last.
      msl_anneal_steps: >0 anneals the MSL weights (msl_weights) by the meta-step.
      first_order_steps: first-order inner gradients for meta-steps below this, second order after.
      meta_step: the training step these settings are for; the trainer supplies it through at_step.
    """
    rate_steps = rate_steps or inner_steps

    def apply_fn(params, x):
        return learner.apply({"params": params}, x)

    def at(tree, step):
        i = jnp.minimum(step, rate_steps - 1)
        return jax.tree.map(lambda a: a[i], tree)

    def full(meta_params, fast, step):
        return {**fast, **at(meta_params["bn"], step)} if per_step_bn else fast

    def init(key, task):
        params = learner.init(key, task.support.x)["params"]
        bn = {k: v for k, v in params.items() if per_step_bn and k.startswith("norm")}
        if per_step_bn and not bn:
            raise ValueError("per_step_bn needs BatchNorm layers (learner.batch_norm=transductive)")
        meta = {"net": {k: v for k, v in params.items() if k not in bn}}
        if per_step_bn:
            meta["bn"] = jax.tree.map(lambda a: jnp.stack([a] * rate_steps), bn)
        if lslr:
            meta["lslr"] = jax.tree.map(lambda a: jnp.full((rate_steps,), inner_lr, a.dtype), meta["net"])
        return meta

    def query_loss(meta_params, fast, step, query):
        return objective(apply_fn(full(meta_params, fast, step), query.x), query.y)

    def adapt(meta_params, support, key):
        del key

        def inner_step(fast, step):
            grads = jax.grad(lambda f: query_loss(meta_params, f, step, support)[0])(fast)
            if first_order:
                grads = jax.lax.stop_gradient(grads)
            elif first_order_steps and meta_step is not None:
                # Annealed order: the stop_gradient branch is taken while meta_step < first_order_steps.
                grads = jax.lax.cond(meta_step < first_order_steps, jax.lax.stop_gradient, lambda g: g, grads)
            rates = at(meta_params["lslr"], step) if lslr else jax.tree.map(lambda _: inner_lr, fast)
            fast = jax.tree.map(lambda p, r, g: p - r * g, fast, rates, grads)
            return fast, fast if msl else None

        fast, trace = jax.lax.scan(inner_step, meta_params["net"], jnp.arange(inner_steps))
        return trace if msl else fast

    def loss(meta_params, state, query, key):
        del key
        if not msl:
            return query_loss(meta_params, state, inner_steps - 1, query)
        losses, metrics = jax.vmap(lambda f, s: query_loss(meta_params, f, s, query))(state, jnp.arange(inner_steps))
        if msl_anneal_steps and meta_step is not None:
            weights = msl_weights(inner_steps, meta_step, msl_anneal_steps)
        elif msl_last_weight is None or inner_steps == 1:
            weights = jnp.full((inner_steps,), 1.0 / inner_steps)
        else:
            rest = (1.0 - msl_last_weight) / (inner_steps - 1)
            weights = jnp.full((inner_steps,), rest).at[-1].set(msl_last_weight)
        total = jnp.dot(weights, losses)
        return total, {**jax.tree.map(lambda m: m[-1], metrics), "msl_loss": total}

    annealed = (msl and msl_anneal_steps) or (first_order_steps and not first_order)
    at_step = None
    if annealed and meta_step is None:
        at_step = lambda step: mamlpp(  # noqa: E731
            learner, objective, inner_lr, inner_steps, first_order, msl, msl_last_weight, lslr, per_step_bn,
            rate_steps, msl_anneal_steps, first_order_steps, meta_step=step)
    return MetaAlgorithm(init=init, adapt=adapt, loss=loss, at_step=at_step)


def from_config(cfg, learner, objective, phase: str) -> MetaAlgorithm:
    """MAML from `cfg.algo` (MAML++ when any of its options is on); phase 'eval' uses the test-time inner steps."""
    steps = cfg.algo.eval_inner_steps if phase == "eval" else cfg.algo.inner_steps
    a = cfg.algo
    msl = a.get("msl", False) and phase != "eval"
    annealed_order = a.get("first_order_steps", 0) and phase != "eval"
    if msl or annealed_order or a.get("lslr", False) or a.get("per_step_bn", False):
        return mamlpp(learner, objective, a.inner_lr, steps, a.first_order, msl, a.get("msl_last_weight"),
                      a.get("lslr", False), a.get("per_step_bn", False), a.inner_steps,
                      a.get("msl_anneal_steps", 0), a.get("first_order_steps", 0) if phase != "eval" else 0)
    return maml(learner, objective, cfg.algo.inner_lr, steps, cfg.algo.first_order)
