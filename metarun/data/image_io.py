"""Decoding and resizing colour images to square uint8 RGB arrays (PIL, Lanczos)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def _square(im: Image.Image, size: int) -> np.ndarray:
    im = im.convert("RGB")  # ImageNet holds some greyscale and CMYK JPEGs
    if im.size != (size, size):
        # A plain resize, no crop: how the published 84x84 files were made from the ImageNet originals.
        im = im.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(im, dtype=np.uint8)


def decode_rgb(data: bytes, size: int) -> np.ndarray:
    """Encoded image bytes (JPEG, PNG, ...) -> uint8 [size, size, 3]; no resampling when already that size."""
    with Image.open(io.BytesIO(data)) as im:
        return _square(im, size)


def resize_rgb(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [n, H, W, 3] -> uint8 [n, size, size, 3]; returned unchanged when already that size."""
    if images.shape[1:3] == (size, size):
        return images
    out = np.empty((len(images), size, size, 3), np.uint8)
    for i, image in enumerate(images):
        out[i] = _square(Image.fromarray(image), size)
    return out
