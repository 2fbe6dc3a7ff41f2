"""Generated image classes for tests and benchmarks: a random binary pattern per class plus noise."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import numpy as np

from metarun.errors import UserError
from metarun.registry import register


def make_synthetic_classes(n_classes: int, examples: int, size: int, noise: float, seed: int) -> np.ndarray:
    """uint8 [n_classes, examples, size, size, 1]; classes are separable, so a learner can learn them."""
    rng = np.random.default_rng(seed)
    patterns = rng.random((n_classes, 1, size, size, 1)) < 0.3
    flips = rng.random((n_classes, examples, size, size, 1)) < noise * 0.5
    return (np.logical_xor(patterns, flips) * 255).astype(np.uint8)


@dataclass
class SyntheticConfig:
    """Generated image classes (a random pattern per class plus noise): tests and benchmarks."""
    name: str = "synthetic"
    kind: str = "classification"
    image_size: int = 28
    classes: List[int] = field(default_factory=lambda: [64, 16, 16])  # train, val, test
    examples_per_class: int = 20
    noise: float = 0.3


@register("dataset", "synthetic", schema=SyntheticConfig, family="classification")
def load(cfg, seed: int = 0):
    if len(cfg.classes) != 3 or min(cfg.classes) < 1:
        raise UserError(f"dataset.classes={list(cfg.classes)}: expected three class counts >= 1 (train, val, test)")
    if cfg.image_size < 1:
        raise UserError(f"dataset.image_size={cfg.image_size} must be >= 1")
    return {s: make_synthetic_classes(n, cfg.examples_per_class, cfg.image_size, cfg.noise, seed=1000 + i)
            for i, (s, n) in enumerate(zip(("train", "val", "test"), cfg.classes))}
