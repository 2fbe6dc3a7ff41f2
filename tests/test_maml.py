"""MAML's defining equalities, on tiny shapes, each of which fails if the algorithm is wrong."""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metarun.algos.base import meta_step, task_grad
from metarun.algos.maml import maml
from metarun.core import task_mapper
from metarun.data.sinusoid import make_sinusoid_sampler
from metarun.data.synthetic import make_synthetic_classes
from metarun.data.tasks import make_image_sampler, sample_batch
from metarun.families.classification import classification_objective
from metarun.families.regression import regression_objective
from metarun.learners import Net
from metarun.learners.conv4 import Conv4
from metarun.learners.mlp import MLP


def _sinusoid_setup(inner_steps, first_order=False, inner_lr=0.05):
    learner = MLP(hidden=(8, 8), out_dim=1)
    algo = maml(Net(learner), regression_objective, inner_lr, inner_steps, first_order)
    task = make_sinusoid_sampler(5, 7)({}, jax.random.PRNGKey(3))
    params, algo_state = algo.init(jax.random.PRNGKey(0), task)
    return learner, algo, task, params, algo_state


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def _query_loss(learner, task):
    """The plain query loss of the learner's own params (no adaptation)."""
    return lambda p: regression_objective(learner.apply({"params": p}, task.query.x), task.query.y)[0]


def test_zero_inner_steps_is_the_plain_gradient():
    learner, algo, task, params, algo_state = _sinusoid_setup(inner_steps=0)
    assert set(params) == {"net"} and algo_state == {}
    grads, _ = task_grad(algo, params, algo_state, task, jax.random.PRNGKey(1))
    plain = jax.grad(_query_loss(learner, task))(params["net"])
    np.testing.assert_allclose(_flat(grads["net"]), _flat(plain), rtol=1e-6, atol=1e-7)


def test_fomaml_gradient_is_the_query_gradient_at_the_adapted_params():
    learner, algo, task, params, algo_state = _sinusoid_setup(inner_steps=2, first_order=True)
    adapted = algo.adapt(params, algo_state, task.support, None)["params"]
    query_grad = jax.grad(_query_loss(learner, task))(adapted)
    grads, _ = task_grad(algo, params, algo_state, task, jax.random.PRNGKey(1))
    np.testing.assert_allclose(_flat(grads["net"]), _flat(query_grad), rtol=1e-5, atol=1e-6)
    # And second-order MAML differs from it: the test would pass vacuously if it did not.
    _, second, _, _, _ = _sinusoid_setup(inner_steps=2, first_order=False)
    grads2, _ = task_grad(second, params, algo_state, task, jax.random.PRNGKey(1))
    assert np.abs(_flat(grads2["net"]) - _flat(query_grad)).max() > 1e-4


def test_maml_meta_gradient_matches_finite_differences():
    with jax.enable_x64(True):
        learner, algo, task, params, algo_state = _sinusoid_setup(inner_steps=2, inner_lr=0.1)
        params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
        task = jax.tree.map(lambda x: x.astype(jnp.float64), task)

        def meta_loss(p):
            task_state = algo.adapt(p, algo_state, task.support, None)
            return algo.loss(p, algo_state, task_state, task.query, None)[0]

        grads = jax.grad(meta_loss)(params)
        rng = np.random.default_rng(0)
        for _ in range(3):
            direction = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape)), params)
            eps = 1e-5
            plus = meta_loss(jax.tree.map(lambda p, d: p + eps * d, params, direction))
            minus = meta_loss(jax.tree.map(lambda p, d: p - eps * d, params, direction))
            numeric = (plus - minus) / (2 * eps)
            analytic = float(jnp.vdot(_flat(grads), _flat(direction)))
            assert numeric == pytest.approx(analytic, rel=1e-6, abs=1e-9)


def test_meta_gradient_is_the_mean_over_tasks():
    # Two conv blocks on 8x8 (the averaging does not depend on depth): run op by op, four blocks on
    # 16x16 cost ~40 s of CPU in small compiles. Eager on purpose: jit(vmap(...)) with conv_impl="xla"
    # gives other gradients than the per-task ones on this JAX/XLA CPU (see the session-5 fasttests report).
    learner = Conv4(out_dim=3, filters=4, blocks=2, conv_impl="xla")
    algo = maml(Net(learner), classification_objective, 0.4, 1)
    images = jnp.asarray(make_synthetic_classes(10, 6, 8, 0.2, seed=0))
    tasks = sample_batch(make_image_sampler(3, 1, 2), images, jax.random.PRNGKey(0), 2)
    params, algo_state = algo.init(jax.random.PRNGKey(1), jax.tree.map(lambda x: x[0], tasks))
    key = jax.random.PRNGKey(2)
    mean_grads, new_state, _ = meta_step(algo, params, algo_state, tasks, key, task_mapper("vmap"))
    assert new_state == algo_state == {}  # transductive BatchNorm: no running statistics to carry
    keys = jax.random.split(key, 2)
    per_task = [task_grad(algo, params, algo_state, jax.tree.map(lambda x: x[i], tasks), keys[i])[0]
                for i in range(2)]
    np.testing.assert_allclose(_flat(mean_grads), (_flat(per_task[0]) + _flat(per_task[1])) / 2,
                               rtol=1e-4, atol=1e-5)  # float32 sums in another order
    # The two tasks' gradients differ, so the mean is not just either one of them.
    assert np.abs(_flat(per_task[0]) - _flat(per_task[1])).max() > 1e-4


def test_image_sampler_draws_distinct_classes_with_consistent_labels():
    n_classes, n_examples = 12, 6
    # Example e of class c is a constant image of value c*10+e, so every pixel says where it came from.
    values = np.arange(n_classes)[:, None] * 10 + np.arange(n_examples)[None, :]
    images = jnp.asarray(np.broadcast_to(values[:, :, None, None, None], (n_classes, n_examples, 4, 4, 1))
                         .astype(np.uint8))
    sample = jax.jit(make_image_sampler(ways=5, shots=2, queries=3))
    task = sample(images, jax.random.PRNGKey(0))
    assert task.support.x.shape == (10, 4, 4, 1) and task.query.x.shape == (15, 4, 4, 1)
    s_cls = np.round(np.asarray(task.support.x[:, 0, 0, 0]) * 255).astype(int) // 10
    q_cls = np.round(np.asarray(task.query.x[:, 0, 0, 0]) * 255).astype(int) // 10
    for label in range(5):  # one class per label, the same in support and query
        assert len(set(s_cls[np.asarray(task.support.y) == label])) == 1
        assert set(q_cls[np.asarray(task.query.y) == label]) == set(s_cls[np.asarray(task.support.y) == label])
    assert len(set(s_cls)) == 5
    examples = np.round(np.concatenate([task.support.x[:, 0, 0, 0], task.query.x[:, 0, 0, 0]]) * 255)
    assert len(set(examples.astype(int))) == 25  # no example drawn twice
    again = sample(images, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(again.query.x), np.asarray(task.query.x))


def test_im2col_convolution_equals_xla_convolution():
    from metarun.learners.conv4 import conv3x3_im2col, conv3x3_xla
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 7, 3))
    k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 5))
    np.testing.assert_allclose(conv3x3_im2col(x, k), conv3x3_xla(x, k), rtol=1e-5, atol=1e-5)
