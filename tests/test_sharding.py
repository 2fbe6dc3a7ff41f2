"""The meta-batch sharded over 4 (forced host) devices trains to the same params and losses as 1 device."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# Tiny MAML (second order, so the sharded program has per-task Hessian-vector products too).
# Plain SGD, not Adam: a conv bias ahead of batch norm has a true gradient of ~0, and Adam's
# g/sqrt(v) turns float noise of 1e-9 there into full-size steps of either sign.
OVERRIDES = ["debug=smoke", "dataset=synthetic", "dataset.image_size=8", "dataset.classes=[8,4,4]",
             "dataset.examples_per_class=4", "learner.filters=4", "learner.blocks=2", "task.ways=2",
             "task.queries=2", "train.meta_batch=4", "algo=maml", "meta_opt=sgd",
             "meta_opt.lr=0.1"]
STEPS = 3
# Same program, same random numbers (threefry is partitionable), only the order of the float
# sums differs (the mean over tasks becomes a cross-device all-reduce): a few float32 ulps.
RTOL, ATOL = 1e-5, 1e-6

# The XLA flag must be set before jax is imported, hence a fresh interpreter per device count.
DRIVER = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from hydra import compose, initialize_config_dir
    from metarun import sharding
    from metarun.build import initial_state, load_family
    from metarun.cli import CONF_DIR
    from metarun.config import register_configs
    from metarun.core import make_train_chunk
    from metarun.errors import UserError

    overrides, steps, out = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    family = load_family(cfg)
    sampler = family.sampler("train")
    algo, optimizer, state = initial_state(cfg, family)
    mesh = sharding.task_mesh(cfg.train.meta_batch)
    state, data = sharding.replicate(state, mesh), sharding.replicate(family.data["train"], mesh)
    chunk = make_train_chunk(algo, optimizer, sampler, cfg.train.meta_batch, steps,
                             shard_tasks=sharding.task_constraint(mesh), sample_tasks=sharding.shard_sampling(mesh))
    hlo = chunk.lower(state, data).compile().as_text()
    state, metrics = chunk(state, data)
    leaves = jax.tree_util.tree_leaves_with_path(state.params)
    arrays = {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}
    arrays["__loss__"] = np.asarray(metrics["loss"])
    np.savez(out, **arrays)
    try:
        sharding.task_mesh(cfg.train.meta_batch + 1)
        bad = None
    except UserError as e:
        bad = str(e)
    print(json.dumps({"devices": jax.device_count(), "mesh": None if mesh is None else mesh.size,
                      "all_reduce": "all-reduce" in hlo,
                      "param_devices": len(leaves[0][1].sharding.device_set), "bad_batch_error": bad}))
""")


def _start(devices: int, out: Path) -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(OVERRIDES), str(STEPS), str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def test_four_devices_match_one(tmp_path):
    procs = [_start(1, tmp_path / "one.npz"), _start(4, tmp_path / "four.npz")]  # side by side
    one, four = [_result(p) for p in procs]
    assert one["devices"] == 1 and one["mesh"] is None and one["bad_batch_error"] is None
    assert four["devices"] == 4 and four["mesh"] == 4
    assert four["param_devices"] == 4, "params should be replicated on every device"
    assert four["all_reduce"], "the 4-device program should all-reduce the per-shard meta-gradients"
    assert "train.meta_batch=5" in four["bad_batch_error"] and "multiple of 4" in four["bad_batch_error"]

    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "four.npz")
    assert sorted(a.files) == sorted(b.files) and len(a.files) > 1
    assert a["__loss__"].shape == (STEPS,)
    for name in a.files:
        np.testing.assert_allclose(b[name], a[name], rtol=RTOL, atol=ATOL, err_msg=name)
    # The steps did move the params (so equality is not two untouched inits).
    assert not np.allclose(a["__loss__"][0], a["__loss__"][-1])
