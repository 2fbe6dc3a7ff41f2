"""The `metarun` command end to end: run dirs, results, kill-and-resume, and one-line errors."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import compose
from metarun.cli import run

REPO = Path(__file__).resolve().parents[1]


def metarun(*overrides, cwd=None, timeout=300):
    """Run the real command line in a subprocess (as a user would) and return the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "metarun", *overrides], cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture(scope="module")
def smoke_overrides(fake_omniglot_dir):
    """fake_omniglot_overrides for the module-scoped smoke run (that fixture is per test)."""
    return ["debug=smoke", f"dataset.local_dir={fake_omniglot_dir}", "dataset.split=lake", "train.progress=false"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, smoke_overrides):
    """(run dir, CompletedProcess) of one uninterrupted `metarun debug=smoke` run on the fake Omniglot, made once
    for the module: the smoke test reads it, and it is the reference the kill-and-resume test must reproduce."""
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    return run_dir, metarun(*smoke_overrides, f"hydra.run.dir={run_dir}")


def test_cli_smoke_run_writes_a_complete_run_dir(tmp_path, fake_omniglot_overrides, smoke_run):
    run_dir, proc = smoke_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run_dir / ".hydra" / "config.yaml").exists()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert all("train/loss" in r and "train/accuracy" in r for r in rows)
    assert "val/accuracy" in rows[1]
    assert sorted(p.name for p in (run_dir / "checkpoints" / "last").iterdir() if p.name.isdigit()) == ["10", "20"]
    assert any(p.name.isdigit() for p in (run_dir / "checkpoints" / "best").iterdir())
    assert (run_dir / "run_config.yaml").exists() and not (run_dir / ".metarun.lock").exists()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["metric"] == "accuracy" and results["episodes"] == 20 and results["split"] == "test"
    assert results["score"] == results["mean"]  # accuracy: the score is the metric itself
    assert results["ci95"] == pytest.approx(1.96 * results["std"] / math.sqrt(results["episodes"]))
    # 20 meta-steps on the fake set's distinct drawings already put 5-way accuracy well above chance (1/5).
    assert results["mean"] - results["ci95"] > 0.2
    vals = {r["step"]: r["val/accuracy"] for r in rows if "val/accuracy" in r}
    assert results["best_val_step"] in vals and results["best_val_score"] == pytest.approx(max(vals.values()))
    assert vals[results["best_val_step"]] == pytest.approx(max(vals.values()))
    assert results["inner_steps"] == 3 and results["train_wall_s"] > 0
    assert results["algo_config"]["name"] == "maml" and results["algo_config"]["eval_inner_steps"] == 3
    assert "test accuracy" in proc.stdout

    # mode=eval on that run reproduces the test figure from its best checkpoint.
    eval_dir = tmp_path / "eval"
    proc = metarun(*fake_omniglot_overrides, "mode=eval", f"ckpt={run_dir}", f"hydra.run.dir={eval_dir}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = json.loads((eval_dir / "results.json").read_text())
    assert again["mean"] == pytest.approx(results["mean"]) and again["checkpoint"] == "best"
    # MAML's head is 5-way: testing it 3-way is refused in one line naming the ways, not a traceback.
    proc = metarun(*fake_omniglot_overrides, "mode=eval", f"ckpt={run_dir}", "eval.ways=3",
                   f"hydra.run.dir={tmp_path / 'eval_3way'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("metarun: error:")]
    assert len(lines) == 1 and "ways" in lines[0], proc.stderr[-2000:]


def test_sinusoid_reports_mse_after_1_5_10_steps(tmp_path):
    # The smoke preset with the MLP learner (20 steps, validation at 10 and 20; was also
    # test_reliability's test_smoke_preset_works_with_the_mlp_learner, merged here: one run, both checks).
    cfg = compose(["experiment=maml_sinusoid", "debug=smoke", "train.progress=false"])
    score = run(cfg, tmp_path)
    from omegaconf import OmegaConf
    assert OmegaConf.load(tmp_path / "run_config.yaml").learner.width_factor == 0.125  # smoke shrinks any learner
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["metric"] == "mse" and results["inner_steps"] == 1 and results["shots"] == 5
    assert set(results["by_inner_steps"]) == {"1", "5", "10"}
    assert results["by_inner_steps"]["1"]["mean"] == pytest.approx(results["mean"])
    # each count really runs that many inner steps (the same episodes give three different MSEs)
    assert len({round(v["mean"], 6) for v in results["by_inner_steps"].values()}) == 3
    # higher is better whatever the metric: the score of an MSE is its negative, and a training run
    # returns (as the sweep objective) its best validation score
    assert results["higher_is_better"] is False and results["score"] == pytest.approx(-results["mean"])
    assert results["best_val_step"] in (10, 20) and score == pytest.approx(results["best_val_score"]) and score < 0


def _strip_timing(rows):
    return [{k: v for k, v in r.items() if k not in ("wall_s", "steps_per_s")} for r in rows]


def test_a_killed_run_resumes_to_the_same_final_metrics(tmp_path, smoke_overrides, smoke_run):
    # The smoke config (20 steps: logs at 5, 10, 15, 20; validation and checkpoints at 10 and 20) killed right
    # after its step-10 checkpoint, then resumed, must end exactly like the module's uninterrupted smoke run.
    whole, proc = smoke_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    overrides = smoke_overrides
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "metarun", *overrides, f"hydra.run.dir={cut}"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.time() + 240
    while not (cut / "checkpoints" / "last" / "10").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "results.json").exists(), "the run finished before it could be killed"
    rows = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert rows(cut)[-1]["step"] < 20, "the kill came after the last step: nothing left to resume"

    resumed = metarun(*overrides, f"hydra.run.dir={cut}", "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = json.loads((whole / "results.json").read_text())
    b = json.loads((cut / "results.json").read_text())
    assert (b["mean"], b["ci95"], b["checkpoint"]) == (a["mean"], a["ci95"], a["checkpoint"])
    assert _strip_timing(rows(cut)) == _strip_timing(rows(whole))
    # the resumed segment's clock continues the killed one's (time to accuracy reads wall_s)
    walls = [r["wall_s"] for r in rows(cut)]
    assert walls == sorted(walls), walls


def test_rerunning_into_a_dir_with_checkpoints_without_resume_is_refused(tmp_path, fake_omniglot_overrides):
    cfg = compose([*fake_omniglot_overrides, "train.steps=5", "train.ckpt_every=5", "train.val_every=0",
                   "eval.episodes=5"])
    run(cfg, tmp_path)
    from metarun.errors import UserError
    with pytest.raises(UserError, match="resume=true"):
        run(cfg, tmp_path)


@pytest.mark.parametrize("overrides,expected", [
    (["dataset.local_dir=/no/such/omniglot"], "/no/such/omniglot"),
    (["task.ways=500"], "task ways=500 exceeds"),
    (["dataset=sinusoid"], "needs learner=mlp"),
])
def test_user_mistakes_give_one_line_errors(tmp_path, fake_omniglot_overrides, overrides, expected):
    base = fake_omniglot_overrides if overrides[0].startswith(("dataset.", "task.")) else ["debug=smoke"]
    proc = metarun(*base, *overrides, f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("metarun: error:")]
    assert len(lines) == 1 and expected in lines[0], proc.stderr[-2000:]


def test_unknown_algo_is_hydras_one_message(tmp_path):
    proc = metarun("algo=nope", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "Could not find 'algo/nope'" in proc.stderr and "maml" in proc.stderr
