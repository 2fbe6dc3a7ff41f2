"""predictions.png for DKT (mean ± 2σ) and MAML (mean): the recorded `_plot_*` arrays are the model's predictions
(numpy GP posterior on numpy features; MAML's adapted network), and the family draws exactly those arrays."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import compose

DKT = ["experiment=dkt_sinusoid", "algo.kernel=rbf", "learner.hidden=[8]", "task.shots=5", "task.queries=5",
       "task.test_queries=7"]
MAML = ["experiment=maml_sinusoid", "learner.hidden=[8]", "task.shots=5", "task.queries=5", "task.test_queries=7"]


def _eval_build(overrides):
    from metarun.build import load_family, make_algo

    cfg = compose(overrides)
    family = load_family(cfg)
    task = family.sampler("test")({}, jax.random.PRNGKey(5))
    params, state = make_algo(cfg, family, "train").init(jax.random.PRNGKey(0), task)
    return cfg, family, make_algo(cfg, family, "eval"), params, state, task


def _metrics(algo, params, state, task):
    """The eval build's metrics of one task (jitted: one compile beats hundreds of eager ops)."""
    run = jax.jit(lambda p, s, t: algo.loss(p, s, algo.adapt(p, s, t.support, None), t.query, None)[1])
    return run(params, state, task)


def _relu_features(p, x):
    return np.maximum(np.asarray(x, np.float64) @ np.asarray(p["dense0"]["kernel"], np.float64)
                      + np.asarray(p["dense0"]["bias"], np.float64), 0.0)


def _expected_grid(task, points=100):
    x = np.concatenate([np.asarray(task.support.x)[:, 0], np.asarray(task.query.x)[:, 0]])
    pad = 0.05 * (x.max() - x.min())
    return np.linspace(x.min() - pad, x.max() + pad, points)


