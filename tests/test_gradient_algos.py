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

from metarun.algos.anil import anil
from metarun.algos.base import meta_step, task_grad
from metarun.algos.maml import MAMLPlusPlus, maml
from metarun.algos.metasgd import metasgd
from metarun.algos.reptile import reptile
from metarun.build import make_algo
from metarun.core import task_mapper
from metarun.data.sinusoid import make_sinusoid_sampler
from metarun.data.synthetic import make_synthetic_classes
from metarun.data.tasks import make_image_sampler, sample_batch
from metarun.families.classification import classification_objective
from metarun.families.regression import regression_objective
from metarun.inner import minibatch_indices
from metarun.learners import Net
from metarun.learners.conv4 import Conv4
from metarun.learners.mlp import MLP

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
KEY = jax.random.PRNGKey(0)
VMAP = task_mapper("vmap")


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)] or [np.zeros(0)])


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


def _grads(algo, params, algo_state, tasks, key=KEY):
    """The mean meta-gradient over `tasks` (vmapped), as the trainer's meta-step computes it."""
    return meta_step(algo, params, algo_state, tasks, key, VMAP)[0]


def _episode_loss(algo, params, algo_state, task, key=None):
    return algo.loss(params, algo_state, algo.adapt(params, algo_state, task.support, key), task.query, key)


# ---- Reptile ----------------------------------------------------------------------------
@pytest.mark.parametrize("inner_opt,inner_state", [("adam", "fresh"), ("sgd", "fresh"), ("adam", "carry")])
def test_reptile_update_is_epsilon_times_phi_minus_theta(inner_opt, inner_state):
    learner = MLP(hidden=(8, 8), out_dim=1)
    lr, steps, eps = 0.01, 3, 0.3
    algo = reptile(Net(learner), regression_objective, lr, steps, inner_opt, inner_beta1=0.0, inner_state=inner_state)
    sampler = make_sinusoid_sampler(5, 5)
    tasks = sample_batch(sampler, {}, jax.random.PRNGKey(2), 2)
    theta, algo_state = algo.init(KEY, _first(tasks))
    assert set(theta) == {"net"} and set(algo_state) == ({"inner_opt"} if inner_state == "carry" else set())

    grads, new_state, metrics = meta_step(algo, theta, algo_state, tasks, jax.random.PRNGKey(3), VMAP)
    outer = optax.sgd(eps)
    updates, _ = outer.update(grads, outer.init(theta), theta)
    new_theta = optax.apply_updates(theta, updates)

    # The inner loop written out by hand, one task at a time; "carry" hands the inner optimiser's
    # state from one task to the next (and back to the run), "fresh" starts it anew per task.
    inner = optax.adam(lr, b1=0.0) if inner_opt == "adam" else optax.sgd(lr)
    net = theta["net"]
    phis, state = [], inner.init(net)
    for i in range(2):
        x, y = tasks.support.x[i], tasks.support.y[i]
        phi = net
        if inner_state == "fresh":
            state = inner.init(net)
        for _ in range(steps):
            g = jax.grad(lambda p: regression_objective(learner.apply({"params": p}, x), y)[0])(phi)
            u, state = inner.update(g, state, phi)
            phi = optax.apply_updates(phi, u)
        phis.append(phi)
    expected = jax.tree.map(lambda t, a, b: t + eps * ((a - t) + (b - t)) / 2, net, *phis)
    np.testing.assert_allclose(_flat(new_theta["net"]), _flat(expected), rtol=1e-5, atol=1e-6)
    assert np.abs(_flat(new_theta["net"]) - _flat(net)).max() > 1e-4  # not vacuous
    if inner_state == "carry":
        np.testing.assert_allclose(_flat(new_state["inner_opt"]), _flat(state), rtol=1e-5, atol=1e-7)
        assert int(new_state["inner_opt"][0].count) == 2 * steps
    else:
        assert new_state == {}
    # The reported metrics are the query metrics after adaptation, averaged over the tasks.
    query_losses = [regression_objective(learner.apply({"params": phi}, tasks.query.x[i]), tasks.query.y[i])[0]
                    for i, phi in enumerate(phis)]
    assert float(metrics["loss"]) == pytest.approx(float(np.mean(query_losses)), rel=1e-4)


