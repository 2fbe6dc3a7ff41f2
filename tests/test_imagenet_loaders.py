"""Tests for the miniImageNet, tieredImageNet, CIFAR-FS and FC100 loaders on tiny files generated in the published layouts."""

from __future__ import annotations

import csv
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metarun.data import cifar_fs, mini_imagenet, tiered_imagenet
from metarun.data.cifar_fs import load_cifar_fs, load_fc100, split_lists
from metarun.data.mini_imagenet import load_mini_imagenet
from metarun.data.tiered_imagenet import load_tiered_imagenet
from metarun.errors import UserError

SPLITS = ("train", "val", "test")
S = 8  # side of the fake ImageNet images


def _smooth_images(rng: np.random.Generator, n: int, base: np.ndarray) -> np.ndarray:
    """n smooth uint8 [S, S, 3] images near a class colour (smooth, so JPEG keeps them close)."""
    ramp = np.linspace(-30, 30, S)
    grad = ramp[:, None, None] * rng.uniform(-1, 1, (n, 1, 1, 1, 3)) + ramp[None, :, None] * rng.uniform(-1, 1, (n, 1, 1, 1, 3))
    return np.clip(base + grad[:, 0], 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- miniImageNet

MINI_CLASSES = {"train": 3, "val": 2, "test": 2}
MINI_PER_CLASS = 4


@pytest.fixture(scope="module")
def mini_source() -> dict[str, dict[str, np.ndarray]]:
    """{split: {wnid: uint8 [4, S, S, 3]}}, classes with well separated colours."""
    rng = np.random.default_rng(0)
    out, k = {}, 0
    for s in SPLITS:
        out[s] = {}
        for _ in range(MINI_CLASSES[s]):
            # wnids deliberately not created in sorted order within a split.
            wnid = f"n{(7 - k) * 1111111:08d}"
            out[s][wnid] = _smooth_images(rng, MINI_PER_CLASS, np.array([40 + 25 * k, 200 - 20 * k, 60 + 15 * (k % 3)]))
            k += 1
    return out


def write_mini_pickles(root: Path, source) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for s, classes in source.items():
        items = [(w, i) for w, imgs in classes.items() for i in range(len(imgs))]
        order = rng.permutation(len(items))  # classes interleaved in image_data, as class_dict allows
        image_data = np.stack([classes[items[j][0]][items[j][1]] for j in order])
        class_dict = {w: [int(np.flatnonzero(order == items.index((w, i)))[0]) for i in range(len(imgs))]
                      for w, imgs in classes.items()}
        with open(root / f"mini-imagenet-cache-{s}.pkl", "wb") as f:
            pickle.dump({"image_data": image_data, "class_dict": class_dict}, f, protocol=4)
    return root


def write_mini_folder(root: Path, source) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    for s, classes in source.items():
        for w, imgs in classes.items():
            for i, img in enumerate(imgs):
                Image.fromarray(img).save(root / "images" / f"{w}{i + 1:08d}.jpg", quality=95)
        # Round robin over the classes: rows interleaved, each class's files still in order.
        rows = [(f"{w}{i + 1:08d}.jpg", w) for i in range(MINI_PER_CLASS) for w in classes if i < len(classes[w])]
        with open(root / f"{s}.csv", "w", newline="") as f:
            csv.writer(f).writerows([("filename", "label")] + rows)
    return root


@pytest.fixture(scope="module")
def mini_pickles(mini_source, tmp_path_factory) -> Path:
    return write_mini_pickles(tmp_path_factory.mktemp("mini_pkl"), mini_source)


@pytest.fixture(scope="module")
def mini_folder(mini_source, tmp_path_factory) -> Path:
    return write_mini_folder(tmp_path_factory.mktemp("mini_csv"), mini_source)


def _expected(source, split):
    return np.stack([source[split][w] for w in sorted(source[split])])


def test_mini_pickle_layout(mini_pickles, mini_source, tmp_path):
    out = load_mini_imagenet(str(mini_pickles), image_size=S, cache_dir=str(tmp_path))
    assert set(out) == set(SPLITS)
    for s in SPLITS:
        assert out[s].dtype == np.uint8 and out[s].shape == (MINI_CLASSES[s], MINI_PER_CLASS, S, S, 3)
        # Classes in sorted wnid order, each class's images in class_dict order, exactly.
        np.testing.assert_array_equal(out[s], _expected(mini_source, s))


def test_mini_folder_layout(mini_folder, mini_source, tmp_path):
    out = load_mini_imagenet(str(mini_folder), image_size=S, cache_dir=str(tmp_path))
    for s in SPLITS:
        exp = _expected(mini_source, s)
        assert out[s].shape == exp.shape
        for c, w in enumerate(sorted(mini_source[s])):
            for i in range(MINI_PER_CLASS):
                decoded = np.asarray(Image.open(mini_folder / "images" / f"{w}{i + 1:08d}.jpg").convert("RGB"))
                np.testing.assert_array_equal(out[s][c, i], decoded)
        # JPEG is lossy, but far closer to its own class than the classes are to each other.
        err = np.abs(out[s].astype(int) - exp.astype(int)).mean(axis=(1, 2, 3, 4))
        other = np.abs(out[s].astype(int) - np.roll(exp, 1, axis=0).astype(int)).mean(axis=(1, 2, 3, 4))
        assert err.max() < 6 and other.min() > 15


def test_mini_resize(mini_pickles, mini_source, tmp_path):
    out = load_mini_imagenet(str(mini_pickles), image_size=5, cache_dir=str(tmp_path))
    w = sorted(mini_source["val"])[1]
    ref = np.asarray(Image.fromarray(mini_source["val"][w][2]).resize((5, 5), Image.Resampling.LANCZOS))
    assert out["val"].shape == (2, MINI_PER_CLASS, 5, 5, 3)
    np.testing.assert_array_equal(out["val"][1, 2], ref)


def test_mini_cache_hit_skips_reading(mini_pickles, mini_folder, tmp_path, monkeypatch):
    first = load_mini_imagenet(str(mini_pickles), image_size=S, cache_dir=str(tmp_path))
    folder_first = load_mini_imagenet(str(mini_folder), image_size=S, cache_dir=str(tmp_path))
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".npz", ".npz"]  # no temp leftovers

    def boom(*args, **kwargs):
        raise AssertionError("read again despite the cache")

    monkeypatch.setattr(mini_imagenet, "_read_pickle", boom)
    monkeypatch.setattr(mini_imagenet, "decode_rgb", boom)
    for root, ref in ((mini_pickles, first), (mini_folder, folder_first)):
        again = load_mini_imagenet(str(root), image_size=S, cache_dir=str(tmp_path))
        for s in SPLITS:
            np.testing.assert_array_equal(again[s], ref[s])
    with pytest.raises(AssertionError, match="read again"):
        load_mini_imagenet(str(mini_pickles), image_size=6, cache_dir=str(tmp_path))


