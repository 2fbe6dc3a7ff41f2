"""train.schedule=online (FTML): the stream, the buffer, scoring before a task joins it, the summary, errors.

Fast tests check the pure pieces on images that encode their own class and example ids; the slow ones run
the driver end to end on the fake Omniglot (buffer invariant, TOE, resume)."""
from __future__ import annotations

import json
import math
import shutil

import jax
import numpy as np
import pytest

from conftest import compose
from metarun import online
from metarun.errors import UserError


def id_images(classes: int, examples: int) -> np.ndarray:
    """uint8 [classes, examples, 2, 2, 1]: pixel (0, 0) holds the class id, pixel (0, 1) the example id."""
    images = np.zeros((classes, examples, 2, 2, 1), np.uint8)
    images[:, :, 0, 0, 0] = np.arange(classes)[:, None]
    images[:, :, 0, 1, 0] = np.arange(examples)[None, :]
    return images


def ids(x) -> tuple:
    """(class ids, example ids) of a batch of id_images examples (floats in [0, 1])."""
    raw = np.rint(np.asarray(x) * 255).astype(int)
    return raw[:, 0, 0, 0], raw[:, 0, 1, 0]


# -- the stream ---------------------------------------------------------------------------------------

def test_the_stream_is_fixed_by_the_seed_disjoint_and_extends_without_reordering():
    a, b = online.make_stream(0, 60, 5, 20, 8), online.make_stream(0, 60, 5, 20, 8)
    np.testing.assert_array_equal(a.classes, b.classes)
    np.testing.assert_array_equal(a.order, b.order)
    other = online.make_stream(1, 60, 5, 20, 8)
    assert not np.array_equal(a.classes, other.classes)
    assert a.classes.shape == (8, 5) and len(set(a.classes.ravel())) == 40  # disjoint class sets
    assert all(sorted(row) == list(range(20)) for row in a.order.reshape(-1, 20))  # each a permutation
    longer = online.make_stream(0, 60, 5, 20, 12)  # train.steps raised on resume: the same first 8 tasks
    np.testing.assert_array_equal(longer.classes[:8], a.classes)
    np.testing.assert_array_equal(longer.order[:8], a.order)
    with pytest.raises(UserError, match=r"train.steps=13 .* use train.steps <= 12"):
        online.make_stream(0, 60, 5, 20, 13)


def test_the_buffer_when_task_t_is_scored_is_tasks_before_t():
    for t in range(6):
        buffer = online.buffer_before(t, 6)
        assert list(buffer[buffer >= 0]) == list(range(t)) and t not in buffer


def test_the_buffer_sampler_draws_only_from_the_buffer_tasks():
    stream = online.make_stream(3, 30, 5, 20, 6)
    images = id_images(30, 20)
    data = online.buffer_data(jax.numpy.asarray(images), jax.numpy.asarray(stream.classes),
                              online.buffer_before(4, 6))  # tasks 0..3; tasks 4 and 5 are not in it
    sample = jax.jit(online.make_buffer_sampler(5, 2, 3, shuffle_labels=True))
    seen = set()
    for i in range(60):
        task = sample(data, jax.random.PRNGKey(i))
        support_classes, support_examples = ids(task.support.x)
        query_classes, query_examples = ids(task.query.x)
        owners = {int(np.flatnonzero((stream.classes == c).any(1))[0]) for c in support_classes}
        assert len(owners) == 1  # one task's classes
        owner = owners.pop()
        seen.add(owner)
        assert set(support_classes) == set(query_classes) == set(stream.classes[owner])
        # label -> class is one mapping for support and query; each class's examples are drawn without replacement
        mapping = dict(zip(np.asarray(task.support.y), support_classes))
        assert all(mapping[y] == c for y, c in zip(np.asarray(task.query.y), query_classes))
        for c in set(support_classes):
            drawn = list(support_examples[support_classes == c]) + list(query_examples[query_classes == c])
            assert len(drawn) == 5 and len(set(drawn)) == 5
    assert seen == {0, 1, 2, 3}


def test_episodic_sampling_shuffles_labels_and_toe_keeps_each_tasks_own():
    stream = online.make_stream(0, 10, 5, 20, 2)
    data = online.buffer_data(jax.numpy.asarray(id_images(10, 20)), jax.numpy.asarray(stream.classes),
                              online.buffer_before(1, 2))
    fixed = jax.jit(online.make_buffer_sampler(5, 1, 1, shuffle_labels=False))
    shuffled = jax.jit(online.make_buffer_sampler(5, 1, 1, shuffle_labels=True))
    orders = set()
    for i in range(10):
        task = fixed(data, jax.random.PRNGKey(i))
        np.testing.assert_array_equal(ids(task.support.x)[0][np.argsort(task.support.y)], stream.classes[0])
        task = shuffled(data, jax.random.PRNGKey(i))
        orders.add(tuple(ids(task.support.x)[0][np.argsort(task.support.y)]))
    assert len(orders) > 1


