"""Shared pytest setup: markers, a private cache dir, and a tiny fake Omniglot in the canonical layout."""

from __future__ import annotations

import io
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

# Lets `import metarun` work from a plain checkout before the package is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The suite's time is mostly XLA compiling tiny programs, and XLA's CPU fusion emitters compile each fusion as its
# own LLVM module: with them off, an end-to-end smoke run compiles in ~30% less CPU time (31 -> 22 s for reptile's)
# with the same results. Set before jax starts (test modules import it after this file), inherited by the CLI
# subprocesses; runs outside the tests keep XLA's defaults. METARUN_TEST_XLA_DEFAULTS=1 tests with the defaults.
TEST_XLA_FLAG = "--xla_cpu_use_fusion_emitters=false"
if not os.environ.get("METARUN_TEST_XLA_DEFAULTS") and "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAG}".strip()

# Small but enough for 5-way episodes everywhere: lake split (last 5 background alphabets = val)
# gives train 2x3=6, val 5x3=15, test 2x3=6 characters.
FAKE_LAYOUT = {
    "images_background": {f"Alpha{a}": 3 for a in "ABCDEFG"},
    "images_evaluation": {"Eval_One": 3, "Eval_Two": 3},
}
FAKE_DRAWINGS = 20


def pytest_configure(config):
    config.addinivalue_line("markers", "realdata: needs the real Omniglot files")
    config.addinivalue_line("markers", "slow: long-running; skipped unless --runslow")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Keep tests from writing into the user's ~/.cache/metarun."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("METARUN_CACHE", str(tmp_path_factory.mktemp("metarun_cache")))
        yield


def _fake_png(rng: np.random.Generator, strokes: np.ndarray) -> bytes:
    """One 105x105 1-bit drawing: the character's strokes, jittered per drawer; ink 0 on white 1 like Omniglot."""
    im = Image.new("1", (105, 105), 1)
    draw = ImageDraw.Draw(im)
    for x0, y0, x1, y1 in strokes + rng.integers(-3, 4, strokes.shape):
        draw.line([(int(x0), int(y0)), (int(x1), int(y1))], fill=0, width=4)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def fake_omniglot_files() -> dict[str, bytes]:
    """{"images_background/Alphabet/characterNN/XXXX_YY.png": png bytes}, deterministic."""
    files, char_id = {}, 0
    for part, alphabets in FAKE_LAYOUT.items():
        for alphabet, n_chars in alphabets.items():
            for c in range(1, n_chars + 1):
                char_id += 1
                rng = np.random.default_rng(char_id)
                strokes = rng.integers(10, 95, (3, 4))
                for d in range(1, FAKE_DRAWINGS + 1):
                    files[f"{part}/{alphabet}/character{c:02d}/{char_id:04d}_{d:02d}.png"] = _fake_png(rng, strokes)
    return files


def write_fake_omniglot(root: Path, as_zip: bool = True) -> Path:
    """Write the fake set under root as images_*.zip (entries in reverse order) or as extracted folders."""
    root.mkdir(parents=True, exist_ok=True)
    files = fake_omniglot_files()
    if as_zip:
        for part in FAKE_LAYOUT:
            # Reverse order so a loader that trusts archive order instead of filenames is caught.
            with zipfile.ZipFile(root / f"{part}.zip", "w") as zf:
                for name in sorted((n for n in files if n.startswith(part + "/")), reverse=True):
                    zf.writestr(name, files[name])
    else:
        for name, data in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
    return root


@pytest.fixture(scope="session")
def fake_omniglot_layout() -> dict:
    """{part: {alphabet: n_characters}} of the fake set; every character has FAKE_DRAWINGS (20) drawings."""
    return FAKE_LAYOUT


@pytest.fixture(scope="session")
def fake_omniglot_dir(tmp_path_factory) -> Path:
    """A directory holding images_background.zip and images_evaluation.zip of a tiny fake Omniglot."""
    return write_fake_omniglot(tmp_path_factory.mktemp("omniglot_zips"), as_zip=True)


