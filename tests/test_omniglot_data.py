"""Tests for metarun.data.omniglot on tiny generated data (plus one opt-in real-data check)."""

from __future__ import annotations

import time
import zipfile

import numpy as np
import pytest
from metarun.data import omniglot
from metarun.data.omniglot import load_omniglot, split_classes
from metarun.errors import UserError

# Mirrors tests/conftest.py FAKE_LAYOUT (checked in test_fake_layout); not imported, so any pytest import mode works.
FAKE_DRAWINGS = 20
N_BG, N_BG_ALPHABETS, PER_ALPHABET, N_EVAL = 21, 7, 3, 6


def test_fake_layout(fake_omniglot_layout):
    bg, ev = fake_omniglot_layout["images_background"], fake_omniglot_layout["images_evaluation"]
    assert (sum(bg.values()), len(bg), set(bg.values()), sum(ev.values())) == (N_BG, N_BG_ALPHABETS, {PER_ALPHABET}, N_EVAL)


@pytest.fixture(scope="module")
def source(fake_omniglot_dir, tmp_path_factory):
    return load_omniglot(str(fake_omniglot_dir), image_size=28, cache_dir=str(tmp_path_factory.mktemp("cache")))


def test_shape_dtype_names_inversion(source):
    n = N_BG + N_EVAL
    assert source.images.shape == (n, FAKE_DRAWINGS, 28, 28, 1)
    assert source.images.dtype == np.uint8
    assert list(source.names) == sorted(source.names) and len(set(source.names)) == n
    assert "AlphaA/character01" in source.names and "Eval_Two/character03" in source.names
    assert source.background.dtype == bool and source.background.sum() == N_BG
    assert all(source.background[i] == name.startswith("Alpha") for i, name in enumerate(source.names))
    # Strokes are thin on a large blank page: after inversion most pixels are dark, ink is bright.
    assert np.median(source.images) == 0 and source.images.max() == 255
    # Different characters, different drawings of one character differ.
    assert not np.array_equal(source.images[0, 0], source.images[1, 0])
    assert not np.array_equal(source.images[0, 0], source.images[0, 1])


def test_drawings_ordered_by_filename(source, fake_omniglot_folders):
    # The zips were written in reverse order; drawing 0 must still be the _01 file.
    i = source.names.index("AlphaB/character02")
    first = sorted((fake_omniglot_folders / "images_background/AlphaB/character02").glob("*.png"))[0]
    assert first.name.endswith("_01.png")
    np.testing.assert_array_equal(source.images[i, 0, ..., 0], omniglot._decode_png(first.read_bytes(), 28))


def test_zips_and_folders_agree(source, fake_omniglot_folders, tmp_path):
    other = load_omniglot(str(fake_omniglot_folders), image_size=28, cache_dir=str(tmp_path))
    assert other.names == source.names
    np.testing.assert_array_equal(other.images, source.images)
    np.testing.assert_array_equal(other.background, source.background)


