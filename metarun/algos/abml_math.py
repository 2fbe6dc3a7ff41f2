"""Amortized Bayesian meta-learning (Ravi & Beatson 2019): diagonal Gaussians over weights, KL, inner ELBO steps."""
from __future__ import annotations

from typing import Callable, Tuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from metarun.core import map_copies


def diag_gaussian(params, init_log_std: float) -> dict:
    """A diagonal Gaussian {"mean": params, "log_std": init_log_std everywhere} over a params pytree."""
    return {"mean": params, "log_std": jax.tree.map(lambda a: jnp.full_like(a, init_log_std), params)}


def sample_weights(q: dict, key, n: int):
    """n weight samples w = mean + exp(log_std) * eps, eps ~ N(0, I) (reparameterised: differentiable in q).

    Args:
      q: {"mean": pytree, "log_std": pytree of the same structure}.
      key: PRNG key.
      n: number of samples; static.

    Returns:
      The params pytree with every leaf stacked n times on a new axis 0.
    """
    # One draw for all weights, then cut into leaves: one random-bits op to compile, not one per leaf.
    flat_mean, unravel = ravel_pytree(q["mean"])
    eps = jax.vmap(unravel)(jax.random.normal(key, (n, flat_mean.size), flat_mean.dtype))
    return jax.tree.map(lambda m, s, e: m + jnp.exp(s) * e, q["mean"], q["log_std"], eps)


def kl_diag_gaussians(q: dict, prior: dict) -> jax.Array:
    """KL(q || prior) between diagonal Gaussians, summed over all weights (closed form).

    Per weight: log(s_p / s_q) + (s_q^2 + (m_q - m_p)^2) / (2 s_p^2) - 1/2, written in log-stds so that
    tiny or huge scales do not overflow.
    """

    def per_leaf(mq, lq, mp, lp):
        ratio = jnp.exp(2.0 * (lq - lp))
        return (lp - lq + 0.5 * (ratio + jnp.square((mq - mp) * jnp.exp(-lp))) - 0.5).sum()

    terms = jax.tree.map(per_leaf, q["mean"], q["log_std"], prior["mean"], prior["log_std"])
    return sum(jax.tree.leaves(terms))


def _uses_kl(kl_weight) -> bool:
    # A Python 0 drops the KL from the graph, so a point-mass posterior (log_std = -inf) has no 0 * inf = NaN.
    return not (isinstance(kl_weight, (int, float)) and kl_weight == 0)


def variational_loss(q: dict, prior: dict, nll_fn: Callable, key, num_samples: int,
                     kl_weight=1.0) -> Tuple[jax.Array, dict]:
    """The negative task ELBO: E_{w~q}[NLL(w)] (Monte Carlo, S samples) + kl_weight * KL(q || prior).

    Args:
      q: the task posterior {"mean", "log_std"}.
      prior: the meta-learned prior, same structure.
      nll_fn: weights pytree -> scalar NLL of the data (e.g. the support set's summed or mean loss).
      key: PRNG key for the samples.
      num_samples: S; static.
      kl_weight: the KL's weight (ABML down-weights it, e.g. 1/number of examples); a Python 0 drops it.

    Returns:
      (loss, {"nll": expected NLL, "kl": KL or 0}).
    """
    weights = sample_weights(q, key, num_samples)
    expected_nll = map_copies(nll_fn, weights).mean()
    kl = kl_diag_gaussians(q, prior) if _uses_kl(kl_weight) else jnp.zeros((), expected_nll.dtype)
    return expected_nll + kl_weight * kl, {"nll": expected_nll, "kl": kl}


def inner_step(q: dict, prior: dict, nll_fn: Callable, key, inner_lr, num_samples: int, kl_weight=1.0,
               first_order: bool = False) -> dict:
    """One SGD step on the task posterior's variational params: q <- q - inner_lr * grad_q variational_loss.

    Both the mean and the log-std move, with the same step size.
    """
    grads = jax.grad(lambda v: variational_loss(v, prior, nll_fn, key, num_samples, kl_weight)[0])(q)
    if first_order:
        grads = jax.lax.stop_gradient(grads)
    return jax.tree.map(lambda p, g: p - inner_lr * g, q, grads)


def adapt_posterior(prior: dict, nll_fn: Callable, key, inner_lr, inner_steps: int, num_samples: int = 1,
                    kl_weight=1.0, first_order: bool = False) -> dict:
    """ABML's amortised inference: the task posterior starts at the prior and takes `inner_steps` SGD steps.

    Each step draws fresh samples (the key folded with the step index); a lax.scan, so it compiles once.
    The meta-gradient can flow through the steps into the prior (unless first_order).

    Args:
      prior: the meta-learned prior {"mean", "log_std"}.
      nll_fn: weights pytree -> scalar NLL of the support set.
      key: PRNG key.
      inner_lr: the inner SGD step size.
      inner_steps: number of steps; static.
      num_samples: S weight samples per step; static.
      kl_weight: weight of KL(q || prior); a Python 0 drops it.
      first_order: treat inner gradients as constants for the meta-gradient.
    """

    def step(q, i):
        return inner_step(q, prior, nll_fn, jax.random.fold_in(key, i), inner_lr, num_samples, kl_weight,
                          first_order), None

    q, _ = jax.lax.scan(step, prior, jnp.arange(inner_steps))
    return q
