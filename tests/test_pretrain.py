"""algo=pretrain (issue 15): labelled single images from every training class (not episodes), the minibatch
loss and gradient against a direct computation, the few-shot eval builds, and one-line refusals."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import compose
from metarun.algos.base import meta_step
from metarun.algos.heads import head_logits
from metarun.build import initial_state, load_family, make_algo
from metarun.core import task_mapper
from metarun.data.tasks import sample_batch
from metarun.errors import UserError
from metarun.learners import Net, build_learner

SYNTH = ["dataset=synthetic", "debug=smoke", "dataset.image_size=8", "dataset.classes=[8,6,6]", "learner.blocks=2",
         "train.progress=false"]


def test_training_split_yields_labelled_images_of_every_class():
    family = load_family(compose(SYNTH + ["algo=pretrain"]))
    images = np.asarray(family.data["train"])
    sampler = family.sampler("train")
    key = jax.random.PRNGKey(0)
    task = sampler(family.data["train"], key)
    assert task.support.x.shape[0] == 0 and task.query.x.shape == (1, 8, 8, 1)
    # Exactly images[label, example] / 255 of the class index in the split, drawn from the key's two halves.
    class_key, example_key = jax.random.split(key)
    label = int(jax.random.randint(class_key, (1,), 0, 8)[0])
    example = int(jax.random.randint(example_key, (1,), 0, images.shape[1])[0])
    assert int(task.query.y[0]) == label
    np.testing.assert_array_equal(task.query.x[0], images[label, example].astype(np.float32) / 255.0)
    # A minibatch of 2000 covers the 8 classes about uniformly (each 1/8: within 5 binomial s.d.).
    draw = jax.jit(lambda data, k: sample_batch(sampler, data, k, 2000).query.y)
    labels = np.asarray(draw(family.data["train"], key)).reshape(-1)
    counts = np.bincount(labels, minlength=8)
    assert np.all(np.abs(counts - 250) < 5 * np.sqrt(2000 * 1 / 8 * 7 / 8))
    # Validation and test stay episodes; other algorithms keep episodes for training too.
    assert family.sampler("val")(family.data["val"], key).support.x.shape[0] == 5
    assert load_family(compose(SYNTH + ["algo=protonet"])).train_tasks == "episodes"


def test_minibatch_loss_and_gradient_against_a_direct_computation():
    cfg = compose(SYNTH + ["algo=pretrain", "train.meta_batch=6"])
    family = load_family(cfg)
    algo = make_algo(cfg, family, "train")
    tasks = jax.jit(lambda data, k: sample_batch(family.sampler("train"), data, k, 6))(family.data["train"],
                                                                                       jax.random.PRNGKey(1))
    params, algo_state = jax.jit(algo.init)(jax.random.PRNGKey(0), jax.tree.map(lambda a: a[0], tasks))
    step = jax.jit(lambda p, s, t, k: meta_step(algo, p, s, t, k, task_mapper("vmap")))
    grads, _, metrics = step(params, algo_state, tasks, jax.random.PRNGKey(2))
    body = Net(build_learner(cfg.learner, None), train=True)
    x, y = tasks.query.x[:, 0], tasks.query.y[:, 0]  # the meta-batch of single images is one minibatch of 6

    def direct(params):
        logits = body.apply(params["net"], x) @ params["head"]["kernel"] + params["head"]["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    features = np.asarray(jax.jit(body.apply)(params["net"], x))
    logits = features @ np.asarray(params["head"]["kernel"]) + np.asarray(params["head"]["bias"])
    log_p = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
    np.testing.assert_allclose(metrics["loss"], -log_p[np.arange(6), np.asarray(y)].mean(), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, jax.jit(jax.grad(direct))(params))
    assert params["head"]["kernel"].shape[1] == 8  # one output per training class


def test_cosine_head_and_eval_builds():
    cfg = compose(SYNTH + ["algo=pretrain", "algo.head=cosine", "learner.dropout=0.2"])  # init passes dropout keys
    family = load_family(cfg)
    example = family.sampler("train")(family.data["train"], jax.random.PRNGKey(0))
    params = jax.jit(make_algo(cfg, family, "train").init)(jax.random.PRNGKey(0), example)[0]
    assert set(params["head"]) == {"direction", "norm"}
    assert head_logits(params["head"], jnp.ones((2, params["head"]["direction"].shape[0]))).shape == (2, 8)
    assert make_algo(cfg, family, "eval").info["eval_head"] == "cosine"  # validation as trained: Baseline++
    centroid = make_algo(compose(SYNTH + ["algo=pretrain", "algo.eval_head=centroid"]), family, "eval")
    assert centroid.info["eval_head"] == "centroid"


def test_refusals():
    with pytest.raises(UserError, match="algo=pretrain trains on labelled batches of an image classification dataset; "
                                        "dataset=sinusoid feeds the regression family") as e:
        load_family(compose(["algo=pretrain", "dataset=sinusoid", "task=regression", "learner=mlp"]))
    assert "\n" not in str(e.value)
    family = load_family(compose(SYNTH + ["algo=pretrain"]))
    with pytest.raises(UserError, match="algo.eval_head=knn is unknown"):
        make_algo(compose(SYNTH + ["algo=pretrain", "algo.eval_head=knn"]), family, "eval")
    with pytest.raises(UserError, match="algo.head=arc is unknown"):
        make_algo(compose(SYNTH + ["algo=pretrain", "algo.head=arc"]), family, "train")


@pytest.mark.slow
def test_pretrain_run_then_finetune_and_init_from(tmp_path):
    """Through the trainer: a pretrain run; mode=eval with finetune_cosine on it; a protonet run from its body."""
    from metarun.cli import run
    from metarun.init_from import read_best

    small = ["train.steps=4", "train.steps_per_call=2", "train.log_every=2", "train.val_every=2", "train.ckpt_every=2",
             "train.val_episodes=4", "eval.episodes=4", "eval.batch=4"]
    run(compose(SYNTH + small + ["algo=pretrain", "algo.eval_epochs=3", "augment=shift", "regularize=wd"]),
        tmp_path / "pre")
    (tmp_path / "pre" / ".hydra").mkdir()  # a direct call has no Hydra snapshot: give it the run's own config
    (tmp_path / "pre" / ".hydra" / "config.yaml").write_text((tmp_path / "pre" / "run_config.yaml").read_text())
    pre = json.loads((tmp_path / "pre" / "results.json").read_text())
    assert pre["algo_config"]["eval_head"] == "linear" and pre["best_val_step"] is not None
    # The pretrain run's own test is a linear head fine-tuned per episode: mode=eval algo=finetune with the same
    # settings scores the same episodes the same way.
    run(compose(SYNTH + small + ["mode=eval", f"ckpt={tmp_path / 'pre'}", "algo=finetune", "algo.epochs=3"]),
        tmp_path / "ft")
    ft = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert ft["algo"] == "finetune" and ft["evaluated_run_algo"] == "pretrain"
    assert ft["mean"] == pre["mean"]
    run(compose(SYNTH + small + ["algo=protonet", f"init.from={tmp_path / 'pre'}", "train.steps=2",
                                 "train.val_every=0"]), tmp_path / "proto")
    saved, _ = read_best(tmp_path / "pre")
    proto = json.loads((tmp_path / "proto" / "results.json").read_text())
    assert proto["algo_config"]["init_from"] == str(tmp_path / "pre")
    assert set(saved["params"]["net"]) == set(initial_state(compose(SYNTH + ["algo=protonet"]),
                                                            load_family(compose(SYNTH + ["algo=protonet"])))[2].params["net"])
