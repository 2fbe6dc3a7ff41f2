"""Every speed path computes what the plain path computes: im2col conv, reshape max-pool, lax.map over tasks."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TEST_XLA_FLAG

from metarun.algos.base import meta_step
from metarun.algos.maml import maml
from metarun.core import init_state, make_eval_batch, make_train_chunk, resolve_task_batching, task_mapper
from metarun.data.tasks import Examples, Task, make_image_sampler
from metarun.families.classification import classification_objective
from metarun.learners import Net
from metarun.learners.conv4 import Conv4, conv3x3_im2col, conv3x3_xla, max_pool_2x2

# float32; the paths differ only in summation order.
RTOL, ATOL = 1e-4, 1e-5
# Conv-4 with 8 filters on 28x28 (four floor-mode 2x2 pools take 14x14 to 0x0: 14-7-3-1-0).
# Some shapes/draws give a badly conditioned float32 second-order gradient (BatchNorm over a few
# 1x1 maps): 16x16 disagreed with float64 by far more than the tolerance for *both* convolutions.
WAYS, SHOTS, QUERIES, SIZE, FILTERS = 3, 1, 2, 28, 8
# The task-batching tests need no depth (batching is orthogonal to it): 1 block on 14x14 (2 blocks: ~40% more
# compile for these four tests).
SMALL = dict(size=14, blocks=1)


def assert_trees_close(a, b, rtol=RTOL, atol=ATOL):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def random_tasks(meta_batch, seed=0, size=SIZE):
    """Distinct random episodes per task, so a path that mixes tasks up gives a different gradient."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 2)
    xs = jax.random.uniform(ks[0], (meta_batch, WAYS * SHOTS, size, size, 1))
    xq = jax.random.uniform(ks[1], (meta_batch, WAYS * QUERIES, size, size, 1))
    ys = jnp.tile(jnp.repeat(jnp.arange(WAYS), SHOTS), (meta_batch, 1))
    yq = jnp.tile(jnp.repeat(jnp.arange(WAYS), QUERIES), (meta_batch, 1))
    return Task(Examples(xs, ys), Examples(xq, yq))


def tiny_maml(conv_impl="im2col", inner_steps=1, first_order=False, blocks=4):
    learner = Conv4(out_dim=WAYS, filters=FILTERS, blocks=blocks, conv_impl=conv_impl)
    return maml(Net(learner), classification_objective, 0.4, inner_steps, first_order)


def init_params(size=SIZE, blocks=4):
    """(meta_params, algo_state) of the tiny MAML."""
    task = jax.tree.map(lambda a: a[0], random_tasks(1, size=size))
    return tiny_maml(blocks=blocks).init(jax.random.PRNGKey(3), task)


def meta_gradient(algo, params, algo_state, tasks, key, task_batching="vmap", task_chunk=1):
    """(mean meta-gradient, mean metrics) of one meta-step in the given batching."""
    grads, _, metrics = meta_step(algo, params, algo_state, tasks, key, task_mapper(task_batching, task_chunk))
    return grads, metrics


def test_im2col_conv_matches_xla_conv_and_its_gradients():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 7, 7, 5))
    k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 5, 4))
    np.testing.assert_allclose(conv3x3_im2col(x, k), conv3x3_xla(x, k), rtol=RTOL, atol=ATOL)
    f = lambda conv: jax.grad(lambda x, k: jnp.sum(jnp.sin(conv(x, k))), argnums=(0, 1))(x, k)  # noqa: E731
    assert_trees_close(f(conv3x3_im2col), f(conv3x3_xla))


def test_reshape_max_pool_matches_reduce_window_and_its_gradient():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 7, 3))  # odd side: floor mode drops the last row/col

    def reduce_window(x):
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

    np.testing.assert_array_equal(max_pool_2x2(x), reduce_window(x))
    g = lambda pool: jax.grad(lambda x: jnp.sum(jnp.sin(pool(x))))(x)  # noqa: E731
    np.testing.assert_allclose(g(max_pool_2x2), g(reduce_window), rtol=RTOL, atol=ATOL)


