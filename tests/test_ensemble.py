"""Ensembles at evaluation (issue 15): the average of the members' class probabilities against numpy, two identical
members equal the single model on the same episodes, the top-K best checkpoints a run keeps, and one-line refusals."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import compose, stand_in_family
from metarun.algos.base import MetaAlgorithm
from metarun.build import load_family, make_algo
from metarun.checkpoint import Checkpoints
from metarun.core import make_eval_batch
from metarun.data.tasks import Examples
from metarun.ensemble import RecordingFamily, ensemble
from metarun.errors import UserError

SYNTH = ["dataset=synthetic", "debug=smoke", "dataset.image_size=16", "dataset.classes=[8,6,6]",
         "learner.blocks=2", "train.progress=false"]


def fixed_logits_algo(family) -> MetaAlgorithm:
    """A 'member' whose query logits are its params (built, like every member, against a RecordingFamily)."""
    return MetaAlgorithm(init=None, adapt=lambda p, s, support, k: {},
                         loss=lambda p, s, t, query, k: family.objective(p, query.y, query.mask))


def test_ensemble_is_the_average_of_member_probabilities():
    family = stand_in_family(compose(["dataset=synthetic"]))
    recording = RecordingFamily(family)
    rng = np.random.default_rng(0)
    logits = [jnp.asarray(rng.normal(scale=2.0, size=(6, 3)), jnp.float32) for _ in range(2)]
    query = Examples(jnp.zeros((6, 1)), jnp.array([0, 1, 2, 0, 1, 2]))
    algo = ensemble([fixed_logits_algo(recording)] * 2, family.objective, "accuracy")
    states = algo.adapt(tuple(logits), ({}, {}), None, None)
    _, metrics = algo.loss(tuple(logits), ({}, {}), states, query, None)

    probs = [np.exp(np.asarray(jax.nn.log_softmax(lg))) for lg in logits]
    mean = (probs[0] + probs[1]) / 2
    y = np.asarray(query.y)
    np.testing.assert_allclose(metrics["accuracy"], (mean.argmax(1) == y).mean())
    np.testing.assert_allclose(metrics["nll"], -np.log(mean[np.arange(6), y]).mean(), rtol=1e-5)
    for i in range(2):
        np.testing.assert_allclose(metrics[f"member{i}_accuracy"], (probs[i].argmax(1) == y).mean())
        np.testing.assert_allclose(metrics[f"ensemble_minus_member{i}"],
                                   (mean.argmax(1) == y).mean() - (probs[i].argmax(1) == y).mean(), atol=1e-7)
    # Two identical members: the ensemble is that member.
    _, same = algo.loss((logits[0], logits[0]), ({}, {}), states, query, None)
    _, alone = fixed_logits_algo(family).loss(logits[0], {}, {}, query, None)
    for k in ("accuracy", "nll", "brier", "loss"):
        np.testing.assert_allclose(same[k], alone[k], rtol=1e-6)


@pytest.mark.slow  # compiles a protonet evaluation twice (> 5 s on a shared 2-core machine)
def test_two_identical_members_equal_the_single_model():
    cfg = compose(SYNTH + ["algo=protonet"])
    family = load_family(cfg)
    single = make_algo(cfg, family, "eval")
    member = make_algo(cfg, RecordingFamily(family), "eval")
    params, state = jax.jit(single.init)(jax.random.PRNGKey(3), family.sampler("test")(family.data["test"],
                                                                                     jax.random.PRNGKey(0)))
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(1234), i))(jnp.arange(8))
    alone = make_eval_batch(single, family.sampler("test"), "vmap")(params, state, family.data["test"], keys)
    pair = make_eval_batch(ensemble([member, member], family.objective), family.sampler("test"), "vmap")(
        (params, params), (state, state), family.data["test"], keys)
    for k in ("accuracy", "nll", "brier"):
        np.testing.assert_allclose(pair[k], alone[k], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(pair["member0_accuracy"], alone["accuracy"])
    np.testing.assert_array_equal(pair["member1_accuracy"], alone["accuracy"])


def test_keep_best_keeps_the_top_k_by_validation_score(tmp_path):
    ckpts = Checkpoints(tmp_path / "checkpoints", keep=1, keep_best=2)
    for step, score in ((10, 0.1), (20, 0.5), (30, 0.3), (40, 0.2)):
        ckpts.save_scored({"w": jnp.full((2,), float(step))}, step, score)
    assert ckpts.best_steps() == [(20, 0.5), (30, 0.3)]
    np.testing.assert_array_equal(ckpts.restore_best_step(30, {"w": jnp.zeros(2)})["w"], [30.0, 30.0])
    assert int(ckpts.restore_best({"w": jnp.zeros(2)})["w"][0]) == 20
    ckpts.close()


def _fake_run(run_dir, overrides, seed=7, scores=(0.5,)):
    """A run directory holding its config and best checkpoints of random learner weights (one per score)."""
    from metarun.build import initial_state

    cfg = compose(SYNTH + overrides + [f"train.keep_best={len(scores)}"])
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    family = load_family(cfg)
    state = jax.eval_shape(lambda: initial_state(cfg, family)[2])  # shapes only: nothing to compile
    leaves, tree = jax.tree.flatten(state.params)
    algo_state = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), state.algo_state)
    ckpts = Checkpoints(run_dir / "checkpoints", keep=1, keep_best=len(scores))
    for i, score in enumerate(scores):
        rng = np.random.default_rng(seed + i)
        params = jax.tree.unflatten(tree, [jnp.asarray(rng.normal(size=a.shape), a.dtype) for a in leaves])
        ckpts.save_scored({"params": params, "algo_state": algo_state}, 10 * (i + 1), score)
    ckpts.close()


def test_refusals(tmp_path):
    from metarun.evaluate import run

    _fake_run(tmp_path / "a", ["algo=protonet"])
    _fake_run(tmp_path / "b", ["algo=protonet", "task.test_ways=3"])
    ev = SYNTH + ["mode=eval", "eval.episodes=2"]
    with pytest.raises(UserError, match=r"ckpt: an ensemble scores its members on the same episodes; .*b tests "
                                        r"dataset=synthetic 3-way 1-shot 5-query, .*a dataset=synthetic 5-way") as e:
        run(compose(ev + [f"ckpt=[{tmp_path / 'a'},{tmp_path / 'b'}]"]), tmp_path / "out")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"eval.ensemble_top_k=2: ckpt=.*a keeps 1 best checkpoint\(s\) .*train.keep_best>=2"):
        run(compose(ev + [f"ckpt={tmp_path / 'a'}", "eval.ensemble_top_k=2"]), tmp_path / "out")
    with pytest.raises(UserError, match="eval.ensemble_top_k ensembles the best checkpoints of one run"):
        run(compose(ev + [f"ckpt=[{tmp_path / 'a'},{tmp_path / 'a'}]", "eval.ensemble_top_k=1"]), tmp_path / "out")
    with pytest.raises(UserError, match="expected a run directory"):
        run(compose(ev + [f"ckpt=[{tmp_path / 'a'},{tmp_path / 'none'}]"]), tmp_path / "out")
    with pytest.raises(UserError, match="eval.ensemble_top_k ensembles a finished run's best checkpoints"):
        from metarun.train import check_config
        check_config(compose(SYNTH + ["eval.ensemble_top_k=2"]))


@pytest.mark.slow
def test_ensembles_through_mode_eval(tmp_path):
    """mode=eval: [A, A] equals A; top-1 equals A's best; top-2 names both checkpoints best first; results.json
    reports each member's accuracy on the same episodes and the ensemble's."""
    from metarun.evaluate import run

    _fake_run(tmp_path / "a", ["algo=protonet"], scores=(0.2, 0.6))
    ev = SYNTH + ["mode=eval", "eval.episodes=6", "eval.batch=6"]
    single = run(compose(ev + [f"ckpt={tmp_path / 'a'}"]), tmp_path / "single")
    pair = run(compose(ev + [f"ckpt=[{tmp_path / 'a'},{tmp_path / 'a'}]"]), tmp_path / "pair")
    assert pair["algo"] == "ensemble" and pair["mean"] == pytest.approx(single["mean"], abs=1e-6)
    assert [m["accuracy"] for m in pair["members"]] == pytest.approx([single["mean"]] * 2, abs=1e-6)
    top1 = run(compose(ev + [f"ckpt={tmp_path / 'a'}", "eval.ensemble_top_k=1"]), tmp_path / "top1")
    assert top1["mean"] == single["mean"]
    top2 = run(compose(ev + [f"ckpt={tmp_path / 'a'}", "eval.ensemble_top_k=2"]), tmp_path / "top2")
    saved = json.loads((tmp_path / "top2" / "results.json").read_text())
    assert [(m["step"], m["val_score"]) for m in saved["members"]] == [(20, 0.6), (10, 0.2)]
    assert saved["members"][0]["accuracy"] == pytest.approx(single["mean"], abs=1e-6)  # the best is member 0
    assert top2["metrics"]["member1_accuracy"]["mean"] == saved["members"][1]["accuracy"]
