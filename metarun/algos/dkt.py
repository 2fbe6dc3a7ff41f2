"""Deep Kernel Transfer (Patacchiola et al. 2020): an exact GP whose kernel runs on a meta-learned network's features.

Meta-training maximises the GP marginal likelihood of each task's points (support and query together, as
the paper's code does); adaptation is the exact GP posterior on the support set; prediction is its
posterior on the queries. Regression: one GP per output dimension. Classification: the paper's
one-vs-rest GP regression onto ±1 labels, one GP per class with shared kernel hyperparameters; class
probabilities (for NLL, Brier, ECE) are the probabilities that each class's latent value is the largest
under the per-class Gaussian predictive marginals (1-D Gauss-Hermite quadrature: deterministic, no
temperature to choose), and accuracy is the argmax of the posterior means, as in the paper.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.stats import norm

from metarun import gaussian_process as gp
from metarun.algos.base import Collaborators, MetaAlgorithm
from metarun.algos.prediction_record import regression_record
from metarun.errors import UserError
from metarun.learners import Net
from metarun.registry import register

KERNELS = ("rbf", "spectral", "cosine")
JITTER = 1e-5  # added to the noise variance: keeps the Cholesky defined when the noise is learned to ~0


# ---- kernels on features -----------------------------------------------------------------------------
def init_kernel(name: str, key, dim: int, lengthscale: float = 1.0, outputscale: float = 1.0,
                mixtures: int = 4) -> dict:
    """The kernel's hyperparameters (unconstrained: logs of positive values), meta-learned with the net.

    rbf:      s^2 exp(-|a - b|^2 / (2 l^2)).
    spectral: Wilson & Adams (2013), gpytorch's form: sum_q w_q prod_d exp(-2 pi^2 t_d^2 v_qd) cos(2 pi t_d mu_qd),
              t = a - b, Q = `mixtures` components with per-dimension frequencies mu and variances v.
    cosine:   s^2 <a/|a|, b/|b|> (a linear kernel on normalised features, DKT's "CosSim").
    """
    if name == "rbf":
        return {"log_lengthscale": jnp.log(jnp.float32(lengthscale)), "log_outputscale": jnp.log(jnp.float32(outputscale))}
    if name == "cosine":
        return {"log_outputscale": jnp.log(jnp.float32(outputscale))}
    if name == "spectral":
        # Frequencies spread below 1 / lengthscale and bandwidths ~ 1 / lengthscale: the mixture starts smooth.
        mu = jax.random.uniform(key, (mixtures, dim), minval=0.0, maxval=1.0) / lengthscale
        return {"log_weights": jnp.full((mixtures,), jnp.log(outputscale / mixtures), jnp.float32),
                "log_means": jnp.log(mu + 1e-3),
                "log_scales": jnp.full((mixtures, dim), jnp.log(1.0 / lengthscale), jnp.float32)}
    raise UserError(f"algo.kernel={name} is unknown; expected one of: {', '.join(KERNELS)}")


def kernel_fn(name: str, hp: dict):
    """The kernel with its hyperparameters bound, `(a [n, d], b [m, d]) -> [n, m]`, from metarun.gaussian_process."""
    if name == "rbf":
        return partial(gp.eq, lengthscale=jnp.exp(hp["log_lengthscale"]), variance=jnp.exp(2 * hp["log_outputscale"]))
    if name == "cosine":
        unit = lambda x: x / jnp.sqrt(jnp.square(x).sum(-1, keepdims=True) + 1e-12)  # noqa: E731
        return lambda a, b: gp.linear(unit(a), unit(b), variance=jnp.exp(2 * hp["log_outputscale"]))
    if name == "spectral":
        return partial(gp.spectral_mixture, weights=jnp.exp(hp["log_weights"]), means=jnp.exp(hp["log_means"]),
                       variances=jnp.square(jnp.exp(hp["log_scales"])))
    raise UserError(f"algo.kernel={name} is unknown; expected one of: {', '.join(KERNELS)}")


def kernel_matrix(name: str, hp: dict, a, b):
    """[n, m] kernel between feature rows a [n, d] and b [m, d]."""
    return kernel_fn(name, hp)(a, b)


# ---- exact GP regression, one GP per target column (metarun.gaussian_process is single-output) ----------
# vmap over the columns only: the Gram matrix and its Cholesky do not depend on y, so JAX computes them once.
def _mask(x, mask):
    return jnp.ones((x.shape[0],), x.dtype) if mask is None else mask.astype(x.dtype)


def gp_neg_log_marginal_likelihood(k_fn, x, y, noise, mask=None):
    """-log N(y | 0, K + noise I) per point and output (gpytorch's ExactMarginalLogLikelihood scale).

    Args:
      k_fn: the kernel, hyperparameters bound (kernel_fn).
      x: [n, d] inputs (features); y: [n, C] targets, one independent GP per column sharing the kernel.
      noise: the Gaussian noise variance (JITTER is added).
      mask: optional [n], 1 = real point (padding contributes nothing).
    """
    m = _mask(x, mask)
    lml = jax.vmap(lambda col: gp.log_marginal_likelihood(k_fn, x, col, m, noise + JITTER), in_axes=1)(y)
    return -lml.sum() / jnp.maximum(m.sum() * y.shape[1], 1.0)


def gp_posterior(k_fn, xs, y, xq, noise, mask=None):
    """The exact GP posterior of the latent function at the queries xq: (mean [q, C], variance [q]).

    metarun.gaussian_process.posterior predicts the noisy targets; the latent variance drops the noise.
    """
    m = _mask(xs, mask)
    mean, diag = jax.vmap(lambda col: _mean_and_diag(k_fn, xs, col, m, xq, noise + JITTER), in_axes=1)(y)
    return mean.T, jnp.maximum(diag[0] - (noise + JITTER), 0.0)


def _mean_and_diag(k_fn, xs, y, mask, xq, noise):
    mean, cov = gp.posterior(k_fn, xs, y, mask, xq, noise)
    return mean, jnp.diagonal(cov)


# ---- one-vs-rest class probabilities -----------------------------------------------------------------
_GH_X, _GH_W = np.polynomial.hermite.hermgauss(32)


def argmax_log_probs(mean, var):
    """log P(class c has the largest latent value) for independent f_c ~ N(mean_c, var), [q, C] -> [q, C].

    P(c) = E_{z~N(0,1)} prod_{j != c} Phi((mean_c - mean_j) / sd + z): one 1-D Gauss-Hermite integral per
    class (the classes share the variance: one kernel), in log space, renormalised over classes.
    """
    sd = jnp.sqrt(jnp.maximum(var, 1e-12))[:, None, None]                   # [q, 1, 1]
    z = jnp.asarray(np.sqrt(2.0) * _GH_X, mean.dtype)                       # [G]
    log_w = jnp.asarray(np.log(_GH_W / np.sqrt(np.pi)), mean.dtype)
    gap = (mean[:, :, None] - mean[:, None, :]) / sd                        # [q, c, j]
    log_cdf = norm.logcdf(gap[..., None] + z)                               # [q, c, j, G]
    eye = jnp.eye(mean.shape[1], dtype=bool)[None, :, :, None]
    log_prod = jnp.where(eye, 0.0, log_cdf).sum(2)                          # [q, c, G]
    return jax.nn.log_softmax(jax.nn.logsumexp(log_prod + log_w, -1), -1)


# ---- the algorithm ------------------------------------------------------------------------------------
def dkt(net: Net, family, kernel: str, train: bool, lengthscale: float = 1.0, outputscale: float = 1.0,
        noise: float = 0.1, mixtures: int = 4, info=None) -> MetaAlgorithm:
    """Builds DKT over a feature network (a learner without its head).

    meta_params = {"net": feature network, "kernel": kernel hyperparameters, "log_noise": scalar};
    algo_state = {}. `adapt` embeds the support set; `loss` returns the negative marginal likelihood of
    the task's points under the GP (support and query, the meta-objective; at evaluation it is reported
    only) with the family's metrics of the posterior predictive on the queries. The regression eval build
    also records predictions.png's arrays (metarun.algos.prediction_record): the posterior mean and the
    predictive standard deviation (latent variance + noise, as in the log-likelihood) on a grid per task.

    Args:
      net: the feature network in a mode.
      family: the task family (kind classification or regression; its objective scores the predictions).
      kernel: rbf | spectral | cosine.
      train: the training build (marginal likelihood over support and query, features in one batch).
    """
    classify = family.kind == "classification"
    ways = family.ways("train" if train else "test") if classify else None

    def targets(y):
        return 2.0 * jax.nn.one_hot(y, ways) - 1.0 if classify else y.reshape(y.shape[0], -1)

    def init(key, task):
        net_key, kernel_key = jax.random.split(key)
        params, _ = net.init(net_key, task.support.x)
        dim = net.apply(params, task.support.x).reshape(task.support.x.shape[0], -1).shape[1]
        return {"net": params, "kernel": init_kernel(kernel, kernel_key, dim, lengthscale, outputscale, mixtures),
                "log_noise": jnp.log(jnp.float32(noise))}, {}

    def features(params, x):
        out = net.apply(params, x)
        return out.reshape(out.shape[0], -1)

    def adapt(meta_params, algo_state, support, key):
        del key, algo_state
        return {"features": features(meta_params["net"], support.x), "support": support}

    def predict(meta_params, zs, zq, support):
        return gp_posterior(kernel_fn(kernel, meta_params["kernel"]), zs, targets(support.y), zq,
                            jnp.exp(meta_params["log_noise"]), support.mask)

    def loss(meta_params, algo_state, task_state, query, key):
        del key, algo_state
        support = task_state["support"]
        n = support.x.shape[0]
        if train:  # one batch of features for the task's points, as the paper trains on all of them
            z = features(meta_params["net"], jnp.concatenate([support.x, query.x]))
            zs, zq = z[:n], z[n:]
        else:
            zs = task_state["features"]
            out = net.apply_query(meta_params["net"], query.x, support.x)
            zq = out.reshape(out.shape[0], -1)
        z_all = jnp.concatenate([zs, zq])
        y_all = jnp.concatenate([targets(support.y), targets(query.y)])
        mask_all = None if support.mask is None else jnp.concatenate(
            [support.mask, jnp.ones((zq.shape[0],), support.mask.dtype) if query.mask is None else query.mask])
        mll_loss = gp_neg_log_marginal_likelihood(kernel_fn(kernel, meta_params["kernel"]), z_all, y_all,
                                                  jnp.exp(meta_params["log_noise"]), mask_all)
        mean, var = predict(meta_params, zs, zq, support)
        if classify:
            _, metrics = family.objective(argmax_log_probs(mean, var), query.y, query.mask)
            metrics["accuracy"] = (jnp.argmax(mean, -1) == query.y).mean()
        else:
            _, metrics = family.objective(mean.reshape(query.y.shape), query.y, query.mask)
            noise_var = jnp.exp(meta_params["log_noise"])
            metrics["log_likelihood"] = predictive_log_likelihood(mean, var + noise_var, query.y, query.mask)
            if not train:
                def grid_predictive(x):
                    out = net.apply_query(meta_params["net"], x, support.x)
                    g_mean, g_var = predict(meta_params, zs, out.reshape(out.shape[0], -1), support)
                    return g_mean, jnp.sqrt(g_var + noise_var)
                metrics.update(regression_record(support, query, grid_predictive))
        return mll_loss, {**metrics, "loss": mll_loss}

    return MetaAlgorithm(init=init, adapt=adapt, loss=loss, info=info or {})


def predictive_log_likelihood(mean, var, y, mask=None):
    """Mean over real query points (and outputs) of log N(y | mean, var): a regression model's predictive
    log-likelihood per point (higher is better). mean [q, C], var [q], y [q, ...]."""
    y = y.reshape(mean.shape)
    per = -0.5 * (jnp.log(2 * jnp.pi * var)[:, None] + jnp.square(y - mean) / var[:, None])
    per = per.mean(-1)
    if mask is None:
        return per.mean()
    m = mask.astype(per.dtype)
    return jnp.where(m > 0, per, 0.0).sum() / jnp.maximum(m.sum(), 1.0)


@dataclass
class DKTConfig:
    name: str = "dkt"
    kernel: str = "rbf"          # rbf | spectral | cosine (linear kernel on normalised features)
    mixtures: int = 4            # spectral: mixture components Q
    init_lengthscale: float = 1.0
    init_outputscale: float = 1.0
    init_noise: float = 0.1      # Gaussian noise variance (learned)


def check_family(name: str, c: Collaborators) -> None:
    """The Bayesian algorithms serve classification and regression families, without running BatchNorm."""
    if c.family.kind not in ("classification", "regression"):
        raise UserError(f"algo={name} serves classification and regression datasets; dataset={c.family.name} "
                        f"is {c.family.kind}")
    if getattr(c.learner_cfg.get("batch_norm"), "value", c.learner_cfg.get("batch_norm")) == "running":
        raise UserError(f"algo={name} supports learner.batch_norm=transductive or none")


@register("algo", "dkt", schema=DKTConfig)
def build(a, c: Collaborators) -> MetaAlgorithm:
    """DKT from its config section: the kernel and its initial hyperparameters."""
    check_family("dkt", c)
    if a.kernel not in KERNELS:
        raise UserError(f"algo.kernel={a.kernel} is unknown; expected one of: {', '.join(KERNELS)}")
    if a.mixtures < 1:
        raise UserError(f"algo.mixtures={a.mixtures} must be >= 1")
    for key in ("init_lengthscale", "init_outputscale", "init_noise"):
        if not a[key] > 0:
            raise UserError(f"algo.{key}={a[key]} must be > 0")
    info = {"name": "dkt", "kernel": a.kernel, **({"mixtures": a.mixtures} if a.kernel == "spectral" else {}),
            "init_lengthscale": a.init_lengthscale, "init_outputscale": a.init_outputscale,
            "init_noise": a.init_noise, "gp": "exact (metarun.gaussian_process)",
            "classification": "one-vs-rest GP regression onto ±1, shared kernel"}
    net = Net(c.learner(None), c.train, c.transductive)
    return dkt(net, c.family, a.kernel, c.train, a.init_lengthscale, a.init_outputscale, a.init_noise, a.mixtures,
               info)