def test_im2col_meta_gradient_matches_xla_conv():
    """Second-order MAML meta-gradient through the whole Conv-4 with either convolution."""
    (params, algo_state), tasks, key = init_params(), random_tasks(2), jax.random.PRNGKey(5)
    fast, _ = jax.jit(lambda p: meta_gradient(tiny_maml("im2col"), p, algo_state, tasks, key))(params)
    plain, _ = jax.jit(lambda p: meta_gradient(tiny_maml("xla"), p, algo_state, tasks, key))(params)
    assert_trees_close(fast, plain)


@pytest.mark.parametrize("task_chunk,meta_batch,inner_steps,first_order", [
    (1, 2, 2, False),   # one task per lax.map iteration, 2 second-order inner steps
    (2, 3, 1, False),   # chunks of two vmapped tasks and a remainder of one
    (1, 2, 1, True),    # FOMAML
])
def test_map_over_tasks_matches_vmap(task_chunk, meta_batch, inner_steps, first_order):
    algo = tiny_maml(inner_steps=inner_steps, first_order=first_order, blocks=SMALL["blocks"])
    (params, algo_state), key = init_params(**SMALL), jax.random.PRNGKey(7)
    by_map = jax.jit(lambda p, t: meta_gradient(algo, p, algo_state, t, key, "map", task_chunk))
    by_vmap = jax.jit(lambda p, t: meta_gradient(algo, p, algo_state, t, key, "vmap"))
    tasks = random_tasks(meta_batch, seed=meta_batch, size=SMALL["size"])
    g_map, m_map = by_map(params, tasks)
    g_vmap, m_vmap = by_vmap(params, tasks)
    assert_trees_close(g_map, g_vmap)
    assert_trees_close(m_map, m_vmap)
    # and the comparison can fail: other episodes give a gradient outside the tolerance
    g_other, _ = by_vmap(params, random_tasks(meta_batch, seed=99, size=SMALL["size"]))
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])  # noqa: E731
    assert not np.allclose(flat(g_other), flat(g_vmap), rtol=RTOL, atol=ATOL)


def test_map_tasks_keeps_task_order():
    tasks = random_tasks(3)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    fn = lambda t, k: (t.query.x.sum() * 2.0, jax.random.uniform(k))  # noqa: E731
    # the reference: fn on each task with its own key, in order, stacked
    one_by_one = [fn(jax.tree.map(lambda a: a[i], tasks), keys[i]) for i in range(3)]
    expected = tuple(jnp.stack(parts) for parts in zip(*one_by_one))
    assert not np.allclose(expected[0][0], expected[0][1])  # distinct tasks, so an order mix-up shows
    assert_trees_close(task_mapper("vmap")(fn, tasks, keys), expected)
    for chunk in (1, 2):
        assert_trees_close(task_mapper("map", chunk)(fn, tasks, keys), expected)


def test_train_chunk_and_eval_batch_map_match_vmap():
    """Whole meta-steps (episodes sampled on the device, outer update) agree between the batchings.

    SGD, not Adam: Adam divides by the gradient's size, so conv biases (whose gradient is float
    noise, BatchNorm cancels them) would move by +-lr on either path and hide nothing but noise.
    """
    shape = (6, SHOTS + QUERIES, SMALL["size"], SMALL["size"], 1)
    images = jax.random.randint(jax.random.PRNGKey(0), shape, 0, 256).astype(jnp.uint8)
    algo, opt, sampler = tiny_maml(blocks=SMALL["blocks"]), optax.sgd(0.1), make_image_sampler(WAYS, SHOTS, QUERIES)
    states = {}
    for mode in ("map", "vmap"):
        state = init_state(algo, opt, sampler, images, seed=0)
        states[mode], _ = make_train_chunk(algo, opt, sampler, 2, 2, task_batching=mode)(state, images)
    assert_trees_close(states["map"].params, states["vmap"].params)
    assert_trees_close(states["map"].algo_state, states["vmap"].algo_state)
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    evals = {mode: make_eval_batch(algo, sampler, task_batching=mode)(states["vmap"].params, states["vmap"].algo_state,
                                                                       images, keys)
             for mode in ("map", "vmap")}
    assert_trees_close(evals["map"], evals["vmap"])
    assert evals["vmap"]["loss"].shape == (3,)  # one value per episode key


def test_auto_task_batching_per_backend():
    expected = "map" if jax.default_backend() == "cpu" else "vmap"
    assert resolve_task_batching("auto") == expected
    assert resolve_task_batching("auto", sharded=True) == "vmap"
    assert resolve_task_batching("vmap") == "vmap"
    with pytest.raises(ValueError):
        resolve_task_batching("loop")


