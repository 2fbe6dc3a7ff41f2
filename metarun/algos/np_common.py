"""What the four Neural Process algorithms (cnp, np, anp, convcnp) share: a MetaAlgorithm over a model that reads
a masked context and predicts every target in one forward pass, its metrics, and its predictions.png record.

There is no inner loop and no learner: the model is built from the `algo` section (metarun.learners.neural_process),
meta_params = {"model": its parameters}, algo_state = {}. `adapt` is the identity on the cleaned, masked context
(the encoding happens inside the model's forward pass, because the attentive and convolutional encoders depend on
the targets too); `loss` is the target negative log-likelihood per point (conditional models) or the latent
model's objective (ELBO, ML or importance-weighted; metarun.algos.np_objectives), and its metrics are
  log_likelihood  per target point (a latent model's: log of the mean over `eval_samples` prior draws of the
                  joint likelihood of the targets, divided by their number), higher is better;
  context_log_likelihood  the same, at the context points (Kim et al. 2019's context NLL; tasks with a context);
  mse             of the predictive mean;
  kl              on GP tasks only: KL per target point from the exact GP posterior (the tasks' own kernel and
                  noise, family.gp_prior) to the model. Conditional models: exact, by
                  gaussian_process.kl_per_target against their independent Gaussians. Latent models, whose
                  predictive is a mixture: (exact GP joint log-likelihood - model log-likelihood) / targets, an
                  unbiased estimate of the same KL over tasks (the targets are drawn from that GP) but noisy per task.
The evaluation build also records the arrays family.plots draws predictions.png from: the family's own
`record_predictions(predict, ctx, tgt, key)` when it has one (image completion), else `_plot_*` arrays on a 1D
grid of inputs (grid_record; the regression family).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

import jax
import jax.numpy as jnp

from metarun import gaussian_process as gp
from metarun.algos import np_objectives as objectives
from metarun.algos.base import Collaborators, MetaAlgorithm
from metarun.errors import UserError
from metarun.learners.neural_process import LATENT_RNG, LatentOutput, clean_context

OBJECTIVES = ("elbo", "ml", "iw")
METRICS = ("log_likelihood", "mse", "kl")
GRID_POINTS = 100  # predictions.png: predictive on this many inputs spanning each task's points


@dataclass
class NPBaseConfig:
    """Keys every Neural Process algorithm has (see the module docstring)."""
    name: str = "cnp"
    metric: str = "log_likelihood"  # the primary metric the regression datasets report (their `metric` key)
    uses_learner: bool = False      # the model comes from algo.*; the learner section is not used
    min_std: float = 0.01           # predictive scale = min_std + softplus(raw)


def _ones_if_none(mask, n, dtype=jnp.float32):
    return jnp.ones((n,), dtype) if mask is None else mask.astype(dtype)


def context_of(examples) -> Dict[str, jax.Array]:
    """The masked set as a dict (x [n, dx], y [n, dy], mask [n]); a missing mask means every point is real.

    Padding is zeroed (even NaN or inf junk): the exact-GP metric multiplies by the mask, and 0 * NaN is NaN."""
    y = examples.y.reshape(examples.y.shape[0], -1)
    mask = _ones_if_none(examples.mask, examples.x.shape[0], examples.x.dtype)
    x, y, mask = clean_context(examples.x, y, mask)
    return {"x": x, "y": y, "mask": mask}


def context_fit(log_likelihood_per_point, ctx) -> Dict[str, jax.Array]:
    """`context_log_likelihood`: the model's log-likelihood of its own context points, per point (Kim et al. 2019's
    "context NLL": how well the model reproduces what it was shown; CNPs underfit it). A task with an empty context
    has none: its `_valid:` flag keeps it out of the mean (TaskFamily.summarize)."""
    return {"context_log_likelihood": log_likelihood_per_point,
            "_valid:context_log_likelihood": jnp.sum(ctx["mask"]) > 0}


def masked_mse(loc, y, mask):
    """Mean over real targets (and output dims) of (loc - y)^2; loc, y [m, dy], mask [m]."""
    err = jnp.square(loc - y).mean(-1)
    return jnp.sum(jnp.where(mask > 0, err, 0.0)) / jnp.maximum(jnp.sum(mask), 1.0)


def exact_posterior(gp_prior, ctx, x_tgt):
    """The exact GP posterior predictive (mean [m], cov [m, m]) of the noisy targets under the tasks' own GP."""
    kernel_fn, noise = gp_prior
    return gp.posterior(kernel_fn, ctx["x"], ctx["y"], ctx["mask"], x_tgt, noise)