def test_mini_missing_files(mini_source, tmp_path):
    with pytest.raises(UserError, match=r"dataset\.local_dir=.*mini-imagenet-cache-\{train,val,test\}\.pkl.*train\.csv"):
        load_mini_imagenet(str(tmp_path), cache_dir=str(tmp_path / "c"))
    with pytest.raises(UserError, match="dataset.local_dir is not set"):
        load_mini_imagenet(None)
    with pytest.raises(UserError, match=r"dataset\.local_dir=.*does-not-exist"):
        load_mini_imagenet(str(tmp_path / "does-not-exist"))
    root = write_mini_pickles(tmp_path / "pkl", mini_source)
    (root / "mini-imagenet-cache-val.pkl").unlink()
    with pytest.raises(UserError, match=r"dataset\.local_dir=.* lacks mini-imagenet-cache-val\.pkl;"):
        load_mini_imagenet(str(root), cache_dir=str(tmp_path / "c"))
    folder = write_mini_folder(tmp_path / "csv", mini_source)
    gone = next((folder / "images").glob("*.jpg"))
    gone.unlink()
    with pytest.raises(UserError, match=rf"dataset\.local_dir=.*{gone.name}"):
        load_mini_imagenet(str(folder), image_size=S, cache_dir=str(tmp_path / "c"))
    (folder / "test.csv").unlink()
    with pytest.raises(UserError, match=r"lacks test\.csv;"):
        load_mini_imagenet(str(folder), cache_dir=str(tmp_path / "c"))
    with pytest.raises(UserError) as e:
        load_mini_imagenet(str(tmp_path), cache_dir=str(tmp_path / "c"))
    assert "\n" not in str(e.value)  # one line


