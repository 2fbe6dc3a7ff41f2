"""Evaluation protocol: fixed-seed episodes on held-out classes -> mean ± 95% CI; results.json."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Dict, List, Optional

import jax
import numpy as np
from omegaconf import OmegaConf, open_dict

from metarun.algos import PRIMARY_METRIC, build_algo
from metarun.core import make_eval_batch
from metarun.data.sources import TaskSource, episode_shapes
from metarun.metrics import atomic_write_json, mean_ci95

log = logging.getLogger(__name__)


def test_inner_steps(cfg) -> Optional[int]:
    """The test-time inner steps of a gradient-based algorithm; None for the others."""
    return cfg.algo.get("eval_inner_steps")


def _with_inner_steps(cfg, steps: int):
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.algo.eval_inner_steps = steps
    return cfg


class Evaluator:
    """Scores params on `episodes` fixed episodes of one split; compiled once, called many times.

    The same episodes (same keys) are used for every call and every inner-step count, so
    validation curves and step-count comparisons are not blurred by sampling noise.
    """

    def __init__(self, cfg, source: TaskSource, split: str, episodes: int, seed: int, batch: int,
                 report_steps: List[int] = ()):
        self.split, self.episodes, self.seed = split, episodes, seed
        self.metric = PRIMARY_METRIC[source.kind]
        self.data = source.data[split]
        self.batch = max(1, min(batch, episodes))
        sampler = source.sampler(split, episode_shapes(cfg.task)[split])
        main_steps = test_inner_steps(cfg)
        counts = [main_steps] + [s for s in report_steps if main_steps is not None and s != main_steps]
        self.inner_steps = main_steps
        self._batches = {
            steps: make_eval_batch(build_algo(cfg if steps is None else _with_inner_steps(cfg, steps),
                                              source.kind, "eval"), sampler, self.batch)
            for steps in counts}

    def __call__(self, params) -> Dict[Optional[int], Dict[str, float]]:
        """{inner_steps: {mean, ci95, std, n}} of the primary metric."""
        base = jax.random.PRNGKey(self.seed)
        out = {}
        for steps, eval_batch in self._batches.items():
            values = [np.asarray(eval_batch(params, self.data, jax.random.fold_in(base, i))[self.metric])
                      for i in range(math.ceil(self.episodes / self.batch))]
            out[steps] = mean_ci95(np.concatenate(values)[: self.episodes])
        return out


def score(metric: str, value: Optional[float]) -> float:
    """Higher is better, whatever the metric (accuracy up, MSE down); a diverged (None) value is worst."""
    if value is None:
        return float("-inf")
    return -value if metric == "mse" else value


def write_results(run_dir: Path, cfg, evaluator: Evaluator, params, extra: dict) -> dict:
    """Evaluate the test protocol and write results.json atomically; returns the results."""
    start = time.perf_counter()
    by_steps = evaluator(params)
    eval_wall = time.perf_counter() - start
    main = by_steps[evaluator.inner_steps]
    shape = episode_shapes(cfg.task)["test"]
    results = {
        "metric": evaluator.metric, "mean": main["mean"], "ci95": main["ci95"], "std": main["std"],
        "median": main["median"], "nonfinite": main["nonfinite"],
        "episodes": main["n"], "split": evaluator.split, "eval_seed": evaluator.seed,
        "inner_steps": evaluator.inner_steps,
        "by_inner_steps": {str(k): v for k, v in by_steps.items() if k is not None},
        "algo": cfg.algo.name, "dataset": cfg.dataset.name,
        "class_split": cfg.dataset.get("split"),
        "ways": shape.ways, "shots": shape.shots, "queries": shape.queries, "seed": cfg.seed,
        "eval_wall_s": round(eval_wall, 3), "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        **extra,
    }
    atomic_write_json(Path(run_dir) / "results.json", results)
    return results


def format_result(results: dict) -> str:
    scale, unit = (100.0, "%") if results["metric"] == "accuracy" else (1.0, "")
    steps = f", {results['inner_steps']} inner steps" if results.get("inner_steps") is not None else ""
    if results["mean"] is None:
        return (f"test {results['metric']}: diverged on {results['nonfinite']} of {results['episodes']} episodes "
                f"(median {results['median']:.4g}{steps})")
    return (f"test {results['metric']}: {results['mean'] * scale:.2f} ± {results['ci95'] * scale:.2f}{unit} "
            f"(95% CI, {results['episodes']} episodes{steps})")


EPISODE_KEYS = ("ways", "shots", "queries")  # eval.<key> sets the evaluated run's task.test_<key>


def run(cfg, run_dir: Path) -> dict:
    """mode=eval: evaluate the run in `cfg.ckpt` with its own config and this run's eval settings."""
    from metarun.checkpoint import Checkpoints
    from metarun.data.sources import load_task_source
    from metarun.errors import UserError
    from metarun.train import initial_state

    if not cfg.ckpt:
        raise UserError("mode=eval needs ckpt=RUN_DIR (a run directory holding .hydra/ and checkpoints/)")
    ckpt_dir = Path(cfg.ckpt)
    saved = ckpt_dir / ".hydra" / "config.yaml"
    if not saved.exists() or not (ckpt_dir / "checkpoints").exists():
        raise UserError(f"ckpt={ckpt_dir}: expected a run directory with .hydra/config.yaml and checkpoints/")
    run_cfg = OmegaConf.load(saved)
    with open_dict(run_cfg):
        run_cfg.eval = cfg.eval
        for key in EPISODE_KEYS:
            if cfg.eval[key] is not None:
                if cfg.eval[key] < 1:
                    raise UserError(f"eval.{key}={cfg.eval[key]} must be >= 1")
                run_cfg.task[f"test_{key}"] = cfg.eval[key]
        if cfg.dataset.get("local_dir"):
            run_cfg.dataset.local_dir = cfg.dataset.local_dir
    source = load_task_source(run_cfg.dataset, run_cfg.seed)
    like = initial_state(run_cfg, source)[2]
    ckpts = Checkpoints(ckpt_dir / "checkpoints", keep=run_cfg.train.keep_ckpts)
    params, which = None, None
    if cfg.eval.use_best:
        params, which = ckpts.restore_best(like.params), "best"
    if params is None:
        state = ckpts.restore_latest(like)
        if state is None:
            raise UserError(f"ckpt={ckpt_dir}: no checkpoint found under {ckpt_dir / 'checkpoints'}")
        params, which = state.params, "last"
    evaluator = Evaluator(run_cfg, source, cfg.eval.split, cfg.eval.episodes, cfg.eval.seed, cfg.eval.batch,
                          list(cfg.eval.report_steps))
    results = write_results(run_dir, run_cfg, evaluator, params,
                            {"checkpoint": which, "evaluated_run": str(ckpt_dir)})
    ckpts.close()
    log.info(format_result(results))
    print(format_result(results))
    return results
