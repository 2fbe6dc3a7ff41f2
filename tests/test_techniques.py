"""Issue 15 techniques: augment= (training tasks only, deterministic, labels kept), regularize= (decoupled
weight decay, label smoothing, dropout refused) and init.from=RUN_DIR (the saved body, bitwise)."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from omegaconf import OmegaConf

from conftest import compose
from metarun.build import initial_state, load_family, make_algo
from metarun.checkpoint import Checkpoints
from metarun.data.augment import augment_task, make_augment
from metarun.data.tasks import make_image_sampler
from metarun.errors import UserError
from metarun.optim import make_optimizer, make_schedule

# Trains through the real trainer several times (minutes on 2 cores): run in CI's second pass (--runslow).
pytestmark = pytest.mark.slow

SYNTH = ["dataset=synthetic", "debug=smoke", "dataset.image_size=16", "dataset.classes=[8,6,6]", "train.progress=false"]


def test_augment_training_tasks_only():
    family = load_family(compose(SYNTH + ["augment=cifar"]))
    key = jax.random.PRNGKey(3)
    data = family.data["train"]
    task = family.sampler("train")(data, key)
    again = family.sampler("train")(data, key)
    jax.tree.map(np.testing.assert_array_equal, task, again)  # deterministic from the key
    # Exactly: the plain episode of the first key half, augmented (make_augment's cifar recipe) with the other.
    task_key, aug_key = jax.random.split(key)
    s = family.shapes["train"]
    plain = make_image_sampler(s.ways, s.shots, s.queries)(data, task_key)
    want = augment_task(make_augment(crop_padding=4, hflip=True, hflip_prob=0.5), aug_key, plain)
    jax.tree.map(np.testing.assert_array_equal, task, want)
    np.testing.assert_array_equal(task.support.y, plain.support.y)
    np.testing.assert_array_equal(task.query.y, plain.query.y)
    assert not np.array_equal(task.query.x, plain.query.x)
    # Validation and test episodes are the unaugmented protocol: the same as with augment=none.
    off = load_family(compose(SYNTH))
    for split in ("val", "test"):
        jax.tree.map(np.testing.assert_array_equal, family.sampler(split)(family.data[split], key),
                     off.sampler(split)(off.data[split], key))
    assert off.augment is None  # augment=none: the training sampler is the plain one


def test_augment_refusals():
    with pytest.raises(UserError, match="augment is for image classification; dataset=sinusoid") as e:
        load_family(compose(["dataset=sinusoid", "task=regression", "learner=mlp", "augment=shift"]))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="augment.crop_padding=-1"):
        load_family(compose(SYNTH + ["augment.crop_padding=-1"]))


def test_label_smoothing_objective():
    family = load_family(compose(SYNTH + ["regularize=smooth"]))
    logits = jnp.array([[2.0, -1.0, 0.5], [0.0, 1.0, 3.0]])
    labels = jnp.array([0, 1])
    loss, metrics = family.objective(logits, labels)
    log_p = np.asarray(jax.nn.log_softmax(logits))
    targets = np.full((2, 3), 0.1 / 3) + 0.9 * np.eye(3)[[0, 1]]
    np.testing.assert_allclose(loss, -(targets * log_p).sum(-1).mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["nll"], -log_p[[0, 1], [0, 1]].mean(), rtol=1e-6)  # unsmoothed
    with pytest.raises(UserError, match=r"regularize.label_smoothing=1.0 must be in \[0, 1\)"):
        load_family(compose(SYNTH + ["regularize.label_smoothing=1.0"]))
    with pytest.raises(UserError, match="regularize.dropout=0.2"):
        load_family(compose(SYNTH + ["regularize.dropout=0.2"]))


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_decoupled_weight_decay(name):
    cfg = compose(["meta_opt=" + name, "meta_opt.lr=0.1"]).meta_opt
    params = {"net": {"conv0": {"kernel": jnp.full((2, 2), 3.0), "bias": jnp.ones(2)}}, "lslr": jnp.ones(3)}
    zero = jax.tree.map(jnp.zeros_like, params)
    opt = make_optimizer(cfg, 10, weight_decay=0.01)
    updates, _ = opt.update(zero, opt.init(params), params)
    # Zero gradients: only the decay moves, by -lr * wd * θ, on kernels only.
    np.testing.assert_allclose(updates["net"]["conv0"]["kernel"], -0.1 * 0.01 * 3.0, rtol=1e-6)
    assert not np.any(updates["net"]["conv0"]["bias"]) and not np.any(updates["lslr"])
    # weight_decay=0 builds exactly the optimiser of before (same state structure: old checkpoints resume).
    plain = make_optimizer(cfg, 10)
    assert jax.tree.structure(plain.init(params)) == jax.tree.structure(
        (optax.adam if name == "adam" else optax.sgd)(make_schedule(cfg, 10)).init(params))
    with pytest.raises(UserError, match="meta_opt.name=adamw both decay"):
        make_optimizer(compose(["meta_opt.name=adamw"]).meta_opt, 10, weight_decay=0.01)


def _fake_run(run_dir, overrides, seed=7):
    """A run directory holding its config and a best checkpoint of random learner weights."""
    cfg = compose(SYNTH + overrides)
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    state = initial_state(cfg, load_family(cfg))[2]
    leaves, tree = jax.tree.flatten(state.params)
    rng = np.random.default_rng(seed)
    params = jax.tree.unflatten(tree, [jnp.asarray(rng.normal(size=a.shape), a.dtype) for a in leaves])
    ckpts = Checkpoints(run_dir / "checkpoints", keep=1)
    ckpts.save_scored({"params": params, "algo_state": state.algo_state}, 10, 0.5)
    ckpts.close()
    return params


def test_init_from_loads_the_saved_body(tmp_path):
    saved = _fake_run(tmp_path / "a", ["algo=maml"])
    cfg = compose(SYNTH + ["algo=maml", f"init.from={tmp_path / 'a'}", "seed=3"])
    family = load_family(cfg)
    params = initial_state(cfg, family, init_from=True)[2].params
    jax.tree.map(np.testing.assert_array_equal, params["net"], saved["net"])  # bitwise, head too (same ways)
    fresh = initial_state(cfg, family)[2].params  # a restore target (mode=eval, resume) does not load it
    assert not np.array_equal(fresh["net"]["conv0"]["kernel"], saved["net"]["conv0"]["kernel"])
    assert make_algo(cfg, family, "eval").info["init_from"] == str(tmp_path / "a")

    # A ProtoNet run (no head) starts MAML's body; MAML's head stays freshly initialised.
    body = _fake_run(tmp_path / "p", ["algo=protonet"])
    cfg = compose(SYNTH + ["algo=maml", f"init.from={tmp_path / 'p'}"])
    params = initial_state(cfg, family, init_from=True)[2].params
    for name in body["net"]:
        jax.tree.map(np.testing.assert_array_equal, params["net"][name], body["net"][name])
    own = initial_state(cfg, family)[2].params
    np.testing.assert_array_equal(params["net"]["head"]["kernel"], own["net"]["head"]["kernel"])


def test_init_from_refusals(tmp_path):
    _fake_run(tmp_path / "a", ["algo=protonet"])
    family = load_family(compose(SYNTH))
    cases = [
        (["learner=resnet12"], r"is a run of learner=conv4; this run's learner=resnet12"),
        (["learner.width_factor=0.25"], r"shape mismatch at conv0/bias: saved \(8,\), this run \(16,\)"),
        (["learner.blocks=3"], r"the saved learner body has conv3/bias, which this learner lacks"),
    ]
    for extra, message in cases:
        cfg = compose(SYNTH + ["algo=protonet", f"init.from={tmp_path / 'a'}"] + extra)
        with pytest.raises(UserError, match=message) as e:
            initial_state(cfg, family, init_from=True)
        assert "\n" not in str(e.value)
    for source, message in ((tmp_path / "none", "expected a run directory"),):
        with pytest.raises(UserError, match=message):
            initial_state(compose(SYNTH + ["algo=protonet", f"init.from={source}"]), family, init_from=True)
    with pytest.raises(UserError, match="init.form is unknown"):
        make_algo(compose(SYNTH + ["+init.form=x"]), family, "train")


def test_init_from_through_the_trainer(tmp_path):
    from metarun.train import run

    _fake_run(tmp_path / "a", ["algo=protonet"])
    run(compose(SYNTH + ["algo=protonet", f"init.from={tmp_path / 'a'}", "train.steps=2", "train.steps_per_call=1",
                         "train.log_every=1", "train.val_every=0", "train.ckpt_every=2", "eval.episodes=2",
                         "augment=shift", "regularize=wd"]), tmp_path / "b")
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    assert results["algo_config"]["init_from"] == str(tmp_path / "a") and np.isfinite(results["mean"])
