"""Omniglot image completion (dataset=omniglot_completion) for the Neural Processes: the context sampler, the
targets and coordinates, identical test tasks across algorithms, CNP (and on-the-grid ConvCNP) permutation
invariance and padding on 2-D contexts, one-line refusals, and a one-step training smoke on a tiny generated
Omniglot (never the real data)."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import compose
from metarun.data.omniglot_completion import make_completion_sampler, pixel_coordinates, sample_context
from metarun.errors import UserError

TINY = {"convcnp": ["algo.channels=4", "algo.num_layers=1", "algo.image_kernel_size=3", "algo.setconv_size=3"],
        "cnp": ["algo.hidden=8", "algo.encoder_layers=2", "algo.decoder_layers=2"],
        "np": ["algo.hidden=8", "algo.latent_dim=4", "algo.encoder_layers=2", "algo.decoder_layers=2",
               "algo.eval_samples=2", "algo.plot_samples=1"],
        "anp": ["algo.hidden=8", "algo.latent_dim=4", "algo.num_heads=2", "algo.attention_layers=1",
                "algo.encoder_layers=2", "algo.decoder_layers=2", "algo.eval_samples=2", "algo.plot_samples=1"]}


# Fast tests read 8x8 images (64 target pixels, contexts of 5..30): the code paths are the 28x28 ones.
SMALL_IMAGES = ["dataset.image_size=8", "dataset.min_context=5", "dataset.max_context=30"]


def _overrides(fake_dir, algo, small=True):
    return [f"algo={algo}", "dataset=omniglot_completion", f"dataset.local_dir={fake_dir}", "dataset.split=lake",
            *TINY.get(algo, []), *(SMALL_IMAGES if small else [])]


def test_the_context_mask_selects_exactly_the_sampled_number_of_distinct_pixels():
    size, lo, hi = 6, 3, 7
    coords = pixel_coordinates(size)
    image = jnp.arange(size * size, dtype=jnp.float32) / (size * size)  # every pixel tells where it is
    ctx, n = jax.jit(jax.vmap(lambda k: sample_context(k, image, coords, lo, hi)))(
        jax.random.split(jax.random.PRNGKey(0), 200))
    ctx, n = jax.tree.map(np.asarray, ctx), np.asarray(n)
    np.testing.assert_array_equal(ctx.mask.sum(1), n)
    np.testing.assert_array_equal(ctx.mask, (np.arange(hi)[None] < n[:, None]).astype(np.float32))  # a prefix
    assert n.min() == lo and n.max() == hi  # both ends of U{lo..hi} occur in 200 draws
    index = np.rint(ctx.y[..., 0] * size * size).astype(int)  # which pixel each slot holds
    for i in range(len(n)):
        assert len(set(index[i].tolist())) == hi  # distinct pixels, padding slots included
    np.testing.assert_allclose(ctx.x, np.asarray(coords)[index], atol=1e-6)  # y is the image at x


def test_targets_are_the_whole_image_and_coordinates_span_the_square():
    size = 5
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, size * size)), jnp.uint8)
    task = jax.jit(make_completion_sampler(size, 2, 4))({"images": images}, jax.random.PRNGKey(1))
    axis = np.linspace(-1.0, 1.0, size)
    expected = np.stack(np.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)  # (row, column), row-major
    np.testing.assert_allclose(task.query.x, expected, atol=1e-6)
    assert task.query.x.min() == -1.0 and task.query.x.max() == 1.0
    np.testing.assert_array_equal(task.query.mask, np.ones(size * size))
    matches = [np.allclose(task.query.y[:, 0], np.asarray(img) / 255.0) for img in images]
    assert sum(matches) == 1  # the targets are one whole image of the split, scaled to [0, 1]
    assert task.support.x.shape == (4, 2) and task.support.y.shape == (4, 1)


def test_the_test_tasks_are_the_same_for_two_algorithms(fake_omniglot_dir):
    """The evaluator's episode keys (fold_in(PRNGKey(eval.seed), i)) give the same images and contexts whatever
    the algorithm: nothing in the family or the dataset config depends on it."""
    from metarun.build import load_family

    tasks, seeds = [], []
    for algo in ("cnp", "anp"):
        cfg = compose(_overrides(fake_omniglot_dir, algo))
        family = load_family(cfg)
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(cfg.eval.seed), i))(jnp.arange(6))
        tasks.append(jax.jit(jax.vmap(family.sampler("test"), in_axes=(None, 0)))(family.data["test"], keys))
        seeds.append(cfg.eval.seed)
    assert seeds[0] == seeds[1]
    for a, b in zip(jax.tree.leaves(tasks[0]), jax.tree.leaves(tasks[1])):
        np.testing.assert_array_equal(a, b)
    assert np.unique(np.asarray(tasks[0].support.mask.sum(1))).size > 1  # the context sizes do vary


def _loss_fn(fake_dir, algo):
    """(a test task, jitted support -> the training loss of an untrained model on the task's query)."""
    from metarun.build import load_family, make_algo

    cfg = compose(_overrides(fake_dir, algo))
    family = load_family(cfg)
    alg = make_algo(cfg, family, "train")
    task = jax.jit(family.sampler("test"))(family.data["test"], jax.random.PRNGKey(5))
    params, state = jax.jit(alg.init)(jax.random.PRNGKey(0), task)  # jitted: op-by-op flax init is slower
    loss = jax.jit(lambda s: alg.loss(params, state, alg.adapt(params, state, s, None), task.query,
                                      jax.random.PRNGKey(2))[0])
    return task, loss


@pytest.fixture(scope="module")
def cnp_loss(fake_omniglot_dir):
    return _loss_fn(fake_omniglot_dir, "cnp")


def test_cnp_prediction_ignores_the_order_of_a_2d_context(cnp_loss):
    task, loss = cnp_loss
    support = task.support._replace(mask=(jnp.arange(30) < 17).astype(jnp.float32))
    order = np.r_[np.random.default_rng(0).permutation(17), np.arange(17, 30)]
    base = float(loss(support))
    np.testing.assert_allclose(float(loss(jax.tree.map(lambda a: a[order], support))), base, rtol=1e-5)
    assert abs(float(loss(support._replace(mask=(jnp.arange(30) < 3).astype(jnp.float32)))) - base) > 1e-4


def _assert_padding_is_ignored(task, loss):
    support = task.support._replace(mask=(jnp.arange(30) < 12).astype(jnp.float32))
    junk = support._replace(x=support.x.at[12:].set(1e3), y=support.y.at[12:].set(jnp.nan))
    np.testing.assert_allclose(float(loss(junk)), float(loss(support)), rtol=1e-5)


def test_padding_pixels_never_change_the_cnp_prediction(cnp_loss):
    _assert_padding_is_ignored(*cnp_loss)


@pytest.mark.slow  # compiling the attentive model's ELBO takes ~5-10 s on the shared CPU
def test_padding_pixels_never_change_the_anp_prediction(fake_omniglot_dir):
    _assert_padding_is_ignored(*_loss_fn(fake_omniglot_dir, "anp"))


def test_an_algorithm_with_a_learner_is_refused_in_one_line(fake_omniglot_dir):
    from metarun.build import load_family, make_algo

    with pytest.raises(UserError, match=r"is image completion for the Neural Processes") as err:
        cfg = compose(_overrides(fake_omniglot_dir, "maml") + ["learner=mlp"])
        make_algo(cfg, load_family(cfg), "train")
    assert "\n" not in str(err.value)


def test_the_grid_convcnp_patches_are_a_same_convolution():
    """The on-the-grid ConvCNP's im2col (patches + one matmul) equals XLA's "SAME" convolution."""
    from metarun.learners.im2col import windows

    rng = np.random.default_rng(0)
    z, w = rng.normal(size=(7, 6, 3)).astype(np.float32), rng.normal(size=(5, 5, 3, 4)).astype(np.float32)
    ours = windows(jnp.asarray(z), (5, 5)) @ jnp.asarray(w).reshape(75, 4)
    ref = jax.lax.conv_general_dilated(z[None], w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))[0]
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_the_grid_convcnp_ignores_context_order_and_padding_and_uses_the_context():
    from metarun.learners.grid_convcnp import GridConvCNP

    size = 8
    coords = pixel_coordinates(size)
    rng = np.random.default_rng(1)
    pick = rng.permutation(size * size)[:20]
    x, y = coords[pick], jnp.asarray(rng.uniform(size=(20, 1)), jnp.float32)
    mask = (jnp.arange(20) < 12).astype(jnp.float32)
    model = GridConvCNP(image_size=size, channels=4, num_layers=1, kernel_size=3, setconv_size=3)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), x, y, mask, coords)
    predict = jax.jit(lambda x_, y_, m_: model.apply(params, x_, y_, m_, coords).loc)
    base = predict(x, y, mask)
    order = np.r_[rng.permutation(12), np.arange(12, 20)]
    np.testing.assert_allclose(predict(x[order], y[order], mask[order]), base, atol=1e-5)
    np.testing.assert_allclose(predict(x.at[12:].set(0.3), y.at[12:].set(jnp.nan), mask), base, atol=1e-5)
    assert float(jnp.abs(predict(x, y, (jnp.arange(20) < 3).astype(jnp.float32)) - base).max()) > 1e-4


