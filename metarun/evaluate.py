"""Evaluation protocol: fixed-seed episodes on held-out classes -> mean ± 95% CI; results.json; mode=eval."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import OmegaConf, open_dict

from metarun.build import initial_state, load_family, make_algo
from metarun.checkpoint import Checkpoints
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
                 report_steps: List[int] = ()):
        self.family, self.split, self.episodes, self.seed = family, split, episodes, seed
        self.metric = family.metric
        self.data = family.data[split]
        self.batch = max(1, min(batch, episodes))
        sampler = family.sampler(split)
        main_steps = cfg.algo.get("eval_inner_steps")
        counts = [main_steps] + [s for s in report_steps if main_steps is not None and s != main_steps]
        self.inner_steps = main_steps
        self.algo_info = make_algo(cfg, family, "eval").info
        self._batches = {
            steps: make_eval_batch(make_algo(cfg, family, "eval", None if steps == main_steps else steps), sampler,
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


def write_results(run_dir: Path, cfg, evaluator: Evaluator, params, algo_state, extra: dict) -> dict:
    """Evaluate the test protocol and write results.json atomically (strict JSON); returns the results."""
    start = time.perf_counter()
    by_steps, per_task = evaluator.evaluate(params, algo_state)
    eval_wall = time.perf_counter() - start
    main = by_steps[evaluator.inner_steps]
    family = evaluator.family
    plots, plot_error = [], None
    try:
        plots = family.plots(run_dir, per_task[evaluator.inner_steps])
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
    """mode=eval: evaluate the run in `cfg.ckpt` with its own config and this run's eval settings."""
    if not cfg.ckpt:
        raise UserError("mode=eval needs ckpt=RUN_DIR (a run directory holding .hydra/ and checkpoints/)")
    check_eval_config(cfg)
    ckpt_dir = Path(cfg.ckpt)
    saved = ckpt_dir / ".hydra" / "config.yaml"
    if not saved.exists() or not (ckpt_dir / "checkpoints").exists():
        raise UserError(f"ckpt={ckpt_dir}: expected a run directory with .hydra/config.yaml and checkpoints/")
    run_cfg = OmegaConf.load(saved)
    if cfg.eval.get("protocol") == "continual":
        fast_slow_builder(run_cfg.algo.name)  # the evaluated run's algorithm, refused before its data loads
    with open_dict(run_cfg):
        run_cfg.eval = cfg.eval
        for key in EPISODE_KEYS:
            if cfg.eval[key] is not None:
                if cfg.eval[key] < 1:
                    raise UserError(f"eval.{key}={cfg.eval[key]} must be >= 1")
                run_cfg.task[f"test_{key}"] = cfg.eval[key]
        if cfg.dataset.get("local_dir"):
            run_cfg.dataset.local_dir = cfg.dataset.local_dir
    family = load_family(run_cfg)
    like = initial_state(run_cfg, family)[2]
    ckpts = Checkpoints(ckpt_dir / "checkpoints", keep=run_cfg.train.keep_ckpts)
    try:
        restored, which = None, None
        if cfg.eval.use_best:
            restored, which = ckpts.restore_best({"params": like.params, "algo_state": like.algo_state}), "best"
        if restored is None:
            state = ckpts.restore_latest(like)
            if state is None:
                raise UserError(f"ckpt={ckpt_dir}: no checkpoint found under {ckpt_dir / 'checkpoints'}")
            restored, which = {"params": state.params, "algo_state": state.algo_state}, "last"
        evaluator = Evaluator(run_cfg, family, cfg.eval.split, cfg.eval.episodes, cfg.eval.seed, cfg.eval.batch,
                              list(cfg.eval.report_steps))
        results = write_results(run_dir, run_cfg, evaluator, restored["params"], restored["algo_state"],
                                {"checkpoint": which, "evaluated_run": str(ckpt_dir)})
    finally:
        ckpts.close()
    log.info(format_result(results))
    return results
