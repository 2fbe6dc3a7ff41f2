"""Function regression: tasks generated on the device; metric MSE (lower is better); optional context masks.

Neural Process additions (issue 11), all optional for a dataset: a dataset may fix its own episode shape
and say which GP drew its tasks (metarun.data.function_datasets.FunctionTasks); `dataset.metric` picks the
primary metric; algorithms that predict a distribution may record `_plot_*` arrays at evaluation, drawn
into predictions.png by `plots`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List

import jax.numpy as jnp
import numpy as np

from metarun.errors import UserError
from metarun.families.base import SPLITS, TaskFamily, check_positive
from metarun.metrics import mean_ci95
from metarun.registry import register


def regression_objective(predictions, targets, mask=None):
    """Mean squared error over the real points (mask 1) of a task; the loss is the MSE."""
    err = jnp.square(predictions - targets).reshape(targets.shape[0], -1).mean(-1)
    if mask is None:
        mse = err.mean()
    else:
        mask = mask.astype(err.dtype)
        mse = (err * mask).sum() / jnp.maximum(mask.sum(), 1.0)
    return mse, {"loss": mse, "mse": mse}


# Primary metrics a regression run may report (`dataset.metric`) -> higher is better. mse comes from the
# family's objective; log_likelihood (per target point) and kl (to the exact GP posterior, per target point)
# from algorithms that predict distributions (the Neural Processes).
METRICS = {"mse": False, "log_likelihood": True, "kl": False}

# Per-task arrays an algorithm may record at evaluation (metrics keys; `_` keeps them out of the summary)
# for predictions.png: the context and the targets, and the predictive on a grid of inputs per task
# (metarun.algos.np_common.plot_record, metarun.algos.prediction_record).
PLOT_KEYS = ("_plot_x_context", "_plot_y_context", "_plot_mask_context", "_plot_x_target", "_plot_y_target",
             "_plot_x_grid", "_plot_mean")
# The tasks themselves (with the targets' mask): the GP reference rows are computed on them.
TASK_KEYS = PLOT_KEYS[:5] + ("_plot_mask_target",)
PLOT_STD = "_plot_std"          # optional [G]: the predictive standard deviation (no band without it: MAML)
PLOT_SAMPLES = "_plot_samples"  # optional [S, G]: sampled functions of a latent model
PLOTTED_TASKS = 4               # the first test episodes (fixed seed: the same tasks for every algorithm)


@register("family", "regression")
class RegressionFamily(TaskFamily):
    """Tasks from a dataset's `sampler_for(split, shots, queries)`; K (support) and Q (query) points.

    `task.min_shots` < `task.shots` draws the support size per task from U{min_shots..shots} with a
    mask (fixed shapes: one compiled step serves every size). A dataset whose loader result has an
    `episode` ({"shots", "queries", "min_shots"}) fixes the shape itself and `task.*` is not read; one with
    `gp_prior` ((kernel_fn, noise_var)) exposes it as `self.gp_prior` (None otherwise).

    The primary metric is `dataset.metric` when the dataset has that key (gp and sawtooth make it the
    algorithm's `algo.metric` in their YAML), else mse: no algorithm-specific branch here or in the trainer.
    """
    kind = "regression"
    metric = "mse"
    higher_is_better = False

    def __init__(self, name: str, sampler_for: Callable, task_cfg, dataset_cfg):
        check_positive("task", task_cfg, ("shots", "queries", "test_shots", "test_queries"))
        super().__init__(name, {s: {} for s in SPLITS})
        self.sampler_for = sampler_for
        episode = getattr(sampler_for, "episode", None)
        if episode is not None:  # the dataset's own protocol (the Neural Process benchmark's sizes)
            self.shots = {"train": episode["shots"], "test": episode["shots"]}
            self.queries = {"train": episode["queries"], "test": episode["queries"]}
            self.min_shots = episode["min_shots"]
        else:
            self.shots = {"train": task_cfg.shots, "test": task_cfg.get("test_shots") or task_cfg.shots}
            self.queries = {"train": task_cfg.queries, "test": task_cfg.get("test_queries") or task_cfg.queries}
            self.min_shots = task_cfg.get("min_shots")
            if self.min_shots is not None and not 0 <= self.min_shots <= task_cfg.shots:
                raise UserError(f"task.min_shots={self.min_shots} must be between 0 and task.shots={task_cfg.shots}")
        self.gp_prior = getattr(sampler_for, "gp_prior", None)
        self.out_dim = int(dataset_cfg.get("y_dim", 1))
        metric = dataset_cfg.get("metric") or "mse"
        if metric not in METRICS:
            raise UserError(f"dataset.metric={metric} is unknown; expected one of: {', '.join(METRICS)}")
        if metric == "kl" and self.gp_prior is None:
            raise UserError(f"dataset.metric=kl needs GP tasks (dataset=gp); dataset={name} has no exact posterior")
        self.metric, self.higher_is_better = metric, METRICS[metric]
        self.uses_learner = bool(dataset_cfg.get("uses_learner", True))

    def objective(self, predictions, targets, mask=None):
        return regression_objective(predictions, targets, mask)

    def head_dim(self, phase: str) -> int:
        return self.out_dim

    def sampler(self, split: str):
        if split not in SPLITS:
            raise UserError(f"split {split!r} is unknown; expected one of: {', '.join(SPLITS)}")
        which = "train" if split == "train" else "test"
        return self.sampler_for(split, self.shots[which], self.queries[which], self.min_shots)

    def describe(self, split: str):
        which = "train" if split == "train" else "test"
        return {"shots": self.shots[which], "queries": self.queries[which], "min_shots": self.min_shots,
                **({"test_regime": self.sampler_for.regimes[split]} if hasattr(self.sampler_for, "regimes") else {}),
                **({"x_range": list(self.sampler_for.x_ranges[split])} if hasattr(self.sampler_for, "x_ranges") else {})}

    def summarize(self, per_task: Dict[str, np.ndarray]):
        if self.metric not in per_task:  # e.g. MAML predicts no variance, hence no log-likelihood
            raise UserError(f"dataset.metric={self.metric}: this algorithm reports only "
                            f"{', '.join(k for k in sorted(per_task) if not k.startswith('_'))} "
                            f"(it predicts no distribution); use dataset.metric=mse")
        out = super().summarize(per_task)
        if self.gp_prior is not None and all(k in per_task for k in TASK_KEYS):
            # The reference rows on the very tasks evaluated (the algorithm recorded them): exact GP, diagonal
            # GP, trivial model; metarun/gp_references.py.
            for name, values in self._references(*(per_task[k] for k in TASK_KEYS)).items():
                stats = mean_ci95(np.asarray(values, np.float64))
                out["metrics"][name] = {"mean": stats["mean"], "ci95": stats["ci95"]}
        return out

    def _references(self, x_ctx, y_ctx, ctx_mask, x_tgt, y_tgt, tgt_mask):
        """metarun.gp_references.reference_rows over the tasks (jitted once per family; validation repeats it)."""
        if getattr(self, "_reference_fn", None) is None:
            import jax

            from metarun.gp_references import reference_rows

            kernel_fn, noise = self.gp_prior
            self._reference_fn = jax.jit(jax.vmap(lambda *task: reference_rows(kernel_fn, noise, *task)))
        return self._reference_fn(*(jnp.asarray(np.asarray(a, np.float32)) for a in
                                    (x_ctx, y_ctx, ctx_mask, x_tgt, y_tgt, tgt_mask)))

    def plots(self, run_dir, per_task: Dict[str, np.ndarray]) -> List[str]:
        """predictions.png: the first PLOTTED_TASKS test tasks with the context, the targets, the predictive
        mean and a ±2σ band when there is a PLOT_STD (and sampled functions of latent models), when the
        algorithm recorded PLOT_KEYS; on GP data also the exact GP posterior of the tasks' own kernel (dashed).
        Algorithms that record nothing (metasgd, anil, ...) get no figure."""
        if not all(k in per_task for k in PLOT_KEYS):
            return []
        from metarun.plots.function_predictions import predictions_figure  # matplotlib only when a plot is drawn

        n = min(PLOTTED_TASKS, len(per_task[PLOT_KEYS[0]]))
        tasks = [{k[len("_plot_"):]: np.asarray(per_task[k][i]) for k in PLOT_KEYS + (PLOT_STD, PLOT_SAMPLES)
                  if k in per_task}
                 for i in range(n)]
        if self.gp_prior is not None:
            from metarun.gaussian_process import posterior

            kernel_fn, noise = self.gp_prior
            for t in tasks:
                mean, cov = posterior(kernel_fn, t["x_context"], t["y_context"], t["mask_context"], t["x_grid"][:, None],
                                      noise)
                t["exact_mean"], t["exact_std"] = np.asarray(mean), np.sqrt(np.maximum(np.diag(np.asarray(cov)), 0.0))
        path = predictions_figure(tasks, Path(run_dir) / "predictions.png", title=f"{self.name} test tasks")
        return [path.name]

    def check_learner(self, learner_cfg) -> None:
        if not self.uses_learner:  # the algorithm builds its own model (dataset.uses_learner, from algo.*)
            return
        if learner_cfg.name != "mlp":
            raise UserError(f"dataset={self.name} is a regression dataset and needs learner=mlp task=regression "
                            f"(got learner={learner_cfg.name}); or take the recipe whole: experiment=maml_sinusoid")
