"""Reference rows for GP regression tasks (Bruinsma's tables), per task, in pure JAX: what the exact GP, the
diagonal GP (exact marginals, no correlations: the floor of any model predicting targets independently) and a
trivial model that ignores the context (the prior marginals) score on the very tasks an algorithm was evaluated on.
"""
from __future__ import annotations

from typing import Dict

import jax
import jax.numpy as jnp

from metarun import gaussian_process as gp


def _independent_log_likelihood(y, mean, var, mask):
    """sum over real targets of log N(y_t | mean_t, var_t)."""
    logp = -0.5 * (jnp.log(2 * jnp.pi * var) + jnp.square(y - mean) / var)
    return jnp.sum(jnp.where(mask > 0, logp, 0.0))


def reference_rows(kernel_fn, noise_var, x_ctx, y_ctx, ctx_mask, x_tgt, y_tgt, tgt_mask) -> Dict[str, jax.Array]:
    """One task's reference metrics, per (real) target point.

    Args: kernel_fn and noise_var of the GP the task was drawn from; x_ctx [n, 1], y_ctx [n, 1] or [n],
      ctx_mask [n]; x_tgt [m, 1], y_tgt [m, 1] or [m], tgt_mask [m].
    Returns: exact_gp_log_likelihood (joint), diagonal_gp_log_likelihood, diagonal_gp_kl, trivial_log_likelihood,
      trivial_kl. The exact GP's KL is 0 by definition.
    """
    count = jnp.maximum(jnp.sum(tgt_mask), 1.0)
    y = y_tgt.reshape(-1)
    mean, cov = gp.posterior(kernel_fn, x_ctx, y_ctx, ctx_mask, x_tgt, noise_var)
    var = jnp.diagonal(cov)
    prior_mean, prior_var = gp.trivial_predictive(kernel_fn, x_tgt, noise_var)
    return {
        "exact_gp_log_likelihood": gp.mvn_log_prob(y, mean, cov, tgt_mask) / count,
        "diagonal_gp_log_likelihood": _independent_log_likelihood(y, mean, var, tgt_mask) / count,
        "diagonal_gp_kl": gp.kl_per_target(mean, cov, mean, var, tgt_mask),
        "trivial_log_likelihood": _independent_log_likelihood(y, prior_mean, prior_var, tgt_mask) / count,
        "trivial_kl": gp.kl_per_target(mean, cov, prior_mean, prior_var, tgt_mask),
    }
