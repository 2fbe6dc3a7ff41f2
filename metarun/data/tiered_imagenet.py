"""tieredImageNet (Ren et al. 2018) from its published pickles, as uint8 arrays per split."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from metarun.data.array_cache import cache_root, check_image_size, fingerprint, read_splits, write_splits
from metarun.data.image_io import decode_rgb, resize_rgb
from metarun.errors import UserError

SPLITS = ("train", "val", "test")
# Ren et al.'s split: 20/6/8 high-level categories holding 351/97/160 ImageNet classes (732 to 1300 images each).
PUBLISHED_CLASSES = {"train": 351, "val": 97, "test": 160}
# Bump when decoding changes so stale caches are not reused.
_CACHE_VERSION = 1
_EXPECTED = ("expected {split}_images_png.pkl (or {split}_images.npz) and {split}_labels.pkl "
             "for train, val and test, as in Ren et al.'s tiered-imagenet.tar")


def _load_pickle(path: Path):
    try:
        with open(path, "rb") as f:
            # The published pickles are Python 2 ones holding numpy arrays: latin1 is what numpy needs.
            return pickle.load(f, encoding="latin1")
    except Exception as e:
        raise UserError(f"{path} is not a readable pickle ({type(e).__name__}: {e}); {_EXPECTED}") from None


def _read_labels(path: Path) -> tuple[np.ndarray, list[str] | None]:
    """(per-image class index int [N], class names or None) from {split}_labels.pkl."""
    data = _load_pickle(path)
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a {type(data).__name__}, expected a dict with 'label_specific'")
    data = {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}
    # 'labels' is the key of a re-packed copy in circulation; Ren et al.'s files use 'label_specific'.
    labels = data.get("label_specific", data.get("labels"))
    if labels is None:
        raise UserError(f"{path} has no 'label_specific' entry (keys: {sorted(data)})")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{path}: 'label_specific' is {labels.dtype} {labels.shape}, expected integers [N]")
    names = data.get("label_specific_str")
    if names is not None:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return labels, names


def _png_bytes(item) -> bytes:
    """One entry of {split}_images_png.pkl: cv2.imencode's uint8 array, or bytes (a Python 2 str read as latin1)."""
    if isinstance(item, np.ndarray):
        return item.tobytes()
    if isinstance(item, str):
        return item.encode("latin1")
    return bytes(item)


def _find_files(root: Path) -> dict[str, tuple[Path, Path]]:
    """{split: (images file, labels file)}; the decoded .npz wins over the PNG pickle when both exist."""
    if not root.is_dir():
        raise UserError(f"dataset.local_dir={root} is not a directory; {_EXPECTED}")
    found, missing = {}, []
    for s in SPLITS:
        npz, png, labels = root / f"{s}_images.npz", root / f"{s}_images_png.pkl", root / f"{s}_labels.pkl"
        images = npz if npz.is_file() else png if png.is_file() else None
        if images is None:
            missing.append(f"{png.name} (or {npz.name})")
        if not labels.is_file():
            missing.append(labels.name)
        found[s] = (images, labels)
    if missing:
        raise UserError(f"dataset.local_dir={root} lacks {', '.join(missing)}; {_EXPECTED}")
    return found


def _class_members(labels: np.ndarray, names: list[str] | None, where: Path) -> dict[str, np.ndarray]:
    """{class name: image indices in file order}, classes in label order."""
    members = {}
    for c in np.unique(labels):
        name = names[c] if names is not None and 0 <= c < len(names) else str(int(c))
        if name in members:
            raise UserError(f"{where}: two labels share the class name {name}")
        members[name] = np.flatnonzero(labels == c)
    if not members:
        raise UserError(f"{where} lists no images")
    return members


