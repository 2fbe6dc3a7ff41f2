"""Tests for the ResNet-12 learner and its DropBlock: shapes, a reference forward pass, parameter count, randomness."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metarun.learners.resnet12 import ResNet12, block_mask, drop_block

TINY = (4, 6, 8, 10)
# The parameter count commonly quoted for this ResNet-12 (e.g. Lee et al. 2019, MetaOptNet): 12.4M.
QUOTED_MILLIONS = 12.4


def _count(tree) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))


@pytest.fixture(scope="module")
def tiny():
    """(model with a 5-way head, random variables incl. non-trivial running statistics).

    Filled with numpy from the init's shapes: compiling flax's init of 17 convolutions costs tens of
    seconds on a busy 2-core CPU, and these tests are about the forward pass.
    """
    model = ResNet12(out_dim=5, widths=TINY)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32))
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        return rng.normal(0, 0.1, leaf.shape).astype(np.float32)  # bias, mean

    return model, jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize("size", [84, 32])
@pytest.mark.parametrize("out_dim", [None, 5])
def test_output_shapes(size, out_dim):
    model = ResNet12(out_dim=out_dim, widths=TINY)
    x = jax.ShapeDtypeStruct((3, size, size, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    assert jax.eval_shape(lambda v, x: model.apply(v, x), variables, x).shape == (3, out_dim or TINY[-1])
    out, state = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, x)
    assert out.shape == (3, out_dim or TINY[-1]) and set(state) == {"batch_stats"}


def test_full_width_parameter_count():
    variables = jax.eval_shape(ResNet12().init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 84, 84, 3), jnp.float32))
    # Per block: 3x3 convs cin->c, c->c, c->c and a 1x1 shortcut, no biases; 4 BatchNorms with scale and bias.
    widths, expected = (3, 64, 160, 320, 640), 0
    for cin, c in zip(widths, widths[1:]):
        expected += 9 * cin * c + 2 * 9 * c * c + cin * c + 4 * 2 * c
    n = _count(variables["params"])
    assert n == expected == 12_424_320
    assert round(n / 1e6, 1) == QUOTED_MILLIONS
    assert _count(variables["batch_stats"]) == 2 * 4 * sum(widths[1:])  # running mean and var
    emb = jax.eval_shape(ResNet12().apply, variables, jax.ShapeDtypeStruct((2, 84, 84, 3), jnp.float32))
    assert emb.shape == (2, 640)


def _reference(variables, x, batch_statistics: bool):
    """The same network written out with lax.conv, explicit BatchNorm and reduce_window pooling."""
    params, stats = variables["params"], variables["batch_stats"]

    def conv(h, kernel):
        return jax.lax.conv_general_dilated(h, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def leaky(h):
        return jnp.where(h > 0, h, 0.1 * h)

    for i in range(len(TINY)):
        p, st = params[f"block{i}"], stats[f"block{i}"]

        def bn(h, name):
            mean, var = (h.mean((0, 1, 2)), h.var((0, 1, 2))) if batch_statistics else (st[name]["mean"], st[name]["var"])
            return (h - mean) / jnp.sqrt(var + 1e-5) * p[name]["scale"] + p[name]["bias"]

        shortcut = bn(conv(x, p["conv_shortcut"]["kernel"]), "norm_shortcut")
        h = x
        for j in range(3):
            h = bn(conv(h, p[f"conv{j}"]["kernel"]), f"norm{j}")
            h = leaky(h) if j < 2 else h
        x = jax.lax.reduce_window(leaky(h + shortcut), -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    return x.mean((1, 2)) @ params["head"]["kernel"] + params["head"]["bias"]


@pytest.fixture(scope="module")
def reference(tiny):
    """(input, reference outputs with running statistics, with batch statistics)."""
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 20, 20, 3))  # 20 -> 10 -> 5 -> 2 -> 1: odd sizes floor
    return x, jax.jit(lambda v, x: (_reference(v, x, False), _reference(v, x, True)))(tiny[1], x)


@pytest.mark.parametrize("conv_impl", ["xla", "im2col"])
def test_matches_reference(tiny, reference, conv_impl):
    model, variables = tiny
    model = model.clone(conv_impl=conv_impl)
    x, reference = reference

    @jax.jit
    def run(v, x):
        return model.apply(v, x, train=False), model.apply(v, x, train=True, mutable=["batch_stats"])

    evaluated, (trained, new) = run(variables, x)
    np.testing.assert_allclose(evaluated, reference[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(trained, reference[1], rtol=1e-4, atol=1e-4)
    assert np.abs(reference[0] - reference[1]).max() > 1e-2  # the two modes do differ here
    # Running statistics move 10% of the way to the batch's (flax momentum 0.9 = torch's 0.1).
    p = variables["params"]["block0"]
    s = jax.lax.conv_general_dilated(x, p["conv_shortcut"]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    old = variables["batch_stats"]["block0"]["norm_shortcut"]
    np.testing.assert_allclose(new["batch_stats"]["block0"]["norm_shortcut"]["mean"],
                               0.9 * old["mean"] + 0.1 * s.mean((0, 1, 2)), rtol=1e-4, atol=1e-5)


def test_dropblock_only_in_training_and_keyed(tiny):
    model, variables = tiny
    dropping = model.clone(drop_rate=0.3, block_size=2)
    x = jax.random.normal(jax.random.PRNGKey(3), (4, 32, 32, 3))

    @jax.jit
    def run(key):
        # Evaluation needs no rng.
        return (dropping.apply(variables, x), model.apply(variables, x),
                dropping.apply(variables, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"])[0])

    # rbg keys: threefry's random bits take ~10 s to compile into this graph on a busy 2-core CPU.
    key = lambda seed: jax.random.key(seed, impl="rbg")  # noqa: E731
    eval_drop, eval_clean, a = run(key(4))
    np.testing.assert_array_equal(eval_drop, eval_clean)  # the identity when train=False
    np.testing.assert_array_equal(run(key(4))[2], a)  # same key, same masks
    assert np.abs(run(key(5))[2] - a).max() > 1e-3  # another key, other masks


def test_block_mask_places_blocks():
    seeds = np.zeros((1, 4, 5, 2), np.float32)  # an 6x7 map with b = 3: seeds on 4x5 corners
    seeds[0, 1, 3, 0] = 1
    seeds[0, 3, 0, 1] = 1
    out = np.asarray(block_mask(jnp.asarray(seeds), 3))
    expected = np.zeros((1, 6, 7, 2), np.float32)
    expected[0, 1:4, 3:6, 0] = 1
    expected[0, 3:6, 0:3, 1] = 1
    np.testing.assert_array_equal(out, expected)


def test_drop_block_rate_and_rescale():
    n, h, b, rate = 64, 12, 3, 0.2
    x = jnp.ones((n, h, h, 16))
    dropper = jax.jit(drop_block, static_argnums=(2, 3))
    key = lambda seed: jax.random.key(seed, impl="rbg")  # noqa: E731  (fast to compile, see above)
    out = np.asarray(dropper(key(6), x, rate, b))
    np.testing.assert_array_equal(out, np.asarray(dropper(key(6), x, rate, b)))
    np.testing.assert_allclose(out.sum(), x.size, rtol=1e-5)  # rescaled to keep the sum
    kept = out > 0
    assert len(np.unique(out[kept])) == 1
    # Closed form: a unit is dropped unless none of the seeds whose block covers it fired.
    gamma = rate / b**2 * h * h / (h - b + 1) ** 2
    cover = np.array([sum(1 for i in range(h - b + 1) if i <= r < i + b) for r in range(h)])
    expected = 1 - np.mean((1 - gamma) ** (cover[:, None] * cover[None, :]))
    assert abs((1 - kept.mean()) - expected) < 0.01, (1 - kept.mean(), expected)
    # Blocks larger than the map shrink to it: a 2x2 map is dropped whole or kept whole.
    small = np.asarray(dropper(key(7), jnp.ones((200, 2, 2, 8)), 0.3, 5))
    per_map = (small > 0).reshape(200, 4, 8).mean(axis=1)
    assert set(np.unique(per_map)) <= {0.0, 1.0}
    assert abs((per_map == 0).mean() - 0.3) < 0.05
