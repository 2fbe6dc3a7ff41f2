"""ProtoNet, Matching Nets and Relation Nets: each scoring rule against NumPy, training through the real trainer."""
from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import pytest
from omegaconf import OmegaConf

from metarun.algos.base import task_loss
from metarun.algos.matching import class_log_probs, cosine_attention, matchingnet
from metarun.algos.protonet import protonet
from metarun.algos.relation import relation_scores, relationnet
from metarun.build import load_family, make_algo
from metarun.core import init_state, make_train_chunk
from metarun.data.tasks import Examples, Task, sample_batch
from metarun.errors import UserError
from metarun.families.classification import episode_shapes
from metarun.learners import Net
from metarun.learners.conv4 import Conv4
from metarun.learners.relation import RelationEmbedding, RelationModule
from metarun.optim import make_optimizer
from metarun.train import check_config

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
# The paper presets NAME_omniglot_<W>w<S>s (variants such as ..._20w1s_lake30 are tested with their split).
PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*_omniglot_*.yaml")
                 if p.stem.split("_")[0] in ("protonet", "matchingnet", "relationnet")
                 and re.fullmatch(r"\d+w\d+s", p.stem.split("_")[-1]))
# One Conv-4 block on 8x8 (4x4 maps for RelationNet's relation module): these tests check wiring, not depth.
TINY = ["debug=smoke", "dataset=synthetic", "dataset.image_size=8", "dataset.classes=[12,6,6]", "learner.blocks=1",
        "learner.conv_impl=xla",
        "train.progress=false"]


def compose(overrides):
    from conftest import compose as conftest_compose

    return conftest_compose(overrides)


def episode(ways, shots, queries, size, seed=0):
    """Random images; support labels shuffled (not grouped by class) so class bookkeeping is tested."""
    rng = np.random.default_rng(seed)
    ys = rng.permutation(np.repeat(np.arange(ways), shots)).astype(np.int32)
    yq = np.repeat(np.arange(ways), queries).astype(np.int32)
    x = lambda n: jnp.asarray(rng.random((n, size, size, 1)), jnp.float32)  # noqa: E731
    return Task(Examples(x(len(ys)), jnp.asarray(ys)), Examples(x(len(yq)), jnp.asarray(yq)))


def logits_objective(logits, labels, mask=None):
    """Hands the algorithm's logits back as a metric."""
    return jnp.zeros(()), {"logits": logits}


def run_episode(algo, params, algo_state, task):
    """The metrics of one episode, as algos.base.task_loss computes them."""
    task_state = algo.adapt(params, algo_state, task.support, None)
    return algo.loss(params, algo_state, task_state, task.query, None)[1]


