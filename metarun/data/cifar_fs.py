"""CIFAR-FS (Bertinetto et al. 2019) and FC100 (Oreshkin et al. 2018) from the local CIFAR-100 python archive."""

from __future__ import annotations

import hashlib
import pickle
import tarfile
from importlib import resources
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from metarun.data.array_cache import cache_root, check_image_size, fingerprint, read_splits, write_splits
from metarun.data.image_io import resize_rgb
from metarun.errors import UserError

SPLITS = ("train", "val", "test")
# Published sizes: CIFAR-FS 64/16/20 classes; FC100 12/4/4 superclasses = 60/20/20 classes; 600 images each.
PUBLISHED_CLASSES = {"cifar_fs": {"train": 64, "val": 16, "test": 20}, "fc100": {"train": 60, "val": 20, "test": 20}}
# Bump when decoding changes so stale caches are not reused.
_CACHE_VERSION = 1
_PARTS = ("train", "test", "meta")
_EXPECTED = ("expected cifar-100-python.tar.gz, or its extracted cifar-100-python/ folder "
             "holding train, test and meta")


class _Cifar100(NamedTuple):
    """Train then test images pooled, in file order."""
    images: np.ndarray          # uint8 [N, 32, 32, 3]
    fine: np.ndarray            # int [N]
    coarse: np.ndarray          # int [N]
    fine_names: list[str]
    coarse_names: list[str]


def split_lists(variant: str) -> dict[str, list[str]]:
    """The shipped class lists: CIFAR-FS fine class names, or FC100 superclass names, per split.

    Args:
      variant: "cifar_fs" or "fc100" (metarun/data/splits/<variant>/{train,val,test}.txt).
    """
    if variant not in PUBLISHED_CLASSES:
        raise UserError(f"dataset.name={variant!r} is not a CIFAR-100 few-shot split; valid values: cifar_fs, fc100")
    folder = resources.files("metarun.data").joinpath("splits", variant)
    return {s: [w for w in (line.strip() for line in folder.joinpath(f"{s}.txt").read_text().splitlines())
                if w and not w.startswith("#")] for s in SPLITS}


def _find_source(root: Path) -> tuple[Path, list[Path]]:
    """(an extracted folder or the .tar.gz, the files to fingerprint); extracted files win."""
    if not root.is_dir():
        raise UserError(f"dataset.local_dir={root} is not a directory; {_EXPECTED}")
    for folder in (root / "cifar-100-python", root):
        if all((folder / p).is_file() for p in _PARTS):
            return folder, [folder / p for p in _PARTS]
    archive = root / "cifar-100-python.tar.gz"
    if archive.is_file():
        return archive, [archive]
    raise UserError(f"dataset.local_dir={root} lacks cifar-100-python.tar.gz and "
                    f"cifar-100-python/{{train,test,meta}}; {_EXPECTED}")


def _unpickle(raw: bytes, where: str) -> dict:
    try:
        # The CIFAR pickles are Python 2 ones: bytes keeps their str keys and names as bytes.
        data = pickle.loads(raw, encoding="bytes")
    except Exception as e:
        raise UserError(f"{where} is not a CIFAR-100 pickle ({type(e).__name__}: {e}); {_EXPECTED}") from None
    if not isinstance(data, dict):
        raise UserError(f"{where} holds a {type(data).__name__}, expected the CIFAR-100 dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


def _read_parts(source: Path) -> dict[str, dict]:
    if source.is_dir():
        return {p: _unpickle((source / p).read_bytes(), str(source / p)) for p in _PARTS}
    try:
        with tarfile.open(source, "r:*") as tf:
            members = {m.name.rsplit("/", 1)[-1]: m for m in tf.getmembers() if m.isfile()}
            missing = [p for p in _PARTS if p not in members]
            if missing:
                raise UserError(f"dataset.local_dir: {source} lacks cifar-100-python/{', '.join(missing)}; {_EXPECTED}")
            return {p: _unpickle(tf.extractfile(members[p]).read(), f"{source}:{members[p].name}") for p in _PARTS}
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"{source} is not a readable tar archive ({e}); {_EXPECTED}") from None


def _load_cifar100(source: Path) -> _Cifar100:
    parts = _read_parts(source)
    try:
        data = [np.asarray(parts[p]["data"], dtype=np.uint8) for p in ("train", "test")]
        fine = np.concatenate([np.asarray(parts[p]["fine_labels"], dtype=np.int64) for p in ("train", "test")])
        coarse = np.concatenate([np.asarray(parts[p]["coarse_labels"], dtype=np.int64) for p in ("train", "test")])
        fine_names = [n.decode() if isinstance(n, bytes) else str(n) for n in parts["meta"]["fine_label_names"]]
        coarse_names = [n.decode() if isinstance(n, bytes) else str(n) for n in parts["meta"]["coarse_label_names"]]
    except KeyError as e:
        raise UserError(f"{source}: a CIFAR-100 pickle lacks the entry {e}; {_EXPECTED}") from None
    data = np.concatenate(data)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(fine) or len(fine) != len(coarse):
        raise UserError(f"{source}: 'data' is {data.shape} for {len(fine)} labels, expected [N, 3072]")
    # Rows are 1024 red, then green, then blue values, each 32x32 row-major.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return _Cifar100(images, fine, coarse, fine_names, coarse_names)