def _read_split(images_path: Path, members: dict[str, np.ndarray], n: int, image_size: int, npz_order: str) -> np.ndarray:
    out = np.empty((len(members), n, image_size, image_size, 3), np.uint8)
    if images_path.suffix == ".npz":
        try:
            with np.load(images_path, allow_pickle=False) as z:
                images = z["images"]
        except Exception as e:
            raise UserError(f"{images_path} is not an .npz with an 'images' array ({type(e).__name__}: {e})") from None
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise UserError(f"{images_path}: 'images' is {images.dtype} {images.shape}, expected uint8 [N, H, W, 3]")
        count = len(images)
        take = lambda idx: images[idx][..., ::-1] if npz_order == "bgr" else images[idx]  # noqa: E731
    else:
        images = _load_pickle(images_path)
        if not isinstance(images, (list, tuple, np.ndarray)):
            raise UserError(f"{images_path} holds a {type(images).__name__}, expected a list of PNG-encoded images")
        count = len(images)

        def take(idx):
            try:
                return np.stack([decode_rgb(_png_bytes(images[i]), image_size) for i in idx])
            except (OSError, ValueError) as e:
                raise UserError(f"{images_path}: cannot decode a PNG ({e})") from None
    top = max(int(idx[-1]) for idx in members.values())
    if top >= count:
        raise UserError(f"{images_path} has {count} images but its labels file indexes image {top}")
    for c, idx in enumerate(members.values()):
        out[c] = resize_rgb(np.ascontiguousarray(take(idx[:n])), image_size)
    return out


def load_tiered_imagenet(local_dir: str | None, image_size: int = 84, cache_dir: str | None = None,
                         examples_per_class: int | None = None, npz_order: str = "bgr") -> dict[str, np.ndarray]:
    """tieredImageNet per split: {"train","val","test"}: uint8 [classes, examples, S, S, 3] (RGB).

    Reads Ren et al.'s files in local_dir: {split}_labels.pkl (a dict whose 'label_specific' gives each
    image's class index and 'label_specific_str' the class names) with either {split}_images_png.pkl
    (a list of PNG-encoded 84x84 images) or {split}_images.npz ('images' uint8 [N, 84, 84, 3], the
    decompressed copy that their code writes with OpenCV, hence BGR: npz_order="bgr" flips it to RGB).
    The classes come from the label files (published: 351/97/160); classes are in label order.
    Classes hold 732 to 1300 images, so each keeps its first examples_per_class images in file order
    (default: as many as the smallest class of all splits). The full set is large (~9 GB of uint8 at
    84x84 for 732 images per class); the arrays are cached as one .npz under cache_dir.

    Args:
      local_dir: the folder holding the files (config key dataset.local_dir).
      image_size: side S of the returned images; resized with Lanczos when not 84.
      cache_dir: where to keep the prepared arrays (default $METARUN_CACHE or ~/.cache/metarun).
      examples_per_class: images kept per class, or None for the smallest class size.
      npz_order: channel order of the .npz images, "bgr" (Ren et al.'s decompress) or "rgb".

    Returns:
      {split: uint8 [classes, examples, S, S, 3]}.
    """
    image_size = check_image_size(image_size)
    if npz_order not in ("bgr", "rgb"):
        raise UserError(f"dataset.npz_order={npz_order!r} is unknown; valid values: bgr, rgb")
    if local_dir is None:
        raise UserError(f"dataset.local_dir is not set; tieredImageNet is read from local files only: {_EXPECTED}")
    root = Path(local_dir).expanduser().absolute()
    files = _find_files(root)
    members = {s: _class_members(*_read_labels(labels), labels) for s, (_, labels) in files.items()}
    seen: dict[str, str] = {}
    for s, m in members.items():
        for name in m:
            if name in seen:
                raise UserError(f"tieredImageNet class {name} is in both the '{seen[name]}' and '{s}' splits")
            seen[name] = s
    smallest = min(len(idx) for m in members.values() for idx in m.values())
    n = smallest if examples_per_class is None else examples_per_class
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= smallest:
        raise UserError(f"dataset.examples_per_class={examples_per_class!r} must be an integer in 1..{smallest} "
                        f"(the smallest tieredImageNet class), or null")
    key = fingerprint(root, [f for pair in files.values() for f in pair], f"v{_CACHE_VERSION}", image_size, n, npz_order)
    cache = cache_root(cache_dir) / f"tiered_imagenet-{image_size}-{n}-{key}.npz"
    if (hit := read_splits(cache, SPLITS)) is not None:
        return hit
    arrays = {s: _read_split(files[s][0], members[s], int(n), image_size, npz_order) for s in SPLITS}
    write_splits(cache, arrays)
    return arrays