def test_cache_hit_skips_decoding(fake_omniglot_dir, tmp_path, monkeypatch):
    first = load_omniglot(str(fake_omniglot_dir), image_size=16, cache_dir=str(tmp_path))
    assert [p.suffix for p in tmp_path.iterdir()] == [".npz"]  # one file, no temp leftovers

    def boom(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(omniglot, "_decode_png", boom)
    second = load_omniglot(str(fake_omniglot_dir), image_size=16, cache_dir=str(tmp_path))
    assert second.names == first.names and second.images.shape[2:4] == (16, 16)
    np.testing.assert_array_equal(second.images, first.images)
    np.testing.assert_array_equal(second.background, first.background)
    # A different size is a different cache entry, so it must decode.
    with pytest.raises(AssertionError, match="decoded again"):
        load_omniglot(str(fake_omniglot_dir), image_size=20, cache_dir=str(tmp_path))


@pytest.mark.parametrize("rotations", [(0,), (0, 90, 180, 270)])
def test_lake_split_counts(source, rotations):
    splits = split_classes(source, "lake", rotations)
    r = len(rotations)
    assert splits["train"].shape == ((N_BG_ALPHABETS - 5) * PER_ALPHABET * r, FAKE_DRAWINGS, 28, 28, 1)
    assert splits["val"].shape[0] == 5 * PER_ALPHABET * r
    assert splits["test"].shape[0] == N_EVAL * r
    assert all(s.dtype == np.uint8 for s in splits.values())


def test_rotation_is_counter_clockwise_rot90(source):
    splits = split_classes(source, "lake", (0, 90, 180, 270))
    test = splits["test"]  # character-major, rotation-minor
    for k in range(1, 4):
        np.testing.assert_array_equal(test[k], np.rot90(test[0], k, axes=(1, 2)))
    i = source.names.index("Eval_One/character01")
    np.testing.assert_array_equal(test[1, 0, ..., 0], np.rot90(source.images[i, 0, ..., 0]))


def test_split_errors(source):
    with pytest.raises(UserError, match=r"dataset\.split.*vinyals, lake"):
        split_classes(source, "nope")
    with pytest.raises(UserError, match=r"dataset\.rotations"):
        split_classes(source, "lake", (0, 45))
    with pytest.raises(UserError, match=r"vinyals.*train\.txt"):
        split_classes(source, "vinyals")


# Omniglot's own layout in miniature: 30 background alphabets (one character each) and 3 evaluation
# alphabets; every drawing of character c is a flat image of gray level 255 - LEVEL * c, so a class of
# any split names its character by its pixels (decoding inverts: ink bright).
LAKE_BG, LAKE_EVAL, LEVEL = [f"Back{a:02d}" for a in range(30)], ["Eval_A", "Eval_B", "Eval_C"], 7


@pytest.fixture(scope="module")
def lake_source(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("lake_layout")
    for c, alphabet in enumerate(LAKE_BG + LAKE_EVAL, start=1):
        part = "images_background" if alphabet in LAKE_BG else "images_evaluation"
        folder = root / part / alphabet / "character01"
        folder.mkdir(parents=True)
        for d in range(1, FAKE_DRAWINGS + 1):
            Image.new("L", (8, 8), 255 - LEVEL * c).save(folder / f"{c:04d}_{d:02d}.png")
    return load_omniglot(str(root), image_size=4, cache_dir=str(tmp_path_factory.mktemp("cache")))


def _alphabets(source, pairs):
    return {source.names[i].split("/")[0] for i, _ in pairs}


def test_lake30_trains_on_all_30_background_alphabets(lake_source):
    members = omniglot.split_members(lake_source, "lake30", (0, 90))
    assert _alphabets(lake_source, members["train"]) == set(LAKE_BG)   # all 30, none held out
    assert _alphabets(lake_source, members["test"]) == set(LAKE_EVAL)
    assert members["val"] == [] and len(members["train"]) == 30 * 2   # once per rotation
    # The arrays hold exactly those characters: the train classes' pixels are the 30 background
    # levels (each twice: two rotations), no evaluation level among them.
    splits = split_classes(lake_source, "lake30", (0, 90))
    levels = lambda a: sorted(int(x) // LEVEL for x in a[:, 0, 0, 0, 0])  # noqa: E731
    assert levels(splits["train"]) == sorted(2 * list(range(1, 31)))
    assert levels(splits["test"]) == sorted(2 * [31, 32, 33])
    assert splits["val"].shape == (0, FAKE_DRAWINGS, 4, 4, 1) and splits["val"].dtype == np.uint8
    # The 25/5 protocol on the same layout, for contrast: the last 5 background alphabets validate.
    lake = omniglot.split_members(lake_source, "lake", (0,))
    assert _alphabets(lake_source, lake["train"]) == set(LAKE_BG[:25])
    assert _alphabets(lake_source, lake["val"]) == set(LAKE_BG[25:])


def test_lake30_has_no_validation_classes(lake_source):
    """A run that validates on lake30 is told, in one line, to train without validation."""
    from conftest import compose
    from metarun.families.classification import ClassificationFamily

    cfg = compose(["dataset=omniglot", "dataset.split=lake30", "task.ways=2"])
    family = ClassificationFamily("omniglot", split_classes(lake_source, "lake30", (0,)), cfg.task, cfg.dataset)
    family.sampler("train"), family.sampler("test")
    with pytest.raises(UserError, match=r"dataset\.split=lake30 has no 'val' classes; .*train\.val_every=0"):
        family.sampler("val")
    with pytest.raises(UserError, match=r"valid values: vinyals, lake, lake30"):
        omniglot.load(compose(["dataset=omniglot", "dataset.split=lake31"]).dataset)


def test_missing_dir(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match="does not exist") as err:
        load_omniglot(str(missing), cache_dir=str(tmp_path))
    assert str(missing) in str(err.value) and "images_background.zip" in str(err.value)


def test_dir_without_archives(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "readme.txt").write_text("hi")
    with pytest.raises(UserError, match="neither images_background") as err:
        load_omniglot(str(tmp_path / "data"), cache_dir=str(tmp_path))
    assert str(tmp_path / "data") in str(err.value)


def test_zip_that_is_not_omniglot(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    with zipfile.ZipFile(data / "images_background.zip", "w") as zf:
        zf.writestr("images_background/photo.png", b"not really")
    with pytest.raises(UserError, match="does not look like Omniglot") as err:
        load_omniglot(str(data), cache_dir=str(tmp_path))
    assert str(data / "images_background.zip") in str(err.value)
    (data / "images_background.zip").write_bytes(b"garbage, not a zip")
    with pytest.raises(UserError, match="not a readable zip") as err:
        load_omniglot(str(data), cache_dir=str(tmp_path))
    assert str(data / "images_background.zip") in str(err.value)


def test_tfds_failure_is_user_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tfds(name, *args, **kwargs):
        if name.startswith("tensorflow_datasets"):
            raise ImportError("No module named 'tensorflow_datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tfds)
    with pytest.raises(UserError, match=r"dataset\.local_dir is not set.*omniglot.*dataset\.local_dir=PATH") as err:
        load_omniglot(None, cache_dir=str(tmp_path))
    assert "\n" not in str(err.value)


@pytest.mark.realdata
def test_real_omniglot(real_omniglot_dir, tmp_path):
    t0 = time.perf_counter()
    source = load_omniglot(str(real_omniglot_dir), image_size=28, cache_dir=str(tmp_path))
    prep = time.perf_counter() - t0
    t0 = time.perf_counter()
    cached = load_omniglot(str(real_omniglot_dir), image_size=28, cache_dir=str(tmp_path))
    hit = time.perf_counter() - t0
    print(f"omniglot first prep {prep:.1f}s, cached load {hit:.2f}s, images {source.images.shape}")
    assert source.images.shape == (1623, 20, 28, 28, 1) and source.background.sum() == 964
    np.testing.assert_array_equal(cached.images, source.images)
    assert hit < 2.0
    splits = split_classes(cached, "vinyals")
    assert {k: v.shape[0] for k, v in splits.items()} == {"train": 4112, "val": 688, "test": 1692}
