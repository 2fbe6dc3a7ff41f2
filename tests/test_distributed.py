"""Two JAX processes on localhost (jax.distributed, gloo) train to the single-process run's parameters.

The slow test starts `metarun` three times side by side: two processes (one CPU device each) of one
distributed run, and the same config in one process. The fast tests check how `distributed.*` and
SLURM's variables turn into `jax.distributed.initialize` arguments (without starting JAX).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from metarun import distributed
from metarun.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

# Tiny second-order MAML with validation, a best and a last checkpoint, and a final evaluation.
# width_factor=1: smoke's 0.125 would leave Conv-4 one filter, whose ReLU can go dead; a conv bias
# then reaches the head through a zero-variance BatchNorm, and float noise of 1e-9 grows to 1e-3
# in two steps. With 4 filters `map` and `vmap` batching agree to 6e-8 after 4 steps (measured).
# Plain SGD: Adam would turn the ~1e-9 noise of near-zero bias gradients into full-size steps.
STEPS = 4
OVERRIDES = ["debug=smoke", "dataset=synthetic", "dataset.image_size=8", "dataset.classes=[8,4,4]",
             "dataset.examples_per_class=4", "learner.filters=4", "learner.width_factor=1.0", "learner.blocks=2",
             "task.ways=2", "task.queries=2", "algo=maml", "meta_opt=sgd", "meta_opt.lr=0.1",
             "train.meta_batch=4", f"train.steps={STEPS}", "train.steps_per_call=2", "train.log_every=2",
             f"train.val_every={STEPS}", "train.val_episodes=4", f"train.ckpt_every={STEPS}", "eval.episodes=4",
             "eval.batch=4", "train.progress=false"]
# The same meta-batch and random numbers; only the order of float sums differs (the mean gradient
# becomes a cross-process all-reduce of two partial sums): a few float32 ulps.
RTOL, ATOL = 1e-5, 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(run_dir: Path, extra=(), log: Path | None = None) -> subprocess.Popen:
    # One CPU device per process; the flag must be set before JAX starts, hence fresh interpreters.
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", "from metarun.cli import main; main()", *OVERRIDES, f"hydra.run.dir={run_dir}",
           *extra]
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


def _wait(proc: subprocess.Popen, log: Path) -> None:
    try:
        proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, log.read_text()[-3000:]


def _rows(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    from conftest import compose, initial_and_last_state

    two, one = tmp_path / "two", tmp_path / "one"
    port = _free_port()
    procs = [(_start(two, [f"distributed.coordinator=127.0.0.1:{port}", "distributed.num_processes=2",
                           f"distributed.process_id={i}"], tmp_path / f"p{i}.log"), tmp_path / f"p{i}.log")
             for i in (0, 1)]
    procs.append((_start(one, log=tmp_path / "one.log"), tmp_path / "one.log"))
    for proc, log in procs:
        _wait(proc, log)

    # Both processes joined one run of 2 devices; each drew half of the meta-batch.
    for i in (0, 1):
        text = (tmp_path / f"p{i}.log").read_text()
        assert f"process {i} of 2 joined (1 local / 2 global devices)" in text
        assert "meta-batch sharded over 2 cpu devices in 2 processes" in text

    # Process 0 alone wrote the run's files: one row per logged step (not two), one results.json.
    rows_two, rows_one = _rows(two), _rows(one)
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one] == [2, 4]
    for a, b in zip(rows_two, rows_one):
        np.testing.assert_allclose(a["train/loss"], b["train/loss"], rtol=RTOL)
    assert rows_two[-1]["val/accuracy"] == pytest.approx(rows_one[-1]["val/accuracy"])
    results_two, results_one = (json.loads((d / "results.json").read_text()) for d in (two, one))
    assert results_two["processes"] == 2 and results_one["processes"] == 1
    assert results_two["mean"] == pytest.approx(results_one["mean"]) and results_two["checkpoint"] == "best"
    assert OmegaConf.load(two / "run_config.yaml").distributed.process_id == 0  # process 0's config
    assert not (two / ".metarun.lock").exists()  # released by process 0; process 1 never took it

    # One checkpoint per step, written by the two processes together (orbax records each process's
    # part), and readable by a single process: its params equal the single-process run's.
    assert sorted(p.name for p in (two / "checkpoints" / "last").iterdir()) == [str(STEPS)]
    parts = sorted(p.name for p in (two / "checkpoints" / "last" / str(STEPS) / "default" / "array_metadatas").iterdir())
    assert parts == ["process_0", "process_1"]
    cfg = compose(OVERRIDES)
    start, last_two = initial_and_last_state(cfg, two)
    _, last_one = initial_and_last_state(cfg, one)
    assert int(last_two.step) == int(last_one.step) == STEPS
    import jax

    moved = differ = 0.0
    for (path, a), b, s in zip(jax.tree_util.tree_leaves_with_path(last_one.params),
                               jax.tree.leaves(last_two.params), jax.tree.leaves(start.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=RTOL, atol=ATOL,
                                   err_msg=jax.tree_util.keystr(path))
        moved = max(moved, float(np.abs(np.asarray(a) - np.asarray(s)).max()))
        differ = max(differ, float(np.abs(np.asarray(a) - np.asarray(b)).max()))
    print(f"two processes vs one: max |param difference| {differ:.3g}; params moved up to {moved:.3g}")
    assert moved > 100 * ATOL  # the steps did move the params: equality is not two untouched inits


# -- configuration (no JAX processes started) ------------------------------------------------

def _cfg(**kw):
    return OmegaConf.create({"coordinator": None, "num_processes": None, "process_id": None, "timeout_s": 300, **kw})


def _clear_slurm(monkeypatch):
    for var in distributed._SLURM_VARS:
        monkeypatch.delenv(var, raising=False)


def test_single_process_by_default(monkeypatch):
    _clear_slurm(monkeypatch)
    assert distributed.settings(_cfg()) is None
    assert distributed.settings(None) is None  # a config saved before the section existed
    assert distributed.settings(_cfg(num_processes=1, coordinator="h:1", process_id=0)) is None


def test_explicit_keys_become_initialize_arguments(monkeypatch):
    _clear_slurm(monkeypatch)
    args = distributed.settings(_cfg(coordinator="10.0.0.1:1234", num_processes=4, process_id=3, timeout_s=60))
    assert args == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3,
                    "initialization_timeout": 60}


@pytest.mark.parametrize("kw, match", [
    ({"coordinator": "h:1", "num_processes": 2}, r"distributed\.process_id is not set"),
    ({"num_processes": 2, "process_id": 0}, r"distributed\.coordinator is not set"),
    ({"coordinator": "h:1", "process_id": 0}, r"distributed\.num_processes is not set"),
    ({"coordinator": "h", "num_processes": 2, "process_id": 0}, r"distributed\.coordinator=h is not HOST:PORT"),
    ({"coordinator": "h:1", "num_processes": 2, "process_id": 2}, r"distributed\.process_id=2 must be in 0\.\.1"),
    ({"num_processes": 0}, r"distributed\.num_processes=0 must be >= 1"),
    ({"timeout_s": 0}, r"distributed\.timeout_s=0 must be >= 1"),
])
def test_config_mistakes_name_the_key(monkeypatch, kw, match):
    _clear_slurm(monkeypatch)
    with pytest.raises(UserError, match=match):
        distributed.settings(_cfg(**kw))


def test_slurm_step_with_several_tasks_is_joined_from_its_variables(monkeypatch):
    slurm = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_NTASKS": "2",
             "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    assert distributed.settings(_cfg(timeout_s=90)) == {"initialization_timeout": 90}  # JAX reads SLURM's vars
    assert distributed.settings(_cfg(num_processes=1)) is None  # explicitly single
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task job (e.g. one run of a submitit array)
    assert distributed.settings(_cfg()) is None


def test_slurm_multinode_launcher_preset_composes():
    """`hydra/launcher=slurm_multinode`: submitit's SLURM launcher, one task (one JAX process) per node."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose as hydra_compose, initialize_config_dir

    from conftest import CONF_DIR
    from metarun.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=["hydra/launcher=slurm_multinode", "hydra.launcher.nodes=4"],
                            return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.nodes == 4 and launcher.tasks_per_node == 1
    assert cfg.distributed.coordinator is None  # SLURM's variables, not keys, join the processes
