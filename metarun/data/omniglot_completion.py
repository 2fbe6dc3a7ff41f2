"""`dataset=omniglot_completion`: Omniglot image completion for the Neural Processes (issue 11).

An image is a function from pixel coordinates to intensity: x = (row, column) scaled to [-1, 1], y = ink
intensity in [0, 1] (ink bright, as metarun.data.omniglot stores it). A task is one drawing: the context is a
random subset of n ~ U{min_context..max_context} distinct pixels (max_context slots, the first n real: fixed
shapes and a mask, so one compiled step serves every context size), the targets are all pixels of the image.
Training tasks draw images of the training classes, validation and test tasks those of the val/test classes
(metarun.data.omniglot's class splits). The tasks depend only on the key the trainer or the evaluator passes:
the test tasks come from eval.seed, so every algorithm is scored on the same images and the same contexts.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from metarun.data.function_tasks import MaskedExamples
from metarun.data.omniglot import SPLIT_MEANINGS, _rotation_steps, _unknown_split, load_omniglot, split_classes
from metarun.data.tasks import Examples, Task
from metarun.errors import UserError
from metarun.registry import register


@dataclasses.dataclass
class OmniglotCompletionConfig:
    name: str = "omniglot_completion"
    kind: str = "regression"
    local_dir: Optional[str] = None
    image_size: int = 28                     # images are resized as dataset=omniglot does (Lanczos)
    split: str = "vinyals"                   # the class split of dataset=omniglot
    rotations: List[int] = dataclasses.field(default_factory=lambda: [0])  # a drawing once, upright
    cache_dir: Optional[str] = None
    min_context: int = 10
    max_context: int = 200
    metric: str = "log_likelihood"           # log_likelihood (per pixel) | mse
    uses_learner: bool = False               # only the Neural Processes (their model comes from algo.*)


def pixel_coordinates(image_size: int) -> jax.Array:
    """[S*S, 2] (row, column) of every pixel in row-major order, each scaled linearly to [-1, 1]."""
    axis = jnp.linspace(-1.0, 1.0, image_size)
    rows, cols = jnp.meshgrid(axis, axis, indexing="ij")
    return jnp.stack([rows.ravel(), cols.ravel()], -1)


def sample_context(key, image, coords, min_context: int, max_context: int):
    """(context MaskedExamples with max_context slots, n): n ~ U{min_context..max_context} distinct pixels.

    image [P] intensities, coords [P, 2]. The slots hold the first max_context pixels of a random permutation;
    the first n are real (mask 1). Nested by construction: the first k < n slots are a context of size k.
    """
    perm_key, n_key = jax.random.split(key)
    picked = jax.random.permutation(perm_key, coords.shape[0])[:max_context]
    n = jax.random.randint(n_key, (), min_context, max_context + 1)
    mask = (jnp.arange(max_context) < n).astype(jnp.float32)
    return MaskedExamples(coords[picked], image[picked][:, None], mask), n


def make_completion_sampler(image_size: int, min_context: int, max_context: int) -> Callable:
    """(images uint8 [N, S*S] on the device, key) -> Task: one random image; context as in sample_context,
    query = every pixel of the image (mask all ones). Pure: same key, same task."""
    coords = pixel_coordinates(image_size)

    def sample(data, key) -> Task:
        images = data["images"]
        image_key, context_key = jax.random.split(key)
        index = jax.random.randint(image_key, (), 0, images.shape[0])
        image = images[index].astype(jnp.float32) / 255.0
        context, _ = sample_context(context_key, image, coords, min_context, max_context)
        query = Examples(coords, image[:, None], jnp.ones((coords.shape[0],), jnp.float32))
        return Task(Examples(*context), query)

    return sample


class CompletionImages:
    """What the completion family receives: per split uint8 images [N, S*S], the episode shape, a sampler maker.

    Called as `sampler_for(split, shots, queries, min_shots)` like the regression datasets (the sizes are the
    `episode` below: max context, all pixels, min context).
    """

    def __init__(self, images: Dict[str, np.ndarray], image_size: int, min_context: int, max_context: int):
        self.images, self.image_size = images, image_size
        self.episode = {"shots": max_context, "queries": image_size * image_size, "min_shots": min_context}

    def __call__(self, split: str, shots: int, queries: int, min_shots: Optional[int] = None) -> Callable:
        del split, queries  # every split: the same task shape over its own images (family.data[split])
        return make_completion_sampler(self.image_size, 0 if min_shots is None else min_shots, shots)


def check(cfg) -> None:
    """One-line refusals, before the (slow when uncached) image decoding."""
    if cfg.split not in SPLIT_MEANINGS:
        raise _unknown_split(cfg.split)
    _rotation_steps(list(cfg.rotations))
    if isinstance(cfg.image_size, bool) or not isinstance(cfg.image_size, int) or cfg.image_size < 2:
        raise UserError(f"dataset.image_size={cfg.image_size!r} must be an integer >= 2")
    pixels = cfg.image_size * cfg.image_size
    if not 1 <= cfg.max_context <= pixels:
        raise UserError(f"dataset.max_context={cfg.max_context} must be between 1 and the {pixels} pixels of a "
                        f"{cfg.image_size}x{cfg.image_size} image")
    if not 0 <= cfg.min_context <= cfg.max_context:
        raise UserError(f"dataset.min_context={cfg.min_context} must be between 0 and "
                        f"dataset.max_context={cfg.max_context}")
    if cfg.metric not in ("log_likelihood", "mse"):
        raise UserError(f"dataset.metric={cfg.metric} is unknown for image completion; expected log_likelihood or mse")


@register("dataset", "omniglot_completion", schema=OmniglotCompletionConfig, family="image_completion")
def load(cfg, seed: int = 0) -> CompletionImages:
    """Omniglot's class splits as flat images per split (every drawing of every class of the split)."""
    del seed  # tasks come from the keys the trainer and the evaluator pass
    check(cfg)
    classes = split_classes(load_omniglot(cfg.local_dir, cfg.image_size, cfg.cache_dir), cfg.split,
                            list(cfg.rotations))
    pixels = cfg.image_size * cfg.image_size
    images = {k: v.reshape(-1, pixels) for k, v in classes.items()}
    return CompletionImages(images, cfg.image_size, cfg.min_context, cfg.max_context)


__all__ = ["CompletionImages", "OmniglotCompletionConfig", "load", "make_completion_sampler", "pixel_coordinates",
           "sample_context"]
