"""algo=feature_transfer: its training loss is the MSE of one network on each task's pooled points (numpy MLP
reference), its head fine-tuning converges to the least-squares closed form, and its refusals are one line."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import compose, stand_in_family
from metarun.errors import UserError

TINY = ["experiment=feature_transfer_sinusoid", "learner.hidden=[8]", "task.shots=4", "task.queries=3",
        "task.test_shots=4", "task.test_queries=6"]


def _setup(extra=(), phase="train", inner_steps=None):
    from metarun.build import load_family, make_algo

    cfg = compose(TINY + list(extra))
    family = load_family(cfg)  # sinusoids: generated, nothing to load
    algo = make_algo(cfg, family, phase, inner_steps)
    task = family.sampler("test" if phase == "eval" else "train")({}, jax.random.PRNGKey(3))
    params, state = make_algo(cfg, family, "train").init(jax.random.PRNGKey(0), task)
    return algo, params, state, task


def _np_mlp(p, x):
    """The learner (dense0 -> relu -> head) in numpy float64."""
    h = np.maximum(np.asarray(x, np.float64) @ np.asarray(p["dense0"]["kernel"], np.float64)
                   + np.asarray(p["dense0"]["bias"], np.float64), 0.0)
    return h, h @ np.asarray(p["head"]["kernel"], np.float64) + np.asarray(p["head"]["bias"], np.float64)


def test_training_loss_is_the_mse_on_support_and_query_pooled():
    algo, params, state, task = _setup()
    loss, metrics = algo.loss(params, state, algo.adapt(params, state, task.support, None), task.query, None)
    x = np.concatenate([task.support.x, task.query.x])
    y = np.concatenate([task.support.y, task.query.y])
    want = np.mean(np.square(_np_mlp(params["net"], x)[1] - y))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["mse"]), want, rtol=1e-5)
    # Training has no inner loop: the task state holds the meta-parameters themselves.
    assert algo.adapt(params, state, task.support, None)["params"] is params["net"]


def test_head_fine_tuning_converges_to_the_least_squares_head():
    """Gradient descent on a linear head from w0 converges to w0 + pinv(H) (y - H w0) (H: support features with a
    bias column): the minimum-distance least-squares solution. The queries are then scored with it."""
    _, params, state, task = _setup(phase="eval", inner_steps=0)
    h, _ = _np_mlp(params["net"], task.support.x)
    design = np.concatenate([h, np.ones((h.shape[0], 1))], 1)
    # The step that converges fastest: 1 / the largest curvature of the mean squared error, (2/n) H^T H.
    lr = 1.0 / np.linalg.eigvalsh(2.0 / len(design) * design.T @ design).max()
    algo, _, _, _ = _setup(["algo.finetune=head", "algo.optimizer=sgd", f"algo.finetune_lr={lr}"], phase="eval",
                           inner_steps=2000)
    w0 = np.concatenate([np.asarray(params["net"]["head"]["kernel"]), np.asarray(params["net"]["head"]["bias"])[None]])
    w = w0 + np.linalg.pinv(design) @ (np.asarray(task.support.y, np.float64) - design @ w0)
    tuned = jax.jit(algo.adapt)(params, state, task.support, None)["params"]
    np.testing.assert_allclose(np.asarray(tuned["head"]["kernel"]), w[:-1], atol=2e-3)
    np.testing.assert_allclose(np.asarray(tuned["head"]["bias"]), w[-1], atol=2e-3)
    for k in ("kernel", "bias"):  # the body is fixed
        np.testing.assert_array_equal(np.asarray(tuned["dense0"][k]), np.asarray(params["net"]["dense0"][k]))
    hq, _ = _np_mlp(params["net"], task.query.x)
    want = np.mean(np.square(np.concatenate([hq, np.ones((hq.shape[0], 1))], 1) @ w - np.asarray(task.query.y)))
    loss, metrics = algo.loss(params, state, {"params": tuned, "support": task.support}, task.query, None)
    np.testing.assert_allclose(float(metrics["mse"]), want, rtol=5e-3, atol=1e-4)


def test_one_sgd_step_on_all_weights_is_the_gradient_step():
    algo, params, state, task = _setup(["algo.finetune=all", "algo.optimizer=sgd", "algo.finetune_lr=0.1"],
                                       phase="eval", inner_steps=1)

    def support_mse(p):
        return jnp.mean(jnp.square(algo_net(p) - task.support.y))

    from metarun.learners.mlp import MLP
    algo_net = lambda p: MLP(hidden=(8,), out_dim=1).apply({"params": p}, task.support.x)  # noqa: E731
    grads = jax.grad(support_mse)(params["net"])
    want = jax.tree.map(lambda p, g: p - 0.1 * g, params["net"], grads)
    got = algo.adapt(params, state, task.support, None)["params"]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("override, message", [
    (["algo.finetune=last"], "algo.finetune=last is unknown; expected one of: all, head"),
    (["algo.optimizer=rmsprop"], "algo.optimizer=rmsprop is unknown; expected one of: adam, sgd"),
    (["algo.finetune_lr=0"], "algo.finetune_lr=0.0 must be > 0"),
    (["algo.eval_inner_steps=-1"], "algo.eval_inner_steps=-1 must be >= 0"),
])
def test_bad_values_get_one_line(override, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.").replace("[", r"\[")):
        _setup(override)


def test_classification_is_refused_in_one_line():
    from metarun.build import make_algo

    cfg = compose(["algo=feature_transfer", "dataset=synthetic"])
    with pytest.raises(UserError, match="algo=feature_transfer serves regression datasets.*dataset=synthetic is "
                                        "classification"):
        make_algo(cfg, stand_in_family(cfg), "train")
