"""pipeline=NAME (issue 15): stage commands, forwarded overrides, resumable stages, the summary table; orchestration
tested with a stand-in interpreter (fast); the real chain on the fake Omniglot is slow-marked."""
from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import compose
from metarun.errors import UserError
from metarun.pipeline import forwarded, run, stage_command, stage_status, stages_of

SPEC = {"name": "demo", "stages": {
    "pretrain": {"args": ["experiment=pretrain_omniglot"], "extra": []},
    "metatrain": {"init_from": "pretrain", "args": ["experiment=protonet_omniglot_5w1s"], "extra": ["train.steps=7"]},
    "finetune": {"evaluate": "metatrain", "args": ["algo=finetune_cosine"], "extra": []},
}}


def test_stage_commands():
    stages = stages_of(OmegaConf.create(SPEC))
    base = forwarded(["pipeline=protonet_omniglot", "debug=smoke", "dataset.local_dir=/d", "+pipeline.x=1",
                      "hydra.verbose=true"])
    assert base == ["debug=smoke", "dataset.local_dir=/d"]
    run_dir = Path("/runs/p")
    assert stage_command(run_dir, "pretrain", stages["pretrain"], base) == [
        "experiment=pretrain_omniglot", "debug=smoke", "dataset.local_dir=/d", "hydra.run.dir=/runs/p/pretrain"]
    assert stage_command(run_dir, "metatrain", stages["metatrain"], base) == [
        "experiment=protonet_omniglot_5w1s", "init.from=/runs/p/pretrain", "debug=smoke", "dataset.local_dir=/d",
        "train.steps=7", "hydra.run.dir=/runs/p/metatrain"]
    assert stage_command(run_dir, "finetune", stages["finetune"], base) == [
        "mode=eval", "ckpt=/runs/p/metatrain", "algo=finetune_cosine", "debug=smoke", "dataset.local_dir=/d",
        "hydra.run.dir=/runs/p/finetune"]
    # The presets compose and name earlier stages only.
    for name in ("protonet_omniglot", "maml_omniglot"):
        assert list(stages_of(compose([f"pipeline={name}"]).pipeline)) == ["pretrain", "metatrain", "finetune"]


def test_refusals():
    for override in ("mode=eval", "experiment=maml_omniglot_5w1s", "+init.from=/x", "resume=true"):
        with pytest.raises(UserError, match="a pipeline sets .* per stage") as e:
            forwarded([override])
        assert "\n" not in str(e.value)
    bad = {"name": "x", "stages": {"a": {"evaluate": "b"}, "b": {}}}
    with pytest.raises(UserError, match=r"pipeline.stages.a.evaluate=b must name an earlier stage \(earlier: none\)"):
        stages_of(OmegaConf.create(bad))
    with pytest.raises(UserError, match="pipeline.stages.a.argz is unknown"):
        stages_of(OmegaConf.create({"stages": {"a": {"argz": []}}}))


