"""OML's incremental sine benchmark: dataset, regression-stream family, OML's batched sequential pass, protocol."""
from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from omegaconf import OmegaConf

from metarun.algos.oml import oml
from metarun.continual_regression import VAL_STREAM, function_draws, make_runs, summarize_runs
from metarun.data.tasks import Examples
from metarun.errors import UserError
from metarun.data.incremental_sine import IncrementalSine
from metarun.families.regression import regression_objective
from metarun.families.regression_stream import RegressionStreamFamily
from metarun.learners.continual_mlp import OMLMLP
from metarun.learners.continual_nets import pln_apply


def family_cfg(**task):
    dataset = OmegaConf.create({"name": "incremental_sine", "kind": "regression", "amplitude": [0.1, 5.1],
                                "phase": [0.0, 3.14159], "x_range": [-5.0, 5.0], "train_functions": 20,
                                "step_batch": 4})
    base = {"ways": 3, "shots": 8, "queries": 5, "test_ways": 3, "test_shots": 8, "test_queries": 6, "min_shots": None,
            "family": None}
    return dataset, OmegaConf.create({**base, **task})


def build_family(dataset, task):
    """The family without the registry (importing every dataset module costs seconds)."""
    return RegressionStreamFamily("incremental_sine", IncrementalSine(dataset, 0), task, dataset)


def tiny_module():
    return OMLMLP(out_dim=1, widths=(8, 8), pln_hidden=())   # a linear PLN: the numpy reference below


def sgd_reference(pln, z, y, lr, step_batch):
    """numpy SGD on a linear head {"head": {kernel, bias}} for the MSE, block after block of `step_batch`
    consecutive points in the given order."""
    w, b = np.asarray(pln["head"]["kernel"], np.float64), np.asarray(pln["head"]["bias"], np.float64)
    z, y = np.asarray(z, np.float64), np.asarray(y, np.float64)
    for start in range(0, z.shape[0], step_batch):
        zb, yb = z[start:start + step_batch], y[start:start + step_batch]
        err = 2.0 * (zb @ w + b - yb) / zb.shape[0]
        w, b = w - lr * zb.T @ err, b - lr * err.sum(0)
    return {"head": {"kernel": w, "bias": b}}


def represent_np(module, params, x):
    return np.asarray(module.apply({"params": params}, x, method="represent"))


def test_trajectory_is_function_after_function_and_the_pass_sees_each_block_once_in_order():
    dataset, task = family_cfg()
    family = build_family(dataset, task)
    t = jax.jit(family.sampler("train"))(family.data["train"], jax.random.PRNGKey(0))
    slots = np.asarray(t.support.x[:, :3]).argmax(-1)
    assert slots.tolist() == [0] * 8 + [1] * 8 + [2] * 8          # 8 points of function 0, then 1, then 2
    assert t.query.x.shape == (15, 4)                              # 5 query points of each function
    module = tiny_module()
    algo = oml(module, regression_objective, 0.05, "pln", train=True, reset_head=False, step_batch=4)
    params, _ = algo.init(jax.random.PRNGKey(1), SimpleNamespace(support=t.support))
    marked = Examples(t.support.x, jnp.arange(24, dtype=jnp.float32)[:, None] / 24.0)
    state = jax.jit(algo.adapt)(params, {}, marked, jax.random.PRNGKey(2))
    # step i learned points 4i..4i+3 (its first target is 4i/24): each block once, in order
    np.testing.assert_allclose(np.asarray(state["seen"]).ravel(), np.arange(0, 24, 4) / 24.0)
    z = represent_np(module, params["net"], marked.x)
    want = sgd_reference(params["net"]["pln"], z, marked.y, 0.05, 4)
    for got, ref in zip(jax.tree.leaves(state["net"]["pln"]), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5)
    other = sgd_reference(params["net"]["pln"], z[::-1], np.asarray(marked.y)[::-1], 0.05, 4)
    assert max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(want))) > 1e-4


def test_meta_test_leaves_the_rln_bitwise_unchanged_and_learns_the_pln():
    dataset, task = family_cfg()
    family = build_family(dataset, task)
    t = jax.jit(family.sampler("test"))({}, jax.random.PRNGKey(3))
    module = tiny_module()
    algo = oml(module, regression_objective, 0.05, "pln", train=False, reset_head=False, step_batch=4)
    params, _ = algo.init(jax.random.PRNGKey(1), SimpleNamespace(support=t.support))
    before = jax.tree.map(lambda a: np.asarray(a).copy(), params["net"]["rln"])
    net = jax.jit(algo.adapt)(params, {}, t.support, jax.random.PRNGKey(2))["net"]
    for a, b in zip(jax.tree.leaves(net["rln"]), jax.tree.leaves(before)):
        assert np.asarray(a).tobytes() == b.tobytes()
    assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(net["pln"]),
                                                            jax.tree.leaves(params["net"]["pln"]))) > 0