def gp_kl(gp_prior, ctx, x_tgt, tgt_mask, loc, var):
    """KL per target point from the exact GP posterior (jointly over the targets) to independent Gaussians
    N(loc, var) [m] or [m, 1]: Bruinsma's metric for a conditional model."""
    mean_p, cov_p = exact_posterior(gp_prior, ctx, x_tgt)
    return gp.kl_per_target(mean_p, cov_p, loc, var, tgt_mask)


def gp_kl_from_log_likelihood(gp_prior, ctx, x_tgt, y_tgt, tgt_mask, model_log_likelihood_sum):
    """(log p_GP(y_T | C) - log q(y_T | C)) / targets: the KL per target of a model whose predictive has no closed
    form (a latent model's mixture), estimated on the task's own targets, which the exact GP drew."""
    mean_p, cov_p = exact_posterior(gp_prior, ctx, x_tgt)
    exact = gp.mvn_log_prob(y_tgt, mean_p, cov_p, tgt_mask)
    return (exact - model_log_likelihood_sum) / jnp.maximum(jnp.sum(tgt_mask), 1.0)


def grid_for(ctx, tgt, points: int = GRID_POINTS):
    """[points, 1] inputs spanning the real context and target inputs of a task (1D), 5% margin each side."""
    x = jnp.concatenate([ctx["x"][:, 0], tgt["x"][:, 0]])
    real = jnp.concatenate([ctx["mask"], tgt["mask"]]) > 0
    lo, hi = jnp.min(jnp.where(real, x, jnp.inf)), jnp.max(jnp.where(real, x, -jnp.inf))
    pad = 0.05 * (hi - lo)
    return jnp.linspace(lo - pad, hi + pad, points)[:, None]


def plot_record(ctx, tgt, x_grid, mean, std, samples=None) -> Dict[str, jax.Array]:
    """The `_plot_*` metrics of one task (metarun.families.regression.PLOT_KEYS and TASK_KEYS: the family draws
    predictions.png and computes the GP reference rows from them), first output dimension. std None: a point
    prediction (MAML), drawn without a band."""
    record = {"_plot_x_context": ctx["x"], "_plot_y_context": ctx["y"], "_plot_mask_context": ctx["mask"],
              "_plot_x_target": tgt["x"], "_plot_y_target": tgt["y"], "_plot_mask_target": tgt["mask"],
              "_plot_x_grid": x_grid[:, 0], "_plot_mean": mean[:, 0]}
    if std is not None:
        record["_plot_std"] = std[:, 0]
    if samples is not None:
        record["_plot_samples"] = samples[..., 0]
    return record


def grid_record(predict, ctx, tgt, key) -> Dict[str, jax.Array]:
    """The regression family's record (1D inputs): the predictive on a GRID_POINTS grid spanning the task.

    predict(ctx, x, mask, key) -> (mean [G, dy], std [G, dy], samples [S, G, dy] or None)."""
    x_grid = grid_for(ctx, tgt)
    mean, std, samples = predict(ctx, x_grid, jnp.ones((x_grid.shape[0],), x_grid.dtype), key)
    return plot_record(ctx, tgt, x_grid, mean, std, samples)


def recorder_of(family):
    """How an evaluation build records its predictions for predictions.png: the family's `record_predictions`
    (same signature as grid_record) when it has one, else grid_record."""
    return getattr(family, "record_predictions", None) or grid_record