def test_mini_bad_data(mini_source, tmp_path):
    shared = {s: dict(c) for s, c in mini_source.items()}
    shared["test"][next(iter(shared["train"]))] = next(iter(shared["train"].values()))
    with pytest.raises(UserError, match="in both the 'train' and 'test' splits"):
        load_mini_imagenet(str(write_mini_pickles(tmp_path / "a", shared)), image_size=S, cache_dir=str(tmp_path / "c"))
    uneven = {s: dict(c) for s, c in mini_source.items()}
    w = next(iter(uneven["val"]))
    uneven["val"][w] = uneven["val"][w][:3]
    with pytest.raises(UserError, match=f"{w} \\('val'\\) has 3 images"):
        load_mini_imagenet(str(write_mini_pickles(tmp_path / "b", uneven)), image_size=S, cache_dir=str(tmp_path / "c"))
    folder = write_mini_folder(tmp_path / "d", mini_source)
    (folder / "val.csv").write_text("image,class\nx.jpg,n1\n")
    with pytest.raises(UserError, match="val.csv must start with the header 'filename,label'"):
        load_mini_imagenet(str(folder), image_size=S, cache_dir=str(tmp_path / "c"))


# ---------------------------------------------------------------- tieredImageNet

TIERED_COUNTS = {"train": [5, 7, 6], "val": [8, 5], "test": [6, 9]}  # images per class: tiered classes vary


@pytest.fixture(scope="module")
def tiered_source():
    """{split: (rgb uint8 [N, S, S, 3] in file order, label_specific [N], class names)}, classes interleaved."""
    rng = np.random.default_rng(2)
    out = {}
    for s, counts in TIERED_COUNTS.items():
        labels = rng.permutation(np.repeat(np.arange(len(counts)), counts))
        images = rng.integers(0, 256, (len(labels), S, S, 3), dtype=np.uint8)
        out[s] = (images, labels.astype(np.int32), [f"{s}_class_{c}" for c in range(len(counts))])
    return out


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_tiered(root: Path, source, images_as: str) -> Path:
    """Ren et al.'s files; images_as: "png" (cv2.imencode-style arrays), "png_bytes" or "npz" (BGR)."""
    root.mkdir(parents=True, exist_ok=True)
    for s, (images, labels, names) in source.items():
        if images_as == "npz":
            np.savez(root / f"{s}_images.npz", images=images[..., ::-1])  # OpenCV's decompress writes BGR
        else:
            items = [_png(im) for im in images]
            if images_as == "png":
                items = [np.frombuffer(b, np.uint8).reshape(-1, 1) for b in items]  # cv2.imencode's shape
            with open(root / f"{s}_images_png.pkl", "wb") as f:
                pickle.dump(items, f, protocol=2)
        general = np.zeros_like(labels)
        with open(root / f"{s}_labels.pkl", "wb") as f:
            pickle.dump({"label_specific": labels, "label_general": general,
                         "label_specific_str": names, "label_general_str": ["thing"]}, f, protocol=2)
    return root


def _tiered_expected(source, split, n):
    images, labels, _ = source[split]
    return np.stack([images[np.flatnonzero(labels == c)[:n]] for c in range(len(TIERED_COUNTS[split]))])