def test_map_copies_equals_vmap_values_and_gradients():
    """core.map_copies (lax.map on CPU) is the vmap over copies ABML's samples and BMAML's particles used."""
    import jax
    import jax.numpy as jnp
    from metarun.core import map_copies
    key = jax.random.PRNGKey(0)
    w = jax.random.normal(key, (5, 3, 4))
    x = jax.random.normal(jax.random.fold_in(key, 1), (7, 3))

    def f(copies):
        return jnp.sum(jnp.tanh(map_copies(lambda wi: x @ wi, copies)) ** 2)

    def g(copies):
        return jnp.sum(jnp.tanh(jax.vmap(lambda wi: x @ wi)(copies)) ** 2)

    assert jax.default_backend() != "cpu" or "scan" in str(jax.make_jaxpr(f)(w))  # really mapped on CPU
    assert jnp.allclose(f(w), g(w), rtol=1e-6)
    assert jnp.allclose(jax.grad(f)(w), jax.grad(g)(w), rtol=1e-5, atol=1e-6)


def test_cpu_vmap_through_xla_conv_is_refused_in_one_line():
    """train.check_cpu_vmap_conv: the combination whose jitted meta-gradients are wrong on XLA CPU is refused."""
    import jax
    from conftest import compose
    from metarun.errors import UserError
    from metarun.train import check_cpu_vmap_conv

    if jax.default_backend() != "cpu":
        pytest.skip("the refusal is for XLA's CPU backend")
    base = ["dataset=synthetic", "learner.conv_impl=xla"]
    for bad in (["train.task_batching=vmap"], ["train.task_chunk=2"]):
        with pytest.raises(UserError, match="learner.conv_impl=im2col") as e:
            check_cpu_vmap_conv(compose(base + bad))
        assert "\n" not in str(e.value)
    check_cpu_vmap_conv(compose(base))                                            # map, chunk 1: fine
    check_cpu_vmap_conv(compose(["dataset=synthetic", "train.task_batching=vmap"]))  # auto conv = im2col: fine


# The wrong gradients come from XLA's CPU fusion emitters: with them off (tests/conftest.py turns them off unless
# METARUN_TEST_XLA_DEFAULTS=1) the same program is right, so the test must pass there and fail with the defaults.
_FUSION_EMITTERS_ON = TEST_XLA_FLAG not in os.environ.get("XLA_FLAGS", "")


@pytest.mark.slow
@pytest.mark.xfail(_FUSION_EMITTERS_ON, strict=True,
                   reason="XLA CPU (jax 0.10.2): jit(vmap) of the meta-step through XLA's conv gives wrong "
                   "meta-gradients with XLA's default fusion emitters; when this passes, lift train.check_cpu_vmap_conv")
def test_jitted_vmap_meta_gradient_through_xla_conv_equals_the_per_task_mean():
    import jax
    import jax.numpy as jnp
    from metarun.algos.base import meta_step
    from metarun.algos.maml import maml
    from metarun.core import task_mapper
    from metarun.data.synthetic import make_synthetic_classes
    from metarun.data.tasks import make_image_sampler, sample_batch
    from metarun.families.classification import classification_objective
    from metarun.learners import Net
    from metarun.learners.conv4 import Conv4

    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])  # noqa: E731
    images = jnp.asarray(make_synthetic_classes(10, 6, 8, 0.2, seed=0))
    tasks = sample_batch(make_image_sampler(3, 1, 2), images, jax.random.PRNGKey(0), 2)
    algo = maml(Net(Conv4(out_dim=3, filters=4, blocks=2, conv_impl="xla")), classification_objective, 0.4, 1, True)
    params, algo_state = algo.init(jax.random.PRNGKey(1), jax.tree.map(lambda x: x[0], tasks))
    key = jax.random.PRNGKey(2)
    mapped = jax.jit(lambda p: meta_step(algo, p, algo_state, tasks, key, task_mapper("map"))[0])(params)
    vmapped = jax.jit(lambda p: meta_step(algo, p, algo_state, tasks, key, task_mapper("vmap"))[0])(params)
    assert np.abs(flat(vmapped) - flat(mapped)).max() < 1e-5
