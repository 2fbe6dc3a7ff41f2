"""Episodes as pytrees, and the N-way K-shot sampler that runs on the device inside the jitted step."""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp


class Examples(NamedTuple):
    """Inputs and targets; `mask` (1 = a real example, 0 = padding) where a task's size varies."""
    x: jax.Array
    y: jax.Array
    mask: Optional[jax.Array] = None


class Task(NamedTuple):
    """One episode (or, with a leading axis, a batch of them)."""
    support: Examples
    query: Examples


# A sampler maps (data, key) -> Task. `data` is a pytree of device arrays passed into the
# jitted step as an argument (never closed over, which would bake it into the program).
Sampler = Callable[[object, jax.Array], Task]


def make_image_sampler(ways: int, shots: int, queries: int) -> Sampler:
    """N-way K-shot sampler over `images[class, example, H, W, C]` (uint8).

    Classes are drawn without replacement and relabelled 0..ways-1 in draw order; each class's
    shots + queries examples are drawn without replacement. Pure: same key, same task.
    """

    def sample(images: jax.Array, key: jax.Array) -> Task:
        n_classes, n_examples = images.shape[:2]
        class_key, example_key = jax.random.split(key)
        classes = jax.random.choice(class_key, n_classes, (ways,), replace=False)
        picks = jax.vmap(lambda k: jax.random.permutation(k, n_examples)[: shots + queries])(
            jax.random.split(example_key, ways))
        x = images[classes[:, None], picks].astype(jnp.float32) / 255.0  # [ways, shots+queries, H, W, C]
        labels = jnp.arange(ways, dtype=jnp.int32)

        def flatten(part, count):
            return Examples(part.reshape((ways * count,) + part.shape[2:]), jnp.repeat(labels, count))

        return Task(flatten(x[:, :shots], shots), flatten(x[:, shots:], queries))

    return sample


def sample_batch(sampler: Sampler, data, key: jax.Array, batch: int) -> Task:
    """`batch` independent tasks stacked on a leading axis."""
    return jax.vmap(sampler, in_axes=(None, 0))(data, jax.random.split(key, batch))


def make_labelled_image_sampler() -> Sampler:
    """One labelled image drawn uniformly from `images[class, example, H, W, C]` (uint8), for whole-class
    supervised training (algo=pretrain): the label is the class's index in the split, not an episode label.

    Returns Task(support=an empty Examples, query=Examples(x [1, H, W, C], y [1])); `sample_batch` stacks
    `train.meta_batch` of them into one minibatch (drawn with replacement: uniform over every image of the
    split, classes having the same number of examples). Pure: same key, same image.
    """

    def sample(images: jax.Array, key: jax.Array) -> Task:
        n_classes, n_examples = images.shape[:2]
        class_key, example_key = jax.random.split(key)
        label = jax.random.randint(class_key, (1,), 0, n_classes)
        example = jax.random.randint(example_key, (1,), 0, n_examples)
        x = images[label, example].astype(jnp.float32) / 255.0  # [1, H, W, C]
        return Task(Examples(x[:0], label[:0]), Examples(x, label.astype(jnp.int32)))

    return sample
