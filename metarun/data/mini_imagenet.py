"""miniImageNet (Vinyals et al. 2016; Ravi & Larochelle 2017 class split) from local files, as uint8 arrays per split."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np

from metarun.data.array_cache import cache_root, check_image_size, fingerprint, read_splits, write_splits
from metarun.data.image_io import decode_rgb, resize_rgb
from metarun.errors import UserError

SPLITS = ("train", "val", "test")
# Ravi & Larochelle's split of the 100 classes; the loader reads the classes from the files, this is for checks.
PUBLISHED_CLASSES = {"train": 64, "val": 16, "test": 20}
PUBLISHED_EXAMPLES = 600
# Bump when decoding changes so stale caches are not reused.
_CACHE_VERSION = 1
_PICKLE = "mini-imagenet-cache-{}.pkl"
_EXPECTED = ("expected mini-imagenet-cache-{train,val,test}.pkl, or an images/ folder with "
             "train.csv, val.csv and test.csv (header filename,label)")


def _read_pickle(path: Path) -> tuple[np.ndarray, dict[str, list[int]]]:
    """(image_data uint8 [N, H, W, 3], class_dict {wnid: indices}) from one cache pickle (a trusted local file)."""
    try:
        with open(path, "rb") as f:
            # latin1 reads Python 2 pickles too; for Python 3 pickles the encoding is unused.
            data = pickle.load(f, encoding="latin1")
        images, class_dict = data["image_data"], data["class_dict"]
    except Exception as e:
        raise UserError(f"{path} is not a miniImageNet cache pickle with 'image_data' and 'class_dict' "
                        f"({type(e).__name__}: {e})") from None
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise UserError(f"{path}: 'image_data' is {images.dtype} {images.shape}, expected uint8 [N, H, W, 3]")
    return images, {str(k): [int(i) for i in v] for k, v in dict(class_dict).items()}


def _read_csv(path: Path) -> dict[str, list[str]]:
    """{label: filenames in row order} from a Ravi-style CSV with header filename,label."""
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        raise UserError(f"{path} must start with the header 'filename,label'")
    groups: dict[str, list[str]] = {}
    for n, row in enumerate(rows[1:], start=2):
        if len(row) != 2:
            raise UserError(f"{path}:{n}: expected two columns 'filename,label', got {row}")
        groups.setdefault(row[1].strip(), []).append(row[0].strip())
    return groups


def _check_counts(splits: dict[str, dict[str, int]]) -> None:
    """Splits share no class and every class has the same number of images (600 in the published data)."""
    seen: dict[str, str] = {}
    for split, counts in splits.items():
        if not counts:
            raise UserError(f"the miniImageNet '{split}' split has no classes; {_EXPECTED}")
        for name in counts:
            if name in seen:
                raise UserError(f"miniImageNet class {name} is in both the '{seen[name]}' and '{split}' splits")
            seen[name] = split
    sizes = {(s, name): c for s, counts in splits.items() for name, c in counts.items()}
    if len(set(sizes.values())) > 1:
        (s0, c0), (s1, c1) = min(sizes.items(), key=lambda kv: kv[1]), max(sizes.items(), key=lambda kv: kv[1])
        raise UserError(f"miniImageNet classes differ in size: {s0[1]} ('{s0[0]}') has {c0} images, "
                        f"{s1[1]} ('{s1[0]}') has {c1}; every class needs the same number ({PUBLISHED_EXAMPLES})")


def _layout(root: Path) -> tuple[str, list[Path]]:
    """('pickle' | 'folder', the files that define the data), or a UserError naming what is missing."""
    if not root.is_dir():
        raise UserError(f"dataset.local_dir={root} is not a directory; {_EXPECTED}")
    pickles = [root / _PICKLE.format(s) for s in SPLITS]
    if all(p.is_file() for p in pickles):
        return "pickle", pickles
    csvs = [root / f"{s}.csv" for s in SPLITS]
    if (root / "images").is_dir() and all(c.is_file() for c in csvs):
        return "folder", csvs
    if any(p.is_file() for p in pickles):
        missing = [p.name for p in pickles if not p.is_file()]
    else:
        missing = [p.name for p in csvs if not p.is_file()] + ([] if (root / "images").is_dir() else ["images/"])
    raise UserError(f"dataset.local_dir={root} lacks {', '.join(missing)}; {_EXPECTED}")


def _from_pickles(pickles: list[Path], image_size: int) -> dict[str, np.ndarray]:
    loaded = dict(zip(SPLITS, map(_read_pickle, pickles)))
    _check_counts({s: {k: len(v) for k, v in cd.items()} for s, (_, cd) in loaded.items()})
    out = {}
    for split, (images, class_dict) in loaded.items():
        for name, idx in class_dict.items():
            if idx and (min(idx) < 0 or max(idx) >= len(images)):
                raise UserError(f"{_PICKLE.format(split)}: class {name} indexes past its {len(images)} images")
        # Classes in sorted wnid order, images in class_dict order: the same order as the CSV layout.
        out[split] = np.stack([resize_rgb(images[class_dict[name]], image_size) for name in sorted(class_dict)])
    return out


def _from_folder(root: Path, groups: dict[str, dict[str, list[str]]], image_size: int) -> dict[str, np.ndarray]:
    out = {}
    for split, classes in groups.items():
        names = sorted(classes)
        arr = np.empty((len(names), len(classes[names[0]]), image_size, image_size, 3), np.uint8)
        for c, name in enumerate(names):
            for i, filename in enumerate(classes[name]):
                path = root / "images" / filename
                try:
                    arr[c, i] = decode_rgb(path.read_bytes(), image_size)
                except (OSError, ValueError) as e:
                    raise UserError(f"cannot decode {path} ({e})") from None
        out[split] = arr
    return out


def load_mini_imagenet(local_dir: str | None, image_size: int = 84, cache_dir: str | None = None) -> dict[str, np.ndarray]:
    """miniImageNet per split: {"train","val","test"}: uint8 [classes, examples, S, S, 3] (RGB).

    Reads either layout in local_dir: the pickles mini-imagenet-cache-{train,val,test}.pkl (dicts with
    'image_data' uint8 [N, 84, 84, 3] and 'class_dict' {wnid: [indices]}), or images/*.jpg with
    train.csv, val.csv and test.csv (header filename,label), as made by Ravi & Larochelle's script.
    The classes of each split come from those files (published: 64/16/20 classes, 600 images each);
    classes are in sorted wnid order. Images are resized to image_size with Lanczos when they differ.
    The arrays are cached as one .npz under cache_dir (default $METARUN_CACHE or ~/.cache/metarun).

    Args:
      local_dir: the folder holding one of the two layouts (config key dataset.local_dir).
      image_size: side S of the returned images.
      cache_dir: where to keep the prepared arrays.

    Returns:
      {split: uint8 [classes, examples, S, S, 3]}.
    """
    image_size = check_image_size(image_size)
    if local_dir is None:
        raise UserError(f"dataset.local_dir is not set; miniImageNet is read from local files only: {_EXPECTED}")
    root = Path(local_dir).expanduser().absolute()
    layout, files = _layout(root)
    groups = None
    if layout == "folder":
        groups = dict(zip(SPLITS, (_read_csv(c) for c in files)))
        _check_counts({s: {k: len(v) for k, v in g.items()} for s, g in groups.items()})
        files = files + [root / "images" / f for g in groups.values() for fs in g.values() for f in fs]
        missing = next((f for f in files if not f.is_file()), None)
        if missing is not None:
            raise UserError(f"dataset.local_dir={root}: a CSV lists {missing.name} but images/{missing.name} "
                            f"is missing; {_EXPECTED}")
    key = fingerprint(root, files, f"v{_CACHE_VERSION}", layout, image_size)
    cache = cache_root(cache_dir) / f"mini_imagenet-{layout}-{image_size}-{key}.npz"
    if (hit := read_splits(cache, SPLITS)) is not None:
        return hit
    arrays = _from_pickles(files, image_size) if layout == "pickle" else _from_folder(root, groups, image_size)
    write_splits(cache, arrays)
    return arrays
