"""Streams of classes for continual meta-learning (OML, ANML): ordered trajectories over image-class arrays.

The same arrays as few-shot classification (`images[class, example, H, W, C]` per split), read another way
(`task.family=stream`, conf/task/stream.yaml):

* train: a trajectory = `task.ways` classes, `task.shots` images each, class after class (the inner loop
  learns them one image per step, in this order); labels are the classes' indices in the training split,
  so a prediction head has one output per training class. The query = the trajectory's images followed by
  a "remember" batch of `task.queries` images of other training classes (OML's random batch, ANML's 64).
* val / test: a small continual episode = `task.test_ways` classes learned one after another from their
  first `task.test_shots` images, scored on each class's last `task.test_queries` images (held out, as the
  papers' 15 / 5 split); labels 0..ways-1 in the order learned. The evaluator's episodes and validation use
  it; the full protocol (K classes up to 600, lr sweep, forgetting) is `eval.protocol` = continual, this
  family's default (metarun.continual_protocol).
"""
from __future__ import annotations

from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from metarun.data.tasks import Examples, Task
from metarun.errors import UserError
from metarun.families.base import SPLITS, check_positive
from metarun.families.classification import ClassificationFamily, EpisodeShape
from metarun.registry import register


def other_classes(draws: jax.Array, taken: jax.Array) -> jax.Array:
    """Map draws from U{0..n-len(taken)-1} onto the classes 0..n-1 that are not in `taken` (distinct classes):
    walk the taken classes in increasing order and step past each one at or below the draw. Uniform over
    the other classes, fixed shapes, no rejection loop."""
    out = draws
    for t in jnp.sort(taken):  # `taken` has a static length (the trajectory's classes)
        out = out + (out >= t)
    return out


def make_trajectory_sampler(ways: int, shots: int, remember: int):
    """Training trajectories over `images[class, example, ...]` (uint8): see the module docstring."""

    def sample(images: jax.Array, key: jax.Array) -> Task:
        n_classes, n_examples = images.shape[:2]
        class_key, example_key, other_key, other_example_key = jax.random.split(key, 4)
        classes = jax.random.choice(class_key, n_classes, (ways,), replace=False)
        picks = jax.vmap(lambda k: jax.random.permutation(k, n_examples)[:shots])(jax.random.split(example_key, ways))
        x = images[classes[:, None], picks].astype(jnp.float32) / 255.0          # [ways, shots, H, W, C]
        x = x.reshape((ways * shots,) + x.shape[2:])
        y = jnp.repeat(classes.astype(jnp.int32), shots)
        others = other_classes(jax.random.randint(other_key, (remember,), 0, n_classes - ways), classes)
        other_x = images[others, jax.random.randint(other_example_key, (remember,), 0, n_examples)]
        query = Examples(jnp.concatenate([x, other_x.astype(jnp.float32) / 255.0]),
                         jnp.concatenate([y, others.astype(jnp.int32)]))
        return Task(Examples(x, y), query)

    return sample


def make_continual_episode_sampler(ways: int, shots: int, queries: int):
    """Evaluation episodes: `ways` random classes learned from their first `shots` images in class order,
    scored on their last `queries` images; labels 0..ways-1 in the order learned."""

    def sample(images: jax.Array, key: jax.Array) -> Task:
        n_classes, n_examples = images.shape[:2]
        classes = jax.random.choice(key, n_classes, (ways,), replace=False)
        chosen = images[classes].astype(jnp.float32) / 255.0                    # [ways, E, H, W, C]
        labels = jnp.arange(ways, dtype=jnp.int32)

        def flatten(part, count):
            return Examples(part.reshape((ways * count,) + part.shape[2:]), jnp.repeat(labels, count))

        return Task(flatten(chosen[:, :shots], shots), flatten(chosen[:, n_examples - queries:], queries))

    return sample


@register("family", "stream", reads=("classification",))
class StreamFamily(ClassificationFamily):
    """Trajectories of classes (train) and small continual episodes (val/test); metric accuracy."""
    kind = "stream"
    protocol = "continual"

    def __init__(self, name: str, arrays: Dict[str, np.ndarray], task_cfg, dataset_cfg):
        check_positive("task", task_cfg, ("ways", "shots", "queries", "test_ways", "test_shots", "test_queries"))
        super().__init__(name, arrays, task_cfg, dataset_cfg)
        train = self.shapes["train"]
        # val/test: held-out images per class default to the examples the trajectory does not use (20 - 15 = 5).
        test_shots = task_cfg.get("test_shots") or min(train.shots, self.examples_per_class - 1)
        test_queries = task_cfg.get("test_queries") or max(self.examples_per_class - test_shots, 1)
        test = EpisodeShape(task_cfg.get("test_ways") or train.ways, test_shots, test_queries)
        self.shapes = {"train": train, "val": test, "test": test}

    def head_dim(self, phase: str) -> int:
        """One output per training class in every phase: the evaluation build restores the trained head."""
        return self.num_classes["train"]

    def sampler(self, split: str):
        if split not in SPLITS:
            raise UserError(f"split {split!r} is unknown; expected one of: {', '.join(SPLITS)}")
        shape, n, per_class = self.shapes[split], self.num_classes[split], self.examples_per_class
        key = "task." if split == "train" else "task.test_"
        if split == "train":
            if shape.shots > per_class:
                raise UserError(f"task.shots={shape.shots} (the trajectory's images per class) exceeds the {per_class} "
                                f"examples per class of dataset={self.name}; choose task.shots <= {per_class}")
            if shape.ways >= n:
                raise UserError(f"task.ways={shape.ways} trajectory classes leaves no other class of the {n} training "
                                f"classes of dataset={self.name} for the remember batch; choose task.ways < {n}")
            return make_trajectory_sampler(shape.ways, shape.shots, shape.queries)
        if shape.ways > n:
            raise UserError(f"{key}ways={shape.ways} exceeds the {n} classes of the '{split}' split of "
                            f"dataset={self.name}; choose task.test_ways <= {n}")
        if shape.shots + shape.queries > per_class:
            raise UserError(f"task.test_shots+test_queries={shape.shots + shape.queries} exceeds the {per_class} "
                            f"examples per class of dataset={self.name} (learned and held-out images are "
                            f"disjoint)")
        return make_continual_episode_sampler(shape.ways, shape.shots, shape.queries)

    def describe(self, split: str):
        s = self.shapes[split]
        if split == "train":
            return {"trajectory_classes": s.ways, "trajectory_shots": s.shots, "remember": s.queries,
                    "class_split": self.class_split}
        return {"ways": s.ways, "shots": s.shots, "queries": s.queries, "class_split": self.class_split,
                "episode": "classes learned one after another, one image per step; held-out images scored"}