def _check_lists(lists: Mapping[str, Sequence[str]], known: Sequence[str], noun: str, key: str) -> dict[str, list[str]]:
    """{split: names}, each a known CIFAR-100 (super)class name, no name in two splits."""
    out, seen = {}, {}
    for s in SPLITS:
        names = [str(n) for n in lists.get(s, ())]
        if not names:
            raise UserError(f"{key} gives no {noun}es for the '{s}' split")
        for n in names:
            if n not in known:
                raise UserError(f"{key} names the {noun} {n!r} ('{s}'), which the CIFAR-100 meta file lacks")
            if n in seen:
                raise UserError(f"{key} puts {n} in both the '{seen[n]}' and '{s}' splits")
            seen[n] = s
        out[s] = names
    return out


def _assemble(cifar: _Cifar100, classes: dict[str, list[int]], image_size: int) -> dict[str, np.ndarray]:
    members = {c: np.flatnonzero(cifar.fine == c) for s in SPLITS for c in classes[s]}
    sizes = {cifar.fine_names[c]: len(m) for c, m in members.items()}
    if len(set(sizes.values())) != 1:
        lo, hi = min(sizes, key=sizes.get), max(sizes, key=sizes.get)
        raise UserError(f"CIFAR-100 classes differ in size: {lo} has {sizes[lo]} images, {hi} has {sizes[hi]}")
    return {s: np.stack([resize_rgb(cifar.images[members[c]], image_size) for c in classes[s]]) for s in SPLITS}


def _load(variant: str, local_dir: str | None, image_size, cache_dir: str | None, lists, key: str) -> dict[str, np.ndarray]:
    image_size = check_image_size(image_size)
    if local_dir is None:
        raise UserError(f"dataset.local_dir is not set; {variant} is built from local CIFAR-100 files: {_EXPECTED}")
    root = Path(local_dir).expanduser().absolute()
    source, files = _find_source(root)
    lists = split_lists(variant) if lists is None else lists
    digest = hashlib.sha1(repr([list(map(str, lists.get(s, ()))) for s in SPLITS]).encode()).hexdigest()[:8]
    cache = cache_root(cache_dir) / (f"{variant}-{image_size}-{digest}-"
                                    f"{fingerprint(root, files, f'v{_CACHE_VERSION}', variant, image_size)}.npz")
    if (hit := read_splits(cache, SPLITS)) is not None:
        return hit
    cifar = _load_cifar100(source)
    fine_names, coarse_names = cifar.fine_names, cifar.coarse_names
    if variant == "cifar_fs":
        names = _check_lists(lists, fine_names, "class", key)
        classes = {s: [fine_names.index(n) for n in names[s]] for s in SPLITS}
    else:
        names = _check_lists(lists, coarse_names, "superclass", key)
        fine_to_coarse: dict[int, set[int]] = {}
        for f, c in zip(cifar.fine.tolist(), cifar.coarse.tolist()):
            fine_to_coarse.setdefault(f, set()).add(c)
        if any(len(c) != 1 for c in fine_to_coarse.values()):
            raise UserError(f"{source}: a CIFAR-100 fine class carries several coarse labels")
        # Fine classes in label order within each split.
        classes = {s: [f for f in sorted(fine_to_coarse)
                       if coarse_names[next(iter(fine_to_coarse[f]))] in names[s]] for s in SPLITS}
    arrays = _assemble(cifar, classes, image_size)
    write_splits(cache, arrays)
    return arrays


def load_cifar_fs(local_dir: str | None, image_size: int = 32, cache_dir: str | None = None,
                  classes: Mapping[str, Sequence[str]] | None = None) -> dict[str, np.ndarray]:
    """CIFAR-FS per split: {"train","val","test"}: uint8 [classes, 600, S, S, 3] (RGB).

    Each class pools its 500 CIFAR-100 training and 100 test images (training first, file order).
    The classes are Bertinetto et al.'s 64/16/20 (metarun/data/splits/cifar_fs/*.txt), in list order.

    Args:
      local_dir: a folder holding cifar-100-python.tar.gz or the extracted cifar-100-python/ (dataset.local_dir).
      image_size: side S; 32 is the native size, others are resized with Lanczos.
      cache_dir: where to keep the prepared arrays (default $METARUN_CACHE or ~/.cache/metarun).
      classes: {split: fine class names} to use instead of the shipped lists.

    Returns:
      {split: uint8 [classes, examples, S, S, 3]}.
    """
    return _load("cifar_fs", local_dir, image_size, cache_dir, classes, "the cifar_fs class lists")


def load_fc100(local_dir: str | None, image_size: int = 32, cache_dir: str | None = None,
               superclasses: Mapping[str, Sequence[str]] | None = None) -> dict[str, np.ndarray]:
    """FC100 per split: {"train","val","test"}: uint8 [classes, 600, S, S, 3] (RGB).

    Split by CIFAR-100 superclass, Oreshkin et al.'s 12/4/4 superclasses (60/20/20 classes;
    metarun/data/splits/fc100/*.txt); a split's classes are every fine class of its superclasses,
    in fine label order. Each class pools its training and test images as in load_cifar_fs.

    Args:
      local_dir: a folder holding cifar-100-python.tar.gz or the extracted cifar-100-python/ (dataset.local_dir).
      image_size: side S; 32 is the native size, others are resized with Lanczos.
      cache_dir: where to keep the prepared arrays (default $METARUN_CACHE or ~/.cache/metarun).
      superclasses: {split: superclass names} to use instead of the shipped lists.

    Returns:
      {split: uint8 [classes, examples, S, S, 3]}.
    """
    return _load("fc100", local_dir, image_size, cache_dir, superclasses, "the fc100 superclass lists")
