"""Few-shot classification: N-way K-shot episodes sampled on the device from images[class, example, ...]."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metarun.data.tasks import make_image_sampler
from metarun.errors import UserError
from metarun.families.base import SPLITS, TaskFamily, check_positive
from metarun.registry import register


@dataclass(frozen=True)
class EpisodeShape:
    ways: int
    shots: int
    queries: int


def episode_shapes(task_cfg) -> Dict[str, EpisodeShape]:
    """Training episodes use task.{ways,shots,queries}; val and test use the test_* values when set."""
    train = EpisodeShape(task_cfg.ways, task_cfg.shots, task_cfg.queries)
    test = EpisodeShape(task_cfg.get("test_ways") or train.ways, task_cfg.get("test_shots") or train.shots,
                        task_cfg.get("test_queries") or train.queries)
    return {"train": train, "val": test, "test": test}


def classification_objective(logits, labels, mask=None):
    del mask
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = (jnp.argmax(logits, -1) == labels).mean()
    return loss, {"loss": loss, "accuracy": accuracy}


@register("family", "classification")
class ClassificationFamily(TaskFamily):
    """N-way K-shot episodes; metric accuracy (higher is better); labels relabelled 0..N-1 per episode."""
    kind = "classification"
    metric = "accuracy"
    higher_is_better = True

    def __init__(self, name: str, arrays: Dict[str, np.ndarray], task_cfg, dataset_cfg):
        check_positive("task", task_cfg, ("ways", "shots", "queries", "test_ways", "test_shots", "test_queries"))
        super().__init__(name, {s: jax.device_put(np.ascontiguousarray(a)) for s, a in arrays.items()})
        self.num_classes = {s: int(a.shape[0]) for s, a in arrays.items()}
        self.examples_per_class = int(min(a.shape[1] for a in arrays.values()))
        self.image_shape = tuple(next(iter(arrays.values())).shape[2:])
        self.shapes = episode_shapes(task_cfg)
        self.class_split = dataset_cfg.get("split")

    def objective(self, logits, labels, mask=None):
        return classification_objective(logits, labels, mask)

    def ways(self, phase: str) -> int:
        return self.shapes["train" if phase == "train" else "test"].ways

    def head_dim(self, phase: str) -> int:
        return self.ways(phase)

    def sampler(self, split: str):
        if split not in SPLITS:
            raise UserError(f"split {split!r} is unknown; expected one of: {', '.join(SPLITS)}")
        shape = self.shapes[split]
        n = self.num_classes[split]
        if shape.ways > n:
            raise UserError(f"task ways={shape.ways} exceeds the {n} classes of the '{split}' split of "
                            f"dataset={self.name}; choose task.ways (or task.test_ways) <= {n}")
        if shape.shots + shape.queries > self.examples_per_class:
            raise UserError(f"task shots+queries={shape.shots + shape.queries} exceeds the "
                            f"{self.examples_per_class} examples per class of dataset={self.name}")
        return make_image_sampler(shape.ways, shape.shots, shape.queries)

    def describe(self, split: str):
        s = self.shapes[split]
        return {"ways": s.ways, "shots": s.shots, "queries": s.queries, "class_split": self.class_split}

    def check_learner(self, learner_cfg) -> None:
        if learner_cfg.name == "mlp":
            raise UserError(f"learner=mlp is for vector inputs; dataset={self.name} has images: use learner=conv4")
        blocks = learner_cfg.get("blocks")
        if blocks is not None:
            side = min(self.image_shape[:2])
            if side < 2 ** blocks:
                raise UserError(f"dataset.image_size={side} is too small for learner.blocks={blocks} "
                                f"(each block halves the image): use an image size >= {2 ** blocks} or fewer blocks")