def test_dkt_records_the_gp_posterior_mean_and_predictive_std_on_a_grid(tmp_path):
    _, family, algo, params, state, task = _eval_build(DKT)
    metrics = _metrics(algo, params, state, task)
    grid = np.asarray(metrics["_plot_x_grid"])
    np.testing.assert_allclose(grid, _expected_grid(task), rtol=1e-5, atol=1e-5)
    # The exact GP posterior in numpy on the feature network's numpy features.
    hp = params["kernel"]
    ls, s2 = float(jnp.exp(hp["log_lengthscale"])), float(jnp.exp(2 * hp["log_outputscale"]))
    noise = float(jnp.exp(params["log_noise"]))
    k = lambda a, b: s2 * np.exp(-0.5 * np.square(a[:, None] - b[None]).sum(-1) / ls**2)  # noqa: E731
    zs, zg = _relu_features(params["net"], task.support.x), _relu_features(params["net"], grid[:, None])
    inv = np.linalg.inv(k(zs, zs) + (noise + 1e-5) * np.eye(len(zs)))
    mean = k(zg, zs) @ inv @ np.asarray(task.support.y, np.float64)[:, 0]
    var = np.diag(k(zg, zg) - k(zg, zs) @ inv @ k(zs, zg))
    np.testing.assert_allclose(np.asarray(metrics["_plot_mean"]), mean, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(np.asarray(metrics["_plot_std"]), np.sqrt(np.maximum(var, 0) + noise), rtol=1e-3,
                               atol=1e-4)
    np.testing.assert_array_equal(np.asarray(metrics["_plot_x_context"]), np.asarray(task.support.x))
    np.testing.assert_array_equal(np.asarray(metrics["_plot_y_target"]), np.asarray(task.query.y))
    # The family draws them (one task here; the Evaluator path is the slow test below).
    assert family.plots(tmp_path, {k: np.asarray(v)[None] for k, v in metrics.items()}) == ["predictions.png"]
    assert (tmp_path / "predictions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_maml_records_its_adapted_networks_predictions_without_a_band():
    from metarun.learners.mlp import MLP

    cfg, _, algo, params, state, task = _eval_build(MAML)
    metrics = _metrics(algo, params, state, task)
    assert "_plot_std" not in metrics
    net = MLP(hidden=(8,), out_dim=1)

    def support_mse(p):
        return jnp.mean(jnp.square(net.apply({"params": p}, task.support.x) - task.support.y))

    adapted = jax.tree.map(lambda p, g: p - cfg.algo.inner_lr * g, params["net"], jax.grad(support_mse)(params["net"]))
    grid = np.asarray(metrics["_plot_x_grid"])
    want = net.apply({"params": adapted}, jnp.asarray(grid[:, None], jnp.float32))[:, 0]
    np.testing.assert_allclose(np.asarray(metrics["_plot_mean"]), np.asarray(want), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # compiles two evaluation programs
def test_the_family_draws_the_evaluated_arrays(tmp_path, monkeypatch):
    """Through the Evaluator (the path write_results takes): predictions.png is written from the first test
    episodes' recorded arrays, DKT with its band, MAML without."""
    import metarun.plots.function_predictions as figure
    from metarun.evaluate import Evaluator

    drawn = []
    real = figure.predictions_figure
    monkeypatch.setattr(figure, "predictions_figure", lambda tasks, path, **kw: drawn.append(tasks) or real(tasks, path, **kw))
    for name, overrides in (("dkt", DKT), ("maml", MAML)):
        cfg, family, _, params, state, _ = _eval_build(overrides)
        per_task = Evaluator(cfg, family, "test", episodes=6, seed=1, batch=6).per_task(params, state)
        out = tmp_path / name
        assert family.plots(out, per_task) == ["predictions.png"]
        assert (out / "predictions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        tasks = drawn[-1]
        assert len(tasks) == 4  # the first PLOTTED_TASKS episodes
        for i, t in enumerate(tasks):
            np.testing.assert_array_equal(t["mean"], per_task["_plot_mean"][i])
            np.testing.assert_array_equal(t["x_grid"], per_task["_plot_x_grid"][i])
            np.testing.assert_array_equal(t["y_target"], per_task["_plot_y_target"][i])
            assert ("std" in t) == (name == "dkt")
        # The recorded query points are the evaluated ones: their MSE against the recorded targets is the MSE.
        assert per_task["mse"].shape == (6,)


def _mlp_outputs(members, grid):
    """Each member's MLP([8]) output on the grid, in numpy (ReLU hidden layer, linear head)."""
    x = np.asarray(grid, np.float64)[:, None]
    out = []
    for i in range(np.asarray(members["dense0"]["kernel"]).shape[0]):
        p = jax.tree.map(lambda a: np.asarray(a[i], np.float64), members)
        h = np.maximum(x @ p["dense0"]["kernel"] + p["dense0"]["bias"], 0.0)
        out.append((h @ p["head"]["kernel"] + p["head"]["bias"])[:, 0])
    return np.stack(out)


@pytest.mark.parametrize("name", ["bmaml", "abml"])
def test_ensembles_record_their_members_mean_and_spread(name):
    """BMAML's adapted particles and ABML's sampled weights: the recorded curve is the members' mean on the grid
    and the band their standard deviation (numpy, from the members the algorithm adapted / drew)."""
    from metarun.algos.abml_math import sample_weights

    extra = ["algo.particles=3"] if name == "bmaml" else ["algo.eval_samples=3", "algo.init_log_std=-1.0"]
    overrides = [f"experiment={name}_sinusoid", "learner.hidden=[8]", "task.shots=5", "task.queries=5",
                 "task.test_queries=7", *extra]
    _, _, algo, params, state, task = _eval_build(overrides)
    k_adapt, k_loss = jax.random.split(jax.random.PRNGKey(3))
    task_state = jax.jit(lambda p: algo.adapt(p, state, task.support, k_adapt))(params)
    metrics = jax.jit(lambda p, ts: algo.loss(p, state, ts, task.query, k_loss)[1])(params, task_state)
    members = task_state["particles"] if name == "bmaml" else sample_weights(task_state["q"], k_loss, 3)
    outputs = _mlp_outputs(members, np.asarray(metrics["_plot_x_grid"]))
    assert outputs.std(0).max() > 1e-3  # distinct members: the band is not trivially zero
    np.testing.assert_allclose(np.asarray(metrics["_plot_mean"]), outputs.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(metrics["_plot_std"]), outputs.std(0), rtol=1e-4, atol=1e-5)
    # The query metrics come from the same members: the ensemble mean at the query points gives its MSE.
    q = _mlp_outputs(members, np.asarray(task.query.x)[:, 0]).mean(0)
    np.testing.assert_allclose(float(metrics["mse"]), np.mean((q - np.asarray(task.query.y)[:, 0]) ** 2), rtol=1e-4)
