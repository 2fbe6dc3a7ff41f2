"""LEO (metarun/algos/leo.py): shapes, the penalty terms against closed forms, one latent / weight inner step
against a hand-computed gradient step, the frozen body, the config refusals, and (slow) that training learns."""
from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from omegaconf import OmegaConf

from metarun.algos import leo as L
from metarun.data.tasks import Examples, Task
from metarun.errors import UserError
from metarun.learners import Net


class TinyBody(nn.Module):
    """A learner without a head: flatten, one Dense (the `train` / `step` arguments every learner takes)."""
    dim: int = 6

    @nn.compact
    def __call__(self, x, train=False, step=0):
        return nn.Dense(self.dim)(x.reshape(x.shape[0], -1))


def cross_entropy(logits, labels, mask=None):
    loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
    return loss, {"loss": loss}


def tiny_task(seed, ways=3, shots=2, queries=2, side=4, tasks=None):
    """A random episode in numpy (no per-op dispatch); `tasks`: a stack of that many."""
    rng = np.random.default_rng(seed)
    lead = () if tasks is None else (tasks,)
    labels = lambda k: np.broadcast_to(np.repeat(np.arange(ways), k), lead + (ways * k,))  # noqa: E731
    images = lambda k: rng.normal(size=lead + (ways * k, side, side, 1)).astype(np.float32)  # noqa: E731
    return Task(Examples(images(shots), labels(shots)), Examples(images(queries), labels(queries)))


def tiny_leo(train=True, **changes):
    """Two inner steps of each kind keep the compiled programs small (these tests check wiring, not learning)."""
    settings = L.LEOSettings(**{"latent_dim": 4, "inner_steps": 2, "finetune_steps": 2, **changes})
    return L.leo(Net(TinyBody(), train=False), cross_entropy, 3, settings, train)


def test_encoder_and_decoder_shapes():
    """Shapes by tracing only (jax.eval_shape compiles nothing)."""
    d, latent, ways, shots = 6, 4, 3, 2
    leo = jax.eval_shape(lambda k: L.init_leo_params(k, d, latent), jax.random.PRNGKey(0))
    assert leo["encoder"]["kernel"].shape == (d, latent)
    assert [leo["relation"][f"layer{i}"]["kernel"].shape for i in range(3)] == [(2 * latent, 2 * latent)] * 3
    assert leo["decoder"]["kernel"].shape == (latent, 2 * d)
    features = jax.ShapeDtypeStruct((ways * shots, d), jnp.float32)
    labels = np.repeat(np.arange(ways), shots)
    mean, sigma = jax.eval_shape(lambda p, f: L.encode(p, f, labels, ways), leo, features)
    assert mean.shape == sigma.shape == (ways, latent)
    w_mean, w_sigma = jax.eval_shape(lambda p, z: L.decode(p, z, L.weight_scale(d, ways)), leo, mean)
    assert w_mean.shape == w_sigma.shape == (ways, d)
    # The whole adapt (train build: sampling, dropout): one weight vector per class in the embedding's dimension.
    algo = tiny_leo()
    task = tiny_task(2)
    params, state = jax.eval_shape(algo.init, jax.random.PRNGKey(3), task)
    assert params["rates"]["latent"].shape == (4,) and params["rates"]["finetune"].shape == (6,)
    adapted = jax.eval_shape(algo.adapt, params, state, task.support, jax.random.PRNGKey(4))
    assert adapted["weights"].shape == (3, 6)
    # Fixed rates (algo.learn_rates=false): no rates among the meta-parameters.
    fixed = tiny_leo(learn_rates=False)
    params, state = jax.eval_shape(fixed.init, jax.random.PRNGKey(3), task)
    assert set(params) == {"net", "leo"}
    assert jax.eval_shape(fixed.adapt, params, state, task.support, jax.random.PRNGKey(4))["weights"].shape == (3, 6)


def test_stddev_is_the_authors_rule():
    raw = jnp.array([-1.0, 0.0, 0.5])
    np.testing.assert_allclose(L.stddev(raw), [1e-10, 1e-10, np.exp(0.5) - 1], rtol=1e-6)
    np.testing.assert_allclose(L.stddev(raw, 0.2), [1e-10, 0.2, np.exp(0.5) - 0.8], rtol=1e-6)


