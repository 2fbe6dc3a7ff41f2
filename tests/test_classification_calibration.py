"""Calibration for every classification algorithm: the family's objective returns NLL, Brier and ECE bins,
summarize pools the bins over episodes, plots writes reliability.png, and a real run reports them."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from conftest import compose
from metarun.families.classification import BINS_KEY, classification_objective, ece_with_ci
from metarun.uncertainty import expected_calibration_error


def _episode(seed, q=12, c=4):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(0, 2, (q, c)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, c, q), jnp.int32)
    return logits, labels


def test_objective_reports_nll_brier_and_bins_against_numpy():
    logits, labels = _episode(0)
    loss, m = classification_objective(logits, labels)
    p = np.exp(np.asarray(logits, np.float64))
    p /= p.sum(-1, keepdims=True)
    y = np.asarray(labels)
    np.testing.assert_allclose(float(m["nll"]), -np.log(p[np.arange(len(y)), y]).mean(), rtol=1e-5)
    np.testing.assert_allclose(float(m["brier"]), np.square(p - np.eye(4)[y]).sum(-1).mean(), rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(m["nll"]), rtol=1e-6)
    assert m[BINS_KEY].shape == (3, 15) and float(m[BINS_KEY][0].sum()) == len(y)


def test_summarize_pools_bins_over_episodes_not_mean_of_episode_eces():
    from metarun.families.classification import ClassificationFamily

    episodes = [_episode(s, q=8 + 4 * s) for s in range(3)]  # unequal sizes: pooling != averaging
    metrics = [classification_objective(lg, lb)[1] for lg, lb in episodes]
    per_task = {k: np.stack([np.asarray(m[k]) for m in metrics]) for k in metrics[0]}
    family = ClassificationFamily.__new__(ClassificationFamily)
    family.metric = "accuracy"
    out = family.summarize(per_task)
    probs = jax.nn.softmax(jnp.concatenate([lg for lg, _ in episodes]), -1)
    want = float(expected_calibration_error(probs, jnp.concatenate([lb for _, lb in episodes])))
    np.testing.assert_allclose(out["metrics"]["ece"]["mean"], want, rtol=1e-5)
    assert out["metrics"]["ece"]["ci95"] > 0
    assert {"nll", "brier", "loss"} <= set(out["metrics"]) and BINS_KEY not in out["metrics"]
    # Relation Nets return scores, not probabilities: no bins, no ECE, no plot.
    no_bins = {k: v for k, v in per_task.items() if k not in (BINS_KEY, "nll", "brier")}
    assert "ece" not in family.summarize(no_bins)["metrics"]
    assert family.plots("/nonexistent", no_bins) == []


def test_ece_ci_of_a_diverged_run_is_null():
    bins = np.ones((4, 3, 15))
    bins[1, 0, 0] = np.nan
    assert ece_with_ci(bins)["mean"] is None


def test_a_run_reports_calibration_and_writes_the_reliability_diagram(tmp_path):
    from metarun.train import run

    cfg = compose(["algo=protonet", "dataset=synthetic", "dataset.image_size=8", "dataset.classes=[20,10,10]",
                   "learner.filters=8", "learner.blocks=2", "debug=smoke", "train.steps=5", "train.val_every=0",
                   "train.progress=false", "eval.episodes=20"])
    run(cfg, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    for key in ("ece", "nll", "brier"):
        assert results["metrics"][key]["mean"] is not None and results["metrics"][key]["ci95"] is not None, key
    assert results["plots"] == ["reliability.png"]
    assert (tmp_path / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
