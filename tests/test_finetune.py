"""Fine-tuning baselines (issue 15): Baseline++'s cosine head against numpy, torch's SGD with dampening against
its formula, Closer Look's minibatch epochs, a fitted head on separable features, and the one-line refusals."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import compose, stand_in_family
from metarun.algos.base import task_loss
from metarun.algos.finetune import FitSettings, finetune
from metarun.algos.heads import (default_cosine_scale, epoch_minibatches, head_logits, init_head,
                                 masked_cross_entropy, torch_sgd)
from metarun.build import make_algo
from metarun.data.tasks import Examples, Task
from metarun.errors import UserError
from metarun.learners import Net


@pytest.mark.parametrize("learnable_norm", [True, False])
def test_cosine_head_against_numpy(learnable_norm):
    rng = np.random.default_rng(0)
    f = rng.normal(size=(6, 4)).astype(np.float32)
    head = init_head(jax.random.PRNGKey(1), 4, 3, "cosine", learnable_norm)
    if learnable_norm:
        head["norm"] = jnp.asarray(rng.uniform(0.5, 2.0, size=3), jnp.float32)  # a trained g_c, not |v_c|
    v = np.asarray(head["direction"])
    want = (f / (np.linalg.norm(f, axis=1, keepdims=True) + 1e-5)) @ (v / np.linalg.norm(v, axis=0, keepdims=True))
    if learnable_norm:
        want = want * np.asarray(head["norm"])
    np.testing.assert_allclose(head_logits(head, jnp.asarray(f)), 2.0 * want, rtol=1e-5, atol=1e-6)  # 3 classes: s=2
    np.testing.assert_allclose(head_logits(head, jnp.asarray(f), scale=7.0), 7.0 * want, rtol=1e-5, atol=1e-6)
    assert default_cosine_scale(200) == 2.0 and default_cosine_scale(201) == 10.0
    # The learned norms start at |v_c|: a fresh head's logits are scale * |v_c| * cosine.
    fresh = init_head(jax.random.PRNGKey(1), 4, 3, "cosine")
    np.testing.assert_allclose(fresh["norm"], np.linalg.norm(np.asarray(fresh["direction"]), axis=0), rtol=1e-6)


def test_linear_head_init_is_torch_default():
    head = init_head(jax.random.PRNGKey(0), 100, 50, "linear")
    bound = 1 / np.sqrt(100)
    for leaf in (head["kernel"], head["bias"]):
        assert np.abs(np.asarray(leaf)).max() <= bound
    # U(-b, b) has variance b^2 / 3; 5000 draws: within 10%.
    np.testing.assert_allclose(np.var(np.asarray(head["kernel"])), bound ** 2 / 3, rtol=0.1)


def test_torch_sgd_with_dampening_matches_its_formula():
    lr, momentum, dampening, wd = 0.1, 0.9, 0.9, 0.01
    opt = torch_sgd(lr, momentum, dampening, wd)
    p = jnp.array([1.0, -2.0])
    state = opt.init(p)
    grads = [jnp.array([0.5, 1.0]), jnp.array([-1.0, 0.25]), jnp.array([2.0, 0.0])]
    ref_p, buf = np.array([1.0, -2.0]), None
    for g in grads:
        updates, state = opt.update(g, state, p)
        p = optax.apply_updates(p, updates)
        d = np.asarray(g) + wd * ref_p                    # torch.optim.SGD: weight decay into the gradient,
        buf = d if buf is None else momentum * buf + (1 - dampening) * d  # the first step stores d undamped,
        ref_p = ref_p - lr * buf                          # then p -= lr * buf
        np.testing.assert_allclose(p, ref_p, rtol=1e-6)


def test_epoch_minibatches_are_closer_looks_loop():
    idx, mask = epoch_minibatches(jax.random.PRNGKey(0), 5, 4, 3)
    assert idx.shape == mask.shape == (6, 4)  # ceil(5/4) = 2 steps per epoch
    np.testing.assert_array_equal(mask, np.tile([[1, 1, 1, 1], [1, 0, 0, 0]], (3, 1)))
    idx = np.asarray(idx)
    for e in range(3):
        real = idx[2 * e:2 * e + 2].reshape(-1)[:5]
        assert sorted(real) == list(range(5))  # every example once per epoch
    full, full_mask = epoch_minibatches(jax.random.PRNGKey(0), 5, None, 3)
    assert full.shape == (3, 5) and np.all(np.asarray(full_mask) == 1)
    logits = jnp.array([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]])
    labels = jnp.array([0, 0, 1])
    log_p = np.asarray(jax.nn.log_softmax(logits))
    np.testing.assert_allclose(masked_cross_entropy(logits, labels, jnp.array([1.0, 1.0, 0.0])),
                               -(log_p[0, 0] + log_p[1, 0]) / 2, rtol=1e-6)


class Identity(nn.Module):
    """A 'body' whose features are its input, flattened (a learner in a mode: train and step accepted)."""

    @nn.compact
    def __call__(self, x, train=False, step=0):
        self.param("unused", nn.initializers.zeros, (1,))
        return x.reshape(x.shape[0], -1)


def _separable_task(ways=3, shots=2, queries=4, seed=0):
    rng = np.random.default_rng(seed)
    means = 4.0 * np.eye(ways, 8)
    def draw(n):
        y = np.repeat(np.arange(ways), n)
        return Examples(jnp.asarray(means[y] + 0.3 * rng.normal(size=(len(y), 8)), jnp.float32), jnp.asarray(y))
    return Task(draw(shots), draw(queries))


@pytest.mark.parametrize("head,adapt_all", [("linear", False), ("cosine", False), ("linear", True)])
def test_fitted_head_separates_separable_classes(head, adapt_all):
    objective = stand_in_family(compose(["dataset=synthetic"])).objective
    task = _separable_task()
    # Closer Look's settings (100 epochs): the cosine head's fixed scale 2 and the dampened momentum learn slowly,
    # and 30 epochs leave some initial draws short of separating the classes.
    algo = finetune(Net(Identity(), train=False), objective, 3, FitSettings(), head, adapt_all=adapt_all)
    params, state = algo.init(jax.random.PRNGKey(0), task)
    run = jax.jit(lambda key: task_loss(algo, params, state, task, key)[1])
    metrics = run(jax.random.PRNGKey(5))
    assert float(metrics["accuracy"]) == 1.0  # classes 4 apart with noise 0.3: a fitted head separates them all
    again = run(jax.random.PRNGKey(5))
    np.testing.assert_array_equal(metrics["loss"], again["loss"])  # the head's draw and order come from the key


def test_evaluation_only_refusals():
    cfg = compose(["dataset=synthetic", "algo=finetune"])
    family = stand_in_family(cfg)
    with pytest.raises(UserError, match=r"algo=finetune fine-tunes at evaluation only .*mode=eval ckpt=RUN_DIR algo=finetune") as e:
        make_algo(cfg, family, "train")
    assert "\n" not in str(e.value)
    make_algo(cfg, family, "eval")  # the eval build is fine
    with pytest.raises(UserError, match="algo.epochs=0 must be >= 1"):
        make_algo(compose(["dataset=synthetic", "algo=finetune", "algo.epochs=0"]), family, "eval")
    with pytest.raises(UserError, match="algo.batch_size=2: algo=finetune_all with learner.batch_norm=transductive"):
        make_algo(compose(["dataset=synthetic", "algo=finetune_all", "algo.batch_size=2", "task.shots=5"]),
                  stand_in_family(compose(["dataset=synthetic", "algo=finetune_all", "task.shots=5"])), "eval")
