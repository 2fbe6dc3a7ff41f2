"""Generated image classes for tests and benchmarks: a random binary pattern per class plus noise."""
from __future__ import annotations

import numpy as np


def make_synthetic_classes(n_classes: int, examples: int, size: int, noise: float, seed: int) -> np.ndarray:
    """uint8 [n_classes, examples, size, size, 1]; classes are separable, so a learner can learn them."""
    rng = np.random.default_rng(seed)
    patterns = rng.random((n_classes, 1, size, size, 1)) < 0.3
    flips = rng.random((n_classes, examples, size, size, 1)) < noise * 0.5
    return (np.logical_xor(patterns, flips) * 255).astype(np.uint8)
