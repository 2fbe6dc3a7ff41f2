"""Neural Process objectives per target point (masked): Gaussian NLL; the latent NP's ELBO, ML and IW bounds."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _count(mask):
    return jnp.maximum(jnp.sum(mask), 1.0)


def target_log_likelihood(predictive, y, mask):
    """sum over the real targets (and output dims) of log p(y_t); predictive is a Normal-like (loc, scale).

    predictive.loc/scale [..., m, dy], y [m, dy], mask [m]; returns [...] (one value per latent sample).
    Padded targets are left out even when y holds NaN there (their inputs should be finite for gradients).
    """
    y = jnp.where(mask[:, None] > 0, y, 0.0)
    return jnp.sum(jnp.where(mask > 0, predictive.log_prob(y).sum(-1), 0.0), -1)


def gaussian_nll(predictive, y, mask):
    """Mean negative log-likelihood per real target point (summed over output dims) of a CNP-style prediction."""
    return -target_log_likelihood(predictive, y, mask) / _count(mask)


def neg_elbo(output, y, mask):
    """-ELBO per target (Garnelo et al. 2018b): -(E_q[sum_t log p(y_t | z)] - KL(q(z|C,T) || q(z|C))) / m.

    output: a LatentOutput computed with y_tgt given, so its z are drawn from the posterior.
    """
    if output.posterior is None:
        raise ValueError("neg_elbo needs the posterior: call the model with y_tgt")
    expected = jnp.mean(target_log_likelihood(output.predictive, y, mask))
    kl = jnp.sum(output.posterior.kl_divergence(output.prior))
    return -(expected - kl) / _count(mask)


def neg_ml(output, y, mask):
    """-log (1/S) sum_s p(y_T | z_s, C) per target, z_s from the prior (the ML objective of Foong et al. 2020).

    output: a LatentOutput computed without y_tgt (z from q(z | context)).
    """
    logp = target_log_likelihood(output.predictive, y, mask)
    return -(jax.nn.logsumexp(logp) - math.log(logp.shape[0])) / _count(mask)


def neg_importance_weighted(output, y, mask):
    """-log (1/S) sum_s p(y_T | z_s) q(z_s | C) / q(z_s | C, T) per target: the importance-weighted bound
    with the posterior as the proposal (tighter than the ELBO as S grows). output: computed with y_tgt."""
    if output.posterior is None:
        raise ValueError("neg_importance_weighted needs the posterior: call the model with y_tgt")
    log_w = (target_log_likelihood(output.predictive, y, mask) + output.prior.log_prob(output.z).sum(-1)
             - output.posterior.log_prob(output.z).sum(-1))
    return -(jax.nn.logsumexp(log_w) - math.log(log_w.shape[0])) / _count(mask)
