"""Evaluation protocol: fixed-seed episodes on held-out classes -> mean ± 95% CI; results.json; mode=eval."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from metarun.build import make_algo
from metarun.continual_protocol import check_continual_config, resolve_protocol, run_continual
from metarun.core import make_eval_batch
from metarun.errors import UserError
from metarun.families import TaskFamily
from metarun.fast_slow import fast_slow_builder
from metarun.metrics import atomic_write_json

log = logging.getLogger(__name__)

EPISODE_KEYS = ("ways", "shots", "queries")  # eval.<key> sets the evaluated run's task.test_<key>


class Evaluator:
    """Scores (params, algo_state) on `episodes` fixed episodes of one split; compiled once, called many times.

    Episode i is sampled from fold_in(PRNGKey(seed), i): the same episodes for every call, every
    inner-step count and every `batch` (episodes per device call), so validation curves and
    step-count comparisons are not blurred by sampling noise.
    """

    def __init__(self, cfg, family: TaskFamily, split: str, episodes: int, seed: int, batch: int,
                 report_steps: List[int] = (), algo_for: Optional[Callable] = None):
        """algo_for: `(inner_steps or None) -> MetaAlgorithm` to score (default: cfg's algorithm, eval build);
        an ensemble passes its own (metarun.ensemble)."""
        self.family, self.split, self.episodes, self.seed = family, split, episodes, seed
        self.metric = family.metric
        self.data = family.data[split]
        self.batch = max(1, min(batch, episodes))
        sampler = family.sampler(split)
        main_steps = cfg.algo.get("eval_inner_steps")
        counts = [main_steps] + [s for s in report_steps if main_steps is not None and s != main_steps]
        self.inner_steps = main_steps
        algo_for = algo_for or (lambda steps: make_algo(cfg, family, "eval", steps))
        self.algo_info = algo_for(None).info
        self._batches = {
            steps: make_eval_batch(algo_for(None if steps == main_steps else steps), sampler,
                                   cfg.train.task_batching, cfg.train.task_chunk)
            for steps in counts}

    def per_task(self, params, algo_state, steps=None) -> Dict[str, np.ndarray]:
        """{metric: [episodes]} for the episodes of this protocol."""
        eval_batch = self._batches[self.inner_steps if steps is None else steps]
        n_calls = math.ceil(self.episodes / self.batch)
        base = jax.random.PRNGKey(self.seed)
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(n_calls * self.batch))
        parts = [jax.device_get(eval_batch(params, algo_state, self.data, keys[i * self.batch:(i + 1) * self.batch]))
                 for i in range(n_calls)]
        return {k: np.concatenate([np.asarray(p[k]) for p in parts])[: self.episodes] for k in parts[0]}

    def evaluate(self, params, algo_state):
        """({inner_steps: the family's summary}, {inner_steps: per-task metrics}) — the per-task metrics
        too, so the family's plots read the very episodes that the summary does."""
        per_task = {steps: self.per_task(params, algo_state, steps) for steps in self._batches}
        return {steps: self.family.summarize(v) for steps, v in per_task.items()}, per_task

    def __call__(self, params, algo_state) -> Dict[Optional[int], dict]:
        """{inner_steps: the family's summary (mean, ci95, std, median, n, nonfinite, metrics)}."""
        return self.evaluate(params, algo_state)[0]


def plotted_inner_steps(family, main_steps, per_task) -> Optional[int]:
    """Which evaluation the family's figures draw: the main one, or — for a family whose figures show every
    adaptation stage (`plots_all_stages`, e.g. navigation2d's trajectories after 0..n steps) — the one with
    the most inner steps among eval.report_steps."""
    counted = [s for s in per_task if s is not None]
    if getattr(family, "plots_all_stages", False) and counted:
        return max(counted)
    return main_steps


def write_results(run_dir: Path, cfg, evaluator: Evaluator, params, algo_state, extra: dict) -> dict:
    """Evaluate the test protocol and write results.json atomically (strict JSON); returns the results."""
    start = time.perf_counter()
    by_steps, per_task = evaluator.evaluate(params, algo_state)
    eval_wall = time.perf_counter() - start
    main = by_steps[evaluator.inner_steps]
    family = evaluator.family
    plots, plot_error = [], None
    try:
        plots = family.plots(run_dir, per_task[plotted_inner_steps(family, evaluator.inner_steps, per_task)])
    except Exception as e:  # a figure must not cost the run its results.json; the error is recorded there
        log.warning("plots failed: %s", e)
        plot_error = f"{type(e).__name__}: {e}"
    results = {
        "metric": evaluator.metric, "higher_is_better": family.higher_is_better,
        "mean": main["mean"], "ci95": main["ci95"], "std": main["std"], "median": main["median"],
        "nonfinite": main["nonfinite"], "episodes": main["n"], "metrics": main["metrics"],
        "score": family.score(main["mean"]),
        "split": evaluator.split, "eval_seed": evaluator.seed, "inner_steps": evaluator.inner_steps,
        "by_inner_steps": {str(k): {kk: vv for kk, vv in v.items() if kk != "metrics"}
                           for k, v in by_steps.items() if k is not None},
        "transductive": bool(cfg.eval.get("transductive", True)),
        "algo": cfg.algo.name, "algo_config": evaluator.algo_info, "learner": cfg.learner.name,
        "dataset": cfg.dataset.name, "task_family": family.kind, **family.describe(evaluator.split),
        "seed": cfg.seed, "eval_wall_s": round(eval_wall, 3), "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind), "plots": plots,
        **({"plot_error": plot_error} if plot_error else {}),
        **extra,
    }
    if resolve_protocol(cfg.eval, family) == "continual":  # OML/ANML's protocol (stream families, or asked for)
        results["continual"] = run_continual(cfg, family, params, algo_state, run_dir)
        results["plots"] = plots + results["continual"]["plots"]
    atomic_write_json(Path(run_dir) / "results.json", results)
    return results


def format_result(results: dict) -> str:
    scale, unit = (100.0, "%") if results["metric"] == "accuracy" else (1.0, "")
    steps = f", {results['inner_steps']} inner steps" if results.get("inner_steps") is not None else ""
    if results["mean"] is None:
        median = "n/a" if results.get("median") is None else f"{results['median']:.4g}"
        return (f"test {results['metric']}: diverged on {results['nonfinite']} of {results['episodes']} episodes "
                f"(median {median}{steps})")
    return (f"test {results['metric']}: {results['mean'] * scale:.2f} ± {results['ci95'] * scale:.2f}{unit} "
            f"(95% CI, {results['episodes']} episodes{steps})")


def check_eval_config(cfg) -> None:
    if cfg.eval.episodes < 1:
        raise UserError(f"eval.episodes={cfg.eval.episodes} must be >= 1")
    if cfg.eval.batch < 1:
        raise UserError(f"eval.batch={cfg.eval.batch} must be >= 1")
    if cfg.eval.split not in ("train", "val", "test"):
        raise UserError(f"eval.split={cfg.eval.split} is unknown; expected one of: train, val, test")
    if any(s < 0 for s in cfg.eval.report_steps):
        raise UserError(f"eval.report_steps={list(cfg.eval.report_steps)}: inner-step counts must be >= 0")
    check_continual_config(cfg.eval)
    if cfg.eval.get("protocol") == "continual" and getattr(cfg.mode, "value", cfg.mode) == "train":
        fast_slow_builder(cfg.algo.name)  # an algorithm without a fast/slow split is refused before data loads


def run(cfg, run_dir: Path) -> dict:
    """mode=eval: evaluate the run in `cfg.ckpt` with its own config and this run's eval settings — or, with
    `ckpt=[A,B,...]` or `eval.ensemble_top_k=K`, the ensemble of those members (metarun.ensemble); with
    `algo=finetune|finetune_cosine|finetune_all`, that evaluation-time algorithm on each run's body."""
    from metarun.members import load_members

    check_eval_config(cfg)
    members = load_members(cfg)
    if len(members) > 1:
        from metarun.ensemble import write_ensemble_results
        results = write_ensemble_results(run_dir, cfg, members)
    else:
        m = members[0]
        evaluator = Evaluator(m.cfg, m.family, cfg.eval.split, cfg.eval.episodes, cfg.eval.seed, cfg.eval.batch,
                              list(cfg.eval.report_steps))
        extra = {"checkpoint": m.checkpoint, "evaluated_run": m.run}
        if m.cfg.algo.name != m.run_algo:
            extra["evaluated_run_algo"] = m.run_algo
        results = write_results(run_dir, m.cfg, evaluator, m.params, m.algo_state, extra)
    log.info(format_result(results))
    return results