def test_protonet_logits_are_minus_squared_distances_to_support_means():
    ways, shots = 3, 2
    task = episode(ways, shots, 4, 14)
    embedding = Conv4(out_dim=None, filters=8, blocks=3)
    algo = protonet(Net(embedding), logits_objective, ways)
    params, algo_state = jax.jit(algo.init)(jax.random.PRNGKey(0), task)
    assert set(params) == {"net"} and algo_state == {}
    logits, zs, zq = jax.jit(lambda p: (run_episode(algo, p, algo_state, task)["logits"],
                                        embedding.apply({"params": p["net"]}, task.support.x),
                                        embedding.apply({"params": p["net"]}, task.query.x)))(params)
    zs, zq = np.asarray(zs, np.float64), np.asarray(zq, np.float64)
    ys = np.asarray(task.support.y)
    protos = np.stack([zs[ys == c].mean(0) for c in range(ways)])
    expected = -((zq[:, None, :] - protos[None]) ** 2).sum(-1)
    assert zs.shape[1] == 8  # 3 pools: 14 -> 7 -> 3 -> 1, so 1x1x8 (a 4th would leave nothing)
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("distance", ["cosine", "l2"])
def test_matchingnet_attention_rows_sum_to_one_and_predict_weighted_one_hot_labels(distance):
    ways, shots = 3, 2
    task = episode(ways, shots, 4, 14, seed=1)
    embedding = Conv4(out_dim=None, filters=8, blocks=3)
    algo = matchingnet(Net(embedding), logits_objective, ways, distance=distance)
    params, algo_state = jax.jit(algo.init)(jax.random.PRNGKey(1), task)
    logits, zs, zq = jax.jit(lambda p: (run_episode(algo, p, algo_state, task)["logits"],
                                        embedding.apply({"params": p["net"]}, task.support.x),
                                        embedding.apply({"params": p["net"]}, task.query.x)))(params)
    zs, zq = np.asarray(zs, np.float64), np.asarray(zq, np.float64)
    if distance == "cosine":
        similarity = (zq / np.linalg.norm(zq, axis=1, keepdims=True)) @ (zs / np.linalg.norm(zs, axis=1, keepdims=True)).T
        got = np.asarray(cosine_attention(jnp.asarray(zq, jnp.float32), jnp.asarray(zs, jnp.float32)))
        np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-6)
    else:
        similarity = -((zq[:, None, :] - zs[None]) ** 2).sum(-1)
        similarity -= similarity.max(1, keepdims=True)
    attention = np.exp(similarity) / np.exp(similarity).sum(1, keepdims=True)
    if distance == "cosine":
        np.testing.assert_allclose(got, attention, rtol=1e-5, atol=1e-6)
    probs = attention @ np.eye(ways)[np.asarray(task.support.y)]
    np.testing.assert_allclose(np.exp(np.asarray(logits)).sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.exp(np.asarray(logits)), probs, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("normalize, learn_scale", [("both", True), ("support", False)])
def test_matchingnet_cosine_variants_against_numpy(normalize, learn_scale):
    """Support-only normalisation = q · s/|s|; a learned scale multiplies the logits, starts at cosine_scale,
    lives in meta_params["log_scale"] and receives a gradient (it changes what the softmax can express)."""
    ways, shots = 3, 2
    task = episode(ways, shots, 4, 14, seed=1)
    embedding = Conv4(out_dim=None, filters=8, blocks=3)
    algo = matchingnet(Net(embedding), logits_objective, ways, normalize=normalize, cosine_scale=5.0,
                       learn_scale=learn_scale)
    params, algo_state = jax.jit(algo.init)(jax.random.PRNGKey(1), task)
    logits, zs, zq = jax.jit(lambda p: (run_episode(algo, p, algo_state, task)["logits"],
                                        embedding.apply({"params": p["net"]}, task.support.x),
                                        embedding.apply({"params": p["net"]}, task.query.x)))(params)
    zs, zq = np.asarray(zs, np.float64), np.asarray(zq, np.float64)
    unit_s = zs / np.linalg.norm(zs, axis=1, keepdims=True)
    q = zq / np.linalg.norm(zq, axis=1, keepdims=True) if normalize == "both" else zq
    similarity = 5.0 * q @ unit_s.T
    attention = np.exp(similarity - similarity.max(1, keepdims=True))
    attention /= attention.sum(1, keepdims=True)
    probs = attention @ np.eye(ways)[np.asarray(task.support.y)]
    np.testing.assert_allclose(np.exp(np.asarray(logits)), probs, rtol=1e-3, atol=1e-5)
    assert ("log_scale" in params) == learn_scale
    if learn_scale:
        assert float(params["log_scale"]) == pytest.approx(np.log(5.0))
        nll = lambda p: -jnp.mean(jnp.take_along_axis(run_episode(algo, p, algo_state, task)["logits"],  # noqa: E731
                                                      task.query.y[:, None], 1))
        grad = jax.grad(nll)(params)
        assert abs(float(grad["log_scale"])) > 1e-6


def test_matchingnet_class_log_probs_stay_finite_when_attention_is_sharp():
    # l2 similarities of distant embeddings: a naive log(softmax @ one_hot) gives log 0 = -inf.
    logits = jnp.array([[0.0, -1e4, -2e4]])
    log_probs = class_log_probs(logits, jax.nn.one_hot(jnp.array([0, 1, 2]), 3))
    assert np.isfinite(np.asarray(log_probs)).all()
    np.testing.assert_allclose(np.asarray(log_probs), [[0.0, -1e4, -2e4]], atol=1e-3)


def test_matchingnet_fce_gives_a_distribution_and_trains_its_lstms():
    ways, shots = 3, 2
    task = episode(ways, shots, 3, 14, seed=2)
    algo = matchingnet(Net(Conv4(out_dim=None, filters=8, blocks=3)), logits_objective, ways, fce=True, fce_steps=2)
    params, algo_state = jax.jit(algo.init)(jax.random.PRNGKey(2), task)
    assert set(params) == {"net", "fce_g", "fce_f"}

    def nll(p):
        logits = run_episode(algo, p, algo_state, task)["logits"]
        return -jnp.take_along_axis(logits, task.query.y[:, None], 1).mean(), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(nll, has_aux=True))(params)
    np.testing.assert_allclose(np.exp(np.asarray(logits)).sum(1), 1.0, rtol=1e-5)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert float(jnp.abs(g).max()) > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"