def test_kl_matches_the_closed_form_and_a_numerical_integral():
    mean = jnp.array([0.0, 1.0, -0.5, 2.0])
    log_sigma = jnp.array([0.0, 0.0, -0.7, 0.4])
    sigma = jnp.exp(log_sigma)
    per_element = 0.5 * (mean ** 2 + sigma ** 2 - 1.0) - log_sigma
    np.testing.assert_allclose(L.kl_to_standard_normal(mean, sigma), per_element.mean(), rtol=1e-6)
    # KL(N(0,1)||N(0,1)) = 0 and KL(N(1,1)||N(0,1)) = 1/2; the others by integrating q log(q/p) on a grid.
    np.testing.assert_allclose(per_element[:2], [0.0, 0.5], atol=1e-7)
    x = np.linspace(-12, 12, 200001)
    for m, s, value in zip(np.asarray(mean), np.asarray(sigma), np.asarray(per_element)):
        log_q = -0.5 * ((x - m) / s) ** 2 - np.log(s) - 0.5 * np.log(2 * np.pi)
        log_p = -0.5 * x ** 2 - 0.5 * np.log(2 * np.pi)
        np.testing.assert_allclose(np.trapezoid(np.exp(log_q) * (log_q - log_p), x), value, rtol=1e-5)


def test_orthogonality_penalty_on_hand_made_matrices():
    # Orthogonal rows of any length: correlation = identity, no penalty.
    rotation = np.array([[np.cos(0.3), np.sin(0.3), 0.0], [-np.sin(0.3), np.cos(0.3), 0.0]])
    scaled_rows = rotation * np.array([[2.0], [0.5]])
    assert float(L.orthogonality_penalty(jnp.asarray(scaled_rows))) == pytest.approx(0, abs=1e-7)
    # Rows (1, 0) and (1, 1): correlation [[1, 1/sqrt2], [1/sqrt2, 1]] -> mean of (C - I)^2 = 2 * (1/2) / 4.
    assert float(L.orthogonality_penalty(jnp.array([[1.0, 0.0], [1.0, 1.0]]))) == pytest.approx(0.25, rel=1e-6)


def test_l2_penalty_and_gradient_clipping():
    leo = {"a": {"kernel": jnp.array([[1.0, 2.0]])}, "b": {"kernel": jnp.array([3.0])}}
    assert float(L.l2_penalty(leo)) == pytest.approx(0.5 * (1 + 4 + 9))
    clipped = L.clip_gradients({"g": jnp.array([0.3, -0.05, 0.0])}, 0.1, 0.1)["g"]
    # Elementwise to [-0.1, 0.1] -> (0.1, -0.05, 0); then the tensor's norm sqrt(0.0125) down to 0.1.
    np.testing.assert_allclose(clipped, np.array([0.1, -0.05, 0.0]) * 0.1 / np.sqrt(0.0125), rtol=1e-6)


