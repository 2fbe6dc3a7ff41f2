"""Function regression: tasks generated on the device; metric MSE (lower is better); optional context masks."""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from metarun.errors import UserError
from metarun.families.base import SPLITS, TaskFamily, check_positive
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


@register("family", "regression")
class RegressionFamily(TaskFamily):
    """Tasks from a dataset's `sampler_for(split, shots, queries)`; K (support) and Q (query) points.

    `task.min_shots` < `task.shots` draws the support size per task from U{min_shots..shots} with a
    mask (fixed shapes: one compiled step serves every size).
    """
    kind = "regression"
    metric = "mse"
    higher_is_better = False

    def __init__(self, name: str, sampler_for: Callable, task_cfg, dataset_cfg):
        check_positive("task", task_cfg, ("shots", "queries", "test_shots", "test_queries"))
        super().__init__(name, {s: {} for s in SPLITS})
        self.sampler_for = sampler_for
        self.shots = {"train": task_cfg.shots, "test": task_cfg.get("test_shots") or task_cfg.shots}
        self.queries = {"train": task_cfg.queries, "test": task_cfg.get("test_queries") or task_cfg.queries}
        self.min_shots = task_cfg.get("min_shots")
        if self.min_shots is not None and not 0 <= self.min_shots <= task_cfg.shots:
            raise UserError(f"task.min_shots={self.min_shots} must be between 0 and task.shots={task_cfg.shots}")
        self.out_dim = int(dataset_cfg.get("y_dim", 1))

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
        return {"shots": self.shots[which], "queries": self.queries[which], "min_shots": self.min_shots}

    def check_learner(self, learner_cfg) -> None:
        if learner_cfg.name != "mlp":
            raise UserError(f"dataset={self.name} is a regression dataset and needs learner=mlp task=regression "
                            f"(got learner={learner_cfg.name}); or take the recipe whole: experiment=maml_sinusoid")
