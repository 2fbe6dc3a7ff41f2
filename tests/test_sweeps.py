"""Hydra multirun: a failing job is recorded and the others finish; Optuna, joblib and submitit plugins."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]

# The smallest run that still trains, validates, checkpoints and evaluates.
TINY = ["debug=smoke", "dataset=synthetic", "dataset.image_size=8", "dataset.classes=[8,4,4]",
        "dataset.examples_per_class=4", "learner.filters=4", "learner.blocks=1", "algo=fomaml",
        "algo.eval_inner_steps=1", "task.ways=2", "task.queries=1", "train.steps=2", "train.steps_per_call=1",
        "train.log_every=1", "train.val_every=2", "train.val_episodes=2", "train.ckpt_every=2",
        "eval.episodes=2", "eval.batch=2", "train.progress=false"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Jobs with the same shapes share compiled programs through JAX's persistent cache."""
    cache = tmp_path_factory.mktemp("jax_cache")
    return {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def metarun(args, cwd: Path, env: dict, timeout: int = 400) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "from metarun.cli import main; main()", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_failing_job_is_recorded_and_the_others_finish(tmp_path, env):
    sweep = tmp_path / "sweep"
    # Job 0 is a config mistake (task.ways=0: a UserError, which in a single run exits 2).
    proc = metarun(["-m", *TINY, "task.ways=0,2", f"hydra.sweep.dir={sweep}"], tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failure = json.loads((sweep / "0" / "failure.json").read_text())
    assert failure["error"] == "UserError" and failure["user_error"] and failure["traceback"] is None
    assert "task.ways=0 must be >= 1" in failure["message"] and "task.ways=0" in failure["overrides"]
    assert not (sweep / "0" / "results.json").exists()
    results = json.loads((sweep / "1" / "results.json").read_text())
    assert results["steps"] == 2 and not (sweep / "1" / "failure.json").exists()

    from metarun.report import report
    out = report(sweep)
    rows = {r["config"]: r for r in out["table"]}   # labelled by what varies: task.ways
    assert rows["task.ways=0"]["failed"] == 1 and rows["task.ways=2"]["n_seeds"] == 1
    assert "failed: `0`" in out["markdown"] and (sweep / "curves.png").exists()


def test_unexpected_error_is_recorded_then_raised_after_the_sweep(tmp_path, monkeypatch):
    """A crash (not a UserError) is written to failure.json with its traceback; the next job still
    runs, and the sweep as a whole fails at the end (exit 1) so the bug is not lost."""
    from metarun import cli

    ran = []

    def fake_run(cfg, run_dir, overrides=None):
        ran.append(cfg.seed)
        if cfg.seed == 0:
            raise RuntimeError("boom")
        return 0.5

    monkeypatch.setattr(cli, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["metarun", "-m", "dataset=synthetic", "seed=0,1",
                                      f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 1
    assert ran == [0, 1]
    failure = json.loads((tmp_path / "sweep" / "0" / "failure.json").read_text())
    assert failure["error"] == "RuntimeError" and "boom" in failure["traceback"]
    assert not (tmp_path / "sweep" / "1" / "failure.json").exists()


def test_optuna_trials_in_parallel_with_joblib(tmp_path, env):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "optuna"
    proc = metarun(["-m", "hparams_search=maml_optuna", *TINY, "algo.inner_steps=1",
                    "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
                    "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                    "+hydra.job.env_set.XLA_FLAGS='--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1'",
                    f"hydra.sweep.dir={sweep}"], tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in proc.stderr + proc.stdout
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert set(best.best_params) == {"algo.inner_lr", "meta_opt.lr"}
    scores = []
    for job in ("0", "1"):
        results = json.loads((sweep / job / "results.json").read_text())
        # each trial's objective is its best validation accuracy, the one validation it logged (step 2)
        rows = [json.loads(line) for line in (sweep / job / "metrics.jsonl").read_text().splitlines()]
        vals = [r["val/accuracy"] for r in rows if "val/accuracy" in r]
        assert len(vals) == 1 and results["best_val_step"] == 2
        assert math.isfinite(vals[0]) and results["best_val_score"] == pytest.approx(vals[0])
        scores.append(results["best_val_score"])
        overrides = OmegaConf.load(sweep / job / ".hydra" / "overrides.yaml")
        assert any(str(o).startswith("algo.inner_lr=") for o in overrides)
    # Optuna maximised what the runs returned: the better trial's score
    assert best.best_value == pytest.approx(max(scores))


def test_submitit_local_launcher(tmp_path, env):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "submitit"
    proc = metarun(["-m", *TINY, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                    f"hydra.sweep.dir={sweep}"], tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((sweep / "0" / "results.json").read_text())["steps"] == 2
    assert list((sweep / ".submitit").glob("*/*_log.out")), "submitit should keep its job logs"


def test_optuna_preset_composes():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from hydra import compose, initialize_config_dir
    from metarun.cli import CONF_DIR
    from metarun.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["hparams_search=maml_optuna"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert set(sweeper.params) == {"algo.inner_lr", "meta_opt.lr", "algo.inner_steps"}
    assert sweeper.params["meta_opt.lr"].startswith("tag(log")
