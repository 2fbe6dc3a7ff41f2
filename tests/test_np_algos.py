"""Neural Process algorithms (cnp, np, anp, acnp, convcnp) on dataset=gp / sawtooth through the real config and trainer:
a training smoke per algorithm, the exact-GP KL metric, invariances through adapt/loss, learning, one-line errors."""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import compose
from metarun.errors import UserError

# Trains through the real trainer several times (minutes on 2 cores): run in CI's second pass (--runslow).
pytestmark = pytest.mark.slow

# Tiny widths: what is tested does not depend on size, and compiles stay short on a loaded CPU.
SMALL = {
    "cnp": ["algo.hidden=16"],
    "np": ["algo.hidden=16", "algo.latent_dim=8", "algo.eval_samples=4", "algo.plot_samples=2"],
    "anp": ["algo.hidden=16", "algo.latent_dim=8", "algo.num_heads=2", "algo.attention_layers=1",
            "algo.eval_samples=4", "algo.plot_samples=2"],
    "acnp": ["algo.hidden=16", "algo.num_heads=2", "algo.attention_layers=1"],
    "convcnp": ["algo.points_per_unit=16", "algo.grid_size=160", "algo.channels=8", "algo.num_layers=2",
                "algo.kernel_size=5"],
}
QUICK = ["dataset=gp", "train.steps=2", "train.steps_per_call=2", "train.meta_batch=2", "train.val_every=0",
         "train.log_every=2", "train.ckpt_every=2", "train.progress=false", "eval.episodes=4", "eval.batch=4"]


