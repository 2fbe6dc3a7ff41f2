"""Prepared per-split uint8 arrays cached as one .npz, keyed by a fingerprint of the source files."""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np

from metarun.errors import UserError


def cache_root(cache_dir: str | None) -> Path:
    """The cache folder: cache_dir, else $METARUN_CACHE, else ~/.cache/metarun (as for Omniglot)."""
    return Path(cache_dir or os.environ.get("METARUN_CACHE") or "~/.cache/metarun").expanduser()


def check_image_size(image_size) -> int:
    """image_size as an int, or a UserError naming dataset.image_size."""
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise UserError(f"dataset.image_size={image_size!r} must be a positive integer")
    return int(image_size)


def fingerprint(root: Path, files: Iterable[Path], *params) -> str:
    """A short hash of the params and each file's path (relative to root), size and mtime."""
    h = hashlib.sha1("|".join(map(str, params)).encode())
    for f in sorted(files):
        st = f.stat()
        h.update(f"|{f.relative_to(root).as_posix()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def read_splits(path: Path, splits: Iterable[str] = ("train", "val", "test")) -> dict[str, np.ndarray] | None:
    """{split: array} from a cache file, or None when it is absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {s: z[s] for s in splits}
    except Exception as e:  # a truncated or foreign file: rebuild rather than fail the run
        warnings.warn(f"ignoring unreadable dataset cache {path}: {e}")
        return None


def write_splits(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write {split: array} atomically; a read-only cache only costs speed, so failures only warn."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Same-directory temp file + os.replace: concurrent runs never see a half-written cache.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        warnings.warn(f"could not write the dataset cache {path}: {e}")
