"""metarun-report --time-to: wall time to a validation threshold, read from metrics.jsonl rows."""
import json

import pytest

from metarun import report
from metarun.time_to_accuracy import first_reach, time_to_table, validation_key

ROWS = [
    {"step": 100, "wall_s": 60.0, "train/loss": 1.0},
    {"step": 500, "wall_s": 300.0, "val/accuracy": 0.93, "val/accuracy_ci95": 0.01},
    {"step": 1000, "wall_s": 630.0, "val/accuracy": 0.971, "val/accuracy_ci95": 0.01},
    {"step": 1500, "wall_s": 900.0, "val/accuracy": 0.965},
    {"step": 2000, "wall_s": 1260.0, "val/accuracy": 0.981},
]


def test_the_first_validation_at_or_above_the_threshold_is_reported():
    assert validation_key(ROWS) == "val/accuracy"
    assert first_reach(ROWS, "val/accuracy", 0.97) == {"wall_s": 630.0, "step": 1000, "value": 0.971}
    # 0.98 is first reached at step 2000, although step 1500 dipped below 0.97 again
    assert first_reach(ROWS, "val/accuracy", 0.98)["step"] == 2000
    assert first_reach(ROWS, "val/accuracy", 0.93)["step"] == 500  # >=, not >
    assert first_reach(ROWS, "val/accuracy", 0.99) is None


def test_a_lower_is_better_metric_reaches_its_threshold_from_above():
    rows = [{"step": s, "wall_s": 10.0 * s, "val/mse": v} for s, v in [(1, 2.0), (2, 0.6), (3, 0.4)]]
    assert first_reach(rows, "val/mse", 0.5, higher_is_better=False)["step"] == 3
    table = time_to_table({"run": rows}, [0.5], higher_is_better=False)
    assert "0.5 min (step 3)" in table and "0.4 (0.5 min, step 3)" in table


def test_table_minutes_steps_and_not_reached():
    table = time_to_table({"maml": ROWS}, [0.95, 0.99])
    row = table.splitlines()[2]
    assert row == "| maml | 10.5 min (step 1000) | not reached | 0.981 (21.0 min, step 2000) |"


def test_cli_writes_the_section_and_the_plot(tmp_path, capsys):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("- algo=maml\n")
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    report.main([str(run), "--time-to", "0.97,0.98"])
    md = (run / "report.md").read_text()
    assert "## Time to validation threshold" in md and "10.5 min (step 1000)" in md and "21.0 min (step 2000)" in md
    assert (run / "time_to_accuracy.png").stat().st_size > 1000


def test_cli_refuses_a_bad_threshold_list_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        report.main([str(tmp_path), "--time-to", "0.95,high"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--time-to" in err
