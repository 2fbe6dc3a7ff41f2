"""From the `dataset` and `task` configs to device-resident data and episode samplers per split."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import jax
import numpy as np

from metarun.data.sinusoid import make_sinusoid_sampler
from metarun.data.synthetic import make_synthetic_classes
from metarun.data.tasks import Sampler, make_image_sampler
from metarun.errors import UserError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class EpisodeShape:
    ways: int
    shots: int
    queries: int


@dataclass
class TaskSource:
    """Per split: the data pytree that goes into the jitted step, and how many classes it has."""
    name: str
    kind: str                        # "classification" | "regression"
    data: Dict[str, object]
    num_classes: Dict[str, Optional[int]]
    examples_per_class: Optional[int]
    dataset_cfg: object

    def sampler(self, split: str, shape: EpisodeShape) -> Sampler:
        """A sampler for `split`, after checking the episode fits its classes."""
        if self.kind == "regression":
            c = self.dataset_cfg
            return make_sinusoid_sampler(shape.shots, shape.queries, tuple(c.amplitude), tuple(c.phase),
                                         tuple(c.x_range))
        n = self.num_classes[split]
        if shape.ways > n:
            raise UserError(f"task ways={shape.ways} exceeds the {n} classes of the '{split}' split of "
                            f"dataset={self.name}; choose task.ways (or task.test_ways) <= {n}")
        if shape.shots + shape.queries > self.examples_per_class:
            raise UserError(f"task shots+queries={shape.shots + shape.queries} exceeds the "
                            f"{self.examples_per_class} examples per class of dataset={self.name}")
        return make_image_sampler(shape.ways, shape.shots, shape.queries)


def episode_shapes(task_cfg) -> Dict[str, EpisodeShape]:
    """Training episodes use task.{ways,shots,queries}; val and test use the test_* values when set."""
    train = EpisodeShape(task_cfg.ways, task_cfg.shots, task_cfg.queries)
    test = EpisodeShape(task_cfg.test_ways or train.ways, task_cfg.test_shots or train.shots,
                        task_cfg.test_queries or train.queries)
    return {"train": train, "val": test, "test": test}


def load_task_source(dataset_cfg, seed: int = 0) -> TaskSource:
    """Load (or generate) the dataset and put each split's array on the default device."""
    name = dataset_cfg.name
    if name == "sinusoid":
        return TaskSource(name, "regression", {s: {} for s in SPLITS}, {s: None for s in SPLITS}, None,
                          dataset_cfg)
    if name == "synthetic":
        c = dataset_cfg
        arrays = {s: make_synthetic_classes(n, c.examples_per_class, c.image_size, c.noise, seed=1000 + i)
                  for i, (s, n) in enumerate(zip(SPLITS, c.classes))}
    elif name == "omniglot":
        from metarun.data.omniglot import load_omniglot, split_classes
        source = load_omniglot(dataset_cfg.local_dir, dataset_cfg.image_size, dataset_cfg.cache_dir)
        arrays = split_classes(source, dataset_cfg.split, list(dataset_cfg.rotations))
    else:
        raise UserError(f"dataset={name} is unknown; expected one of: omniglot, sinusoid, synthetic")
    return TaskSource(name, "classification",
                      {s: jax.device_put(np.ascontiguousarray(a)) for s, a in arrays.items()},
                      {s: int(a.shape[0]) for s, a in arrays.items()},
                      int(min(a.shape[1] for a in arrays.values())), dataset_cfg)
