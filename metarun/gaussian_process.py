"""Kernels and exact Gaussian-process regression (posterior, marginal likelihood, KL to a model) in jax.numpy."""
from __future__ import annotations

import math
from typing import Callable, Dict

import jax
import jax.numpy as jnp

from metarun.errors import UserError

# kernel(x1[n, d], x2[m, d], **hyper) -> [n, m]; a kernel_fn below is one with its hyperparameters bound
# (functools.partial(eq, lengthscale=0.25)), so kernel_fn(x1, x2) -> [n, m].
KernelFn = Callable[[jax.Array, jax.Array], jax.Array]

_LOG_2PI = math.log(2.0 * math.pi)


def _sq_dist(x1, x2, lengthscale):
    """Squared Euclidean distances [n, m] of x / lengthscale (lengthscale scalar or [d] for ARD)."""
    z1, z2 = x1 / lengthscale, x2 / lengthscale
    return jnp.sum(jnp.square(z1[:, None, :] - z2[None, :, :]), -1)


def _safe_sqrt(a):
    # sqrt has an infinite derivative at 0 (every diagonal of a stationary kernel); route it away.
    positive = a > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, a, 1.0)), 0.0)


def eq(x1, x2, lengthscale=1.0, variance=1.0):
    """Exponentiated quadratic (RBF): variance * exp(-|x1 - x2|^2 / (2 lengthscale^2))."""
    return variance * jnp.exp(-0.5 * _sq_dist(x1, x2, lengthscale))


def matern52(x1, x2, lengthscale=1.0, variance=1.0):
    """Matérn-5/2: variance * (1 + sqrt5 r + 5 r^2 / 3) exp(-sqrt5 r), r = |x1 - x2| / lengthscale."""
    r = _safe_sqrt(_sq_dist(x1, x2, lengthscale))
    s5r = jnp.sqrt(5.0) * r
    return variance * (1.0 + s5r + jnp.square(s5r) / 3.0) * jnp.exp(-s5r)


def periodic(x1, x2, period=1.0, lengthscale=1.0, variance=1.0):
    """MacKay's periodic kernel: variance * exp(-2 sum_d sin^2(pi (x1_d - x2_d) / period) / lengthscale^2).

    This is an EQ of the given lengthscale on the embedding x -> (sin, cos)(2 pi x / period), which is
    what stheno's `EQ().periodic(period)` computes.
    """
    diff = x1[:, None, :] - x2[None, :, :]
    s = jnp.sin(jnp.pi * diff / period) / lengthscale
    return variance * jnp.exp(-2.0 * jnp.sum(jnp.square(s), -1))


def weakly_periodic(x1, x2, lengthscale=0.5, period=0.25, periodic_lengthscale=1.0, variance=1.0):
    """EQ(lengthscale 0.5) x periodic(period 0.25): the ConvCNP / `neuralprocesses` weakly periodic kernel."""
    return eq(x1, x2, lengthscale, variance) * periodic(x1, x2, period, periodic_lengthscale)


def spectral_mixture(x1, x2, weights=(1.0,), means=((0.0,),), variances=((1.0,),)):
    """Spectral mixture kernel (Wilson & Adams 2013), Q components over d input dimensions.

    k(tau) = sum_q w_q prod_d exp(-2 pi^2 tau_d^2 v_qd) cos(2 pi tau_d mu_qd).

    Args:
        x1, x2: inputs [n, d] and [m, d].
        weights: w [Q], the component weights (the spectral density's mass per component).
        means: mu [Q, d] (or [Q, 1], broadcast over d), the spectral means (frequencies).
        variances: v [Q, d] (or [Q, 1]), the spectral variances (inverse squared lengthscales / 4 pi^2).
    """
    w, mu, v = jnp.asarray(weights), jnp.asarray(means), jnp.asarray(variances)
    tau = x1[:, None, None, :] - x2[None, :, None, :]  # [n, m, 1, d], broadcast against [Q, d]
    per_dim = jnp.exp(-2.0 * jnp.pi ** 2 * jnp.square(tau) * v) * jnp.cos(2.0 * jnp.pi * tau * mu)
    return jnp.sum(w * jnp.prod(per_dim, -1), -1)