def test_relationnet_sums_class_maps_scores_in_unit_interval_and_loss_is_mse_to_one_hot():
    ways, shots = 3, 2
    task = episode(ways, shots, 2, 28, seed=3)
    embedding = Net(RelationEmbedding(filters=8))
    relation = Net(RelationModule(filters=8, hidden=8))
    algo = relationnet(embedding, relation, ways)
    params, algo_state = jax.jit(algo.init)(jax.random.PRNGKey(3), task)
    assert set(params) == {"embed", "relation"}

    @jax.jit
    def forward(p):
        task_state = algo.adapt(p, algo_state, task.support, None)
        classes = task_state["classes"]
        return (classes, *algo.loss(p, algo_state, task_state, task.query, None),
                relation_scores(embedding, relation, p, classes, task.query.x),
                embedding.apply(p["embed"], task.support.x), embedding.apply(p["embed"], task.query.x))

    classes, loss, metrics, scores, maps, query_maps = jax.device_get(forward(params))
    assert maps.shape == (ways * shots, 5, 5, 8)  # the paper's 5x5 maps on 28x28 Omniglot
    ys = np.asarray(task.support.y)
    np.testing.assert_allclose(np.asarray(classes), np.stack([maps[ys == c].sum(0) for c in range(ways)]),
                               rtol=1e-5, atol=1e-5)
    # Each (query, class) pair scored by the relation module on [class maps, query maps] along channels.
    pairs = np.stack([np.concatenate([classes[c], query_maps[q]], -1)
                      for q in range(len(task.query.y)) for c in range(ways)])
    reference = np.asarray(jax.jit(relation.apply)(params["relation"], jnp.asarray(pairs)))
    assert scores.shape == (len(task.query.y), ways)
    np.testing.assert_allclose(scores, reference.reshape(len(task.query.y), ways), rtol=1e-5, atol=1e-6)
    assert np.all((scores > 0) & (scores < 1))
    one_hot = np.eye(ways)[np.asarray(task.query.y)]
    mse = ((scores - one_hot) ** 2).mean()
    np.testing.assert_allclose(float(loss), mse, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), mse, rtol=1e-5)
    assert float(metrics["accuracy"]) == pytest.approx((scores.argmax(1) == np.asarray(task.query.y)).mean())


# ProtoNet's turn through the trainer is the CLI test below (10-way training, 5-way test); FCE's
# gradients are checked above (a trainer run of its own would double this file's compile time for it).
@pytest.mark.parametrize("overrides", [["algo=matchingnet"], ["algo=relationnet"]], ids=["matchingnet", "relationnet"])
def test_trains_through_the_trainer_with_finite_loss_and_moving_params(overrides):
    cfg = compose(TINY + overrides)
    family = load_family(cfg)
    sampler, data = family.sampler("train"), family.data["train"]
    algo = make_algo(cfg, family, "train")
    optimizer = make_optimizer(cfg.meta_opt, 3)
    state = init_state(algo, optimizer, sampler, data, cfg.seed)
    before = jax.tree.map(np.array, state.params)
    algo_state, key = jax.tree.map(np.array, state.algo_state), np.array(state.key)  # the chunk donates state
    state, metrics = make_train_chunk(algo, optimizer, sampler, 2, 3)(state, data)
    assert int(state.step) == 3
    assert np.all(np.isfinite(np.asarray(metrics["loss"]))) and not np.asarray(metrics["nonfinite"]).any()
    # Step 0's metrics are the mean over its two episodes (sampled as the trainer samples them) of
    # the algorithm's own episode metrics at the initial params.
    task_key, algo_key = jax.random.split(jax.random.fold_in(key, 0))
    tasks = sample_batch(sampler, data, task_key, 2)
    keys = jax.random.split(algo_key, 2)
    episode_metrics = [jax.jit(lambda p, t, k: task_loss(algo, p, algo_state, t, k)[1])(
        before, jax.tree.map(lambda a: a[i], tasks), keys[i]) for i in range(2)]
    for name in ("loss", "accuracy"):
        expected = np.mean([float(m[name]) for m in episode_metrics])
        assert float(metrics[name][0]) == pytest.approx(expected, rel=1e-4, abs=1e-6), name
    moved = [not np.allclose(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params))]
    assert all(moved), "every parameter should get a gradient"


