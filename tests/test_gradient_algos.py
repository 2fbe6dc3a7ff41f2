"""Reptile, Meta-SGD, ANIL and the MAML++ options: their defining equalities on tiny shapes, and real training runs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metarun.algos import build_algo
from metarun.algos.anil import anil
from metarun.algos.base import classification_objective, regression_objective
from metarun.algos.maml import maml, mamlpp
from metarun.algos.metasgd import metasgd
from metarun.algos.reptile import minibatch_indices, reptile
from metarun.core import meta_gradient, task_grad
from metarun.data.sinusoid import make_sinusoid_sampler
from metarun.data.synthetic import make_synthetic_classes
from metarun.data.tasks import make_image_sampler, sample_batch
from metarun.learners.conv4 import Conv4
from metarun.learners.mlp import MLP

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
KEY = jax.random.PRNGKey(0)


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def _image_tasks(ways=3, shots=2, queries=2, batch=2):
    images = jnp.asarray(make_synthetic_classes(8, 6, 8, 0.2, seed=0))
    return sample_batch(make_image_sampler(ways, shots, queries), images, jax.random.PRNGKey(1), batch)


def _conv4(ways=3):
    return Conv4(out_dim=ways, filters=4, blocks=2, conv_impl="xla")


def _first(tasks):
    return jax.tree.map(lambda x: x[0], tasks)


def _mlp_tasks(batch=2):
    return sample_batch(make_sinusoid_sampler(5, 7), {}, jax.random.PRNGKey(3), batch)


def _mlp():
    return MLP(hidden=(8, 8), out_dim=1)


# ---- Reptile ----------------------------------------------------------------------------
@pytest.mark.parametrize("inner_opt", ["adam", "sgd"])
def test_reptile_update_is_epsilon_times_phi_minus_theta(inner_opt):
    learner = MLP(hidden=(8, 8), out_dim=1)
    lr, steps, eps = 0.01, 3, 0.3
    algo = reptile(learner, regression_objective, lr, steps, inner_opt, inner_beta1=0.0)
    sampler = make_sinusoid_sampler(5, 5)
    tasks = sample_batch(sampler, {}, jax.random.PRNGKey(2), 2)
    theta = algo.init(KEY, _first(tasks))

    grads, metrics = meta_gradient(algo, theta, tasks, jax.random.PRNGKey(3))
    outer = optax.sgd(eps)
    updates, _ = outer.update(grads, outer.init(theta), theta)
    new_theta = optax.apply_updates(theta, updates)

    # The inner loop written out by hand, one task at a time.
    inner = optax.adam(lr, b1=0.0) if inner_opt == "adam" else optax.sgd(lr)
    phis = []
    for i in range(2):
        x, y = tasks.support.x[i], tasks.support.y[i]
        phi, state = theta, inner.init(theta)
        for _ in range(steps):
            g = jax.grad(lambda p: regression_objective(learner.apply({"params": p}, x), y)[0])(phi)
            u, state = inner.update(g, state, phi)
            phi = optax.apply_updates(phi, u)
        phis.append(phi)
    expected = jax.tree.map(lambda t, a, b: t + eps * ((a - t) + (b - t)) / 2, theta, *phis)
    np.testing.assert_allclose(_flat(new_theta), _flat(expected), rtol=1e-5, atol=1e-6)
    assert np.abs(_flat(new_theta) - _flat(theta)).max() > 1e-4  # not vacuous
    assert np.isfinite(float(metrics["loss"]))


def test_reptile_minibatches_are_shuffled_passes_over_the_support_set():
    idx = np.asarray(minibatch_indices(KEY, 10, 5, 4))
    assert idx.shape == (4, 5)
    assert sorted(idx[:2].ravel()) == list(range(10)) and sorted(idx[2:].ravel()) == list(range(10))
    assert (np.asarray(minibatch_indices(KEY, 10, None, 3)) == np.arange(10)).all()


def test_reptile_transductive_flag_changes_only_how_the_query_is_batched():
    tasks = _image_tasks()
    task = _first(tasks)
    learner = _conv4()
    trans = reptile(learner, classification_objective, 1e-3, 2, transductive=True)
    single = reptile(learner, classification_objective, 1e-3, 2, transductive=False)
    params = trans.init(KEY, task)
    state = trans.adapt(params, task.support, KEY)
    expected = jnp.stack([learner.apply({"params": state["params"]},
                                        jnp.concatenate([task.support.x, q[None]]))[-1] for q in task.query.x])
    got = single.loss(params, state, task.query, KEY)[0]
    np.testing.assert_allclose(float(got), float(classification_objective(expected, task.query.y)[0]), rtol=1e-5)
    # With batch norm the two settings differ: the flag is not a no-op.
    assert abs(float(trans.loss(params, state, task.query, KEY)[0]) - float(got)) > 1e-4


# ---- Meta-SGD ---------------------------------------------------------------------------
def test_metasgd_with_a_frozen_scalar_rate_is_maml():
    tasks = _mlp_tasks()
    learner, c = _mlp(), 0.3
    msgd = metasgd(learner, regression_objective, 2, inner_lr_init=(c, c), learn_inner_lr=False)
    params = msgd.init(KEY, _first(tasks))
    assert all(np.allclose(a, c) for a in jax.tree.leaves(params["inner_lr"]))
    g_msgd, _ = meta_gradient(msgd, params, tasks, KEY)
    g_maml, _ = meta_gradient(maml(learner, regression_objective, c, 2), params["net"], tasks, KEY)
    np.testing.assert_allclose(_flat(g_msgd["net"]), _flat(g_maml), rtol=1e-4, atol=1e-6)
    assert not _flat(g_msgd["inner_lr"]).any()  # frozen: no meta-gradient, so Adam leaves alpha alone
    opt = optax.adam(1e-2)
    updates, _ = opt.update(g_msgd, opt.init(params), params)
    np.testing.assert_array_equal(_flat(optax.apply_updates(params, updates)["inner_lr"]), _flat(params["inner_lr"]))
    # Learned alpha does get a meta-gradient, and the net gradient then still matches MAML at alpha = c.
    learned = metasgd(learner, regression_objective, 2, inner_lr_init=(c, c))
    g_learned, _ = meta_gradient(learned, params, tasks, KEY)
    assert np.abs(_flat(g_learned["inner_lr"])).max() > 1e-6
    np.testing.assert_allclose(_flat(g_learned["net"]), _flat(g_maml), rtol=1e-4, atol=1e-6)


def test_metasgd_rates_start_uniform_in_the_configured_range():
    params = metasgd(_conv4(), classification_objective, 1).init(KEY, _first(_image_tasks()))
    rates = _flat(params["inner_lr"])
    assert rates.min() >= 0.005 and rates.max() <= 0.1 and rates.std() > 0.01


# ---- ANIL -------------------------------------------------------------------------------
def test_anil_adapts_only_the_head_and_its_meta_gradient_reaches_the_body():
    tasks = _image_tasks()
    task = _first(tasks)
    learner, lr, steps = _conv4(), 0.4, 2
    algo = anil(learner, classification_objective, lr, steps)
    params = algo.init(KEY, task)
    head = algo.adapt(params, task.support, KEY)

    # MAML's inner loop with the body's gradient masked: the body stays put, the head must match.
    fast = params
    for _ in range(steps):
        g = jax.grad(lambda p: classification_objective(learner.apply({"params": p}, task.support.x),
                                                        task.support.y)[0])(fast)
        fast = {k: jax.tree.map(lambda p, d: p - lr * d, v, g[k]) if k == "head" else v for k, v in fast.items()}
    assert all(fast[k] is params[k] for k in params if k != "head")
    np.testing.assert_allclose(_flat(head), _flat(fast["head"]), rtol=1e-5, atol=1e-6)
    assert np.abs(_flat(head) - _flat(params["head"])).max() > 1e-4
    loss, _ = algo.loss(params, head, task.query, KEY)
    full = classification_objective(learner.apply({"params": fast}, task.query.x), task.query.y)[0]
    np.testing.assert_allclose(float(loss), float(full), rtol=1e-5)

    grads, _ = task_grad(algo, params, task, KEY)
    assert np.abs(_flat(grads["conv0"])).max() > 1e-6
    # Second order through the head's adaptation: differs from the first-order body gradient.
    fo, _ = task_grad(anil(learner, classification_objective, lr, steps, first_order=True), params, task, KEY)
    assert np.abs(_flat(grads["conv0"]) - _flat(fo["conv0"])).max() > 1e-7


# ---- MAML++ options ---------------------------------------------------------------------
def test_mamlpp_with_options_off_or_at_init_is_maml():
    tasks = _mlp_tasks()
    learner = _mlp()
    plain = maml(learner, regression_objective, 0.2, 2)
    params = plain.init(KEY, _first(tasks))
    g_plain, _ = meta_gradient(plain, params, tasks, KEY)
    off = mamlpp(learner, regression_objective, 0.2, 2)
    g_off, _ = meta_gradient(off, {"net": params}, tasks, KEY)
    np.testing.assert_allclose(_flat(g_off["net"]), _flat(g_plain), rtol=1e-4, atol=1e-6)
    lslr = mamlpp(learner, regression_objective, 0.2, 2, lslr=True)
    meta = lslr.init(KEY, _first(tasks))
    assert jax.tree.leaves(meta["lslr"])[0].shape == (2,)
    g_lslr, _ = meta_gradient(lslr, meta, tasks, KEY)
    np.testing.assert_allclose(_flat(g_lslr["net"]), _flat(g_plain), rtol=1e-4, atol=1e-6)
    assert np.abs(_flat(g_lslr["lslr"])).max() > 1e-6


def test_mamlpp_multi_step_loss_is_the_weighted_query_loss_after_each_step():
    learner = MLP(hidden=(8, 8), out_dim=1)
    task = make_sinusoid_sampler(5, 7)({}, jax.random.PRNGKey(3))
    params = maml(learner, regression_objective, 0.05, 1).init(KEY, task)
    per_step = []
    for k in (1, 2, 3):
        m = maml(learner, regression_objective, 0.05, k)
        per_step.append(float(m.loss(params, m.adapt(params, task.support, None), task.query, None)[0]))
    for last_weight, weights in ((None, [1 / 3] * 3), (0.8, [0.1, 0.1, 0.8])):
        algo = mamlpp(learner, regression_objective, 0.05, 3, msl=True, msl_last_weight=last_weight)
        loss, metrics = algo.loss({"net": params}, algo.adapt({"net": params}, task.support, None), task.query, None)
        assert float(loss) == pytest.approx(float(np.dot(weights, per_step)), rel=1e-5)
        assert float(metrics["loss"]) == pytest.approx(per_step[-1], rel=1e-5)


def test_mamlpp_msl_weights_anneal_from_uniform_to_the_last_step():
    from metarun.algos.maml import msl_weights
    np.testing.assert_allclose(msl_weights(4, 0, 100), [0.25] * 4, rtol=1e-6)
    mid = np.asarray(msl_weights(4, 50, 100))
    np.testing.assert_allclose(mid, [0.125, 0.125, 0.125, 0.625], rtol=1e-6)
    end = np.asarray(msl_weights(4, 500, 100))
    np.testing.assert_allclose(end, [0.0075, 0.0075, 0.0075, 1 - 3 * 0.0075], rtol=1e-6)
    assert mid.sum() == pytest.approx(1.0) and end.sum() == pytest.approx(1.0)


def test_mamlpp_at_step_anneals_msl_and_switches_first_to_second_order():
    learner = _mlp()
    task = make_sinusoid_sampler(5, 7)({}, jax.random.PRNGKey(3))
    params = {"net": maml(learner, regression_objective, 0.05, 1).init(KEY, task)}
    annealed = mamlpp(learner, regression_objective, 0.05, 3, msl=True, msl_anneal_steps=100, first_order_steps=10)
    assert annealed.at_step is not None
    grad = lambda algo: _flat(task_grad(algo, params, task, KEY)[0])  # noqa: E731
    fixed_first = mamlpp(learner, regression_objective, 0.05, 3, first_order=True, msl=True)
    np.testing.assert_allclose(grad(annealed.at_step(jnp.int32(0))), grad(fixed_first), rtol=1e-5, atol=1e-7)
    late = annealed.at_step(jnp.int32(1000))  # second order, weights at their floor but the last
    late_loss = float(late.loss(params, late.adapt(params, task.support, None), task.query, None)[0])
    fixed_late = mamlpp(learner, regression_objective, 0.05, 3, msl=True, msl_last_weight=1 - 2 * 0.01)
    assert late_loss == pytest.approx(
        float(fixed_late.loss(params, fixed_late.adapt(params, task.support, None), task.query, None)[0]), rel=1e-5)
    second = mamlpp(learner, regression_objective, 0.05, 3, msl=True, msl_last_weight=1 - 2 * 0.01)
    np.testing.assert_allclose(grad(late), grad(second), rtol=1e-5, atol=1e-7)
    assert np.abs(grad(late) - grad(fixed_first)).max() > 1e-4  # first and second order do differ here


def test_mamlpp_per_step_batch_norm_has_one_copy_per_step_and_each_is_learned():
    tasks = _image_tasks()
    algo = mamlpp(_conv4(), classification_objective, 0.2, 2, per_step_bn=True)
    meta = algo.init(KEY, _first(tasks))
    assert "norm0" not in meta["net"] and meta["bn"]["norm0"]["scale"].shape == (2, 4)
    grads, _ = meta_gradient(algo, meta, tasks, KEY)
    scale = np.asarray(grads["bn"]["norm0"]["scale"])
    assert np.abs(scale[0]).max() > 1e-7 and np.abs(scale[1]).max() > 1e-7 and not np.allclose(scale[0], scale[1])


# ---- configs and the real trainer -------------------------------------------------------
def _compose(overrides):
    from hydra import compose, initialize_config_dir

    from metarun.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*_omniglot_*.yaml")
                 if p.stem.split("_")[0] in ("maml", "fomaml", "reptile", "metasgd", "anil", "mamlpp"))


def test_all_gradient_presets_exist():
    for algo in ("maml", "fomaml", "reptile", "metasgd", "anil", "mamlpp"):
        for shape in ("5w1s", "5w5s", "20w1s", "20w5s"):
            assert f"{algo}_omniglot_{shape}" in PRESETS


@pytest.mark.parametrize("preset", PRESETS)
def test_gradient_preset_composes_and_builds(preset):
    cfg = _compose([f"experiment={preset}"])
    ways, shots = preset.split("_")[-1][:-1].split("w")
    assert cfg.task.ways == int(ways) and (cfg.task.test_shots or cfg.task.shots) == int(shots)
    assert cfg.dataset.name == "omniglot"
    assert cfg.algo.name == {"mamlpp": "maml"}.get(preset.split("_")[0], preset.split("_")[0])
    build_algo(cfg, "classification", "train")
    build_algo(cfg, "classification", "eval")


SMOKE = ["debug=smoke", "dataset=synthetic", "dataset.image_size=8", "dataset.classes=[12,6,6]",
         "learner.blocks=2", "learner.filters=4", "train.steps=4", "train.steps_per_call=2", "train.log_every=2", "train.val_every=0",
         "train.ckpt_every=4", "train.progress=false", "eval.episodes=4", "eval.batch=4", "task.ways=3"]


@pytest.mark.parametrize("algo", [
    ["algo=reptile", "algo.eval_inner_steps=3", "meta_opt=sgd", "meta_opt.schedule=linear"],
    ["algo=metasgd"],
    ["algo=anil"],
    ["algo=maml", "algo.inner_steps=2", "algo.eval_inner_steps=2", "algo.msl=true", "algo.lslr=true",
     "algo.per_step_bn=true"],
], ids=["reptile", "metasgd", "anil", "mamlpp"])
def test_trains_through_the_real_trainer(algo, tmp_path):
    from conftest import initial_and_last_state
    from metarun.cli import run

    cfg = _compose(SMOKE + algo)
    run(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and all(math.isfinite(r["train/loss"]) for r in rows)
    results = json.loads((tmp_path / "results.json").read_text())
    assert 0.0 <= results["mean"] <= 1.0 and results["algo"] == cfg.algo.name

    start, final = initial_and_last_state(cfg, tmp_path)
    assert int(final.step) == 4
    assert np.abs(_flat(final.params) - _flat(start.params)).max() > 1e-6
