"""The task-family interface, and building a family from the `dataset` and `task` config sections.

A family is what the trainer and the evaluator ask about tasks; they contain no family-specific
branch. docs/design.md shows the interface with a worked example per family, including the
reinforcement-learning and stream (continual / online) shapes that come in their own issues.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import numpy as np

from metarun.data.tasks import Sampler
from metarun.errors import UserError
from metarun.metrics import mean_ci95
from metarun.registry import lookup

SPLITS = ("train", "val", "test")
# A per-task metric `k` that some tasks do not have (a context log-likelihood with an empty context) comes with a
# boolean `_valid:k` per task: the summary averages over the valid tasks only and reports their number `n`.
VALID = "_valid:"


def _defined(name: str, values, per_task: Dict[str, np.ndarray]):
    """The values of metric `name` on the tasks that have it (all of them unless per_task has `_valid:name`)."""
    valid = per_task.get(f"{VALID}{name}")
    return np.asarray(values) if valid is None else np.asarray(values)[np.asarray(valid, bool)]


class TaskFamily:
    """Base class: a family of tasks over one dataset.

    Attributes:
      name:     the dataset's name (results.json `dataset`).
      kind:     the family's registered name (classification, regression, ...).
      metric:   the primary metric: the key of `loss`'s metrics that results.json reports.
      higher_is_better: its direction (accuracy up, MSE down); `score` makes it higher-is-better.
      data:     per split, the pytree of device arrays passed into the jitted step ({} when tasks
                are generated from the key alone).
    """
    kind: str = ""
    metric: str = ""
    higher_is_better: bool = True
    protocol: str = "episodes"   # what eval.protocol=auto runs at the end (stream families: "continual")

    def __init__(self, name: str, data: Dict[str, Any]):
        self.name = name
        self.data = data

    # -- what algorithms ask ---------------------------------------------------------------
    def objective(self, outputs, y, mask=None):
        """(loss, metrics) of a learner's outputs against targets (mask: 1 = real example)."""
        raise NotImplementedError

    def head_dim(self, phase: str) -> Optional[int]:
        """Outputs of a learner's head in this phase (classes, or output dimensions)."""
        raise NotImplementedError

    def ways(self, phase: str) -> Optional[int]:
        """Classes per task in this phase (None where tasks have no classes)."""
        return None

    # -- what the trainer and the evaluator ask ----------------------------------------------
    def sampler(self, split: str) -> Sampler:
        """A pure `(data, key) -> Task` for `split`, checked to fit the split."""
        raise NotImplementedError

    def describe(self, split: str) -> Dict[str, Any]:
        """Facts about the tasks of `split` for results.json (episode shape, class split, ...)."""
        return {}

    def score(self, value: Optional[float]) -> float:
        """Higher is better, whatever the metric; a diverged (None / non-finite) value is worst."""
        if value is None or not np.isfinite(value):
            return float("-inf")
        return float(value) if self.higher_is_better else -float(value)

    def summarize(self, per_task: Dict[str, np.ndarray]) -> Dict[str, Any]:
        """The protocol's numbers from per-task metrics: mean ± 95% CI of the primary metric and
        the mean ± CI of every other metric under `metrics` (a metric with a `_valid:` flag: over the tasks
        that have it, with their number n)."""
        main = mean_ci95(per_task[self.metric])
        others = {k: mean_ci95(_defined(k, v, per_task)) for k, v in per_task.items()
                  if k != self.metric and not k.startswith("_")}
        return {**main, "metrics": {k: {"mean": v["mean"], "ci95": v["ci95"],
                                        **({"n": v["n"]} if f"{VALID}{k}" in per_task else {})}
                                    for k, v in others.items()}}

    def plots(self, run_dir, per_task: Dict[str, np.ndarray]) -> List[str]:
        """Write the family's plots of the final test evaluation into run_dir (e.g. classification's
        reliability diagram) from the same per-task metrics `summarize` read; returns the file names
        written (results.json lists them). The evaluator calls it for every family: no family branch."""
        return []

    def check_learner(self, learner_cfg) -> None:
        """Refuse a learner that cannot read this family's inputs (one line)."""


def build_family(dataset_cfg, task_cfg, seed: int = 0, augment=None, label_smoothing: float = 0.0,
                 train_tasks: str = "episodes", algo: str = "") -> TaskFamily:
    """Load (or generate) the dataset named by `dataset.name` and wrap it in its task family.

    augment: the `augment` section (training tasks only); label_smoothing: regularize.label_smoothing;
    train_tasks: "batches" when the algorithm (`algo`, for the message) trains on labelled minibatches of
    every training class instead of episodes (algo=pretrain). Passed to the family only when set, so
    families that do not take them are refused in one line.
    """
    import inspect

    from metarun.families.augmenting import augment_from_config

    entry = lookup("dataset", dataset_cfg.name, "dataset")
    family_name = entry.meta["family"]
    chosen = task_cfg.get("family") if hasattr(task_cfg, "get") else None
    if chosen and chosen != family_name:  # task.family: another family over the same arrays (e.g. stream)
        reads = lookup("family", chosen, "task.family").meta.get("reads", ())
        if family_name not in reads:
            raise UserError(f"task.family={chosen} reads {', '.join(reads) or 'no'} datasets; "
                            f"dataset={dataset_cfg.name} "
                            f"feeds the {family_name} family")
        family_name = chosen
    family_cls = lookup("family", family_name).build
    techniques = {}
    if augment_from_config(augment) is not None:
        techniques["augment"] = augment
    if label_smoothing:
        techniques["label_smoothing"] = label_smoothing
    accepted = inspect.signature(family_cls).parameters
    if train_tasks != "episodes":
        if "train_tasks" not in accepted:
            raise UserError(f"algo={algo} trains on labelled batches of an image classification dataset; "
                            f"dataset={dataset_cfg.name} feeds the {entry.meta['family']} family")
        techniques["train_tasks"] = train_tasks
    for key in [k for k in techniques if k != "train_tasks"]:
        if key not in accepted:
            section = "augment" if key == "augment" else "regularize.label_smoothing"
            raise UserError(f"{section} is for image classification; dataset={dataset_cfg.name} feeds the "
                            f"{family_name} family: leave it unset")
    payload = entry.build(dataset_cfg, seed)
    return family_cls(dataset_cfg.name, payload, task_cfg, dataset_cfg, **techniques)


def check_positive(section: str, cfg, keys) -> None:
    for key in keys:
        value = cfg.get(key)
        if value is not None and value < 1:
            raise UserError(f"{section}.{key}={value} must be >= 1")


FamilyBuilder = Callable[..., TaskFamily]
