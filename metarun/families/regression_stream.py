"""Streams of regression functions for continual meta-learning: OML's incremental sine benchmark
(dataset=incremental_sine; metarun.data.incremental_sine).

* train: a trajectory = `task.ways` functions (10) from the meta-training pool, `task.shots` points each
  (mrcl: 40 steps x 32 points = 1280), function after function; the inner loop takes `dataset.step_batch` (32)
  points per SGD step, in order. Query: `task.queries` fresh points of each of the trajectory's functions
  (mrcl's 32): the outer loss after the whole trajectory is the MSE on all of them.
* val / test: the same episode on fresh functions (`task.test_ways`, `test_shots` learned, `test_queries`
  held out per function): the evaluator's episodes score the MSE on every function after the last. The full
  protocol (many runs, MSE per function after each one, forgetting) is `eval.protocol` = continual, this
  family's default (metarun.continual_regression).
Metric: MSE, lower is better.
"""
from __future__ import annotations

from typing import Dict

from metarun.errors import UserError
from metarun.families.base import SPLITS, TaskFamily, check_positive
from metarun.families.regression import regression_objective
from metarun.registry import register


@register("family", "regression_stream")
class RegressionStreamFamily(TaskFamily):
    kind = "regression_stream"
    metric = "mse"
    higher_is_better = False
    protocol = "continual"

    def __init__(self, name: str, source, task_cfg, dataset_cfg):
        check_positive("task", task_cfg, ("ways", "shots", "queries", "test_ways", "test_shots", "test_queries"))
        import jax.numpy as jnp
        super().__init__(name, {"train": {k: jnp.asarray(v) for k, v in source.pool.items()}, "val": {}, "test": {}})
        self.source = source
        self.step_batch = source.step_batch
        self.slots = int(task_cfg.ways)  # one-hot slots of the input: the trajectory's functions
        self.shapes: Dict[str, tuple] = {
            "train": (int(task_cfg.ways), int(task_cfg.shots), int(task_cfg.queries)),
            "test": (int(task_cfg.get("test_ways") or task_cfg.ways), int(task_cfg.get("test_shots") or task_cfg.shots),
                     int(task_cfg.get("test_queries") or task_cfg.queries))}
        functions, shots, _ = self.shapes["test"]
        if functions > self.slots:
            raise UserError(f"task.test_ways={functions} functions need as many one-hot input slots; the network reads "
                            f"task.ways={self.slots}: choose task.test_ways <= {self.slots}")
        if task_cfg.ways > len(source.pool["amplitude"]):
            raise UserError(f"task.ways={task_cfg.ways} functions per trajectory exceeds the "
                            f"dataset.train_functions={len(source.pool['amplitude'])} of the meta-training pool")
        for key, value in (("task.shots", task_cfg.shots), ("task.test_shots", shots)):
            if value % self.step_batch:
                raise UserError(f"{key}={value} points per function must be a multiple of dataset.step_batch="
                                f"{self.step_batch} (points per SGD step)")

    def objective(self, predictions, targets, mask=None):
        return regression_objective(predictions, targets, mask)

    def head_dim(self, phase: str) -> int:
        return 1

    def input_dim(self) -> int:
        return self.slots + 1

    def sampler(self, split: str):
        from metarun.data.incremental_sine import make_trajectory_sampler
        if split not in SPLITS:
            raise UserError(f"split {split!r} is unknown; expected one of: {', '.join(SPLITS)}")
        s = self.source
        if split == "train":
            return make_trajectory_sampler(*self.shapes["train"], s.x_range, self.slots)
        return make_trajectory_sampler(*self.shapes["test"], s.x_range, self.slots, fresh=(s.amplitude, s.phase))

    def describe(self, split: str):
        functions, shots, queries = self.shapes["train" if split == "train" else "test"]
        return {"functions": functions, "points_per_function": shots, "held_out_per_function": queries,
                "points_per_step": self.step_batch, "functions_from": "pool" if split == "train" else "fresh draws",
                "amplitude": list(self.source.amplitude), "phase": list(self.source.phase)}

    def check_learner(self, learner_cfg) -> None:
        if learner_cfg.name != "oml_mlp":
            raise UserError(f"dataset={self.name} needs a representation and a prediction network: learner=oml_mlp "
                            f"(got learner={learner_cfg.name}); or take the recipe whole: experiment=oml_incremental_sine")

    def run_continual(self, cfg, params, algo_state, run_dir=None) -> dict:
        """The continual protocol of this family (metarun.continual_regression)."""
        from metarun.continual_regression import run_continual_regression
        return run_continual_regression(cfg, self, params, algo_state, run_dir)
