"""The sinusoid out-of-range test (DKT paper): eval.x_range moves the test split's inputs and nothing else."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from conftest import compose
from metarun.errors import UserError

BASE = ["experiment=dkt_sinusoid", "task.shots=5", "task.queries=5"]


def _family(extra=()):
    from metarun.build import load_family

    return load_family(compose(BASE + list(extra)))


def _draw(family, split, n=64):
    sample = jax.jit(jax.vmap(family.sampler(split), in_axes=(None, 0)))
    return sample({}, jax.random.split(jax.random.PRNGKey(7), n))


def test_test_inputs_lie_in_the_range_and_training_tasks_do_not_change():
    moved, plain = _family(["eval.x_range=[5,10]"]), _family()
    test = _draw(moved, "test")
    x = np.concatenate([np.asarray(test.support.x).ravel(), np.asarray(test.query.x).ravel()])
    assert x.min() >= 5.0 and x.max() <= 10.0 and x.max() - x.min() > 4.5  # the whole range, support and query
    # y = A sin(x - phase) with A <= 5 still holds there (the functions are the same family).
    assert np.abs(np.asarray(test.query.y)).max() <= 5.0
    for split in ("train", "val"):  # bitwise the same tasks as without the override
        a, b = _draw(moved, split), _draw(plain, split)
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    x_in = np.asarray(_draw(plain, "test").query.x)
    assert x_in.min() >= -5.0 and x_in.max() <= 5.0
    assert moved.describe("test")["x_range"] == [5.0, 10.0]
    assert moved.describe("train")["x_range"] == plain.describe("test")["x_range"] == [-5.0, 5.0]


def test_dataset_key_and_eval_key_agree():
    a = _draw(_family(["dataset.test_x_range=[-5,10]"]), "test")
    b = _draw(_family(["eval.x_range=[-5,10]"]), "test")
    np.testing.assert_array_equal(np.asarray(a.query.x), np.asarray(b.query.x))


@pytest.mark.parametrize("override, message", [
    ("eval.x_range=[10,5]", r"dataset.test_x_range=\[10.0, 5.0\] must be \[low, high\] with low < high"),
    ("eval.x_range=[5]", r"dataset.test_x_range=\[5.0\] must be \[low, high\] \(two numbers\)"),
    ("dataset.x_range=[1,1]", r"dataset.x_range=\[1.0, 1.0\] must be \[low, high\] with low < high"),
])
def test_bad_ranges_get_one_line(override, message):
    with pytest.raises(UserError, match=message):
        _family([override])


def test_a_dataset_without_an_input_range_refuses_eval_x_range_before_loading():
    from metarun.build import load_family

    cfg = compose(["eval.x_range=[5,10]", "dataset.local_dir=/nonexistent"])  # omniglot: nothing is read
    with pytest.raises(UserError, match=r"eval.x_range=\[5.0, 10.0\]: dataset=omniglot has no test input range"):
        load_family(cfg)
