"""Continual meta-learning (issue 14): OML/ANML's sequential inner loop, the stream tasks, the continual protocol's
runs and class orders, the forgetting metrics, and the one-line refusals."""
from __future__ import annotations

import hashlib
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from omegaconf import OmegaConf

from metarun import continual_metrics as cm
from metarun.algos.oml import oml, reset_rows
from metarun.continual_learn import make_runs, segment_ends, segment_length
from metarun.continual_protocol import check_against_family, class_orders, planned_orders
from metarun.data.tasks import Examples
from metarun.errors import UserError
from metarun.fast_slow import fast_slow_builder
from metarun.families.classification import classification_objective
from metarun.families.stream import StreamFamily, make_trajectory_sampler
from metarun.learners.continual_nets import ANMLNet, OMLNet

NAN = np.nan


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def sequential_sgd_reference(w, b, features, labels, lr):
    """numpy: one SGD step of softmax cross-entropy per example, in the given order."""
    w, b = w.astype(np.float64).copy(), b.astype(np.float64).copy()
    for z, y in zip(features.astype(np.float64), labels):
        g = softmax(z @ w + b)
        g[y] -= 1.0
        w -= lr * np.outer(z, g)
        b -= lr * g
    return w, b


def tiny_oml(train=True, ways=3):
    module = OMLNet(out_dim=6, channels=2, strides=(2, 2), pln_hidden=())
    return module, oml(module, classification_objective, 0.5, "pln", first_order=False, train=train, eval_ways=ways)


def test_sequential_update_sees_each_example_once_in_order():
    module, algo = tiny_oml()
    support = Examples(jax.random.uniform(jax.random.PRNGKey(1), (5, 8, 8, 1)), jnp.array([3, 1, 4, 0, 2]))
    params, _ = algo.init(jax.random.PRNGKey(0), SimpleNamespace(support=support))
    key = jax.random.PRNGKey(7)
    state = algo.adapt(params, {}, support, key)
    assert np.asarray(state["seen"]).tolist() == [3, 1, 4, 0, 2]   # step i learned example i, once each
    # the same head rows reset, then numpy SGD one example at a time in this order (and not in another)
    head = reset_rows(key, params["net"]["pln"]["head"], support.y)
    z = np.asarray(module.apply({"params": params["net"]}, support.x, method="represent"))
    w, b = sequential_sgd_reference(np.asarray(head["kernel"]), np.asarray(head["bias"]), z, [3, 1, 4, 0, 2], 0.5)
    got = state["net"]["pln"]["head"]
    np.testing.assert_allclose(np.asarray(got["kernel"]), w, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got["bias"]), b, atol=1e-5)
    w_rev, _ = sequential_sgd_reference(np.asarray(head["kernel"]), np.asarray(head["bias"]), z[::-1], [2, 0, 4, 1, 3],
                                        0.5)
    assert np.abs(w_rev - w).max() > 1e-3   # the order matters: the check above could tell


def test_meta_test_adaptation_leaves_the_representation_and_neuromodulation_unchanged():
    module = ANMLNet(out_dim=6, channels=2, nm_channels=2)
    support = Examples(jax.random.uniform(jax.random.PRNGKey(1), (6, 28, 28, 1)), jnp.array([0, 0, 1, 1, 2, 2]))
    # training: ANML's inner loop moves the prediction network's convolutions; at meta-test only the PLN learns
    train = oml(module, classification_objective, 0.5, "prediction", train=True, eval_ways=3)
    test = oml(module, classification_objective, 0.5, "prediction", train=False, eval_ways=3)
    params, _ = train.init(jax.random.PRNGKey(0), SimpleNamespace(support=support))
    trained = train.adapt(params, {}, support, jax.random.PRNGKey(2))["net"]
    tested = test.adapt(params, {}, support, jax.random.PRNGKey(2))["net"]
    def moved(a, b):
        return max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    assert moved(trained["rln"], params["net"]["rln"]) > 0 and moved(trained["nm"], params["net"]["nm"]) == 0
    assert moved(tested["rln"], params["net"]["rln"]) == 0 and moved(tested["nm"], params["net"]["nm"]) == 0
    assert tested["pln"]["head"]["kernel"].shape == (18, 3)          # a fresh head for the episode's 3 classes