def test_reptile_carried_inner_state_changes_the_update():
    """carry and fresh differ with Adam (the second task starts from the first one's moments), so the
    carry case above is not the fresh one in disguise."""
    tasks = sample_batch(make_sinusoid_sampler(5, 5), {}, jax.random.PRNGKey(2), 2)
    updates = {}
    for mode in ("carry", "fresh"):
        algo = reptile(Net(_mlp()), regression_objective, 0.01, 3, "adam", inner_state=mode)
        theta, state = algo.init(KEY, _first(tasks))
        updates[mode] = _flat(meta_step(algo, theta, state, tasks, jax.random.PRNGKey(3), VMAP)[0])
    assert np.abs(updates["carry"] - updates["fresh"]).max() > 1e-5


def test_reptile_minibatches_are_shuffled_passes_over_the_support_set():
    idx = np.asarray(minibatch_indices(KEY, 10, 5, 4))
    assert idx.shape == (4, 5)
    assert sorted(idx[:2].ravel()) == list(range(10)) and sorted(idx[2:].ravel()) == list(range(10))
    assert (np.asarray(minibatch_indices(KEY, 10, None, 3)) == np.arange(10)).all()


def test_reptile_transductive_flag_changes_only_how_the_query_is_batched():
    tasks = _image_tasks()
    task = _first(tasks)
    learner = _conv4()
    trans = reptile(Net(learner, train=False, transductive=True), classification_objective, 1e-3, 2)
    single = reptile(Net(learner, train=False, transductive=False), classification_objective, 1e-3, 2)
    params, algo_state = trans.init(KEY, task)
    state = trans.adapt(params, algo_state, task.support, KEY)
    # adaptation itself does not depend on the flag
    np.testing.assert_array_equal(_flat(single.adapt(params, algo_state, task.support, KEY)["params"]),
                                  _flat(state["params"]))
    expected = jnp.stack([learner.apply({"params": state["params"]},
                                        jnp.concatenate([task.support.x, q[None]]))[-1] for q in task.query.x])
    got = single.loss(params, algo_state, state, task.query, KEY)[0]
    np.testing.assert_allclose(float(got), float(classification_objective(expected, task.query.y)[0]), rtol=1e-5)
    # With batch norm the two settings differ: the flag is not a no-op.
    assert abs(float(trans.loss(params, algo_state, state, task.query, KEY)[0]) - float(got)) > 1e-4


def test_eval_transductive_config_reaches_the_eval_build():
    """eval.transductive=false (the config key that replaced algo.transductive) scores each query
    with the support set alone in the eval build, and leaves the train build transductive."""
    from conftest import compose, stand_in_family

    task = _first(_image_tasks())
    losses = {}
    for flag in (True, False):
        cfg = compose(["algo=reptile", "dataset=synthetic", "dataset.image_size=8", "learner.blocks=2",
                       "learner.filters=4", "learner.conv_impl=xla", "task.ways=3", "algo.eval_inner_steps=2",
                       f"eval.transductive={str(flag).lower()}"])
        family = stand_in_family(cfg)
        for phase in ("train", "eval"):
            algo = make_algo(cfg, family, phase)
            params, algo_state = algo.init(KEY, task)
            losses[flag, phase] = float(_episode_loss(algo, params, algo_state, task, KEY)[0])
    assert losses[True, "train"] == pytest.approx(losses[False, "train"], rel=1e-6)
    assert abs(losses[True, "eval"] - losses[False, "eval"]) > 1e-4


# ---- Meta-SGD ---------------------------------------------------------------------------
def test_metasgd_with_a_frozen_scalar_rate_is_maml():
    tasks = _mlp_tasks()
    net, c = Net(_mlp()), 0.3
    msgd = metasgd(net, regression_objective, 2, inner_lr_init=(c, c), learn_inner_lr=False)
    params, algo_state = msgd.init(KEY, _first(tasks))
    assert all(np.allclose(a, c) for a in jax.tree.leaves(params["inner_lr"]))
    g_msgd = _grads(msgd, params, algo_state, tasks)
    g_maml = _grads(maml(net, regression_objective, c, 2), {"net": params["net"]}, {}, tasks)
    np.testing.assert_allclose(_flat(g_msgd["net"]), _flat(g_maml["net"]), rtol=1e-4, atol=1e-6)
    assert not _flat(g_msgd["inner_lr"]).any()  # frozen: no meta-gradient, so Adam leaves alpha alone
    opt = optax.adam(1e-2)
    updates, _ = opt.update(g_msgd, opt.init(params), params)
    np.testing.assert_array_equal(_flat(optax.apply_updates(params, updates)["inner_lr"]), _flat(params["inner_lr"]))
    # Learned alpha does get a meta-gradient, and the net gradient then still matches MAML at alpha = c.
    learned = metasgd(net, regression_objective, 2, inner_lr_init=(c, c))
    g_learned = _grads(learned, params, algo_state, tasks)
    assert np.abs(_flat(g_learned["inner_lr"])).max() > 1e-6
    np.testing.assert_allclose(_flat(g_learned["net"]), _flat(g_maml["net"]), rtol=1e-4, atol=1e-6)