@pytest.fixture(scope="session")
def fake_omniglot_folders(tmp_path_factory) -> Path:
    """The same fake Omniglot as extracted folders images_background/ and images_evaluation/."""
    return write_fake_omniglot(tmp_path_factory.mktemp("omniglot_folders"), as_zip=False)


@pytest.fixture(scope="session")
def real_omniglot_dir() -> Path:
    """The real Omniglot files (METARUN_OMNIGLOT_DIR or ../shared/data/omniglot); skips when absent."""
    path = Path(os.environ.get("METARUN_OMNIGLOT_DIR") or Path(__file__).resolve().parents[2] / "shared/data/omniglot")
    if not path.is_dir():
        pytest.skip(f"real Omniglot not found at {path}")
    return path


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose(overrides=()):
    """The config `metarun <overrides>` would run, composed without starting a Hydra app."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from metarun.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


@pytest.fixture
def fake_omniglot_overrides(fake_omniglot_dir):
    """Overrides for a smoke run on the fake Omniglot (lake split: the fake has no Vinyals names)."""
    return ["debug=smoke", f"dataset.local_dir={fake_omniglot_dir}", "dataset.split=lake",
            "train.progress=false"]


def initial_and_last_state(cfg, run_dir: Path):
    """(the train state a run of `cfg` starts from, the newest state checkpointed in run_dir)."""
    from metarun.build import initial_state, load_family
    from metarun.checkpoint import Checkpoints

    start = initial_state(cfg, load_family(cfg))[2]
    ckpts = Checkpoints(Path(run_dir) / "checkpoints", cfg.train.keep_ckpts)
    try:
        return start, ckpts.restore_latest(start)
    finally:
        ckpts.close()


def replay_training(cfg, start, steps: int):
    """The train state after `steps` meta-steps from `start`, computed directly with core.make_train_chunk
    in the trainer's chunks (train.chunk_size) and settings: the reference a run's checkpoint must equal."""
    import jax

    from metarun.build import load_family, make_algo
    from metarun.core import make_train_chunk
    from metarun.optim import make_optimizer
    from metarun.train import chunk_size

    family = load_family(cfg)
    chunk = chunk_size(cfg)
    assert steps % chunk == 0
    skip = getattr(cfg.train.on_nonfinite, "value", cfg.train.on_nonfinite) == "skip_step"
    train_chunk = make_train_chunk(make_algo(cfg, family, "train"), make_optimizer(cfg.meta_opt, cfg.train.steps),
                                   family.sampler("train"), cfg.train.meta_batch, chunk,
                                   task_batching=cfg.train.task_batching, task_chunk=cfg.train.task_chunk,
                                   skip_nonfinite=skip)
    state = jax.tree.map(lambda a: a.copy(), start)  # the chunk donates its input
    for _ in range(steps // chunk):
        state, _ = train_chunk(state, family.data["train"])
    return state


def stand_in_family(cfg):
    """The task family of `cfg` over a one-class placeholder of the dataset's image shape: enough to build
    an algorithm (head sizes, ways, objective, learner checks) without loading the data (presets name Omniglot)."""
    import numpy as np

    from metarun.families.base import SPLITS
    from metarun.registry import lookup

    entry = lookup("dataset", cfg.dataset.name)
    family_cls = lookup("family", entry.meta["family"]).build
    side = cfg.dataset.get("image_size", 28)
    arrays = {s: np.zeros((1, 20, side, side, 1), np.uint8) for s in SPLITS}
    family = family_cls(cfg.dataset.name, arrays, cfg.task, cfg.dataset)
    family.check_learner(cfg.learner)
    return family


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
    """One persistent XLA cache for the session: the trainer builds a fresh jitted closure per run, so
    identical programs (the same tiny config in many tests) would otherwise be compiled again each time."""
    import jax

    cache = str(tmp_path_factory.mktemp("xla_cache"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    # The tests that run `metarun` in a subprocess (the CLI, kill-and-resume, sweeps) start a fresh
    # interpreter per run: through the environment they share this session's cache too, so the second
    # and later runs of one tiny config load its programs instead of compiling them again.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAX_COMPILATION_CACHE_DIR", cache)
        mp.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
        yield