def test_protocol_runs_match_sequential_sgd_on_a_fresh_linear_head():
    rng = np.random.default_rng(0)
    train, held = rng.normal(size=(4, 2, 5)).astype(np.float32), rng.normal(size=(4, 3, 5)).astype(np.float32)
    orders, keys = np.array([[2, 0, 3]], np.int32), jax.random.PRNGKey(3)[None]
    out = make_runs("sgd", "reset", 3)(jnp.asarray(train), jnp.asarray(held), None, jnp.asarray(orders), keys,
                                       jnp.float32(0.3))
    head = jax.random.normal(keys[0], (5, 3)) * np.sqrt(2.0 / 5)
    w, b = np.asarray(head, np.float64), np.zeros(3)
    for label, c in enumerate(orders[0]):
        w, b = sequential_sgd_reference(w, b, train[c], [label] * 2, 0.3)
        row = [(np.argmax(held[cj] @ w + b, -1) == j).mean() for j, cj in enumerate(orders[0])]
        assert np.asarray(out.rows)[0, label] == pytest.approx(row)     # K=3: a row after every class
        assert float(out.diagonal[0, label]) == pytest.approx(row[label])


def test_rows_are_taken_every_segment_without_padding():
    assert [segment_length(k) for k in (3, 10, 75, 101, 600)] == [1, 1, 5, 101, 30]
    assert segment_ends(75)[:2] == [5, 10] and segment_ends(75)[-1] == 75 and len(segment_ends(600)) == 20


def test_forgetting_and_backward_transfer_on_a_hand_made_matrix():
    a = np.array([[0.9, NAN, NAN],
                  [0.6, 0.8, NAN],
                  [0.5, 0.7, 0.9]])
    assert cm.average_accuracy(a) == pytest.approx(0.7)
    np.testing.assert_allclose(cm.forgetting_per_task(a), [0.4, 0.1])
    assert cm.forgetting(a) == pytest.approx(0.25)
    assert cm.backward_transfer(a) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    # improving on an old class is negative forgetting; a sparse middle row takes the best of what was measured
    b = np.array([[0.4, NAN, NAN], [NAN, 0.8, NAN], [0.6, 0.5, 1.0]])
    np.testing.assert_allclose(cm.forgetting_per_task(b), [-0.2, 0.3])
    assert cm.backward_transfer(b) == pytest.approx((0.2 - 0.3) / 2)
    assert np.isnan(cm.forgetting(np.array([[0.7]])))
    built = cm.accuracy_matrix([0.9, 0.8, 0.9], np.array([[0.9, 0.1, 0.2], [0.5, 0.7, 0.9]]), [1, 3])
    np.testing.assert_array_equal(np.isnan(built), [[False, True, True], [True, False, True], [False, False, False]])
    summary = cm.summarize([a, b])
    assert summary["forgetting"]["mean"] == pytest.approx((0.25 + 0.05) / 2) and summary["accuracy"]["n"] == 2


def test_class_orders_come_from_the_seed_and_k_alone():
    first = class_orders(1234, 50, 659, 5)
    np.testing.assert_array_equal(first, class_orders(1234, 50, 659, 5))
    assert not np.array_equal(first, class_orders(1235, 50, 659, 5))
    assert all(len(set(row)) == 50 and row.min() >= 0 and row.max() < 659 for row in first)
    np.testing.assert_array_equal(class_orders(1234, 50, 659, 3), first[:3])   # more runs extend, not reshuffle


def stream_family(dataset_cfg, **task):
    from metarun.data.omniglot import load
    cfg = OmegaConf.create({"ways": 1, "shots": 20, "queries": 4, "test_ways": 3, "test_shots": 15, "test_queries": 5,
                            "min_shots": None, "family": "stream", **task})
    return StreamFamily("omniglot", load(dataset_cfg), cfg, dataset_cfg)


@pytest.fixture(scope="module")
def omniglot_cfg(fake_omniglot_dir):
    return OmegaConf.create({"name": "omniglot", "local_dir": str(fake_omniglot_dir), "image_size": 28,
                             "split": "lake", "rotations": [0], "cache_dir": None})


def test_protocol_classes_are_evaluation_classes_disjoint_from_meta_training(omniglot_cfg):
    family = stream_family(omniglot_cfg)
    eval_cfg = OmegaConf.create({"seed": 3, "continual_classes": [2, 6], "continual_runs": 4, "continual_val_runs": 2,
                                 "continual_lrs": [1e-3, 1e-2]})
    available = {s: family.num_classes[s] for s in ("test", "val")}
    plan = planned_orders(eval_cfg, available, "test", "val")
    assert {s for s, _ in plan} == {"test", "val"}
    digest = lambda imgs: {hashlib.sha1(np.ascontiguousarray(i).tobytes()).hexdigest() for i in imgs}  # noqa: E731
    train_images = digest(np.asarray(family.data["train"]).reshape((-1, 28, 28, 1)))
    for (split, _), orders in plan.items():
        used = np.asarray(family.data[split])[np.unique(orders)].reshape((-1, 28, 28, 1))
        assert not digest(used) & train_images