@pytest.mark.parametrize("images_as", ["png", "png_bytes", "npz"])
def test_tiered_layouts(tiered_source, tmp_path, images_as):
    root = write_tiered(tmp_path / "data", tiered_source, images_as)
    out = load_tiered_imagenet(str(root), image_size=S, cache_dir=str(tmp_path / "c"))
    smallest = min(min(c) for c in TIERED_COUNTS.values())
    for s in SPLITS:
        assert out[s].dtype == np.uint8 and out[s].shape == (len(TIERED_COUNTS[s]), smallest, S, S, 3)
        # First images of each class in file order, RGB (the npz's BGR flipped back), exactly.
        np.testing.assert_array_equal(out[s], _tiered_expected(tiered_source, s, smallest))


def test_tiered_options(tiered_source, tmp_path):
    root = write_tiered(tmp_path / "npz", tiered_source, "npz")
    out = load_tiered_imagenet(str(root), image_size=S, cache_dir=str(tmp_path / "c"), examples_per_class=3)
    np.testing.assert_array_equal(out["test"], _tiered_expected(tiered_source, "test", 3))
    raw = load_tiered_imagenet(str(root), image_size=S, cache_dir=str(tmp_path / "c"), npz_order="rgb")
    np.testing.assert_array_equal(raw["val"], _tiered_expected(tiered_source, "val", 5)[..., ::-1])
    small = load_tiered_imagenet(str(root), image_size=4, cache_dir=str(tmp_path / "c"))
    ref = np.asarray(Image.fromarray(_tiered_expected(tiered_source, "train", 5)[2, 4]).resize((4, 4), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(small["train"][2, 4], ref)
    with pytest.raises(UserError, match=r"dataset\.examples_per_class=6 must be an integer in 1\.\.5"):
        load_tiered_imagenet(str(root), image_size=S, cache_dir=str(tmp_path / "c"), examples_per_class=6)


def test_tiered_cache_and_errors(tiered_source, tmp_path, monkeypatch):
    root = write_tiered(tmp_path / "png", tiered_source, "png")
    first = load_tiered_imagenet(str(root), image_size=S, cache_dir=str(tmp_path / "c"))

    def boom(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(tiered_imagenet, "decode_rgb", boom)
    again = load_tiered_imagenet(str(root), image_size=S, cache_dir=str(tmp_path / "c"))
    np.testing.assert_array_equal(again["train"], first["train"])
    (root / "val_labels.pkl").unlink()
    (root / "test_images_png.pkl").unlink()
    with pytest.raises(UserError, match=r"dataset\.local_dir=.* lacks val_labels\.pkl, test_images_png\.pkl \(or test_images\.npz\);"):
        load_tiered_imagenet(str(root), cache_dir=str(tmp_path / "c"))
    with pytest.raises(UserError, match="dataset.local_dir is not set"):
        load_tiered_imagenet(None)


# ---------------------------------------------------------------- CIFAR-FS and FC100

# The CIFAR-100 hierarchy (Krizhevsky 2009), written out independently of the shipped split files.
CIFAR100 = {
    "aquatic_mammals": "beaver dolphin otter seal whale",
    "fish": "aquarium_fish flatfish ray shark trout",
    "flowers": "orchid poppy rose sunflower tulip",
    "food_containers": "bottle bowl can cup plate",
    "fruit_and_vegetables": "apple mushroom orange pear sweet_pepper",
    "household_electrical_devices": "clock keyboard lamp telephone television",
    "household_furniture": "bed chair couch table wardrobe",
    "insects": "bee beetle butterfly caterpillar cockroach",
    "large_carnivores": "bear leopard lion tiger wolf",
    "large_man-made_outdoor_things": "bridge castle house road skyscraper",
    "large_natural_outdoor_scenes": "cloud forest mountain plain sea",
    "large_omnivores_and_herbivores": "camel cattle chimpanzee elephant kangaroo",
    "medium_mammals": "fox porcupine possum raccoon skunk",
    "non-insect_invertebrates": "crab lobster snail spider worm",
    "people": "baby boy girl man woman",
    "reptiles": "crocodile dinosaur lizard snake turtle",
    "small_mammals": "hamster mouse rabbit shrew squirrel",
    "trees": "maple_tree oak_tree palm_tree pine_tree willow_tree",
    "vehicles_1": "bicycle bus motorcycle pickup_truck train",
    "vehicles_2": "lawn_mower rocket streetcar tank tractor",
}
COARSE = sorted(CIFAR100)  # the meta file lists both label sets alphabetically
FINE = sorted(f for fs in CIFAR100.values() for f in fs.split())
COARSE_OF = {f: COARSE.index(c) for c, fs in CIFAR100.items() for f in fs.split()}
# Oreshkin et al.'s TADAM datasets/create_dataset_cifar100.py: class_split by coarse label index.
TADAM_SPLIT = {"train": {1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19}, "val": {8, 11, 13, 16}, "test": {0, 7, 12, 14}}
CIFAR_TRAIN, CIFAR_TEST = 3, 1  # fake images per class in each file (500 and 100 in the real one)


@pytest.fixture(scope="module")
def cifar_rows():
    """{"train"|"test": (data uint8 [N, 3072] rows, fine labels [N])}, classes shuffled as in the real files."""
    rng = np.random.default_rng(3)
    out = {}
    for part, n in (("train", CIFAR_TRAIN), ("test", CIFAR_TEST)):
        fine = rng.permutation(np.repeat(np.arange(100), n))
        out[part] = (rng.integers(0, 256, (len(fine), 3072), dtype=np.uint8), fine)
    return out


def write_cifar100(root: Path, rows, as_tar: bool) -> Path:
    """cifar-100-python/{train,test,meta} (bytes keys, as Python 2 pickles read with encoding='bytes'), or its .tar.gz."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for part, (data, fine) in rows.items():
        d = {b"data": data, b"fine_labels": fine.tolist(), b"coarse_labels": [COARSE_OF[FINE[f]] for f in fine],
             b"filenames": [b"x.png"] * len(fine), b"batch_label": part.encode()}
        (folder / part).write_bytes(pickle.dumps(d, protocol=2))
    (folder / "meta").write_bytes(pickle.dumps(
        {b"fine_label_names": [f.encode() for f in FINE], b"coarse_label_names": [c.encode() for c in COARSE]}, protocol=2))
    if as_tar:
        with tarfile.open(root / "cifar-100-python.tar.gz", "w:gz") as tf:
            tf.add(folder, arcname="cifar-100-python")
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()
    return root


@pytest.fixture(scope="module")
def cifar_tar(cifar_rows, tmp_path_factory) -> Path:
    return write_cifar100(tmp_path_factory.mktemp("cifar_tar"), cifar_rows, as_tar=True)


@pytest.fixture(scope="module")
def cifar_folder(cifar_rows, tmp_path_factory) -> Path:
    return write_cifar100(tmp_path_factory.mktemp("cifar_dir"), cifar_rows, as_tar=False)


def _cifar_class(rows, fine_index: int) -> np.ndarray:
    """A class's images: its training rows then its test rows, each row RGB planes -> [32, 32, 3]."""
    picked = [rows[p][0][rows[p][1] == fine_index] for p in ("train", "test")]
    return np.concatenate(picked).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def test_shipped_split_lists():
    fs = split_lists("cifar_fs")
    assert {s: len(v) for s, v in fs.items()} == {"train": 64, "val": 16, "test": 20}
    assert sorted(sum(fs.values(), [])) == FINE  # a partition of the 100 classes
    # Spot check: Bertinetto's train.txt as copied in another public repo (its first 32 lines).
    assert set("train skyscraper turtle raccoon spider orange castle keyboard clock pear girl seal elephant apple "
               "aquarium_fish bus mushroom possum squirrel chair tank plate wolf road mouse boy shrew couch "
               "sunflower tiger caterpillar lion".split()) <= set(fs["train"])
    fc = split_lists("fc100")
    assert {s: set(v) for s, v in fc.items()} == {s: {COARSE[i] for i in idx} for s, idx in TADAM_SPLIT.items()}


@pytest.mark.parametrize("layout", ["tar", "folder", "folder_itself"])
def test_cifar_fs(cifar_rows, cifar_tar, cifar_folder, layout, tmp_path):
    root = {"tar": cifar_tar, "folder": cifar_folder, "folder_itself": cifar_folder / "cifar-100-python"}[layout]
    out = load_cifar_fs(str(root), cache_dir=str(tmp_path))
    lists = split_lists("cifar_fs")
    per_class = CIFAR_TRAIN + CIFAR_TEST
    for s in SPLITS:
        assert out[s].dtype == np.uint8 and out[s].shape == (len(lists[s]), per_class, 32, 32, 3)
        for c, name in enumerate(lists[s]):
            np.testing.assert_array_equal(out[s][c], _cifar_class(cifar_rows, FINE.index(name)))


def test_fc100(cifar_rows, cifar_tar, tmp_path):
    out = load_fc100(str(cifar_tar), cache_dir=str(tmp_path))
    assert {s: a.shape[0] for s, a in out.items()} == {"train": 60, "val": 20, "test": 20}
    for s in SPLITS:
        # The fine classes of the split's superclasses, in fine label order.
        fines = [i for i, f in enumerate(FINE) if COARSE_OF[f] in TADAM_SPLIT[s]]
        np.testing.assert_array_equal(out[s], np.stack([_cifar_class(cifar_rows, i) for i in fines]))


def test_cifar_custom_lists_resize_cache(cifar_rows, cifar_folder, tmp_path, monkeypatch):
    classes = {"train": ["bee", "apple"], "val": ["cloud"], "test": ["whale"]}
    out = load_cifar_fs(str(cifar_folder), image_size=16, cache_dir=str(tmp_path), classes=classes)
    assert out["train"].shape == (2, 4, 16, 16, 3) and out["val"].shape == (1, 4, 16, 16, 3)
    ref = np.asarray(Image.fromarray(_cifar_class(cifar_rows, FINE.index("apple"))[3]).resize((16, 16), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(out["train"][1, 3], ref)
    sup = load_fc100(str(cifar_folder), cache_dir=str(tmp_path), superclasses={"train": ["fish"], "val": ["people"], "test": ["trees"]})
    np.testing.assert_array_equal(sup["val"], np.stack([_cifar_class(cifar_rows, FINE.index(n)) for n in CIFAR100["people"].split()]))

    def boom(*args, **kwargs):
        raise AssertionError("read again despite the cache")

    monkeypatch.setattr(cifar_fs, "_load_cifar100", boom)
    again = load_cifar_fs(str(cifar_folder), image_size=16, cache_dir=str(tmp_path), classes=classes)
    np.testing.assert_array_equal(again["train"], out["train"])
    with pytest.raises(AssertionError, match="read again"):  # other lists, other cache entry
        load_cifar_fs(str(cifar_folder), image_size=16, cache_dir=str(tmp_path), classes={**classes, "test": ["seal"]})


def test_cifar_errors(cifar_folder, tmp_path):
    with pytest.raises(UserError, match=r"dataset\.local_dir=.* lacks cifar-100-python\.tar\.gz and cifar-100-python/\{train,test,meta\}"):
        load_cifar_fs(str(tmp_path), cache_dir=str(tmp_path / "c"))
    with pytest.raises(UserError, match="dataset.local_dir is not set"):
        load_fc100(None)
    with pytest.raises(UserError, match=r"names the class 'unicorn' \('val'\)"):
        load_cifar_fs(str(cifar_folder), cache_dir=str(tmp_path / "c"), classes={"train": ["bee"], "val": ["unicorn"], "test": ["seal"]})
    with pytest.raises(UserError, match="puts bee in both the 'train' and 'test' splits"):
        load_cifar_fs(str(cifar_folder), cache_dir=str(tmp_path / "c"), classes={"train": ["bee"], "val": ["cloud"], "test": ["bee"]})
    with pytest.raises(UserError, match=r"names the superclass 'bee'"):
        load_fc100(str(cifar_folder), cache_dir=str(tmp_path / "c"), superclasses={"train": ["bee"], "val": ["fish"], "test": ["trees"]})
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "cifar-100-python.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(UserError, match="is not a readable tar archive"):
        load_cifar_fs(str(broken), cache_dir=str(tmp_path / "c"))