def test_a_scored_task_adapts_on_its_first_k_examples_and_is_scored_on_its_last_held_out():
    stream = online.make_stream(0, 10, 5, 20, 2)
    task = online.scoring_task(jax.numpy.asarray(id_images(10, 20)), stream.classes[1], stream.order[1], 10, 5)
    s_class, s_example = ids(task.support.x)
    q_class, q_example = ids(task.query.x)
    for j, c in enumerate(stream.classes[1]):
        assert list(s_example[s_class == c]) == list(stream.order[1, j, :10])
        assert list(q_example[q_class == c]) == list(stream.order[1, j, 15:])
        assert set(np.asarray(task.support.y)[s_class == c]) == set(np.asarray(task.query.y)[q_class == c]) == {j}
    # support sizes are nested: the 1-shot support is the first example of the 10-shot one
    one = online.scoring_task(jax.numpy.asarray(id_images(10, 20)), stream.classes[1], stream.order[1], 1, 5)
    assert list(ids(one.support.x)[1]) == list(stream.order[1, :, 0])


# -- metrics ------------------------------------------------------------------------------------------

def test_shots_to_threshold_is_the_first_k_reaching_it():
    assert online.shots_to_threshold({1: 0.5, 5: 0.92, 10: 0.95}, 0.9) == 5
    assert online.shots_to_threshold({10: 0.95, 1: 0.91}, 0.9) == 1  # order of the dict does not matter
    assert online.shots_to_threshold({1: 0.5, 10: 0.89}, 0.9) is None
    assert online.shots_to_threshold({1: 1.0}, 1.0) == 1


def test_the_stream_summary_is_the_second_halfs_mean_and_ci_with_censored_tasks_at_the_largest_k():
    acc = [0.2, 0.4, 0.6, 0.8, 0.5, 0.7]
    need = [None, 10, None, 5, 1, None]
    rows = [{"task": t, "step": 5 * (t + 1), online.accuracy_key(1): a, online.accuracy_key(10): 1.0,
             online.THRESHOLD_KEY: n} for t, (a, n) in enumerate(zip(acc, need))]
    s = online.summarize_stream(rows[::-1], [10, 1], 0.9)  # row order and shot order do not matter
    assert s["tasks"] == 6 and s["shots"] == [1, 10] and s["second_half_from_task"] == 3
    assert s["per_task"]["accuracy"]["1"] == acc and s["per_task"]["shots_to_threshold"] == need
    half = np.array([0.8, 0.5, 0.7])
    a1 = s["second_half"]["accuracy"]["1"]
    assert a1["mean"] == pytest.approx(half.mean()) and a1["n"] == 3
    assert a1["ci95"] == pytest.approx(1.96 * half.std(ddof=1) / math.sqrt(3))
    n = s["second_half"]["shots_to_threshold"]
    assert n["mean"] == pytest.approx((5 + 1 + 10) / 3) and n["censored"] == 1
    assert n["reached_fraction"] == pytest.approx(2 / 3)


def test_the_online_plot_is_written(tmp_path):
    from metarun.plots.online_curves import online_curves

    rows = [{"task": t, online.accuracy_key(1): 0.5 + 0.04 * t, online.accuracy_key(5): 0.9,
             online.THRESHOLD_KEY: 5 if t % 2 else None} for t in range(8)]
    s = online.summarize_stream(rows, [1, 5], 0.9)
    path = online_curves({"ftml": s, "toe": s}, tmp_path / "o.png")
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- config -------------------------------------------------------------------------------------------

def test_batch_is_the_default_schedule_and_old_configs_are_batch():
    from omegaconf import OmegaConf

    cfg = compose(["debug=smoke"])
    assert online.schedule(cfg) == "batch"
    online.check_schedule(cfg)
    old = OmegaConf.create({"train": {"steps": 5}})  # a run saved before train.schedule existed
    assert online.schedule(old) == "batch"


@pytest.mark.parametrize("overrides,expected", [
    (["train.schedule=stream"], "train.schedule=stream is unknown; expected one of: batch, online"),
    (["train.online.threshold=1.5"], "train.online.threshold=1.5 must be in (0, 1]"),
    (["train.online.threshold=0"], "train.online.threshold=0.0 must be in (0, 1]"),
    (["train.online.shots=[]"], "train.online.shots=[] is empty"),
    (["train.online.shots=[0,5]"], "train.online.shots=[0, 5] must hold integers >= 1"),
    (["train.online.held_out=0"], "train.online.held_out=0 must be >= 1"),
    (["train.online.meta_steps=0"], "train.online.meta_steps=0 must be >= 1"),
    (["train.online.baseline=scratch"], "train.online.baseline=scratch is unknown; expected one of: none, toe"),
    (["experiment=maml_sinusoid"], "dataset=sinusoid feeds the regression family"),
    (["algo=protonet", "train.online.baseline=toe"], "algo=protonet has no such loop"),
    (["algo=reptile", "train.online.baseline=toe"], "algo=reptile has no such loop"),
    (["algo.msl=true", "train.online.baseline=toe"], "algo.msl=true"),
])
def test_bad_online_keys_are_one_line_errors(overrides, expected):
    from metarun.train import check_config

    cfg = compose(["debug=smoke", "train.schedule=online", *overrides])
    with pytest.raises(UserError) as e:
        check_config(cfg)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_online_keys_are_not_checked_under_batch():
    online.check_schedule(compose(["debug=smoke", "train.online.threshold=2"]))