def test_trajectories_are_ordered_by_class_and_remember_other_classes():
    images = jnp.broadcast_to(jnp.arange(7, dtype=jnp.uint8)[:, None, None, None, None], (7, 20, 2, 2, 1))
    task = make_trajectory_sampler(ways=2, shots=3, remember=40)(images, jax.random.PRNGKey(0))
    y = np.asarray(task.support.y)
    assert y[:3].tolist() == [y[0]] * 3 and y[3:].tolist() == [y[3]] * 3 and y[0] != y[3]
    np.testing.assert_allclose(np.asarray(task.support.x)[:, 0, 0, 0] * 255, y)        # labels are the classes
    remember = np.asarray(task.query.y)[6:]
    assert set(remember) <= set(range(7)) - set(y) and len(set(remember)) == 5        # every other class, only
    np.testing.assert_array_equal(np.asarray(task.query.y)[:6], y)


def test_refusals_are_one_line(omniglot_cfg):
    errors = []
    with pytest.raises(UserError, match=r"task\.shots=25 .*exceeds the 20 examples per class") as e:
        stream_family(omniglot_cfg, shots=25).sampler("train")
    errors.append(e)
    family = SimpleNamespace(num_classes={"test": 6}, examples_per_class=20, name="omniglot")
    with pytest.raises(UserError, match=r"eval\.continual_classes=\[2, 10\] asks for 10 classes; .* has 6") as e:
        check_against_family(OmegaConf.create({"continual_classes": [2, 10], "continual_shots": 15}), family, "test")
    errors.append(e)
    with pytest.raises(UserError, match=r"continual_shots=20 .* leaves none") as e:
        check_against_family(OmegaConf.create({"continual_classes": [2], "continual_shots": 20}), family, "test")
    errors.append(e)
    with pytest.raises(UserError, match=r"algo=relationnet has no such split.*anml.*maml.*oml.*protonet") as e:
        fast_slow_builder("relationnet")
    errors.append(e)
    assert all("\n" not in str(err.value) for err in errors)


def test_oml_refuses_episodes_and_learners_without_a_split():
    from metarun.algos.base import Collaborators
    from metarun.algos.oml import OMLConfig, build
    from metarun.learners.conv4 import Conv4
    episodes = SimpleNamespace(kind="classification", name="omniglot")
    with pytest.raises(UserError, match=r"algo=oml meta-learns from class streams: use task=stream"):
        build(OMLConfig(), Collaborators(family=episodes, learner=None, learner_cfg=None, phase="train"))
    stream = SimpleNamespace(kind="stream", name="omniglot", head_dim=lambda phase: 5)
    with pytest.raises(UserError, match=r"learner=oml_net or learner=anml_net \(learner=conv4 has no such split\)"):
        build(OMLConfig(), Collaborators(family=stream, learner=lambda out: Conv4(out),
                                         learner_cfg=OmegaConf.create({"name": "conv4"}), phase="train"))


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["oml", "anml"])
def test_smoke_run_writes_the_continual_section_and_curve(algo, fake_omniglot_dir, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path
    run = tmp_path / algo
    proc = subprocess.run([sys.executable, "-m", "metarun", f"algo={algo}", "debug=smoke",
                           f"dataset.local_dir={fake_omniglot_dir}", "train.progress=false", "task.test_ways=2",
                           f"hydra.run.dir={run}"], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((run / "results.json").read_text())
    assert set(results["continual"]["by_classes"]) == {"2", "4"} and (run / "continual_curve.png").exists()


@pytest.mark.slow
def test_a_pretrained_network_runs_the_protocol_as_the_pretraining_baseline(fake_omniglot_dir, tmp_path):
    """The papers' "pretraining" row: algo=pretrain's body, frozen, with a fresh head learned one image at a time
    (mode=eval on the run; it was refused before pretrain mapped to a body). Wiring only: 20 smoke steps on the
    fake Omniglot are not a representation worth scoring."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    run, evaluated = tmp_path / "pretrain", tmp_path / "continual"
    common = [f"dataset.local_dir={fake_omniglot_dir}", "train.progress=false"]
    proc = subprocess.run([sys.executable, "-m", "metarun", "algo=pretrain", "debug=smoke", "dataset.split=lake",
                           *common, f"hydra.run.dir={run}"], cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-m", "metarun", "mode=eval", f"ckpt={run}", "eval.protocol=continual",
                           "eval.continual_classes=[2,4]", "eval.continual_runs=8", "eval.continual_val_runs=2",
                           f"hydra.run.dir={evaluated}"], cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    continual = json.loads((evaluated / "results.json").read_text())["continual"]
    assert set(continual["by_classes"]) == {"2", "4"} and (evaluated / "continual_curve.png").exists()