def test_metasgd_rates_start_uniform_in_the_configured_range():
    params, _ = metasgd(Net(_conv4()), classification_objective, 1).init(KEY, _first(_image_tasks()))
    rates = _flat(params["inner_lr"])
    assert rates.min() >= 0.005 and rates.max() <= 0.1 and rates.std() > 0.01


# ---- ANIL -------------------------------------------------------------------------------
def test_anil_adapts_only_the_head_and_its_meta_gradient_reaches_the_body():
    tasks = _image_tasks()
    task = _first(tasks)
    learner, lr, steps = _conv4(), 0.4, 2
    algo = anil(Net(learner), classification_objective, lr, steps)
    params, algo_state = algo.init(KEY, task)
    head = algo.adapt(params, algo_state, task.support, KEY)["head"]

    # MAML's inner loop with the body's gradient masked: the body stays put, the head must match.
    fast = params["net"]
    for _ in range(steps):
        g = jax.grad(lambda p: classification_objective(learner.apply({"params": p}, task.support.x),
                                                        task.support.y)[0])(fast)
        fast = {k: jax.tree.map(lambda p, d: p - lr * d, v, g[k]) if k == "head" else v for k, v in fast.items()}
    np.testing.assert_allclose(_flat(head), _flat(fast["head"]), rtol=1e-5, atol=1e-6)
    assert np.abs(_flat(head) - _flat(params["net"]["head"])).max() > 1e-4
    # The query loss is the whole learner's with the meta-learned body and the adapted head.
    loss, _ = _episode_loss(algo, params, algo_state, task, KEY)
    full = classification_objective(learner.apply({"params": fast}, task.query.x), task.query.y)[0]
    np.testing.assert_allclose(float(loss), float(full), rtol=1e-5)

    grads, _ = task_grad(algo, params, algo_state, task, KEY)
    assert np.abs(_flat(grads["net"]["conv0"])).max() > 1e-6
    # Second order through the head's adaptation: differs from the first-order body gradient.
    fo, _ = task_grad(anil(Net(learner), classification_objective, lr, steps, first_order=True), params,
                      algo_state, task, KEY)
    assert np.abs(_flat(grads["net"]["conv0"]) - _flat(fo["net"]["conv0"])).max() > 1e-7


# ---- MAML++ options ---------------------------------------------------------------------
def test_mamlpp_lslr_at_init_is_maml_and_learns_its_rates():
    tasks = _mlp_tasks()
    net = Net(_mlp())
    plain = maml(net, regression_objective, 0.2, 2)
    params, algo_state = plain.init(KEY, _first(tasks))
    g_plain = _grads(plain, params, algo_state, tasks)
    lslr = maml(net, regression_objective, 0.2, 2, options=MAMLPlusPlus(lslr=True))
    meta, _ = lslr.init(KEY, _first(tasks))
    assert set(meta) == {"net", "lslr"} and jax.tree.leaves(meta["lslr"])[0].shape == (2,)
    assert np.allclose(_flat(meta["lslr"]), 0.2)
    meta = {**meta, "net": params["net"]}
    g_lslr = _grads(lslr, meta, algo_state, tasks)
    np.testing.assert_allclose(_flat(g_lslr["net"]), _flat(g_plain["net"]), rtol=1e-4, atol=1e-6)
    assert np.abs(_flat(g_lslr["lslr"])).max() > 1e-6
    # The rates are the ones used: all at 0.35 is MAML with inner_lr 0.35 (and not MAML at 0.2).
    faster = {**meta, "lslr": jax.tree.map(lambda r: jnp.full_like(r, 0.35), meta["lslr"])}
    g_faster = _grads(lslr, faster, algo_state, tasks)
    g_maml_faster = _grads(maml(net, regression_objective, 0.35, 2), params, algo_state, tasks)
    np.testing.assert_allclose(_flat(g_faster["net"]), _flat(g_maml_faster["net"]), rtol=1e-4, atol=1e-6)
    assert np.abs(_flat(g_faster["net"]) - _flat(g_plain["net"])).max() > 1e-4


