"""metarun-report on generated run dirs: grouping by config, CIs, failed/unfinished jobs, CSV, PNG."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from metarun.report import main, report, write_failure
from metarun.errors import UserError


def fake_job(root: Path, num: int, overrides, mean=None, ci95=0.02, best_val=None, losses=(2.0, 1.5, 1.0),
             failure=None, wall=10.0):
    """A run dir as Hydra + metarun leave it; no results.json when mean is None (unfinished)."""
    d = root / str(num)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    seed = next((int(o.split("=")[1]) for o in overrides if o.startswith("seed=")), 0)
    (d / ".hydra" / "config.yaml").write_text(f"seed: {seed}\n")
    rows = [{"step": 10 * (i + 1), "wall_s": i, "train/loss": loss + 0.1 * seed,
             **({"val/accuracy": 0.5 + 0.1 * i, "val/accuracy_ci95": 0.1} if i % 2 else {})}
            for i, loss in enumerate(losses)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if mean is not None:
        (d / "results.json").write_text(json.dumps({
            "metric": "accuracy", "mean": mean, "ci95": ci95, "episodes": 600, "steps": 30, "seed": seed,
            "train_wall_s": wall, "best_val_score": best_val}))
    if failure is not None:
        write_failure(d, failure, overrides)
    return d


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "multirun" / "2024-01-01" / "12-00-00_maml_synthetic"
    fake_job(root, 0, ["algo=maml", "seed=0"], mean=0.60, best_val=0.55, wall=10)
    fake_job(root, 1, ["algo=maml", "seed=1"], mean=0.70, best_val=0.65, wall=20)
    fake_job(root, 2, ["algo=maml", "seed=2"], mean=0.80, best_val=0.75, wall=30)
    fake_job(root, 3, ["algo=fomaml", "seed=0"], mean=0.50, ci95=0.03, best_val=0.45)
    fake_job(root, 4, ["algo=fomaml", "seed=1"], losses=(2.0,))              # still running
    fake_job(root, 5, ["algo=fomaml", "train.meta_batch=3", "seed=0"], losses=(),
             failure=UserError("train.meta_batch=3 does not split over the 4 cpu devices"))
    return root


def test_table_groups_seeds_and_lists_problems(sweep, tmp_path):
    out = tmp_path / "out"
    result = report(sweep, out)
    rows = {r["config"]: r for r in result["table"]}
    assert list(rows) == ["algo=maml", "algo=fomaml", "algo=fomaml train.meta_batch=3"]

    maml = rows["algo=maml"]
    assert maml["n_seeds"] == 3 and maml["seeds"] == "0 1 2" and maml["ci_over"] == "seeds"
    assert maml["mean"] == pytest.approx(0.70)
    # Student t with 2 dof: 4.303 * std(0.6, 0.7, 0.8) / sqrt(3) = 4.303 * 0.1 / 1.732
    assert maml["ci95"] == pytest.approx(4.3027 * 0.1 / math.sqrt(3), rel=1e-3)
    assert maml["best_val"] == pytest.approx(0.65) and maml["train_wall_s"] == pytest.approx(20.0)
    assert maml["steps"] == 30 and maml["failed"] == 0 and maml["unfinished"] == 0

    fomaml = rows["algo=fomaml"]   # one finished seed: the episode CI from results.json
    assert fomaml["n_seeds"] == 1 and fomaml["mean"] == 0.5 and fomaml["ci95"] == 0.03
    assert fomaml["ci_over"] == "episodes" and fomaml["unfinished"] == 1

    bad = rows["algo=fomaml train.meta_batch=3"]
    assert bad["n_seeds"] == 0 and bad["mean"] is None and bad["failed"] == 1

    md = (out / "report.md").read_text()
    assert md == result["markdown"]
    assert "| `algo=maml` | accuracy 70.00% ± 24.84% | seeds | 3 |" in md
    assert "failed: `5`" in md and "UserError: train.meta_batch=3 does not split" in md
    assert "unfinished: `4`" in md and "last logged step 10" in md
    assert "6 jobs: 4 finished, 1 failed, 1 unfinished" in md

    with open(out / "report.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["config"] for r in csv_rows] == list(rows)
    assert float(csv_rows[0]["mean"]) == pytest.approx(0.70) and csv_rows[2]["mean"] == ""

    png = out / "curves.png"
    assert result["png"] == png and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![learning curves](curves.png)" in md


def test_single_run_dir_and_cli(sweep, capsys):
    run = sweep / "0"
    main([str(run), "--no-plot"])
    printed = capsys.readouterr().out
    assert "`algo=maml`" in printed and "| episodes | 1 |" in printed
    assert (run / "report.md").exists() and (run / "report.csv").exists()
    assert not (run / "curves.png").exists()


def test_failure_record_is_complete_and_atomic(tmp_path):
    try:
        raise RuntimeError("boom")
    except RuntimeError as e:
        path = write_failure(tmp_path, e, ["algo=maml"])
    record = json.loads(path.read_text())
    assert record["error"] == "RuntimeError" and record["message"] == "boom" and not record["user_error"]
    assert "Traceback" in record["traceback"] and record["overrides"] == ["algo=maml"]
    assert [p.name for p in tmp_path.iterdir()] == ["failure.json"]   # no temp file left behind


def test_empty_dir_is_a_user_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no run directories" in capsys.readouterr().err
