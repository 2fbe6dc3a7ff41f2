"""Omniglot as uint8 arrays (local zips/folders or tensorflow-datasets), cached as .npz, and its class splits."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import re
import tempfile
import warnings
import zipfile
from importlib import resources
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image

from metarun.errors import UserError
from metarun.registry import register

DRAWINGS = 20
_PARTS = ("images_background", "images_evaluation")
_CHAR_RE = re.compile(r"character\d+")
# Bump when decoding changes so stale caches are not reused.
_CACHE_VERSION = 1
_EXPECTED = "expected a folder holding images_background.zip and images_evaluation.zip (or the extracted folders)"
_LAKE_VAL_ALPHABETS = 5
# dataset.split: which characters train, validate and test (each once per rotation).
SPLIT_MEANINGS = {
    "vinyals": "Vinyals et al.'s shipped lists: 1028 train / 172 val / 423 test characters",
    "lake": "train on 25 background alphabets, validate on the last 5 (by name), test on the 20 evaluation alphabets",
    "lake30": "train on all 30 background alphabets (Lake et al.; Snell et al.), no validation "
              "(train.val_every=0, a fixed step count), test on the 20 evaluation alphabets",
}


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: comparing ndarray fields with == is ambiguous
class OmniglotSource:
    """All characters: images uint8 [n, 20, S, S, 1] (ink 255), sorted "Alphabet/characterNN" names, background flags."""

    images: np.ndarray
    names: tuple[str, ...]
    background: np.ndarray


def _decode_png(data: bytes, size: int) -> np.ndarray:
    """One PNG -> uint8 [size, size], ink bright."""
    with Image.open(io.BytesIO(data)) as im:
        small = im.convert("L").resize((size, size), Image.Resampling.LANCZOS)
    return 255 - np.asarray(small, dtype=np.uint8)


def _cache_root(cache_dir: str | None) -> Path:
    return Path(cache_dir or os.environ.get("METARUN_CACHE") or "~/.cache/metarun").expanduser()


def _read_cache(path: Path) -> OmniglotSource | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return OmniglotSource(z["images"], tuple(z["names"].tolist()), z["background"])
    except Exception as e:  # a truncated or foreign file: rebuild rather than fail the run
        warnings.warn(f"ignoring unreadable Omniglot cache {path}: {e}")
        return None


def _write_cache(path: Path, source: OmniglotSource) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Same-directory temp file + os.replace: concurrent runs never see a half-written cache.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, images=source.images, names=np.array(source.names), background=source.background)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:  # a read-only cache only costs speed
        warnings.warn(f"could not write the Omniglot cache {path}: {e}")


def _find_sources(root: Path) -> list[tuple[Path, bool]]:
    if not root.exists():
        raise UserError(f"dataset.local_dir={root} does not exist; {_EXPECTED}")
    if not root.is_dir():
        raise UserError(f"dataset.local_dir={root} is not a directory; {_EXPECTED}")
    found = []
    for part in _PARTS:
        folder, zipped = root / part, root / f"{part}.zip"
        src = folder if folder.is_dir() else zipped if zipped.is_file() else None
        if src is not None:
            found.append((src, part == "images_background"))
    if not found:
        raise UserError(f"dataset.local_dir={root} has neither images_background(.zip) nor images_evaluation(.zip); {_EXPECTED}")
    return found


def _list_pngs(src: Path) -> dict[str, list[str]]:
    """{"Alphabet/characterNN": drawing paths (zip members or relative files) sorted by filename}."""
    if src.is_dir():
        rels = [p.relative_to(src).as_posix() for p in src.rglob("*") if p.suffix.lower() == ".png"]
    else:
        try:
            with zipfile.ZipFile(src) as zf:
                rels = [n for n in zf.namelist() if n.lower().endswith(".png")]
        except (zipfile.BadZipFile, OSError) as e:
            raise UserError(f"{src} is not a readable zip file ({e}); expected the Omniglot archive {src.name}") from None
    groups: dict[str, list[str]] = {}
    for rel in rels:
        parts = rel.split("/")
        if len(parts) >= 3 and "__MACOSX" not in parts and _CHAR_RE.fullmatch(parts[-2]):
            groups.setdefault(f"{parts[-3]}/{parts[-2]}", []).append(rel)
    if not groups:
        raise UserError(f"{src} does not look like Omniglot: no <Alphabet>/characterNN/*.png entries in it")
    for name, refs in groups.items():
        if len(refs) != DRAWINGS:
            raise UserError(f"{src}: {name} has {len(refs)} drawings, expected {DRAWINGS}")
        refs.sort(key=lambda r: r.rsplit("/", 1)[-1])
    return groups


def _fingerprint(root: Path, listed: list[tuple[Path, bool, dict[str, list[str]]]], image_size: int) -> str:
    h = hashlib.sha1(f"v{_CACHE_VERSION}|{image_size}".encode())
    for src, _, groups in listed:
        files = [src / r for refs in groups.values() for r in refs] if src.is_dir() else [src]
        for f in sorted(files):
            st = f.stat()
            h.update(f"|{f.relative_to(root).as_posix()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _assemble(chars: dict[str, tuple[bool, list[np.ndarray]]], image_size: int) -> OmniglotSource:
    names = tuple(sorted(chars))
    images = np.empty((len(names), DRAWINGS, image_size, image_size, 1), np.uint8)
    for i, name in enumerate(names):
        images[i, ..., 0] = np.stack(chars[name][1])
    return OmniglotSource(images, names, np.array([chars[n][0] for n in names], dtype=bool))


def _load_local(root: Path, image_size: int, cache_dir: str | None) -> OmniglotSource:
    listed = [(src, bg, _list_pngs(src)) for src, bg in _find_sources(root)]
    cache = _cache_root(cache_dir) / f"omniglot-local-{image_size}-{_fingerprint(root, listed, image_size)}.npz"
    if (hit := _read_cache(cache)) is not None:
        return hit
    chars: dict[str, tuple[bool, list[np.ndarray]]] = {}
    for src, bg, groups in listed:
        zf = None if src.is_dir() else zipfile.ZipFile(src)
        try:
            for name, refs in groups.items():
                if name in chars:
                    raise UserError(f"{src}: {name} also appears in the other Omniglot part; {_EXPECTED}")
                try:
                    # A plain loop: ~32k small PNGs decode in seconds, threads bought little on 2 cores.
                    chars[name] = (bg, [_decode_png(zf.read(r) if zf else (src / r).read_bytes(), image_size) for r in refs])
                except (OSError, ValueError, zipfile.BadZipFile) as e:
                    raise UserError(f"{src}: cannot decode a drawing of {name} ({e})") from None
        finally:
            if zf is not None:
                zf.close()
    source = _assemble(chars, image_size)
    _write_cache(cache, source)
    return source


def _load_tfds(image_size: int, cache_dir: str | None) -> OmniglotSource:
    cache = _cache_root(cache_dir) / f"omniglot-tfds-{image_size}-v{_CACHE_VERSION}.npz"
    if (hit := _read_cache(cache)) is not None:
        return hit
    chars: dict[str, tuple[bool, list[np.ndarray]]] = {}
    try:
        import tensorflow_datasets as tfds

        (train, test), info = tfds.load("omniglot", split=["train", "test"], with_info=True, shuffle_files=False)
        alphabets = info.features["alphabet"].names
        for ds, bg in ((train, True), (test, False)):
            for ex in tfds.as_numpy(ds):
                # TFDS stores alphabet_char_id = NN - 1 for the folder characterNN.
                name = f"{alphabets[int(ex['alphabet'])]}/character{int(ex['alphabet_char_id']) + 1:02d}"
                # The 3 channels are identical copies of the 1-bit drawing (ink 0, background 255).
                img = Image.fromarray(np.asarray(ex["image"])[..., 0]).resize((image_size, image_size), Image.Resampling.LANCZOS)
                # TFDS drops the file names, so drawings keep the builder's (fixed) order, not filename order.
                chars.setdefault(name, (bg, []))[1].append(255 - np.asarray(img, dtype=np.uint8))
    except ImportError as e:
        raise UserError(
            f"dataset.local_dir is not set, and loading 'omniglot' through tensorflow-datasets needs the tfds extra "
            f"({e.name or e}): pip install 'metarun[tfds]' (and internet), or set dataset.local_dir=PATH to a folder "
            f"holding images_background.zip and images_evaluation.zip"
        ) from None
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        raise UserError(
            f"dataset.local_dir is not set and tensorflow-datasets could not load 'omniglot' ({type(e).__name__}: {reason}); "
            f"set dataset.local_dir=PATH to a folder holding images_background.zip and images_evaluation.zip (or the extracted folders)"
        ) from None
    bad = [n for n, (_, imgs) in chars.items() if len(imgs) != DRAWINGS]
    if not chars or bad:
        raise UserError(f"tensorflow-datasets 'omniglot' gave {len(chars)} characters, {len(bad)} without {DRAWINGS} drawings; set dataset.local_dir=PATH instead")
    source = _assemble(chars, image_size)
    _write_cache(cache, source)
    return source


def load_omniglot(local_dir: str | None, image_size: int = 28, cache_dir: str | None = None) -> OmniglotSource:
    """All 1623 (or the given) Omniglot characters, resized to image_size, from local_dir or tensorflow-datasets."""
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise UserError(f"dataset.image_size={image_size!r} must be a positive integer")
    if local_dir is None:
        return _load_tfds(int(image_size), cache_dir)
    return _load_local(Path(local_dir).expanduser().absolute(), int(image_size), cache_dir)


def _rotation_steps(rotations: Sequence[int]) -> dict[int, int]:
    """{degrees mod 360: quarter turns}, in the order given."""
    steps: dict[int, int] = {}
    for r in rotations:
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r % 90:
            raise UserError(f"dataset.rotations={list(rotations)} must hold multiples of 90 degrees, e.g. [0, 90, 180, 270]")
        steps.setdefault(int(r) % 360, int(r) % 360 // 90)
    if not steps:
        raise UserError("dataset.rotations is empty; use e.g. [0] or [0, 90, 180, 270]")
    return steps


def _vinyals_pairs(source: OmniglotSource, steps: dict[int, int]) -> dict[str, list[tuple[int, int]]]:
    index = {n: i for i, n in enumerate(source.names)}
    pairs: dict[str, list[tuple[int, int]]] = {}
    for part in ("train", "val", "test"):
        listing = resources.files("metarun.data").joinpath("splits", "vinyals", f"{part}.txt")
        pairs[part] = []
        for line in listing.read_text().split():
            char, rot = line.rsplit("/", 1)
            deg = int(rot.removeprefix("rot"))
            if deg not in steps:
                continue
            if char not in index:
                raise UserError(
                    f"dataset.split=vinyals lists {char} in {listing} but the loaded Omniglot data "
                    f"({len(source.names)} characters) lacks it; point dataset.local_dir at the full images_background/images_evaluation"
                )
            pairs[part].append((index[char], steps[deg]))
    return pairs


def _unknown_split(split) -> UserError:
    return UserError(f"dataset.split={split!r} is unknown; valid values: {', '.join(SPLIT_MEANINGS)}")


def split_members(source: OmniglotSource, split: str = "vinyals",
                  rotations: Sequence[int] = (0, 90, 180, 270)) -> dict[str, list[tuple[int, int]]]:
    """{"train","val","test"}: the classes of each part as (index into source.names, quarter turns).

    "vinyals": the shipped class lists of Vinyals et al. (2016), restricted to `rotations`.
    "lake": train = images_background characters except the last 5 background alphabets (sorted by name),
    which form val; test = images_evaluation characters.
    "lake30": train = every images_background character (all 30 alphabets, as Lake et al. 2015 and
    Snell et al. 2017 trained); val = none (train with train.val_every=0); test = images_evaluation.
    Each character appears once per rotation.
    """
    steps = _rotation_steps(rotations)
    if split == "vinyals":
        return _vinyals_pairs(source, steps)
    if split not in ("lake", "lake30"):
        raise _unknown_split(split)
    held = np.zeros(len(source.names), bool)
    if split == "lake":
        alphabet = np.array([n.split("/", 1)[0] for n in source.names])
        bg_alphabets = sorted(set(alphabet[source.background]))
        if len(bg_alphabets) <= _LAKE_VAL_ALPHABETS:
            raise UserError(f"dataset.split=lake needs more than {_LAKE_VAL_ALPHABETS} background alphabets, the data has {len(bg_alphabets)}")
        held = np.isin(alphabet, bg_alphabets[-_LAKE_VAL_ALPHABETS:]) & source.background
    members = {"train": source.background & ~held, "val": held, "test": ~source.background}
    return {k: [(int(i), s) for i in np.flatnonzero(m) for s in steps.values()] for k, m in members.items()}


def split_classes(source: OmniglotSource, split: str = "vinyals", rotations: Sequence[int] = (0, 90, 180, 270)) -> dict[str, np.ndarray]:
    """Split into {"train","val","test"}: uint8 [classes, 20, S, S, 1], one class per (character, rotation),
    the classes of `split_members`. Rotations turn counter-clockwise by k*90 degrees (np.rot90 on H, W).
    lake30's val is empty ([0, 20, S, S, 1]): a run with validation is refused when it asks for it.
    """
    pairs = split_members(source, split, rotations)
    empty = [k for k, p in pairs.items() if not p and not (split == "lake30" and k == "val")]
    if empty:
        raise UserError(f"dataset.split={split} gives no classes for {'/'.join(empty)}; the data needs both images_background and images_evaluation")
    blank = np.zeros((0,) + source.images.shape[1:], source.images.dtype)
    return {k: np.stack([np.rot90(source.images[i], s, axes=(1, 2)) for i, s in p]) if p else blank
            for k, p in pairs.items()}


@dataclasses.dataclass
class OmniglotConfig:
    name: str = "omniglot"
    kind: str = "classification"
    local_dir: Optional[str] = None
    image_size: int = 28
    split: str = "vinyals"
    rotations: List[int] = dataclasses.field(default_factory=lambda: [0, 90, 180, 270])
    cache_dir: Optional[str] = None


@register("dataset", "omniglot", schema=OmniglotConfig, family="classification")
def load(cfg, seed: int = 0) -> dict[str, np.ndarray]:
    """{split: uint8 [classes, 20, S, S, 1]} from dataset.local_dir (or tensorflow-datasets)."""
    del seed
    if cfg.split not in SPLIT_MEANINGS:  # checked before the (slow) first decode
        raise _unknown_split(cfg.split)
    _rotation_steps(list(cfg.rotations))
    source = load_omniglot(cfg.local_dir, cfg.image_size, cfg.cache_dir)
    return split_classes(source, cfg.split, list(cfg.rotations))
