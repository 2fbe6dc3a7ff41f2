"""Runs that cannot silently go wrong: each case of the reliability issue, on generated data, a few steps each."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import compose
from metarun.errors import UserError

SYN = ["dataset=synthetic", "dataset.image_size=8", "dataset.classes=[20,10,10]", "learner.filters=4",
       "learner.blocks=2", "task.queries=2", "train.meta_batch=2", "train.steps=10", "train.steps_per_call=5",
       "train.log_every=5", "train.val_every=5", "train.val_episodes=4", "train.ckpt_every=5", "train.keep_ckpts=4",
       "train.progress=false", "eval.episodes=4", "eval.batch=4", "meta_opt.lr=3e-3"]
TIMING = ("wall_s", "steps_per_s", "train_wall_s", "compile_s", "eval_wall_s")


def _run(overrides, run_dir, cli_overrides=None):
    from metarun.train import run
    return run(compose(overrides), run_dir, cli_overrides)


def _strict_json(text):
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def _results(run_dir):
    r = _strict_json((Path(run_dir) / "results.json").read_text())
    return {k: v for k, v in r.items() if k not in TIMING}


def _rows(run_dir):
    return [{k: v for k, v in _strict_json(line).items() if k not in TIMING}
            for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def syn_run(tmp_path_factory):
    """One finished run of SYN (10 steps), trained once for the module; tests take a copy (syn_copy)."""
    run_dir = tmp_path_factory.mktemp("syn_run")
    _run(SYN, run_dir)
    return run_dir


@pytest.fixture
def syn_copy(syn_run, tmp_path):
    """A private copy of the finished SYN run, as if `_run(SYN, dest)` had just been called."""
    def copy(dest=tmp_path):
        shutil.copytree(syn_run, dest, dirs_exist_ok=True)
        return dest
    return copy


def _ckpt_steps(run_dir, which="last"):
    d = Path(run_dir) / "checkpoints" / which
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


# ---- 1. divergence ------------------------------------------------------------------------
def test_nonfinite_training_stops_keeps_the_last_finite_checkpoint_and_records_failure(tmp_path):
    from metarun.checkpoint import Checkpoints
    from metarun.build import initial_state, load_family
    from metarun.train import DivergedError

    # lr warms up from 0 to 1e30: the first steps are finite, then the weights blow up.
    over = SYN + ["meta_opt.lr=1e30", "meta_opt.warmup_steps=8", "train.steps_per_call=1", "train.log_every=1",
                  "train.ckpt_every=1", "train.val_every=0"]
    with pytest.raises(DivergedError, match=r"diverged at step (\d+)") as info:
        _run(over, tmp_path)
    bad = int(info.value.args[0].split("diverged at step ")[1].split()[0])
    assert (tmp_path / "failure.json").exists() and not (tmp_path / "results.json").exists()
    failure = _strict_json((tmp_path / "failure.json").read_text())
    assert failure["user_error"] and "meta_opt.lr" in failure["message"]
    steps = _ckpt_steps(tmp_path)
    assert steps and max(steps) < bad, (steps, bad)
    cfg = compose(over)
    like = initial_state(cfg, load_family(cfg))[2]
    ckpts = Checkpoints(tmp_path / "checkpoints", 4)
    try:
        last = ckpts.restore_latest(like)
    finally:
        ckpts.close()
    assert int(last.step) == max(steps)
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(last.params))


def test_skip_step_drops_every_nonfinite_step_and_results_stay_strict_json(tmp_path):
    from metarun.build import initial_state, load_family

    over = SYN + ["algo.inner_lr=1e30", "train.on_nonfinite=skip_step", "train.val_every=0"]
    _run(over, tmp_path)
    results = _results(tmp_path)
    assert results["skipped_steps"] == 10
    # Every step was dropped, so the trained parameters are the initial ones exactly.
    cfg = compose(over)
    start = initial_state(cfg, load_family(cfg))[2]
    from tests_helpers import last_state
    last = last_state(cfg, tmp_path, start)
    for a, b in zip(jax.tree.leaves(start.params), jax.tree.leaves(last.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The evaluation's loss diverges too (NaN logits still give an argmax): null, not NaN, in strict JSON.
    assert results["metrics"]["loss"]["mean"] is None
    _rows(tmp_path)  # metrics.jsonl parses strictly


# ---- 2. resume takes the run's own config -------------------------------------------------
def test_resume_uses_the_saved_config_and_refuses_unsafe_overrides(tmp_path, syn_copy):
    syn_copy()  # _run(SYN, tmp_path)
    before = _results(tmp_path)
    saved = (tmp_path / "run_config.yaml").read_text()
    # `metarun resume=true hydra.run.dir=RUN`: the composed config is the defaults; only the CLI overrides count.
    _run(["resume=true"], tmp_path, ["resume=true"])
    assert _results(tmp_path) == before

    hydra_cfg = tmp_path / ".hydra" / "config.yaml"
    hydra_cfg.parent.mkdir(exist_ok=True)
    hydra_cfg.write_text("rewritten by hydra: {}\n")
    with pytest.raises(UserError, match=r"algo\.inner_lr"):
        _run(["resume=true", "algo.inner_lr=0.1"], tmp_path, ["resume=true", "algo.inner_lr=0.1"])
    assert hydra_cfg.read_text() == (tmp_path / "run_config.yaml").read_text()  # the run's own config is back
    assert OmegaConf.load(hydra_cfg).algo.inner_lr == OmegaConf.create(saved).algo.inner_lr
    with pytest.raises(UserError, match=r"algo=fomaml"):
        _run(["resume=true", "algo=fomaml"], tmp_path, ["resume=true", "algo=fomaml"])

    # train.steps may change: the run is extended.
    _run(["resume=true", "train.steps=15"], tmp_path, ["resume=true", "train.steps=15"])
    assert _results(tmp_path)["steps"] == 15 and _ckpt_steps(tmp_path)[-1] == 15


def test_resume_in_a_directory_without_a_run_says_so(tmp_path):
    with pytest.raises(UserError, match="holds no metarun run"):
        _run(SYN + ["resume=true"], tmp_path)
    assert not (tmp_path / "checkpoints").exists()


# ---- 3. best validation score survives resume; a resumed run equals an uninterrupted one -----
def test_resumed_run_matches_uninterrupted_including_best_val(tmp_path, syn_copy):
    full, cut = tmp_path / "full", tmp_path / "cut"
    over = SYN + ["train.steps=20"]
    _run(over, full)
    syn_copy(cut)                                  # SYN stopped at step 10 (constant lr: same trajectory)
    _run(over + ["resume=true"], cut)              # then continued to 20
    a, b = _results(full), _results(cut)
    assert a["best_val_score"] is not None and a["best_val_step"] is not None
    assert a == b
    assert _rows(full) == _rows(cut)
    # Resumed at the very end: the best is restored with the state, not forgotten.
    _run(over + ["resume=true"], cut)
    assert _results(cut)["best_val_score"] == a["best_val_score"]


# ---- 4. a damaged newest checkpoint falls back to the previous good step ---------------------
def test_torn_newest_checkpoint_falls_back_to_the_previous_step(tmp_path, caplog, syn_copy):
    syn_copy()  # _run(SYN, tmp_path)
    before = _results(tmp_path)
    newest = tmp_path / "checkpoints" / "last" / "10"
    data = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with caplog.at_level("WARNING"):
        _run(SYN + ["resume=true"], tmp_path)
    assert "cannot be restored" in caplog.text
    assert _results(tmp_path) == before  # steps 5..10 redone from step 5, identically


# ---- 5. one run per directory ---------------------------------------------------------------
def test_a_second_run_in_a_locked_directory_stops_and_a_stale_lock_is_taken_over(tmp_path):
    import socket
    lock = tmp_path / ".metarun.lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        with pytest.raises(UserError, match=f"in use by pid {sleeper.pid}"):
            _run(SYN, tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not (tmp_path / "checkpoints").exists()
    lock.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))  # now a dead pid
    _run(SYN, tmp_path)
    assert (tmp_path / "results.json").exists() and not lock.exists()


# ---- 6. user mistakes: one line, before compute ------------------------------------------------
@pytest.mark.parametrize("override, key", [("learner.filters=0", "learner.filters"),
                                           ("dataset.image_size=2", "dataset.image_size"),
                                           ("eval.split=tset", "eval.split"),
                                           ("train.task_chunk=0", "train.task_chunk")])
def test_user_mistakes_name_the_key_before_any_data_is_read(override, key, tmp_path, monkeypatch):
    import metarun.build as build

    monkeypatch.setattr(build, "build_family", lambda *a, **k: pytest.fail("data was read before the check"))
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        _run(SYN + [override], tmp_path)


def test_cli_user_error_is_one_line_on_stderr_with_exit_code_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "metarun", *SYN, "eval.split=tset", f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert errors == [l for l in errors if l.startswith("metarun: error: eval.split=tset")] and len(errors) == 1
    assert "Traceback" not in proc.stdout + proc.stderr


# ---- 7. first contact ---------------------------------------------------------------------------
# The smoke preset with the MLP learner (experiment=maml_sinusoid debug=smoke) is run and checked by
# tests/test_cli.py::test_sinusoid_reports_mse_after_1_5_10_steps.


def test_strict_json_writes_null_for_nonfinite_values(tmp_path):
    from metarun.metrics import MetricsLog, atomic_write_json

    atomic_write_json(tmp_path / "r.json", {"a": float("nan"), "b": [float("-inf"), 1.5], "c": np.float32(2.0)})
    assert _strict_json((tmp_path / "r.json").read_text()) == {"a": None, "b": [None, 1.5], "c": 2.0}
    log = MetricsLog(tmp_path / "m.jsonl")
    log.append({"step": 1, "x": float("inf")})
    assert _strict_json((tmp_path / "m.jsonl").read_text()) == {"step": 1, "x": None}
    assert math.isfinite(2.0)