# -- the driver (slow: compiles a training chunk) -----------------------------------------------------

def _online_cfg(fake_omniglot_overrides, *extra):
    # The fake Omniglot's lake train split has 6 characters x 4 rotations = 24 classes: 4 tasks of 5 ways.
    return compose([*fake_omniglot_overrides, "train.schedule=online", "train.steps=4", "train.online.meta_steps=3",
                    "train.online.shots=[1,5]", "train.online.held_out=5", "train.val_every=2", "train.ckpt_every=1",
                    "train.keep_ckpts=10", "eval.episodes=4", "eval.batch=4", *extra])


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("baseline", ["none", "toe"])
def test_an_online_run_never_trains_on_the_task_it_is_about_to_score(baseline, tmp_path, fake_omniglot_overrides,
                                                                     monkeypatch):
    from metarun.cli import run

    events = []
    real_data, real_scorer = online.buffer_data, online.make_scorer

    def recording_data(images, classes, buffer):
        buffer = np.asarray(buffer)
        events.append(("train", set(np.asarray(classes)[buffer[buffer >= 0]].ravel().tolist())))
        return real_data(images, classes, buffer)

    def recording_scorer(algo, shots, held_out):
        score = real_scorer(algo, shots, held_out)

        def scored(params, algo_state, images, classes, order, key):
            events.append(("score", set(np.asarray(classes).tolist())))
            return score(params, algo_state, images, classes, order, key)
        return scored

    monkeypatch.setattr(online, "buffer_data", recording_data)
    monkeypatch.setattr(online, "make_scorer", recording_scorer)
    cfg = _online_cfg(fake_omniglot_overrides, f"train.online.baseline={baseline}")
    score = run(cfg, tmp_path)

    trained_on = set()
    scored_tasks = 0
    for kind, classes in events:
        if kind == "score":
            assert not classes & trained_on, "the learner was trained on the task it is scored on"
            scored_tasks += 1
        else:
            trained_on |= classes
    assert scored_tasks == 4 * 2  # 4 tasks x 2 support sizes

    rows = _rows(tmp_path)
    assert [r["task"] for r in rows] == [0, 1, 2, 3] and [r["step"] for r in rows] == [3, 6, 9, 12]
    assert [r["buffer_tasks"] for r in rows] == [0, 1, 2, 3]
    assert "val/accuracy" in rows[1] and "val/accuracy" in rows[3]
    results = json.loads((tmp_path / "results.json").read_text())
    o = results["online"]
    assert results["schedule"] == "online" and results["steps"] == 12
    assert o["method"] == ("toe" if baseline == "toe" else "maml") and o["plot"] == "online.png"
    assert (tmp_path / "online.png").exists()
    assert o["per_task"]["accuracy"]["1"] == [r[online.accuracy_key(1)] for r in rows]
    assert o["second_half_from_task"] == 2
    assert score == pytest.approx(o["second_half"]["accuracy"]["1"]["mean"])
    # the final learner is scored on the usual test episodes too
    assert results["episodes"] == 4 and results["split"] == "test"


@pytest.mark.slow
def test_a_resumed_online_run_gives_the_same_metrics(tmp_path, fake_omniglot_overrides):
    from metarun.cli import run

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    cfg = _online_cfg(fake_omniglot_overrides)
    run(cfg, whole)
    # A run killed after task 2's row was written and before its checkpoint: checkpoints 3.. and results gone.
    shutil.copytree(whole, cut)
    for step in ("9", "12"):
        shutil.rmtree(cut / "checkpoints" / "last" / step)
    for name in ("results.json", "online.png"):
        (cut / name).unlink()
    run(_online_cfg(fake_omniglot_overrides, "resume=true"), cut)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("wall_s", "task_s")} for r in rows]  # noqa: E731
    assert strip(_rows(cut)) == strip(_rows(whole))
    a, b = (json.loads((d / "results.json").read_text()) for d in (whole, cut))
    for key in ("per_task", "second_half"):
        assert b["online"][key] == a["online"][key]
    assert (b["mean"], b["ci95"], b["checkpoint"]) == (a["mean"], a["ci95"], a["checkpoint"])