def test_protocol_matrix_matches_sequential_sgd_on_the_frozen_features():
    module = tiny_module()
    draws = function_draws(0, 2, 1, 8, 5, (0.1, 5.1), (0.0, 3.0), (-5.0, 5.0))
    params = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 3)))["params"]

    def represent(x):
        return module.apply({"params": params}, x, method="represent")

    rows = np.asarray(make_runs(represent, 2, 4, "sgd")(params["pln"], {k: jnp.asarray(v) for k, v in draws.items()},
                                                        jnp.float32(0.01)))[0]
    pln = params["pln"]
    a, p = draws["amplitude"][0], draws["phase"][0]

    def inputs(f, x):
        return np.concatenate([np.eye(2)[[f] * len(x)], x[:, None]], -1).astype(np.float32)

    held = [(represent_np(module, params, inputs(f, draws["x_held"][0, f])),
             a[f] * np.sin(draws["x_held"][0, f] + p[f])[:, None]) for f in range(2)]
    for f in range(2):   # function 0's points, then function 1's, 4 per step; MSE on both after each
        z = represent_np(module, params, inputs(f, draws["x_train"][0, f]))
        pln = sgd_reference(pln, z, a[f] * np.sin(draws["x_train"][0, f] + p[f])[:, None], 0.01, 4)
        want = [np.mean((hz @ pln["head"]["kernel"] + pln["head"]["bias"] - hy) ** 2) for hz, hy in held]
        np.testing.assert_allclose(rows[f], want, rtol=1e-4)


def test_function_draws_are_deterministic_from_the_seed_and_stream():
    args = (3, 10, 4, 64, 20, (0.1, 5.1), (0.0, np.pi), (-5.0, 5.0))
    first, again = function_draws(*args), function_draws(*args)
    for k in first:
        assert np.array_equal(first[k], again[k])
    more_runs = function_draws(3, 10, 7, *args[3:])
    for k in first:   # run r's functions do not depend on how many runs are drawn
        assert np.array_equal(more_runs[k][:4], first[k])
    other_seed = function_draws(4, *args[1:])
    val = function_draws(*args, stream=VAL_STREAM)
    assert not np.array_equal(first["amplitude"], other_seed["amplitude"])
    assert not np.array_equal(first["amplitude"], val["amplitude"])
    assert first["amplitude"].min() >= 0.1 and first["amplitude"].max() <= 5.1   # mrcl's (U[0,1) + 0.02) * 5


def test_forgetting_signs_for_mse():
    # function 0: MSE 1 after learning it, 3 at the end (forgotten by 2); function 1: 0.5 after learning it
    m = np.array([[[1.0, 9.0], [3.0, 0.5]], [[1.0, 9.0], [3.0, 0.5]]])
    s = summarize_runs(m)
    assert s["mse"]["mean"] == pytest.approx(1.75)
    assert s["forgetting"]["mean"] == pytest.approx(2.0)             # >= 0: the MSE rose from its best
    assert s["backward_transfer"]["mean"] == pytest.approx(-2.0)     # < 0: later learning hurt function 0
    assert [f["mean"] for f in s["mse_after"]] == pytest.approx([1.0, 1.75])


@pytest.mark.parametrize("task,dataset,match", [
    ({"ways": 0}, {}, r"task.ways=0 must be >= 1"),
    ({"shots": 0}, {}, r"task.shots=0 must be >= 1"),
    ({"shots": 6}, {}, r"task.shots=6 points per function must be a multiple of dataset.step_batch=4"),
    ({"test_ways": 5}, {}, r"task.test_ways=5 functions need as many one-hot input slots"),
    ({}, {"train_functions": 0}, r"dataset.train_functions=0 must be >= 1"),
    ({}, {"step_batch": 0}, r"dataset.step_batch=0 must be >= 1"),
])
def test_bad_settings_are_refused_in_one_line(task, dataset, match):
    d, t = family_cfg(**task)
    d = OmegaConf.merge(d, dataset)
    with pytest.raises(UserError, match=match) as e:
        build_family(d, t)
    assert "\n" not in str(e.value)


def test_learner_and_algorithm_mismatches_are_refused_in_one_line():
    from metarun.algos.base import Collaborators
    from metarun.algos.oml import OMLConfig, build
    from metarun.learners.continual_nets import OMLNet
    d, t = family_cfg()
    family = build_family(d, t)
    with pytest.raises(UserError, match=r"learner=oml_mlp \(got learner=mlp\)"):
        family.check_learner(OmegaConf.create({"name": "mlp"}))
    with pytest.raises(UserError, match=r"needs a representation and a prediction network: learner=oml_mlp"):
        build(OMLConfig(inner_lr=0.003), Collaborators(family=family, learner=lambda out: OMLNet(out),
                                                       learner_cfg=OmegaConf.create({"name": "oml_net"}), phase="train"))


@pytest.mark.slow
def test_brief_meta_training_beats_the_untrained_representation(tmp_path):
    """200 meta-steps on a small net: the continual MSE after the last function is below the untrained
    (random RLN, same functions, same rate sweep) one."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    run = tmp_path / "isine"
    proc = subprocess.run([sys.executable, "-m", "metarun", "experiment=oml_incremental_sine", "train.progress=false",
                           "learner.rln=[64,64,64]", "learner.pln_hidden=[32]", "dataset.step_batch=8",
                           "task.ways=3", "task.shots=32", "task.queries=16", "task.test_ways=3", "task.test_shots=32",
                           "task.test_queries=32", "meta_opt.lr=1e-3", "algo.inner_lr=0.01", "train.steps=200",
                           "train.steps_per_call=100", "train.val_every=0", "train.log_every=100",
                           "train.ckpt_every=200", "eval.episodes=10", "eval.continual_runs=10",
                           "eval.continual_val_runs=3", "eval.continual_lrs=[0.01,0.003]", f"hydra.run.dir={run}"],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    c = json.loads((run / "results.json").read_text())["continual"]
    assert c["mse"]["mean"] < c["untrained"]["mse"]["mean"]
    assert c["plots"] == ["continual_curve.png"] and (run / "continual_curve.png").stat().st_size > 0