def test_protonet_trains_10_way_and_tests_5_way_end_to_end(tmp_path):
    from conftest import initial_and_last_state, replay_training
    from metarun.cli import run
    from metarun.evaluate import Evaluator

    cfg = compose(TINY + ["algo=protonet", "task.ways=10", "task.test_ways=5", "train.steps=10",
                          "train.val_every=0", "train.ckpt_every=10", "eval.episodes=10"])
    family = load_family(cfg)
    for phase, ways in (("train", 10), ("eval", 5)):
        task = episode(ways, 1, 1, 8)
        algo = make_algo(cfg, family, phase)
        params, algo_state = algo.init(jax.random.PRNGKey(0), task)
        # one prototype per class of the phase
        assert algo.adapt(params, algo_state, task.support, None)["prototypes"].shape[0] == ways
    run(cfg, tmp_path)

    results = json.loads((tmp_path / "results.json").read_text())
    assert (results["algo"], results["ways"], results["metric"]) == ("protonet", 5, "accuracy")
    assert results["inner_steps"] is None and results["checkpoint"] == "last" and results["episodes"] == 10
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
    start, trained = initial_and_last_state(cfg, tmp_path)
    assert int(trained.step) == 10
    # The checkpoint is the state 10 meta-steps of the core's train chunk make from the start ...
    expected = replay_training(cfg, start, 10)
    for a, b in zip(jax.tree.leaves(trained.params), jax.tree.leaves(expected.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert all(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(start.params), jax.tree.leaves(trained.params)))
    # ... and results.json scores it, 5-way, on the test protocol: above chance (1/5) by more than its
    # 95% CI on the separable synthetic classes.
    summary = Evaluator(cfg, family, "test", 10, cfg.eval.seed, cfg.eval.batch)(trained.params, trained.algo_state)
    assert results["mean"] == pytest.approx(summary[None]["mean"], abs=1e-6)
    assert results["score"] == results["mean"] and results["mean"] - results["ci95"] > 0.2, results

    # mode=eval re-tests the trained run on another episode shape (eval.ways/shots/queries).
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")
    eval_dir = tmp_path / "eval_3w2s"
    score = run(compose(TINY + ["mode=eval", f"ckpt={tmp_path}", "eval.ways=3", "eval.shots=2", "eval.queries=4",
                                "eval.episodes=10"]), eval_dir)
    again = json.loads((eval_dir / "results.json").read_text())
    assert (again["algo"], again["ways"], again["shots"], again["queries"]) == ("protonet", 3, 2, 4)
    assert again["evaluated_run"] == str(tmp_path) and score == again["score"] == again["mean"]
    with pytest.raises(UserError, match=r"eval\.ways sets the test episodes of mode=eval.*task\.test_ways"):
        run(compose(TINY + ["algo=protonet", "eval.ways=3"]), tmp_path / "train_with_eval_ways")


@pytest.mark.parametrize("preset", PRESETS)
def test_every_metric_preset_composes_and_builds(preset):
    from conftest import stand_in_family

    cfg = compose([f"experiment={preset}"])
    check_config(cfg)
    algo, shape = preset.split("_")[0], preset.split("_")[-1]
    ways, shots = (int(v) for v in shape[:-1].split("w"))
    assert (cfg.algo.name, cfg.dataset.name, cfg.train.meta_batch) == (algo, "omniglot", 1)
    test = episode_shapes(cfg.task)["test"]
    assert (test.ways, test.shots) == (ways, shots)
    assert cfg.task.ways == (60 if algo == "protonet" else ways)
    assert cfg.task.shots + cfg.task.queries <= 20 and test.shots + test.queries <= 20  # Omniglot's drawers
    family = stand_in_family(cfg)
    assert (family.ways("train"), family.ways("eval")) == (cfg.task.ways, ways)
    for phase in ("train", "eval"):
        assert make_algo(cfg, family, phase).info["name"] == algo


def test_all_twelve_presets_exist():
    assert len(PRESETS) == 12


@pytest.mark.parametrize("overrides,message", [
    (["algo=protonet", "dataset=sinusoid", "task=regression", "learner=mlp"], "classification"),
    (["algo=relationnet", "dataset=synthetic", "learner=mlp"], "learner=conv4"),
    (["algo=relationnet", "dataset=synthetic", "algo.class_feature=max"], "class_feature"),
    (["algo=matchingnet", "dataset=synthetic", "algo.distance=manhattan"], r"algo\.distance=manhattan is unknown"),
    (["algo=matchingnet", "dataset=synthetic", "algo.normalize=query"], r"algo\.normalize=query is unknown"),
    (["algo=matchingnet", "dataset=synthetic", "algo.cosine_scale=0"], r"algo\.cosine_scale=0\.0 must be > 0"),
    (["algo=matchingnet", "dataset=synthetic", "algo.distance=l2", "algo.learn_scale=true"], "does not use them"),
])
def test_misuse_fails_with_a_user_error(overrides, message):
    cfg = compose(overrides)
    with pytest.raises(UserError, match=message):
        make_algo(cfg, load_family(cfg), "train")
