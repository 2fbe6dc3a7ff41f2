"""The core's new contracts: algorithm state (Reptile's carried moments, running BatchNorm statistics),
fixed evaluation episodes, and state that survives a checkpoint."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metarun.algos.base import meta_step
from metarun.algos.maml import maml
from metarun.algos.reptile import reptile
from metarun.core import task_mapper
from metarun.data.sinusoid import make_sinusoid_sampler
from metarun.data.synthetic import make_synthetic_classes
from metarun.data.tasks import make_image_sampler, sample_batch
from metarun.families.classification import classification_objective
from metarun.families.regression import regression_objective
from metarun.learners import Net
from metarun.learners.conv4 import Conv4
from metarun.learners.mlp import MLP

KEY = jax.random.PRNGKey(0)


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def _jit_meta_step(algo, params, state, tasks, key):
    """meta_step over vmapped tasks, jitted as the trainer runs it: op-by-op (eager) dispatch of a
    second-order Conv-4 meta-step costs twice its compile."""
    return jax.jit(lambda p, s, t, k: meta_step(algo, p, s, t, k, task_mapper("vmap")))(params, state, tasks, key)


def test_reptile_carries_the_inner_adam_state_across_tasks_and_evaluates_from_it():
    module = MLP(hidden=(8, 8), out_dim=1)
    lr, steps = 0.01, 3
    algo = reptile(Net(module), regression_objective, lr, steps, "adam", 0.0, None, inner_state="carry")
    tasks = sample_batch(make_sinusoid_sampler(5, 5), {}, jax.random.PRNGKey(2), 3)
    params, state = algo.init(KEY, jax.tree.map(lambda a: a[0], tasks))
    grads, new_state, _ = meta_step(algo, params, state, tasks, jax.random.PRNGKey(3), task_mapper("vmap"))

    # By hand: one Adam(b1=0) whose state runs on from task to task; each task starts at theta.
    inner = optax.adam(lr, b1=0.0)
    opt_state, diffs = inner.init(params["net"]), []
    for i in range(3):
        x, y = tasks.support.x[i], tasks.support.y[i]
        phi = params["net"]
        for _ in range(steps):
            g = jax.grad(lambda p: regression_objective(module.apply({"params": p}, x), y)[0])(phi)
            u, opt_state = inner.update(g, opt_state, phi)
            phi = optax.apply_updates(phi, u)
        diffs.append(jax.tree.map(lambda t, p: t - p, params["net"], phi))
    np.testing.assert_allclose(_flat(grads["net"]), _flat(jax.tree.map(lambda *d: sum(d) / 3, *diffs)),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(_flat(new_state["inner_opt"]), _flat(opt_state), rtol=1e-5, atol=1e-8)
    assert int(new_state["inner_opt"][0].count) == 9  # 3 tasks x 3 steps

    # Fresh per task differs (the carried moments matter) ...
    fresh = reptile(Net(module), regression_objective, lr, steps, "adam", 0.0, None, inner_state="fresh")
    g_fresh, _, _ = meta_step(fresh, params, {}, tasks, jax.random.PRNGKey(3), task_mapper("vmap"))
    assert np.abs(_flat(g_fresh) - _flat(grads)).max() > 1e-5
    # ... and adaptation at test time starts from the trained moments (and does not keep its changes).
    task = jax.tree.map(lambda a: a[0], tasks)
    adapted = algo.adapt(params, new_state, task.support, KEY)["params"]
    phi, s = params["net"], new_state["inner_opt"]
    for _ in range(steps):
        g = jax.grad(lambda p: regression_objective(module.apply({"params": p}, task.support.x), task.support.y)[0])(phi)
        u, s = inner.update(g, s, phi)
        phi = optax.apply_updates(phi, u)
    np.testing.assert_allclose(_flat(adapted), _flat(phi), rtol=1e-5, atol=1e-7)


def _image_tasks(batch=2, ways=3, shots=2, queries=3):
    images = jnp.asarray(make_synthetic_classes(8, 8, 8, 0.2, seed=0))
    sampler = make_image_sampler(ways, shots, queries)
    return jax.jit(lambda k: sample_batch(sampler, images, k, batch))(jax.random.PRNGKey(1))  # one dispatch, not per op


def test_running_batch_norm_statistics_are_per_step_state_updated_from_the_support_passes():
    tasks = _image_tasks()
    # im2col: the meta-step below is jit(vmap)ped, which XLA's own CPU conv gets wrong (train.check_cpu_vmap_conv).
    module = Conv4(out_dim=3, filters=4, blocks=2, batch_norm="running", bn_steps=2, conv_impl="im2col")
    algo = maml(Net(module, train=True), classification_objective, 0.1, 2)
    params, state = jax.jit(algo.init)(KEY, jax.tree.map(lambda a: a[0], tasks))
    stats = state["batch_stats"]
    assert stats["norm0"]["mean"].shape == (2, 4)
    assert not np.asarray(stats["norm0"]["mean"]).any() and (np.asarray(stats["norm0"]["var"]) == 1).all()
    _, new_state, _ = _jit_meta_step(algo, params, state, tasks, KEY)

    # Copy 0 moves towards the first block's batch mean of each task's support set at the initial weights.
    from metarun.learners.conv4 import conv3x3_xla
    conv = lambda x: conv3x3_xla(x, params["net"]["conv0"]["kernel"]) + params["net"]["conv0"]["bias"]  # noqa: E731
    batch_means = [np.asarray(conv(tasks.support.x[i]).mean((0, 1, 2))) for i in range(2)]
    expected = 0.9 * 0.0 + 0.1 * np.mean(batch_means, axis=0)
    np.testing.assert_allclose(np.asarray(new_state["batch_stats"]["norm0"]["mean"][0]), expected, rtol=1e-4, atol=1e-6)
    assert np.abs(np.asarray(new_state["batch_stats"]["norm0"]["mean"][1]) - expected).max() > 1e-6  # step 1: own copy

    # Evaluation normalises with the running statistics: a query's prediction ignores the other queries.
    evaluator = maml(Net(module, train=False), classification_objective, 0.1, 2)
    task = jax.tree.map(lambda a: a[0], tasks)
    ts = jax.jit(evaluator.adapt)(params, new_state, task.support, KEY)
    out = jax.jit(lambda x: Net(module, train=False).apply(ts["params"], x, new_state["batch_stats"], 1))
    np.testing.assert_allclose(np.asarray(out(task.query.x))[:1], np.asarray(out(task.query.x[:1])), rtol=1e-5, atol=1e-6)


def test_evaluation_episodes_do_not_depend_on_episodes_per_call():
    from conftest import compose
    from metarun.build import initial_state, load_family
    from metarun.evaluate import Evaluator

    cfg = compose(["dataset=synthetic", "dataset.image_size=8", "learner.filters=4", "learner.blocks=2",
                   "task.queries=2", "algo=protonet"])
    family = load_family(cfg)
    state = initial_state(cfg, family)[2]
    a = Evaluator(cfg, family, "test", 10, 7, 3).per_task(state.params, state.algo_state)
    b = Evaluator(cfg, family, "test", 10, 7, 10).per_task(state.params, state.algo_state)
    np.testing.assert_allclose(a["accuracy"], b["accuracy"])
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    assert len(set(np.round(a["loss"], 5))) > 5  # ten different episodes, not one repeated


def test_checkpoints_save_and_restore_the_algorithm_state(tmp_path):
    from metarun.checkpoint import Checkpoints
    from metarun.core import init_state

    algo = reptile(Net(MLP(hidden=(4,), out_dim=1)), regression_objective, 0.01, 2, "adam", 0.0, None, "carry")
    sampler = make_sinusoid_sampler(5, 5)
    opt = optax.sgd(1.0)
    state = init_state(algo, opt, sampler, {}, 0)
    tasks = sample_batch(sampler, {}, KEY, 2)
    _, algo_state, _ = meta_step(algo, state.params, state.algo_state, tasks, KEY, task_mapper("vmap"))
    state = state._replace(algo_state=algo_state, best_score=jnp.float32(0.5), best_step=jnp.int32(7))
    ckpts = Checkpoints(tmp_path, 2)
    try:
        ckpts.save(state, 1)
        back = ckpts.restore_latest(init_state(algo, opt, sampler, {}, 0))
    finally:
        ckpts.close()
    np.testing.assert_array_equal(_flat(back.algo_state), _flat(state.algo_state))
    assert int(back.algo_state["inner_opt"][0].count) == 4
    assert float(back.best_score) == pytest.approx(0.5) and int(back.best_step) == 7