def _stand_in_python(tmp_path, fail_stage=None) -> str:
    """An 'interpreter' that records each call's arguments and writes a stage's results.json like a run would."""
    script = tmp_path / "python"
    script.write_text(f"""#!{sys.executable}
import json, sys, pathlib
args = sys.argv[3:]  # after -m metarun
with open({str(tmp_path / 'calls.jsonl')!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")
run_dir = pathlib.Path([a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")][0])
if run_dir.name == {fail_stage!r}:
    sys.exit(2)
run_dir.mkdir(parents=True, exist_ok=True)
mean = {{"pretrain": 0.5, "metatrain": 0.75, "finetune": 0.7}}[run_dir.name]
(run_dir / "results.json").write_text(json.dumps({{"metric": "accuracy", "mean": mean, "ci95": 0.01, "score": mean,
    "episodes": 20, "ways": 5, "shots": 1, "queries": 15, "eval_seed": 1234, "algo": run_dir.name,
    "higher_is_better": True}}))
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def _calls(tmp_path):
    path = tmp_path / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_stages_run_in_order_then_resume_where_they_stopped(tmp_path):
    cfg = OmegaConf.create({"pipeline": SPEC})
    out = tmp_path / "run"
    # metatrain fails: pretrain ran, finetune did not; the error names the stage and how to continue.
    with pytest.raises(UserError, match=r"pipeline stage metatrain failed \(exit 2; .*rerun the same command") as e:
        run(cfg, out, ["debug=smoke"], python=_stand_in_python(tmp_path, fail_stage="metatrain"))
    assert "\n" not in str(e.value)
    assert [c[-1] for c in _calls(tmp_path)] == [f"hydra.run.dir={out / 'pretrain'}", f"hydra.run.dir={out / 'metatrain'}"]
    # metatrain had saved a checkpoint before it stopped: the rerun resumes it, skips pretrain (done), runs finetune.
    (out / "metatrain" / "checkpoints" / "last" / "10").mkdir(parents=True)
    assert stage_status(out / "metatrain", evaluation=False) == "resume"
    assert stage_status(out / "pretrain", evaluation=False) == "done"
    assert stage_status(out / "finetune", evaluation=True) == "fresh"
    (tmp_path / "calls.jsonl").unlink()
    score = run(cfg, out, ["debug=smoke"], python=_stand_in_python(tmp_path))
    calls = _calls(tmp_path)
    assert [c[-1] for c in calls] == ["resume=true", f"hydra.run.dir={out / 'finetune'}"]
    assert calls[0][:-1] == stage_command(out, "metatrain", stages_of(cfg.pipeline)["metatrain"], ["debug=smoke"])
    assert score == 0.7  # the last stage's
    summary = json.loads((out / "pipeline.json").read_text())
    assert [(r["stage"], r["status"], r["mean"]) for r in summary["stages"]] == [
        ("pretrain", "done", 0.5), ("metatrain", "resume", 0.75), ("finetune", "ran", 0.7)]
    table = (out / "summary.md").read_text()
    assert "| metatrain | metatrain from pretrain | 75.00 ± 1.00% (accuracy) | 20 | 5-way 1-shot |" in table
    assert "| finetune | finetune on metatrain | 70.00 ± 1.00% (accuracy) |" in table


@pytest.mark.slow
def test_pipeline_on_fake_omniglot(tmp_path, fake_omniglot_overrides):
    """pipeline=protonet_omniglot through real child runs (smoke-sized): three stages, summary.md, every stage
    scored on the same test episodes; a rerun skips all stages."""
    import subprocess

    out = tmp_path / "p"
    args = [sys.executable, "-m", "metarun", "pipeline=protonet_omniglot", *fake_omniglot_overrides,
            "eval.episodes=6", "train.val_episodes=4", 'pipeline.stages.metatrain.extra=["task.ways=5"]',
            f"hydra.run.dir={out}"]  # the fake Omniglot has 24 training classes: ProtoNets' 60-way episodes do not fit
    subprocess.run(args, check=True, cwd=Path(__file__).resolve().parents[1])
    summary = json.loads((out / "pipeline.json").read_text())
    rows = summary["stages"]
    assert [r["stage"] for r in rows] == ["pretrain", "metatrain", "finetune"]
    assert [r["algo"] for r in rows] == ["pretrain", "protonet", "finetune_cosine"]
    assert summary["same_test_episodes"] and rows[0]["queries"] == 15
    meta = json.loads((out / "metatrain" / "results.json").read_text())
    assert meta["algo_config"]["init_from"] == str(out / "pretrain")
    subprocess.run(args, check=True, cwd=Path(__file__).resolve().parents[1])
    assert [r["status"] for r in json.loads((out / "pipeline.json").read_text())["stages"]] == ["done"] * 3


def test_a_terminated_pipeline_stops_its_running_stage():
    """SIGTERM to the pipeline process reaches the stage's child process (no orphaned training in the run dir);
    the pipeline itself survives to report it, and its own handler is restored afterwards."""
    import os
    import signal
    import threading
    import time

    from metarun.pipeline import run_stage

    before = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGTERM))
    timer.start()
    start = time.perf_counter()
    code = run_stage([sys.executable, "-c", "import time; time.sleep(60)"])
    timer.join()
    assert code == -signal.SIGTERM  # the child was terminated by the forwarded signal, not left sleeping
    assert time.perf_counter() - start < 30
    assert signal.getsignal(signal.SIGTERM) is before