def test_mamlpp_multi_step_loss_is_the_weighted_query_loss_after_each_step():
    net = Net(MLP(hidden=(8, 8), out_dim=1))
    task = make_sinusoid_sampler(5, 7)({}, jax.random.PRNGKey(3))
    params, algo_state = maml(net, regression_objective, 0.05, 1).init(KEY, task)
    per_step = [float(_episode_loss(maml(net, regression_objective, 0.05, k), params, algo_state, task)[0])
                for k in (1, 2, 3)]
    for last_weight, weights in ((None, [1 / 3] * 3), (0.8, [0.1, 0.1, 0.8])):
        algo = maml(net, regression_objective, 0.05, 3, options=MAMLPlusPlus(msl=True, msl_last_weight=last_weight))
        loss, metrics = _episode_loss(algo, params, algo_state, task)
        assert float(loss) == pytest.approx(float(np.dot(weights, per_step)), rel=1e-5)
        assert float(metrics["loss"]) == pytest.approx(per_step[-1], rel=1e-5)
    # An eval-mode net scores the last step only (the multi-step loss is a training objective).
    evaluated = maml(net._replace(train=False), regression_objective, 0.05, 3, options=MAMLPlusPlus(msl=True))
    assert float(_episode_loss(evaluated, params, algo_state, task)[0]) == pytest.approx(per_step[-1], rel=1e-5)


def test_mamlpp_msl_weights_anneal_from_uniform_to_the_last_step():
    from metarun.algos.maml import msl_weights
    np.testing.assert_allclose(msl_weights(4, 0, 100), [0.25] * 4, rtol=1e-6)
    mid = np.asarray(msl_weights(4, 50, 100))
    np.testing.assert_allclose(mid, [0.125, 0.125, 0.125, 0.625], rtol=1e-6)
    end = np.asarray(msl_weights(4, 500, 100))
    np.testing.assert_allclose(end, [0.0075, 0.0075, 0.0075, 1 - 3 * 0.0075], rtol=1e-6)
    assert mid.sum() == pytest.approx(1.0) and end.sum() == pytest.approx(1.0)


def test_mamlpp_at_step_anneals_msl_and_switches_first_to_second_order():
    net = Net(_mlp())
    task = make_sinusoid_sampler(5, 7)({}, jax.random.PRNGKey(3))
    params, algo_state = maml(net, regression_objective, 0.05, 1).init(KEY, task)

    def build(first_order=False, **options):
        return maml(net, regression_objective, 0.05, 3, first_order, options=MAMLPlusPlus(**options))

    annealed = build(msl=True, msl_anneal_steps=100, first_order_steps=10)
    assert annealed.at_step is not None
    grad = lambda algo: _flat(task_grad(algo, params, algo_state, task, KEY)[0])  # noqa: E731
    fixed_first = build(first_order=True, msl=True)
    np.testing.assert_allclose(grad(annealed.at_step(jnp.int32(0))), grad(fixed_first), rtol=1e-5, atol=1e-7)
    late = annealed.at_step(jnp.int32(1000))  # second order, weights at their floor but the last
    late_loss = float(_episode_loss(late, params, algo_state, task)[0])
    fixed_late = build(msl=True, msl_last_weight=1 - 2 * 0.01)
    assert late_loss == pytest.approx(float(_episode_loss(fixed_late, params, algo_state, task)[0]), rel=1e-5)
    np.testing.assert_allclose(grad(late), grad(fixed_late), rtol=1e-5, atol=1e-7)
    assert np.abs(grad(late) - grad(fixed_first)).max() > 1e-4  # first and second order do differ here


def test_mamlpp_per_step_batch_norm_has_one_copy_per_step_and_each_is_learned():
    tasks = _image_tasks()
    algo = maml(Net(_conv4()), classification_objective, 0.2, 2, options=MAMLPlusPlus(per_step_bn=True))
    meta, algo_state = algo.init(KEY, _first(tasks))
    assert "norm0" not in meta["net"] and meta["bn"]["norm0"]["scale"].shape == (2, 4)
    grads = _grads(algo, meta, algo_state, tasks)
    scale = np.asarray(grads["bn"]["norm0"]["scale"])
    assert np.abs(scale[0]).max() > 1e-7 and np.abs(scale[1]).max() > 1e-7 and not np.allclose(scale[0], scale[1])


