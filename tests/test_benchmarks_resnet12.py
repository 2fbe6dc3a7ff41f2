"""Issue 15 wiring: learner=resnet12 with BatchNorm modes, and dataset=mini_imagenet / tiered_imagenet /
cifar_fs / fc100 registered and running end to end on tiny files generated in the published layouts."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import compose
from metarun.errors import UserError
from metarun.learners import Net, build_learner
from metarun.learners.resnet12 import ResNet12
from test_imagenet_loaders import cifar_rows, mini_source, tiered_source, write_cifar100, write_mini_folder, write_tiered  # noqa: F401

# Trains through the real trainer several times (minutes on 2 cores): run in CI's second pass (--runslow).
pytestmark = pytest.mark.slow

SMOKE = ["debug=smoke", "train.progress=false", "train.steps=4", "train.steps_per_call=2", "train.log_every=2",
         "train.val_every=4", "train.ckpt_every=4", "train.val_episodes=2", "eval.episodes=4", "eval.batch=4"]


def _param_paths(tree):
    return sorted(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree))


def test_resnet12_learner_config_and_modes():
    cfg = compose(["learner=resnet12", "debug=smoke"])
    assert cfg.learner.width_factor == 0.125 and list(cfg.learner.widths) == [64, 160, 320, 640]
    x = jnp.ones((2, 16, 16, 3))
    net = Net(build_learner(cfg.learner, 5))
    params, stats = jax.eval_shape(net.init, jax.random.PRNGKey(0), x)
    assert stats == {}  # transductive: no running statistics
    # The same parameter names (and shapes) as the pure module at widths x 1/8: weights move between them.
    pure = jax.eval_shape(ResNet12(out_dim=5, widths=(8, 20, 40, 80)).init, jax.random.PRNGKey(0), x)["params"]
    assert _param_paths(params) == _param_paths(pure)
    assert jax.tree.map(lambda a: a.shape, params) == jax.tree.map(lambda a: a.shape, pure)

    running = compose(["learner=resnet12", "debug=smoke", "learner.batch_norm=running"]).learner
    net = Net(build_learner(running, 5, bn_steps=2), train=True)
    params, stats = net.init(jax.random.PRNGKey(0), x)
    assert stats["block0"]["norm0"]["mean"].shape == (2, 8)
    out, new = net.apply_updating(params, x * 3.0, stats, step=1)
    assert out.shape == (2, 5)
    # Only copy `step` of the running statistics moves (per-step statistics, as Conv-4's).
    np.testing.assert_array_equal(new["block0"]["norm0"]["mean"][0], stats["block0"]["norm0"]["mean"][0])
    assert not np.allclose(new["block0"]["norm0"]["mean"][1], stats["block0"]["norm0"]["mean"][1])
    ev = Net(build_learner(running, 5, bn_steps=2), train=False).apply(params, x, new, step=1)
    assert ev.shape == (2, 5) and np.isfinite(ev).all()


def test_resnet12_refusals():
    from metarun.build import make_algo
    from conftest import stand_in_family

    cfg = compose(["learner=resnet12", "algo=protonet", "dataset=synthetic", "learner.batch_norm=running"])
    with pytest.raises(UserError, match="algo=protonet supports learner.batch_norm=transductive or none") as e:
        make_algo(cfg, stand_in_family(cfg), "train")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="learner.drop_rate=0.1"):
        build_learner(compose(["learner=resnet12", "learner.drop_rate=0.1"]).learner, 5)


def _train(overrides, run_dir):
    from metarun.train import run

    run(compose(SMOKE + overrides), run_dir)
    return json.loads((run_dir / "results.json").read_text())


def test_cifar_fs_smoke_and_fc100_family(cifar_rows, tmp_path):  # noqa: F811
    from metarun.build import load_family

    root = write_cifar100(tmp_path / "cifar", cifar_rows, as_tar=True)
    common = [f"dataset.local_dir={root}", f"dataset.cache_dir={tmp_path / 'cache'}", "task.queries=3",
              "dataset.image_size=16"]
    res = _train(["dataset=cifar_fs", "algo=protonet"] + common, tmp_path / "fs")
    assert res["dataset"] == "cifar_fs" and res["episodes"] == 4 and np.isfinite(res["mean"])
    family = load_family(compose(["dataset=fc100"] + common))
    assert family.kind == "classification" and family.num_classes == {"train": 60, "val": 20, "test": 20}
    task = family.sampler("test")(family.data["test"], jax.random.PRNGKey(0))
    assert task.support.x.shape == (5, 16, 16, 3) and task.query.x.shape == (15, 16, 16, 3)


def test_imagenet_smoke(mini_source, tiered_source, tmp_path):  # noqa: F811
    from metarun.build import load_family

    mini = write_mini_folder(tmp_path / "mini", mini_source)
    # 2 val/test classes and 4 images each in the generated set: 2-way 1-shot, 2 queries.
    episode = ["task.ways=2", "task.queries=2", "dataset.image_size=16", f"dataset.cache_dir={tmp_path / 'cache'}"]
    res = _train(["dataset=mini_imagenet", f"dataset.local_dir={mini}", "algo=protonet", "learner=resnet12"] + episode,
                 tmp_path / "m")
    assert res["dataset"] == "mini_imagenet" and res["learner"] == "resnet12" and np.isfinite(res["mean"])
    tiered = write_tiered(tmp_path / "tiered", tiered_source, "npz")
    family = load_family(compose(["dataset=tiered_imagenet", f"dataset.local_dir={tiered}"] + episode))
    assert family.num_classes == {"train": 3, "val": 2, "test": 2} and family.image_shape == (16, 16, 3)


def test_missing_files_one_line(tmp_path):
    from metarun.build import load_family

    for name, expected in (("mini_imagenet", "mini-imagenet-cache"), ("tiered_imagenet", "train_labels.pkl"),
                           ("cifar_fs", "cifar-100-python.tar.gz"), ("fc100", "cifar-100-python.tar.gz")):
        with pytest.raises(UserError, match=expected) as e:
            load_family(compose([f"dataset={name}", f"dataset.local_dir={tmp_path}"]))
        assert "\n" not in str(e.value)