def test_a_context_larger_than_the_image_is_one_line(fake_omniglot_dir):
    from metarun.build import load_family

    with pytest.raises(UserError, match=r"dataset\.max_context=900 must be between 1 and the 784 pixels") as err:
        load_family(compose(_overrides(fake_omniglot_dir, "cnp", small=False) + ["dataset.max_context=900"]))
    assert "\n" not in str(err.value)


@pytest.mark.slow
# anp and convcnp on 8x8 images: anp's 28x28 ELBO compiles for ~30 s on the shared CPU
@pytest.mark.parametrize("algo, small", [("cnp", False), ("anp", True), ("convcnp", True)])
def test_one_training_step_writes_results_and_the_completion_grid(fake_omniglot_dir, tmp_path, algo, small):
    from metarun.train import run

    run(compose(_overrides(fake_omniglot_dir, algo, small=small) + [
        "train.steps=1", "train.steps_per_call=1", "train.meta_batch=2", "train.val_every=0", "train.log_every=1",
        "train.ckpt_every=1", "train.progress=false", "eval.episodes=4", "eval.batch=4"]), tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["metric"] == "log_likelihood" and results["higher_is_better"] is True
    assert np.isfinite(results["mean"]) and "mse" in results["metrics"]
    expected = (30, 64, 5, 8) if small else (200, 784, 10, 28)
    assert (results["shots"], results["queries"], results["min_shots"], results["image_size"]) == expected
    assert not any(k.startswith("_") for k in results["metrics"])
    assert results["plots"] == ["predictions.png"] and (tmp_path / "predictions.png").stat().st_size > 5_000
