"""learner.init (kernel initialisation by name, against each scheme's variance formula) and conv4's learner.dropout
(off at evaluation: identical outputs; in training the inverted-dropout mask, deterministic from the key)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import compose, stand_in_family
from metarun.build import make_algo
from metarun.errors import UserError
from metarun.learners import build_learner
from metarun.learners.initializers import kernel_init


def _kernels(overrides, side=8):
    cfg = compose(["dataset=synthetic"] + overrides)
    module = build_learner(cfg.learner, 5)
    params = jax.jit(lambda k: module.init(k, jnp.zeros((1, side, side, 1)), train=False))(jax.random.PRNGKey(0))
    return params["params"]


@pytest.mark.parametrize("scheme,variance", [
    ("lecun", lambda fan_in, fan_out: 1 / fan_in),
    ("xavier", lambda fan_in, fan_out: 2 / (fan_in + fan_out)),
    ("kaiming", lambda fan_in, fan_out: 2 / fan_in),
    ("torch", lambda fan_in, fan_out: 1 / (3 * fan_in)),  # U(+-1/sqrt(fan_in)): PyTorch's Conv2d/Linear default
])
def test_init_variance(scheme, variance):
    kernel = np.asarray(kernel_init(scheme, None)(jax.random.PRNGKey(0), (3, 3, 64, 32)))  # 18432 draws
    fan_in, fan_out = 9 * 64, 9 * 32  # a conv kernel's fans count its receptive field
    np.testing.assert_allclose(kernel.var(), variance(fan_in, fan_out), rtol=0.05)
    assert abs(kernel.mean()) < 4 * np.sqrt(variance(fan_in, fan_out) / kernel.size)
    if scheme == "torch":  # uniform, bounded by 1/sqrt(fan_in) like torch's, and filling that range
        bound = 1 / np.sqrt(fan_in)
        assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.99 * bound


def test_conv4_kernels_follow_learner_init():
    params = _kernels(["learner=conv4", "learner.blocks=2", "learner.init=kaiming"])
    kernel = np.asarray(params["conv1"]["kernel"])  # 3x3x64x64: fan_in 576, 36864 draws
    np.testing.assert_allclose(kernel.var(), 2 / 576, rtol=0.05)
    head = np.asarray(params["head"]["kernel"])  # the head follows the scheme too (fan_in 64*2*2)
    np.testing.assert_allclose(head.var(), 2 / 256, rtol=0.3)  # 1280 draws
    np.testing.assert_array_equal(params["conv1"]["bias"], 0)  # biases keep zeros
    assert kernel_init("default", "the learner's own") == "the learner's own"


def test_orthogonal():
    kernel = np.asarray(_kernels(["learner=conv4", "learner.blocks=2", "learner.init=orthogonal"])["conv1"]["kernel"])
    w = kernel.reshape(-1, 64)  # [fan_in 576, out 64]: orthonormal columns
    np.testing.assert_allclose(w.T @ w, np.eye(64), atol=1e-4)
    with pytest.raises(UserError, match="learner.init=he is unknown; expected one of: default, lecun, xavier"):
        _kernels(["learner=conv4", "learner.init=he"])


@pytest.mark.slow  # compiles two ResNet-12 initialisations (> 5 s on a shared 2-core machine)
def test_resnet12_default_and_xavier():
    # ResNet-12 keeps its reference init by default: Kaiming normal with fan_out (variance 2 / (9 * out)).
    params = _kernels(["learner=resnet12", "learner.widths=[16,64]"], side=8)
    conv = np.asarray(params["block1"]["conv1"]["kernel"])  # 3x3x64x64
    np.testing.assert_allclose(conv.var(), 2 / (9 * 64), rtol=0.05)
    params = _kernels(["learner=resnet12", "learner.widths=[16,64]", "learner.init=xavier"], side=8)
    np.testing.assert_allclose(np.asarray(params["block1"]["conv1"]["kernel"]).var(), 2 / (9 * 64 + 9 * 64), rtol=0.05)


def test_conv4_dropout_off_at_eval_and_a_mask_in_training():
    cfg = compose(["dataset=synthetic", "learner.blocks=1", "learner.batch_norm=none", "learner.filters=16",
                   "learner.dropout=0.5"])
    module = build_learner(cfg.learner, None)
    plain = build_learner(compose(["dataset=synthetic", "learner.blocks=1", "learner.batch_norm=none",
                                   "learner.filters=16"]).learner, None)
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 8, 8, 1))
    variables = jax.jit(lambda k: module.init(k, x, train=False))(jax.random.PRNGKey(0))
    apply = jax.jit(lambda v, x, train, key: module.apply(v, x, train=train, rngs={"dropout": key}),
                    static_argnums=2)
    evaluated = apply(variables, x, False, jax.random.PRNGKey(2))
    np.testing.assert_array_equal(evaluated, jax.jit(lambda v, x: plain.apply(v, x, train=False))(variables, x))
    np.testing.assert_array_equal(evaluated, apply(variables, x, False, jax.random.PRNGKey(3)))  # no key dependence
    trained = np.asarray(apply(variables, x, True, jax.random.PRNGKey(2)))
    np.testing.assert_array_equal(trained, apply(variables, x, True, jax.random.PRNGKey(2)))  # deterministic from the key
    kept = trained != 0
    # Inverted dropout: each unit is dropped (0) or kept and scaled by 1 / (1 - 0.5), the evaluation output otherwise.
    np.testing.assert_allclose(trained[kept], 2.0 * np.asarray(evaluated)[kept], rtol=1e-6)
    live = np.asarray(evaluated) != 0
    dropped = (~kept & live).sum() / live.sum()
    assert abs(dropped - 0.5) < 4 * np.sqrt(0.25 / live.sum())


def test_dropout_needs_an_algorithm_that_passes_keys():
    cfg = compose(["dataset=synthetic", "algo=maml", "learner.dropout=0.1"])
    with pytest.raises(UserError, match=r"learner.dropout=0.1: algo=maml does not pass dropout keys to its learner; "
                                        r"use learner.dropout=0 or one of: pretrain, protonet") as e:
        make_algo(cfg, stand_in_family(cfg), "train")
    assert "\n" not in str(e.value)
    make_algo(cfg, stand_in_family(cfg), "eval")  # evaluation runs without dropout: any algorithm
    ok = compose(["dataset=synthetic", "algo=protonet", "learner.dropout=0.1"])
    make_algo(ok, stand_in_family(ok), "train")
    with pytest.raises(UserError, match=r"learner.dropout=1.0 must be in \[0, 1\)"):
        build_learner(compose(["learner.dropout=1.0"]).learner, None)
