"""Tests for on-device augmentation: crops, rotations (against scipy), flips, the composer, jit and vmap."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from metarun.data.augment import augment_task, crop, flip, make_augment, random_crop, random_flip, rotate
from metarun.data.tasks import Examples, Task
from metarun.errors import UserError

N, H, W, C = 6, 12, 12, 3


@pytest.fixture(scope="module")
def images() -> jax.Array:
    return jax.random.uniform(jax.random.PRNGKey(0), (N, H, W, C))


@pytest.fixture(scope="module")
def augment():
    return jax.jit(make_augment(crop_padding=2, rotation_degrees=15.0, hflip=True))


def test_deterministic_from_key(augment, images):
    a = augment(jax.random.PRNGKey(1), images)
    assert a.shape == images.shape and a.dtype == images.dtype
    np.testing.assert_array_equal(a, augment(jax.random.PRNGKey(1), images))
    assert np.abs(a - augment(jax.random.PRNGKey(2), images)).max() > 0.1
    assert np.abs(a - images).max() > 0.1


class MaskedExamples(NamedTuple):
    x: jax.Array
    y: jax.Array
    mask: jax.Array


def test_task_labels_and_masks_kept(augment, images):
    y = jnp.arange(N) % 3
    task = Task(Examples(images, y), MaskedExamples(images[::-1], y[::-1], jnp.ones(N)))
    out = augment_task(augment, jax.random.PRNGKey(3), task)
    np.testing.assert_array_equal(out.support.y, y)
    np.testing.assert_array_equal(out.query.y, y[::-1])
    np.testing.assert_array_equal(out.query.mask, jnp.ones(N))
    assert type(out.query) is MaskedExamples
    assert np.abs(out.support.x - images).max() > 0.1 and np.abs(out.query.x - images[::-1]).max() > 0.1
    kept = augment_task(augment, jax.random.PRNGKey(3), task, query=False)
    np.testing.assert_array_equal(kept.query.x, images[::-1])
    np.testing.assert_array_equal(kept.support.x, out.support.x)


def test_crop_shifts_with_zero_fill(images):
    x = np.asarray(images)
    np.testing.assert_array_equal(crop(images, jnp.full((N, 2), 4), 4), x)  # no shift: the identity
    offsets = np.array([[0, 0], [8, 8], [4, 1], [2, 7], [4, 4], [8, 0]])
    out = np.asarray(crop(images, jnp.asarray(offsets), 4))
    for i, (r, c) in enumerate(offsets):
        padded = np.pad(x[i], ((4, 4), (4, 4), (0, 0)))
        np.testing.assert_array_equal(out[i], padded[r:r + H, c:c + W])


def test_random_crop_is_a_valid_crop():
    x = jax.random.uniform(jax.random.PRNGKey(4), (40, 8, 8, 1)) + 0.5  # no zeros, so shifts are identifiable
    out = np.asarray(jax.jit(random_crop, static_argnums=2)(jax.random.PRNGKey(5), x, 2))
    found = []
    for i in range(len(x)):
        padded = np.pad(np.asarray(x[i]), ((2, 2), (2, 2), (0, 0)))
        hits = [(r, c) for r in range(5) for c in range(5) if np.array_equal(out[i], padded[r:r + 8, c:c + 8])]
        assert len(hits) == 1
        found.append(hits[0])
    assert len(set(found)) > 10  # 25 possible corners, 40 draws


def test_flip(images):
    which = jnp.array([True, False, True, True, False, False])
    once = flip(images, which)
    np.testing.assert_array_equal(flip(once, which), images)  # twice is the identity
    np.testing.assert_array_equal(once[0], images[0, :, ::-1])
    np.testing.assert_array_equal(once[1], images[1])
    x = jnp.broadcast_to(jnp.arange(W, dtype=jnp.float32)[None, None, :, None], (400, 2, W, 1))
    flipped = np.asarray(jax.jit(random_flip)(jax.random.PRNGKey(6), x))[:, 0, 0, 0] == W - 1
    assert 0.4 < flipped.mean() < 0.6  # p = 0.5, 400 draws: sd 0.025


def test_rotation(images):
    rot = jax.jit(rotate)
    np.testing.assert_array_equal(rot(images, jnp.zeros(N)), images)
    np.testing.assert_allclose(rot(images, jnp.full(N, 90.0)), jnp.rot90(images, 1, axes=(1, 2)), atol=1e-5)
    odd = images[:, :11, :11]
    np.testing.assert_allclose(rot(odd, jnp.full(N, -90.0)), jnp.rot90(odd, -1, axes=(1, 2)), atol=1e-5)
    # Small angles: scipy's bilinear rotation about the centre with zeros outside.
    angles = np.array([7.5, -12.0, 30.0, 0.0, -3.0, 15.0], np.float32)
    out = np.asarray(rot(images, jnp.asarray(angles)))
    for i, a in enumerate(angles):
        ref = ndimage.rotate(np.asarray(images[i]), a, axes=(1, 0), reshape=False, order=1, mode="grid-constant", cval=0.0)
        np.testing.assert_allclose(out[i], ref, atol=1e-5)


def test_uint8_and_identity():
    x = jax.random.randint(jax.random.PRNGKey(7), (4, 8, 8, 1), 0, 256).astype(jnp.uint8)
    k = jax.random.PRNGKey(8)
    np.testing.assert_array_equal(make_augment()(k, x), x)  # everything off by default, flips included
    np.testing.assert_array_equal(make_augment(hflip_prob=1.0)(k, x), x)
    np.testing.assert_array_equal(make_augment(hflip=True, hflip_prob=1.0)(k, x), x[:, :, ::-1])
    rotating = jax.jit(make_augment(rotation_degrees=20.0))
    out = rotating(k, x)
    assert out.dtype == jnp.uint8
    ref = np.asarray(rotating(k, x.astype(jnp.float32)))
    np.testing.assert_array_equal(out, np.clip(np.round(ref), 0, 255).astype(np.uint8))


def test_jit_and_vmap_over_tasks(augment, images):
    tasks = jnp.stack([images, images * 0.5, images[::-1]])
    keys = jax.random.split(jax.random.PRNGKey(9), 3)
    batched = jax.jit(jax.vmap(augment))(keys, tasks)
    for t in range(3):
        np.testing.assert_allclose(batched[t], augment(keys[t], tasks[t]), atol=1e-6)


def test_bad_config():
    with pytest.raises(UserError, match="augment.flip is unknown; valid keys: crop_padding, rotation_degrees, hflip, hflip_prob"):
        make_augment(flip=True)
    with pytest.raises(UserError, match="augment.crop_padding=-1"):
        make_augment(crop_padding=-1)
    with pytest.raises(UserError, match="augment.rotation_degrees=200"):
        make_augment(rotation_degrees=200)
    with pytest.raises(UserError, match="augment.hflip_prob=2"):
        make_augment(hflip=True, hflip_prob=2)