def mixture_moments(predictive):
    """Mean and standard deviation of the equal-weight mixture of the per-sample Gaussians ([S, m, dy] -> [m, dy])."""
    mean = predictive.loc.mean(0)
    second = (jnp.square(predictive.scale) + jnp.square(predictive.loc)).mean(0)
    return mean, jnp.sqrt(jnp.maximum(second - jnp.square(mean), 1e-12))


def check_common(a, c: Collaborators) -> None:
    """One-line refusals shared by the Neural Process algorithms."""
    if c.family.kind != "regression":
        raise UserError(f"algo={a.name} predicts functions: it needs a regression dataset (gp, sawtooth, sinusoid); "
                        f"dataset={c.family.name} is {c.family.kind}")
    if a.metric not in METRICS:
        raise UserError(f"algo.metric={a.metric} is unknown; expected one of: {', '.join(METRICS)}")
    if not a.min_std > 0:
        raise UserError(f"algo.min_std={a.min_std} must be > 0")


def conditional_np(model, family, phase: str, info: Dict[str, Any]) -> MetaAlgorithm:
    """A conditional model (CNP, ConvCNP): model(x_ctx, y_ctx, ctx_mask, x_tgt, tgt_mask) -> Normal [m, dy]."""
    record = phase == "eval"
    gp_prior = family.gp_prior
    recorder = recorder_of(family)

    def init(key, task):
        ctx, tgt = context_of(task.support), context_of(task.query)
        return {"model": model.init(key, ctx["x"], ctx["y"], ctx["mask"], tgt["x"], tgt["mask"])["params"]}, {}

    def adapt(meta_params, algo_state, support, key):
        del meta_params, algo_state, key
        return context_of(support)

    def loss(meta_params, algo_state, ctx, query, key):
        del algo_state
        tgt = context_of(query)
        apply = lambda x, m: model.apply({"params": meta_params["model"]}, ctx["x"], ctx["y"], ctx["mask"], x, m)  # noqa: E731
        pred = apply(tgt["x"], tgt["mask"])
        nll = objectives.gaussian_nll(pred, tgt["y"], tgt["mask"])
        metrics = {"loss": nll, "log_likelihood": -nll, "mse": masked_mse(pred.loc, tgt["y"], tgt["mask"])}
        if record:  # evaluation only: training needs no exact posterior (a Cholesky per task)
            metrics.update(context_fit(-objectives.gaussian_nll(apply(ctx["x"], ctx["mask"]), ctx["y"], ctx["mask"]),
                                       ctx))
            if gp_prior is not None:
                metrics["kl"] = gp_kl(gp_prior, ctx, tgt["x"], tgt["mask"], pred.loc, jnp.square(pred.scale))

            def predict(c, x, m, k):
                del k
                g = model.apply({"params": meta_params["model"]}, c["x"], c["y"], c["mask"], x, m)
                return g.loc, g.scale, None

            metrics.update(recorder(predict, ctx, tgt, key))
        return nll, metrics

    return MetaAlgorithm(init=init, adapt=adapt, loss=loss, info=info)