def linear(x1, x2, variance=1.0, bias=0.0):
    """Dot-product kernel on features: variance * x1 x2^T + bias (a deep kernel's last layer)."""
    return variance * x1 @ x2.T + bias


KERNELS: Dict[str, Callable] = {
    "eq": eq,
    "matern52": matern52,
    "periodic": periodic,
    "weakly_periodic": weakly_periodic,
    "spectral_mixture": spectral_mixture,
    "linear": linear,
}


def get_kernel(name: str) -> Callable:
    """The kernel called `name`; a UserError naming `dataset.kernel` and the valid names otherwise."""
    if name not in KERNELS:
        raise UserError(f"dataset.kernel={name!r} is not a kernel; expected one of {', '.join(KERNELS)}")
    return KERNELS[name]


def _flat(y, n):
    # Single-output GP: accept y as [n] or [n, 1]; a wider y fails here rather than silently mixing outputs.
    return jnp.reshape(y, (n,))


def _masked_gram(kernel_fn, x, mask, noise_var):
    """K(x, x) + noise I with masked-out points turned into independent unit-variance dummies.

    Zeroing a masked point's row and column and putting 1 on its diagonal makes the matrix block
    diagonal (real points | dummies), so the dummies cannot affect anything computed from the real
    block: exact, unlike a large-noise approximation.
    """
    keep = mask.astype(x.dtype)
    gram = kernel_fn(x, x) + noise_var * jnp.eye(x.shape[0], dtype=x.dtype)
    both = keep[:, None] * keep[None, :]
    return gram * both + jnp.diag(1.0 - keep)


def posterior(kernel_fn: KernelFn, x_ctx, y_ctx, ctx_mask, x_tgt, noise_var):
    """Exact posterior predictive of the noisy targets given the (masked) context, zero prior mean.

    Args:
        kernel_fn: (x1[n, d], x2[m, d]) -> [n, m], hyperparameters bound.
        x_ctx: context inputs [n, d]; y_ctx: context outputs [n] or [n, 1].
        ctx_mask: [n], 1 for a real context point, 0 for padding (padding has no effect).
        x_tgt: target inputs [m, d].
        noise_var: observation noise variance (scalar), on the context and on the targets; > 0 keeps the
            float32 Cholesky well conditioned.

    Returns:
        (mean [m], cov [m, m]) of y_tgt | context, with noise_var on the diagonal of cov.
    """
    keep = ctx_mask.astype(x_ctx.dtype)
    y = _flat(y_ctx, x_ctx.shape[0]) * keep
    chol = jnp.linalg.cholesky(_masked_gram(kernel_fn, x_ctx, ctx_mask, noise_var))
    k_ct = kernel_fn(x_ctx, x_tgt) * keep[:, None]  # masked context points decouple from the targets
    alpha = jax.scipy.linalg.cho_solve((chol, True), y)
    v = jax.scipy.linalg.solve_triangular(chol, k_ct, lower=True)
    mean = k_ct.T @ alpha
    cov = kernel_fn(x_tgt, x_tgt) - v.T @ v + noise_var * jnp.eye(x_tgt.shape[0], dtype=x_tgt.dtype)
    return mean, cov