@pytest.mark.parametrize("algo", sorted(SMALL))
def test_a_short_training_run_writes_results_and_predictions(algo, tmp_path):
    from metarun.train import run

    run(compose(QUICK + [f"algo={algo}"] + SMALL[algo]), tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["metric"] == "log_likelihood" and results["higher_is_better"] is True
    assert np.isfinite(results["mean"]) and results["score"] == results["mean"]
    assert {"mse", "kl", "context_log_likelihood"} <= set(results["metrics"]) and results["metrics"]["kl"]["mean"] > 0
    assert 0 < results["metrics"]["context_log_likelihood"]["n"] <= 4  # tasks with an empty context are left out
    assert not any(k.startswith("_") for k in results["metrics"])
    assert {"exact_gp_log_likelihood", "diagonal_gp_kl", "trivial_kl"} <= set(results["metrics"])  # reference rows
    assert results["plots"] == ["predictions.png"] and (tmp_path / "predictions.png").stat().st_size > 10_000
    assert results["shots"] == 30 and results["queries"] == 50 and results["min_shots"] == 0


class _Family:
    """The two facts the Neural Process algorithms ask of the regression family."""
    kind = "regression"

    def __init__(self, gp_prior):
        self.gp_prior = gp_prior


class _ExactGP:
    """A stand-in model with the conditional models' call: the exact GP posterior marginals of `kernel_fn`."""

    def __init__(self, kernel_fn, noise):
        self.kernel_fn, self.noise = kernel_fn, noise

    def init(self, key, *args):
        return {"params": {}}

    def apply(self, variables, x_ctx, y_ctx, ctx_mask, x_tgt, tgt_mask=None):
        from metarun.gaussian_process import diagonal_posterior
        from metarun.learners.neural_process import Normal

        mean, var = diagonal_posterior(self.kernel_fn, x_ctx, y_ctx, ctx_mask, x_tgt, self.noise)
        return Normal(mean[:, None], jnp.sqrt(var)[:, None])


def _separated_task(seed=0):
    """A GP task (EQ, lengthscale 0.25) whose targets are 1.0 apart: their exact posterior is all but diagonal,
    so the exact GP's marginals must score KL ~ 0; padding in the context and the targets must not count."""
    from metarun.data.function_tasks import make_task_kernel, sample_gp_values
    from metarun.data.tasks import Examples, Task

    kernel_fn = make_task_kernel("eq")
    x_ctx = jnp.linspace(-2.0, 2.0, 12)[:, None]
    x_tgt = jnp.concatenate([jnp.arange(-2.2, 2.3, 1.0), jnp.array([7.0, 9.0])])[:, None]  # 5 real + 2 padded
    y = sample_gp_values(kernel_fn, jnp.concatenate([x_ctx, x_tgt]), 0.05, jax.random.key(seed))
    ctx_mask = (jnp.arange(12) < 9).astype(jnp.float32)
    tgt_mask = (jnp.arange(7) < 5).astype(jnp.float32)
    return kernel_fn, Task(Examples(x_ctx, y[:12], ctx_mask), Examples(x_tgt, y[12:], tgt_mask))


def test_exact_gp_kl_metric_is_zero_for_the_exact_gp_and_positive_for_a_wrong_one():
    from metarun.algos.np_common import conditional_np, gp_kl_from_log_likelihood, context_of
    from metarun.data.function_tasks import make_task_kernel
    from metarun.gaussian_process import mvn_log_prob, posterior

    kernel_fn, task = _separated_task()
    family = _Family((kernel_fn, 0.05))

    def kl_of(model):
        algo = conditional_np(model, family, "eval", {})
        state = algo.adapt({"model": {}}, {}, task.support, None)
        return float(algo.loss({"model": {}}, {}, state, task.query, None)[1]["kl"])

    assert abs(kl_of(_ExactGP(kernel_fn, 0.05))) < 1e-3
    assert kl_of(_ExactGP(make_task_kernel("eq", lengthscale=1.0), 0.05)) > 0.1   # wrong kernel
    assert kl_of(_ExactGP(kernel_fn, 0.5)) > 0.1                                   # wrong noise
    # The latent models' estimate: exactly 0 when the model's joint log-likelihood is the exact GP's.
    ctx, tgt = context_of(task.support), context_of(task.query)
    mean, cov = posterior(kernel_fn, ctx["x"], ctx["y"], ctx["mask"], tgt["x"], 0.05)
    exact = mvn_log_prob(tgt["y"], mean, cov, tgt["mask"])
    assert abs(float(gp_kl_from_log_likelihood((kernel_fn, 0.05), ctx, tgt["x"], tgt["y"], tgt["mask"], exact))) < 1e-5


def test_context_log_likelihood_is_the_models_fit_of_its_own_context():
    """The exact GP's marginals at the context points, against a numpy closed form on the 9 real context points
    (the 3 padded ones and the targets must not count); an empty context has no value and is flagged."""
    from metarun.algos.np_common import conditional_np, context_of

    kernel_fn, task = _separated_task()
    algo = conditional_np(_ExactGP(kernel_fn, 0.05), _Family((kernel_fn, 0.05)), "eval", {})

    def metrics(support):
        return algo.loss({"model": {}}, {}, algo.adapt({"model": {}}, {}, support, None), task.query, None)[1]

    ctx = context_of(task.support)
    x, y = np.asarray(ctx["x"], np.float64)[:9], np.asarray(ctx["y"], np.float64)[:9, 0]
    k = np.asarray(kernel_fn(x, x), np.float64)
    solve = np.linalg.solve(k + 0.05 * np.eye(9), np.c_[y, k])
    mean, var = k @ solve[:, 0], np.diag(k - k @ solve[:, 1:]) + 0.05
    want = np.mean(-0.5 * np.log(2 * np.pi * var) - 0.5 * (y - mean) ** 2 / var)
    got = metrics(task.support)
    np.testing.assert_allclose(float(got["context_log_likelihood"]), want, rtol=1e-3, atol=1e-3)
    assert bool(got["_valid:context_log_likelihood"])
    assert not bool(metrics(task.support._replace(mask=jnp.zeros(12)))["_valid:context_log_likelihood"])


def test_a_metric_with_a_valid_flag_is_averaged_over_the_valid_tasks_only():
    from metarun.build import load_family

    family = load_family(compose(["algo=cnp", "dataset=gp"]))
    summary = family.summarize({"log_likelihood": np.array([-1.0, -2.0, -3.0]), "mse": np.array([1.0, 2.0, 3.0]),
                                "context_log_likelihood": np.array([0.5, 123.0, 1.5]),
                                "_valid:context_log_likelihood": np.array([True, False, True])})
    assert summary["metrics"]["context_log_likelihood"]["mean"] == 1.0
    assert summary["metrics"]["context_log_likelihood"]["n"] == 2
    assert summary["metrics"]["mse"]["mean"] == 2.0 and "n" not in summary["metrics"]["mse"]
    assert summary["mean"] == -2.0


def _built(algo_name, phase="eval"):
    from metarun.build import load_family, make_algo

    cfg = compose(QUICK + [f"algo={algo_name}"] + SMALL[algo_name])
    family = load_family(cfg)
    return family, make_algo(cfg, family, phase)


@pytest.mark.parametrize("algo_name", ["cnp", "anp"])
def test_adapt_and_loss_ignore_context_order_and_padding(algo_name):
    """The prediction through the algorithm (adapt, then loss) is the same for a shuffled context and for a
    context with extra padded slots holding junk; anp: attention is where a mask bug would show."""
    from metarun.data.tasks import Examples

    family, algo = _built(algo_name)
    task = family.sampler("test")({}, jax.random.key(3))
    support = task.support._replace(mask=(jnp.arange(30) < 11).astype(jnp.float32))  # 11 real points
    params, state = algo.init(jax.random.key(0), task)
    metrics = jax.jit(lambda s, k: algo.loss(params, state, algo.adapt(params, state, s, k), task.query, k)[1])
    key = jax.random.key(1)
    base = metrics(support, key)
    order = np.r_[np.random.default_rng(0).permutation(11), np.arange(11, 30)]
    shuffled = metrics(jax.tree.map(lambda a: a[order], support), key)
    padded = Examples(jnp.concatenate([support.x, jnp.full((5, 1), 1e3)]), jnp.concatenate([support.y, jnp.full((5, 1), jnp.nan)]),
                      jnp.concatenate([support.mask, jnp.zeros(5)]))
    padded_metrics = jax.jit(lambda s, k: algo.loss(params, state, algo.adapt(params, state, s, k), task.query, k)[1])(
        padded, key)
    for name in ("log_likelihood", "mse", "kl"):
        np.testing.assert_allclose(shuffled[name], base[name], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(padded_metrics[name], base[name], rtol=1e-4, atol=1e-5)
    # and the context matters: with no real point the prediction changes
    empty = metrics(support._replace(mask=jnp.zeros(30)), key)
    assert abs(float(empty["log_likelihood"]) - float(base["log_likelihood"])) > 1e-4


def test_cnp_learns_on_gp_tasks(tmp_path):
    """~100 meta-steps of a small CNP beat its untrained test log-likelihood by a clear margin."""
    from metarun.build import initial_state, load_family
    from metarun.evaluate import Evaluator
    from metarun.train import run

    cfg = compose(["dataset=gp", "algo=cnp", "algo.hidden=32", "train.steps=120", "train.steps_per_call=40",
                   "train.meta_batch=8", "meta_opt.lr=3e-3", "train.val_every=0", "train.log_every=40",
                   "train.ckpt_every=1000", "train.progress=false", "eval.episodes=64", "eval.batch=64"])
    family = load_family(cfg)
    state = initial_state(cfg, family)[2]
    untrained = Evaluator(cfg, family, "test", 64, cfg.eval.seed, 64)(state.params, state.algo_state)[None]["mean"]
    run(cfg, tmp_path)
    trained = json.loads((tmp_path / "results.json").read_text())["mean"]
    assert trained > untrained + 0.2, (untrained, trained)


@pytest.mark.parametrize("overrides, match", [
    (["algo=cnp", "dataset=gp", "dataset.kernel=rbf"], r"dataset\.kernel=rbf is unknown"),
    (["algo=maml", "dataset=gp", "learner=conv4"], r"needs learner=mlp"),
    (["algo=cnp", "dataset=gp", "dataset.min_context=40"], r"dataset\.min_context=40 must be between 0 and dataset\.max_context=30"),
    (["algo=cnp", "dataset=sawtooth", "dataset.metric=kl"], r"dataset\.metric=kl needs GP tasks"),
    (["algo=np", "dataset=gp", "algo.objective=vi"], r"algo\.objective=vi is unknown"),
    (["algo=acnp", "dataset=gp", "algo.num_heads=3"], r"algo\.hidden=128 must be a multiple of algo\.num_heads=3"),
    (["algo=acnp", "dataset=gp", "algo.decoder_layers=0"], r"algo\.decoder_layers=0 must be >= 1"),
    (["algo=anp", "dataset=gp", "algo.attention_layers=0"], r"algo\.num_heads=8 and algo\.attention_layers=0 must be >= 1"),
    (["algo=cnp", "dataset=gp", "dataset.test_regime=beyond"], r"dataset\.test_regime=beyond is unknown"),
])
def test_bad_input_is_one_line(overrides, match):
    from metarun.build import initial_state, load_family

    with pytest.raises(UserError, match=match) as err:
        cfg = compose(overrides)
        initial_state(cfg, load_family(cfg))
    assert "\n" not in str(err.value)


def test_a_metric_the_algorithm_does_not_report_is_one_line():
    """MAML on GP tasks predicts no variance: asking it for a log-likelihood fails with one line, not a KeyError."""
    from metarun.build import load_family

    family = load_family(compose(["algo=maml", "learner=mlp", "dataset=gp", "dataset.metric=log_likelihood"]))
    with pytest.raises(UserError, match=r"dataset\.metric=log_likelihood: this algorithm reports only loss, mse"):
        family.summarize({"loss": np.ones(3), "mse": np.ones(3)})


@pytest.mark.parametrize("algo_name", sorted(SMALL))
def test_presets_set_the_benchmark_tasks_and_report_the_log_likelihood(algo_name):
    kernels = {"gp_eq": "eq", "gp_matern": "matern52", "gp_weakly_periodic": "weakly_periodic"}
    for data, kernel in kernels.items():
        cfg = compose([f"experiment={algo_name}_{data}"])
        assert (cfg.algo.name, cfg.dataset.name, cfg.dataset.kernel, cfg.dataset.metric) == (
            algo_name, "gp", kernel, "log_likelihood")
        assert (cfg.eval.episodes, cfg.train.meta_batch) == (2048, 16)
    cfg = compose([f"experiment={algo_name}_sawtooth"])
    assert (cfg.dataset.name, cfg.dataset.max_context, cfg.dataset.num_targets) == ("sawtooth", 75, 100)
    # maml on the same tasks keeps mse (it predicts no variance)
    assert compose(["algo=maml", "learner=mlp", "dataset=gp"]).dataset.metric == "mse"


# Bruinsma (2022), 1D synthetic tables, interpolation: KL per target of the diagonal GP and of the trivial model.
PUBLISHED_REFERENCES = {"eq": (0.40, 1.19), "matern52": (0.40, 1.08), "weakly_periodic": (0.38, 0.82)}


@pytest.mark.parametrize("kernel", sorted(PUBLISHED_REFERENCES))
def test_reference_rows_on_our_gp_tasks_match_the_published_ones(kernel):
    """Our tasks (sampler, kernel hyperparameters, noise, context sizes) and our exact-GP code reproduce the
    reference rows of the published tables: a wrong lengthscale, noise or context distribution moves them."""
    from metarun.build import load_family
    from metarun.data.tasks import sample_batch
    from metarun.gp_references import reference_rows

    family = load_family(compose(["algo=cnp", "dataset=gp", f"dataset.kernel={kernel}"]))
    t = sample_batch(family.sampler("test"), {}, jax.random.key(0), 512)
    kernel_fn, noise = family.gp_prior
    rows = jax.jit(jax.vmap(partial(reference_rows, kernel_fn, noise)))(
        t.support.x, t.support.y, t.support.mask, t.query.x, t.query.y, t.query.mask)
    diagonal, trivial = PUBLISHED_REFERENCES[kernel]
    assert abs(float(rows["diagonal_gp_kl"].mean()) - diagonal) < 0.06
    assert abs(float(rows["trivial_kl"].mean()) - trivial) < 0.04
    assert float(rows["exact_gp_log_likelihood"].mean()) > float(rows["diagonal_gp_log_likelihood"].mean()) > float(
        rows["trivial_log_likelihood"].mean())


def test_the_extrapolation_regime_moves_only_the_test_targets():
    from metarun.build import load_family

    family = load_family(compose(["algo=cnp", "dataset=gp", "dataset.test_regime=extrapolation"]))
    test = family.sampler("test")({}, jax.random.key(0))
    val = family.sampler("val")({}, jax.random.key(0))
    assert float(test.query.x.min()) >= 2.0 and float(test.support.x.max()) <= 2.0
    assert float(val.query.x.max()) <= 2.0 and family.describe("test")["test_regime"] == "extrapolation"


def test_a_neural_process_runs_on_sinusoids(tmp_path):
    """dataset=sinusoid (no masks unless task.min_shots) works with the Neural Processes; its metric stays mse."""
    from metarun.train import run

    run(compose(["dataset=sinusoid", "learner=mlp", "task=regression", "algo=cnp", "algo.hidden=16",
                 "task.min_shots=0"] + QUICK[1:]), tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["metric"] == "mse" and "log_likelihood" in results["metrics"] and "kl" not in results["metrics"]
    assert results["plots"] == ["predictions.png"] and results["algo"] == "cnp"