def latent_np(model, family, phase: str, objective: str, train_samples: int, eval_samples: int,
              plot_samples: int, info: Dict[str, Any]) -> MetaAlgorithm:
    """A latent model (NP, ANP): model(..., y_tgt=None, num_samples=S) -> LatentOutput, z from the flax RNG
    stream LATENT_RNG. Training minimises `objective` (elbo | ml | iw) with `train_samples` draws of z; the
    evaluation's log-likelihood is the ML estimate with `eval_samples` draws from q(z | context)."""
    train = phase == "train"
    gp_prior = family.gp_prior
    recorder = recorder_of(family)

    def init(key, task):
        ctx, tgt = context_of(task.support), context_of(task.query)
        params_key, z_key = jax.random.split(key)
        variables = model.init({"params": params_key, LATENT_RNG: z_key}, ctx["x"], ctx["y"], ctx["mask"], tgt["x"],
                               tgt["mask"])
        return {"model": variables["params"]}, {}

    def adapt(meta_params, algo_state, support, key):
        del meta_params, algo_state, key
        return context_of(support)

    def run(meta_params, ctx, x, mask, key, samples, y=None) -> LatentOutput:
        return model.apply({"params": meta_params["model"]}, ctx["x"], ctx["y"], ctx["mask"], x, mask, y, samples,
                           rngs={LATENT_RNG: key})

    def loss(meta_params, algo_state, ctx, query, key):
        del algo_state
        tgt = context_of(query)
        if train:
            with_targets = objective in ("elbo", "iw")
            out = run(meta_params, ctx, tgt["x"], tgt["mask"], key, train_samples, tgt["y"] if with_targets else None)
            value = {"elbo": objectives.neg_elbo, "ml": objectives.neg_ml,
                     "iw": objectives.neg_importance_weighted}[objective](out, tgt["y"], tgt["mask"])
            metrics = {"loss": value}
            if out.posterior is not None:
                metrics["kl_z"] = jnp.sum(out.posterior.kl_divergence(out.prior))
            return value, metrics
        pred_key, grid_key = jax.random.split(key)
        out = run(meta_params, ctx, tgt["x"], tgt["mask"], pred_key, eval_samples)
        nll = objectives.neg_ml(out, tgt["y"], tgt["mask"])
        mean, std = mixture_moments(out.predictive)
        metrics = {"loss": nll, "log_likelihood": -nll, "mse": masked_mse(mean, tgt["y"], tgt["mask"])}
        at_context = run(meta_params, ctx, ctx["x"], ctx["mask"], pred_key, eval_samples)
        metrics.update(context_fit(-objectives.neg_ml(at_context, ctx["y"], ctx["mask"]), ctx))
        if gp_prior is not None:
            total = -nll * jnp.maximum(jnp.sum(tgt["mask"]), 1.0)
            metrics["kl"] = gp_kl_from_log_likelihood(gp_prior, ctx, tgt["x"], tgt["y"], tgt["mask"], total)

        def predict(c, x, m, k):
            g = run(meta_params, c, x, m, k, eval_samples)
            mean, std = mixture_moments(g.predictive)
            return mean, std, g.predictive.loc[:plot_samples]

        metrics.update(recorder(predict, ctx, tgt, grid_key))
        return nll, metrics

    return MetaAlgorithm(init=init, adapt=adapt, loss=loss, info=info)


@dataclass
class LatentConfigMixin:
    """Keys of the latent models (np, anp)."""
    objective: str = "elbo"       # elbo (Garnelo et al. 2018b) | ml (Foong et al. 2020) | iw (importance-weighted)
    train_samples: int = 1        # z draws per task in the training objective
    eval_samples: int = 20        # z draws per task for the evaluated log-likelihood, mean, band
    plot_samples: int = 3         # sampled functions drawn in predictions.png


def check_attention(a) -> None:
    """The attentive models' (acnp, anp) heads and blocks: at least one each, and heads that divide the width."""
    if a.num_heads < 1 or a.attention_layers < 1:
        raise UserError(f"algo.num_heads={a.num_heads} and algo.attention_layers={a.attention_layers} must be >= 1")
    if a.hidden % a.num_heads:
        raise UserError(f"algo.hidden={a.hidden} must be a multiple of algo.num_heads={a.num_heads}")


def check_latent(a) -> None:
    if a.objective not in OBJECTIVES:
        raise UserError(f"algo.objective={a.objective} is unknown; expected one of: {', '.join(OBJECTIVES)}")
    for key in ("train_samples", "eval_samples"):
        if a[key] < 1:
            raise UserError(f"algo.{key}={a[key]} must be >= 1")
    if not 0 <= a.plot_samples <= a.eval_samples:
        raise UserError(f"algo.plot_samples={a.plot_samples} must be between 0 and algo.eval_samples={a.eval_samples}")