# ---- configs and the real trainer -------------------------------------------------------
def _compose(overrides):
    from conftest import compose

    return compose(overrides)


PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*_omniglot_*.yaml")
                 if p.stem.split("_")[0] in ("maml", "fomaml", "reptile", "metasgd", "anil", "mamlpp"))


def test_all_gradient_presets_exist():
    for algo in ("maml", "fomaml", "reptile", "metasgd", "anil", "mamlpp"):
        for shape in ("5w1s", "5w5s", "20w1s", "20w5s"):
            assert f"{algo}_omniglot_{shape}" in PRESETS


@pytest.mark.parametrize("preset", PRESETS)
def test_gradient_preset_composes_and_builds(preset):
    from conftest import stand_in_family

    cfg = _compose([f"experiment={preset}"])
    ways, shots = preset.split("_")[-1][:-1].split("w")
    assert cfg.task.ways == int(ways) and (cfg.task.test_shots or cfg.task.shots) == int(shots)
    assert cfg.dataset.name == "omniglot"
    assert cfg.algo.name == {"mamlpp": "maml"}.get(preset.split("_")[0], preset.split("_")[0])
    family = stand_in_family(cfg)
    for phase in ("train", "eval"):
        info = make_algo(cfg, family, phase).info
        assert info["name"] == cfg.algo.name
    if preset.startswith("mamlpp"):
        assert info["variant"] == "maml++"


# One conv block: what is checked (checkpoint = replayed core chunk, results = the Evaluator) does not depend
# on depth, and each algorithm compiles ~20% faster than with two.
SMOKE = ["debug=smoke", "dataset=synthetic", "dataset.image_size=8", "dataset.classes=[12,6,6]",
         "learner.blocks=1", "learner.filters=4", "train.steps=4", "train.steps_per_call=2", "train.log_every=2", "train.val_every=0",
         "train.ckpt_every=4", "train.progress=false", "eval.episodes=4", "eval.batch=4", "task.ways=3"]


@pytest.mark.parametrize("algo", [
    ["algo=reptile", "algo.eval_inner_steps=3", "meta_opt=sgd", "meta_opt.schedule=linear"],
    ["algo=metasgd"],
    ["algo=anil"],
    ["algo=maml", "algo.inner_steps=2", "algo.eval_inner_steps=2", "algo.msl=true", "algo.lslr=true",
     "algo.per_step_bn=true"],
], ids=["reptile", "metasgd", "anil", "mamlpp"])
def test_trains_through_the_real_trainer(algo, tmp_path):
    from conftest import initial_and_last_state, replay_training
    from metarun.build import load_family
    from metarun.cli import run
    from metarun.evaluate import Evaluator

    cfg = _compose(SMOKE + algo)
    run(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and all(math.isfinite(r["train/loss"]) for r in rows)
    assert all(r["train/nonfinite"] == 0.0 for r in rows)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["algo"] == cfg.algo.name and results["algo_config"]["name"] == cfg.algo.name
    assert results["checkpoint"] == "last" and results["episodes"] == 4
    assert results["inner_steps"] == cfg.algo.eval_inner_steps

    start, final = initial_and_last_state(cfg, tmp_path)
    assert int(final.step) == 4
    # The checkpoint holds the state that 4 meta-steps of the core's train chunk make from the start
    # (params and algo state, e.g. Reptile's carried inner Adam moments).
    expected = replay_training(cfg, start, 4)
    np.testing.assert_allclose(_flat(final.params), _flat(expected.params), rtol=1e-5, atol=1e-6)
    assert jax.tree.structure(final.algo_state) == jax.tree.structure(expected.algo_state)
    np.testing.assert_allclose(_flat(final.algo_state), _flat(expected.algo_state), rtol=1e-5, atol=1e-6)
    # and training moved it (so the equality above is not two untouched inits)
    assert np.abs(_flat(final.params) - _flat(start.params)).max() > 1e-4
    # results.json scores that state on the test protocol (score = accuracy: higher is better).
    family = load_family(cfg)
    summary = Evaluator(cfg, family, "test", 4, cfg.eval.seed, 4)(final.params, final.algo_state)
    assert results["mean"] == pytest.approx(summary[cfg.algo.eval_inner_steps]["mean"], abs=1e-6)
    assert results["score"] == results["mean"]