def log_marginal_likelihood(kernel_fn: KernelFn, x, y, mask, noise_var):
    """log N(y | 0, K + noise I) over the points where mask is 1 (padding contributes exactly 0).

    Args:
        kernel_fn: (x1, x2) -> Gram matrix, hyperparameters bound (differentiate through them).
        x: inputs [n, d]; y: outputs [n] or [n, 1]; mask: [n]; noise_var: scalar.
    """
    keep = mask.astype(x.dtype)
    yv = _flat(y, x.shape[0]) * keep
    chol = jnp.linalg.cholesky(_masked_gram(kernel_fn, x, mask, noise_var))
    z = jax.scipy.linalg.solve_triangular(chol, yv, lower=True)
    # Dummies have y = 0 and a unit diagonal: they add nothing to the quadratic or the log-determinant.
    logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol)))
    return -0.5 * (jnp.sum(jnp.square(z)) + logdet + jnp.sum(keep) * _LOG_2PI)


def mvn_log_prob(y, mean, cov, mask=None):
    """log N(y | mean, cov) of a joint Gaussian over m points, restricted to mask (padding ignored).

    With `posterior`'s outputs this is the exact GP's joint log-likelihood of the targets (the
    `pred_logpdf` of the `neuralprocesses` benchmark).
    """
    m = mean.shape[0]
    keep = jnp.ones((m,), mean.dtype) if mask is None else mask.astype(mean.dtype)
    both = keep[:, None] * keep[None, :]
    chol = jnp.linalg.cholesky(cov * both + jnp.diag(1.0 - keep))
    z = jax.scipy.linalg.solve_triangular(chol, (_flat(y, m) - mean) * keep, lower=True)
    logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol)))
    return -0.5 * (jnp.sum(jnp.square(z)) + logdet + jnp.sum(keep) * _LOG_2PI)


def kl_per_target(mean_p, cov_p, mean_q, var_q_diag, mask=None):
    """KL( N(mean_p, cov_p) || N(mean_q, diag var_q) ) divided by the number of (unmasked) targets.

    Bruinsma's metric: p is the exact GP's joint posterior predictive (`posterior`), q a model's
    independent per-target predictive. The diagonal GP (`diagonal_posterior`) attains the floor for
    any model that predicts targets independently.

    Args:
        mean_p: [m]; cov_p: [m, m]; mean_q: [m] or [m, 1]; var_q_diag: [m] or [m, 1].
        mask: optional [m]; targets where it is 0 are left out of the sum and the count.
    """
    m = mean_p.shape[0]
    keep = jnp.ones((m,), mean_p.dtype) if mask is None else mask.astype(mean_p.dtype)
    # A masked target becomes p = q = N(0, 1): it contributes exactly 0.
    var_q = jnp.where(keep > 0, _flat(var_q_diag, m), 1.0)
    diff = (_flat(mean_q, m) - mean_p) * keep
    cov = cov_p * (keep[:, None] * keep[None, :]) + jnp.diag(1.0 - keep)
    chol = jnp.linalg.cholesky(cov)
    logdet_p = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol)))
    kl = 0.5 * (jnp.sum(jnp.diagonal(cov) / var_q) + jnp.sum(jnp.square(diff) / var_q) - m
                + jnp.sum(jnp.log(var_q)) - logdet_p)
    return kl / jnp.maximum(jnp.sum(keep), 1.0)


def diagonal_posterior(kernel_fn: KernelFn, x_ctx, y_ctx, ctx_mask, x_tgt, noise_var):
    """Reference predictor "diagonal GP": the exact posterior marginals (mean [m], var [m]).

    Its `kl_per_target` is the lowest any model that predicts targets independently can reach.
    """
    mean, cov = posterior(kernel_fn, x_ctx, y_ctx, ctx_mask, x_tgt, noise_var)
    return mean, jnp.diagonal(cov)


def trivial_predictive(kernel_fn: KernelFn, x_tgt, noise_var):
    """Reference predictor "trivial": ignores the context; the GP prior marginals (mean 0, var [m])."""
    var = jax.vmap(lambda x: kernel_fn(x[None], x[None])[0, 0])(x_tgt) + noise_var
    return jnp.zeros((x_tgt.shape[0],), x_tgt.dtype), var
