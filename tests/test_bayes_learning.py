"""The Bayesian algorithms learn: after a short run on generated data each beats its own untrained model
(tests/test_learning.py's pattern), and reports calibration (classification) or a predictive
log-likelihood (DKT regression) in results.json."""
from __future__ import annotations

import json

import pytest
from omegaconf import open_dict

from conftest import compose

# Trains through the real trainer several times (minutes on 2 cores): run in CI's second pass (--runslow).
pytestmark = pytest.mark.slow

# algo -> (extra overrides, train steps, required accuracy gain over the untrained model)
CASES = {
    "dkt": ([], 60, 0.08),
    # BMAML's chaser loss moves the initial particles slowly; 60 steps gain ~0.09 here (seed 0).
    "bmaml": (["algo.particles=2"], 60, 0.05),
    "abml": (["algo.eval_samples=4"], 60, 0.08),
}
BASE = ["dataset=synthetic", "dataset.image_size=8", "dataset.noise=0.3", "dataset.classes=[40,10,10]",
        "learner.filters=8", "learner.blocks=2", "task.ways=5", "task.shots=1", "task.queries=5",
        "train.meta_batch=4", "meta_opt.lr=1e-2", "train.steps_per_call=30", "train.log_every=30", "train.val_every=0",
        "train.ckpt_every=1000", "train.progress=false", "eval.episodes=100", "eval.batch=100", "eval.report_steps=[]"]


def _untrained(cfg):
    from metarun.build import initial_state, load_family
    from metarun.evaluate import Evaluator

    family = load_family(cfg)
    state = initial_state(cfg, family)[2]
    return Evaluator(cfg, family, "test", cfg.eval.episodes, cfg.eval.seed, cfg.eval.batch)(
        state.params, state.algo_state)[cfg.algo.get("eval_inner_steps")]["mean"]


def _trained(cfg, run_dir, steps):
    from metarun.train import run

    with open_dict(cfg):
        cfg.train.steps = steps
    run(cfg, run_dir)
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.parametrize("algo", sorted(CASES))
def test_learns_on_separable_classes_and_reports_calibration(algo, tmp_path):
    extra, steps, gain = CASES[algo]
    cfg = compose(BASE + [f"algo={algo}"] + extra)
    untrained = _untrained(cfg)
    results = _trained(cfg, tmp_path, steps)
    print(f"{algo}: untrained {untrained:.3f}, trained {results['mean']:.3f}, ECE {results['metrics']['ece']}")
    assert results["mean"] >= untrained + gain, f"{algo} did not learn: {untrained:.3f} -> {results['mean']:.3f}"
    assert results["metrics"]["ece"]["mean"] is not None and (tmp_path / "reliability.png").exists()


def test_dkt_regression_lowers_the_mse_and_reports_a_predictive_log_likelihood(tmp_path):
    cfg = compose(["experiment=dkt_sinusoid", "learner.hidden=[32,32]", "train.meta_batch=10",
                   "train.steps_per_call=100", "train.log_every=100", "train.val_every=0", "train.ckpt_every=1000",
                   "train.progress=false", "eval.episodes=200", "eval.batch=100", "meta_opt.lr=1e-2",
                   "algo.kernel=rbf"])
    untrained = _untrained(cfg)
    results = _trained(cfg, tmp_path, 300)
    print(f"DKT sinusoid MSE: untrained {untrained:.3f}, trained {results['mean']:.3f}, "
          f"log-likelihood {results['metrics']['log_likelihood']}")
    assert results["mean"] <= 0.6 * untrained, f"DKT did not learn the sinusoids: {untrained:.3f} -> {results['mean']:.3f}"
    assert results["metrics"]["log_likelihood"]["mean"] is not None


def test_dkt_on_gp_tasks_learns_and_stays_below_the_exact_gp(tmp_path):
    """dataset=gp (EQ-kernel GP functions): DKT's MSE falls below its untrained model's (an RBF GP on random ReLU
    features is already a fair GP: 200 steps gave 0.444 -> 0.379 on seed 0), and its predictive
    log-likelihood per query point lies between the family's trivial N(0, 1)-style baseline and the exact GP
    with the true kernel (the Bayes-optimal predictive: no model may beat it by more than sampling noise)."""
    cfg = compose(["experiment=dkt_sinusoid", "dataset=gp", "learner.hidden=[32,32]", "train.meta_batch=8",
                   "train.steps_per_call=100", "train.log_every=100", "train.val_every=0", "train.ckpt_every=1000",
                   "train.progress=false", "eval.episodes=100", "eval.batch=100", "eval.report_steps=[]",
                   "meta_opt.lr=1e-2", "algo.kernel=rbf"])
    untrained = _untrained(cfg)
    results = _trained(cfg, tmp_path, 200)
    m = {k: v["mean"] for k, v in results["metrics"].items() if isinstance(v, dict)}
    print(f"DKT gp MSE: untrained {untrained:.3f}, trained {results['mean']:.3f}; log-lik {m['log_likelihood']:.3f} "
          f"(trivial {m['trivial_log_likelihood']:.3f}, exact GP {m['exact_gp_log_likelihood']:.3f})")
    assert results["mean"] <= 0.95 * untrained, f"DKT did not learn the GP tasks: {untrained:.3f} -> {results['mean']:.3f}"
    assert m["trivial_log_likelihood"] + 0.2 < m["log_likelihood"] < m["exact_gp_log_likelihood"] + 0.05
    assert (tmp_path / "predictions.png").exists()