def _softmax(a):
    e = np.exp(a - a.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_one_latent_step_and_one_weight_step_equal_hand_computed_gradient_steps():
    d, latent, ways = 3, 2, 2
    rng = np.random.default_rng(0)
    decoder = rng.normal(size=(latent, 2 * d)).astype(np.float32)
    leo = {"decoder": {"kernel": decoder}}
    x = rng.normal(size=(4, d)).astype(np.float32)
    y = np.array([0, 1, 1, 0])
    z = rng.normal(size=(ways, latent)).astype(np.float32)
    rates = np.array([0.7, 1.3], np.float32)
    # Evaluation decoding (key None): w = z D_mean, logits = x w^T, loss = mean cross-entropy.
    decoder_mean = decoder[:, :d]
    residual = (_softmax(x @ (z @ decoder_mean).T) - np.eye(ways)[y]) / len(y)   # dL/dlogits
    grad_w = residual.T @ x                                                        # dL/dw [ways, d]
    grad_z = grad_w @ decoder_mean.T                                               # dL/dz [ways, L]
    stepped = L.adapt_latents(leo, z, x, y, cross_entropy, rates, 1)
    np.testing.assert_allclose(stepped, z - rates * grad_z, rtol=1e-5, atol=1e-6)
    # One step directly on the weights, with a per-feature rate.
    w = z @ decoder_mean
    w_rates = np.array([0.1, 0.2, 0.3], np.float32)
    np.testing.assert_allclose(L.finetune_weights(w, x, y, cross_entropy, w_rates, 1), w - w_rates * grad_w,
                               rtol=1e-5, atol=1e-6)


def test_evaluation_decodes_means_without_dropout_or_penalties():
    algo = tiny_leo(train=False, inner_steps=1, finetune_steps=1)
    task = tiny_task(0)
    # Random values in init's shapes (no init program to compile): determinism needs no particular weights.
    rng = np.random.default_rng(1)
    params, state = jax.tree.map(lambda a: (0.3 * rng.normal(size=a.shape)).astype(a.dtype),
                                 jax.eval_shape(algo.init, jax.random.PRNGKey(1), task))

    @jax.jit
    def two_keys(p, s):
        first, second = (algo.adapt(p, s, task.support, jax.random.PRNGKey(k)) for k in (2, 3))
        return first["weights"], second["weights"], algo.loss(p, s, first, task.query, jax.random.PRNGKey(4))

    first, second, (loss, metrics) = two_keys(params, state)
    np.testing.assert_array_equal(first, second)
    assert "kl" not in metrics and float(loss) == pytest.approx(float(metrics["loss"]))


@pytest.mark.parametrize("override, message", [
    ({"latent_dim": 0}, "algo.latent_dim=0 must be >= 1"),
    ({"inner_steps": -1}, "algo.inner_steps=-1 must be >= 0"),
    ({"finetune_steps": -2}, "algo.finetune_steps=-2 must be >= 0"),
    ({"dropout": 1.0}, "algo.dropout=1.0 must be in [0, 1)"),
    ({"kl_weight": -0.1}, "algo.kl_weight=-0.1 must be >= 0"),
])
def test_bad_settings_are_refused_in_one_line(override, message):
    a = OmegaConf.merge(OmegaConf.structured(L.LEOConfig), override)
    with pytest.raises(UserError) as error:
        L.settings_of(a, a.inner_steps)
    assert str(error.value) == message and "\n" not in str(error.value)


def test_the_registered_builder_refuses_a_bad_latent_dim_before_any_data():
    from conftest import compose

    from metarun.build import make_algo

    cfg = compose(["algo=leo", "dataset=omniglot", "algo.latent_dim=0"])
    with pytest.raises(UserError, match=r"^algo.latent_dim=0 must be >= 1$"):
        make_algo(cfg, None, "train")  # refused before the family (the data) is needed


@pytest.mark.slow
def test_leo_learns_on_separable_generated_classes_with_the_body_frozen(tmp_path):
    """A short run through the real trainer on generated classes beats the untrained model; the body (a random
    Conv-4, no init.from) comes out of training bitwise unchanged and the penalty terms are logged."""
    from test_learning import BASE, _test_metric, _untrained_metric

    from conftest import compose, initial_and_last_state

    # Many training classes: with 40 (test_learning's) LEO's decoder memorises them and the test accuracy drops.
    # kl_weight 1e-3 (the authors' config.py default) and no dropout: the paper's miniImageNet KL weight (0.756)
    # and dropout make the sampled training episodes so noisy that 300 steps gain only ~3 points here.
    cfg = compose(BASE + ["algo=leo", "dataset.classes=[2000,10,50]", "meta_opt.lr=1e-2", "algo.kl_weight=1e-3",
                          "algo.dropout=0", "train.steps_per_call=100", "train.log_every=100"])
    untrained = _untrained_metric(cfg)
    trained = _test_metric(cfg, tmp_path / "leo", 300)
    print(f"leo: untrained {untrained:.3f}, trained {trained:.3f}")
    # Measured: 0.454 -> 0.556 (a cosine nearest neighbour on the same frozen features: 0.62).
    assert trained >= untrained + 0.05, f"leo did not learn: {untrained:.3f} -> {trained:.3f}"
    start, last = initial_and_last_state(cfg, tmp_path / "leo")
    assert int(last.step) == 300
    for a, b in zip(jax.tree.leaves(start.params["net"]), jax.tree.leaves(last.params["net"])):
        np.testing.assert_array_equal(a, b)
    logged = json.loads((tmp_path / "leo" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train/kl", "train/encoder_penalty", "train/orthogonality", "train/l2"} <= set(logged)
