"""On-device image augmentation inside the jitted step: padded random crops, small rotations, horizontal flips."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from metarun.data.tasks import Task
from metarun.errors import UserError

# (key, images [n, H, W, C]) -> images of the same shape and dtype.
Augment = Callable[[jax.Array, jax.Array], jax.Array]


def crop(images: jax.Array, offsets: jax.Array, padding: int) -> jax.Array:
    """Zero-pad by `padding` on every side, then cut the original size at the given corners.

    Args:
      images: [n, H, W, C].
      offsets: int [n, 2], (row, column) of each crop's corner in the padded image, in 0..2*padding;
        (padding, padding) gives the image back.
      padding: pixels added on each side.

    Returns:
      [n, H, W, C], each image shifted by offsets - padding (content moves up/left for larger offsets).
    """
    n, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    cut = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c))  # noqa: E731
    return jax.vmap(cut)(padded, offsets)


def random_crop(key: jax.Array, images: jax.Array, padding: int) -> jax.Array:
    """Pad by `padding` then crop at a uniform random corner per image (the CIFAR recipe: pad 4, crop 32)."""
    offsets = jax.random.randint(key, (images.shape[0], 2), 0, 2 * padding + 1)
    return crop(images, offsets, padding)


def rotate(images: jax.Array, degrees: jax.Array) -> jax.Array:
    """Rotate each image counter-clockwise by its angle about its centre; bilinear, zeros outside.

    The sense is jnp.rot90's: 90 degrees moves the top row to the left column.

    Args:
      images: float [n, H, W, C].
      degrees: [n] angles.

    Returns:
      float [n, H, W, C].
    """
    n, h, w, c = images.shape
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) - cy, jnp.arange(w, dtype=jnp.float32) - cx,
                              indexing="ij")

    def one(image, deg):
        t = jnp.deg2rad(deg)
        # Output pixel (y, x) reads the input at R(-t)-rotated coordinates (inverse mapping).
        src = jnp.stack([jnp.cos(t) * rows + jnp.sin(t) * cols + cy, -jnp.sin(t) * rows + jnp.cos(t) * cols + cx])
        sample = lambda ch: jax.scipy.ndimage.map_coordinates(ch, list(src), order=1, mode="constant", cval=0.0)  # noqa: E731
        return jax.vmap(sample, in_axes=2, out_axes=2)(image)

    return jax.vmap(one)(images, degrees)


def random_rotate(key: jax.Array, images: jax.Array, max_degrees: float) -> jax.Array:
    """Rotate each image by an angle drawn uniformly from [-max_degrees, max_degrees]."""
    degrees = jax.random.uniform(key, (images.shape[0],), minval=-max_degrees, maxval=max_degrees)
    return rotate(images, degrees)


def flip(images: jax.Array, which: jax.Array) -> jax.Array:
    """Mirror left-right the images where `which` [n] is true."""
    return jnp.where(which[:, None, None, None], images[:, :, ::-1], images)


def random_flip(key: jax.Array, images: jax.Array, prob: float = 0.5) -> jax.Array:
    """Mirror each image left-right with probability prob."""
    return flip(images, jax.random.bernoulli(key, prob, (images.shape[0],)))


_DEFAULTS = {"crop_padding": 0, "rotation_degrees": 0.0, "hflip": False, "hflip_prob": 0.5}


def make_augment(**cfg) -> Augment:
    """An augmentation fn(key, images[n, H, W, C]) -> images, pure and jit/vmap-able, labels untouched.

    Applied in order: rotation, padded random crop, horizontal flip; each draws from its own split
    of the key, so the same key gives the same images. Integer images (uint8) are computed in
    float32 and rounded back to their dtype; float images keep theirs.

    Args:
      **cfg: the `augment` config. crop_padding (int, 0 = off; 4 for CIFAR-sized images),
        rotation_degrees (max |angle|, 0 = off), hflip (bool, default False: mirrored characters
        are other characters), hflip_prob (default 0.5).

    Returns:
      The augmentation function (the identity when everything is off).
    """
    unknown = sorted(set(cfg) - set(_DEFAULTS))
    if unknown:
        raise UserError(f"augment.{unknown[0]} is unknown; valid keys: {', '.join(_DEFAULTS)}")
    c = {k: (_DEFAULTS[k] if cfg.get(k) is None else cfg[k]) for k in _DEFAULTS}
    padding, degrees, hflip, prob = c["crop_padding"], c["rotation_degrees"], c["hflip"], c["hflip_prob"]
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise UserError(f"augment.crop_padding={padding!r} must be a non-negative integer")
    if isinstance(degrees, bool) or not isinstance(degrees, (int, float)) or not 0 <= degrees <= 180:
        raise UserError(f"augment.rotation_degrees={degrees!r} must be a number in [0, 180]")
    if not isinstance(hflip, bool):
        raise UserError(f"augment.hflip={hflip!r} must be true or false")
    if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0 <= prob <= 1:
        raise UserError(f"augment.hflip_prob={prob!r} must be a number in [0, 1]")

    def augment(key: jax.Array, images: jax.Array) -> jax.Array:
        if degrees == 0 and padding == 0 and not (hflip and prob > 0):
            return images
        k_rot, k_crop, k_flip = jax.random.split(key, 3)
        x = images
        if degrees > 0:
            x = random_rotate(k_rot, x.astype(jnp.float32), float(degrees))
            if jnp.issubdtype(images.dtype, jnp.integer):
                info = jnp.iinfo(images.dtype)
                x = jnp.clip(jnp.round(x), info.min, info.max)
            x = x.astype(images.dtype)
        if padding > 0:
            x = random_crop(k_crop, x, padding)
        if hflip and prob > 0:
            x = random_flip(k_flip, x, float(prob))
        return x

    return augment


def augment_task(augment: Augment, key: jax.Array, task: Task, support: bool = True, query: bool = True) -> Task:
    """The task with its support and/or query images augmented (independent keys), labels and masks kept."""
    k_s, k_q = jax.random.split(key)
    s, q = task.support, task.query
    if support:
        s = s._replace(x=augment(k_s, s.x))
    if query:
        q = q._replace(x=augment(k_q, q.x))
    return task._replace(support=s, query=q)

