"""scripts/bayes_table.py on fake run dirs: the Omniglot (accuracy, ECE, NLL) and sinusoid (in/out-of-range MSE)
tables, each written between its markers in a markdown file."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import yaml

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bayes_table.py"
spec = importlib.util.spec_from_file_location("bayes_table", SCRIPT)
bayes_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bayes_table)


def _run(run_dir: Path, results: dict, config: dict = None) -> Path:
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps(results))
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config or {"train": {"meta_batch": 8}}))
    return run_dir


def _omniglot(root: Path, algo: str, ways: int, acc: float, ece: float = None):
    metrics = {"nll": {"mean": 0.41234, "ci95": 0.0123}, "brier": {"mean": 0.1, "ci95": 0.01}}
    if ece is not None:
        metrics["ece"] = {"mean": ece, "ci95": 0.004}
    return _run(root / f"{algo}_{ways}w", {
        "metric": "accuracy", "dataset": "omniglot", "algo": algo, "ways": ways, "shots": 1, "mean": acc,
        "ci95": 0.0042, "episodes": 1000, "eval_seed": 1234, "class_split": "vinyals", "metrics": metrics,
        "steps": 1000, "train_wall_s": 1200.0})


def _sinusoid(run_dir: Path, algo: str, mean: float, x_range, by_steps=None, inner_steps=None, algo_config=None,
              evaluated_run=None):
    results = {"metric": "mse", "dataset": "sinusoid", "algo": algo, "mean": mean, "ci95": 0.01, "episodes": 1000,
               "x_range": x_range, "inner_steps": inner_steps, "by_inner_steps": by_steps or {},
               "algo_config": algo_config or {}, "steps": 50000, "train_wall_s": 600.0}
    if evaluated_run:
        results["evaluated_run"] = str(evaluated_run)
    return _run(run_dir, results, {"train": {"meta_batch": 25}, "dataset": {"x_range": [-5.0, 5.0]}})


def test_omniglot_rows_in_algorithm_order_per_setting_with_ece_and_nll(tmp_path):
    _omniglot(tmp_path, "maml", 5, 0.9212, ece=0.031)
    _omniglot(tmp_path, "dkt", 5, 0.9050, ece=0.012)
    _omniglot(tmp_path, "protonet", 20, 0.8011, ece=0.02)
    _omniglot(tmp_path, "relationnet", 5, 0.95)  # no calibration reported: dashes, not zeros
    _sinusoid(tmp_path / "sine", "maml", 0.5, [-5.0, 5.0])  # not an Omniglot row
    rows = bayes_table.omniglot_rows(bayes_table.find_results([tmp_path]))
    assert [(r["ways"], r["algo"]) for r in rows] == [(5, "dkt"), (5, "maml"), (5, "relationnet"), (20, "protonet")]
    lines = bayes_table.omniglot_markdown(rows).splitlines()
    assert lines[2] == ("| 5-way 1-shot | dkt | 90.50 ± 0.42 | 1.20 ± 0.40 | 0.412 ± 0.012 | 1000 | 8 | 20.0 min | "
                        "1000 (seed 1234, vinyals) | dkt_5w |")
    assert "| relationnet | 95.00 ± 0.42 | — | 0.412 ± 0.012 |" in lines[4]


def test_sinusoid_pairs_a_re_evaluation_out_of_range_with_its_trained_run(tmp_path, monkeypatch):
    ft = _sinusoid(tmp_path / "ft", "feature_transfer", 2.7, [-5.0, 5.0], inner_steps=100,
                   by_steps={"1": {"mean": 2.9, "ci95": 0.1}, "100": {"mean": 2.7, "ci95": 0.01}})
    monkeypatch.chdir(tmp_path)  # mode=eval records ckpt= as typed: relative to where it ran
    _sinusoid(tmp_path / "ft_oor", "feature_transfer", 6.5, [-5.0, 10.0], inner_steps=100, evaluated_run="ft",
              by_steps={"1": {"mean": 7.0, "ci95": 0.2}, "100": {"mean": 6.5, "ci95": 0.3}})
    dkt = _sinusoid(tmp_path / "dkt", "dkt", 0.08, [-5.0, 5.0], algo_config={"kernel": "spectral"})
    _sinusoid(tmp_path / "dkt_oor", "dkt", 0.5, [5.0, 10.0], algo_config={"kernel": "spectral"}, evaluated_run=dkt)
    rows = bayes_table.sinusoid_rows(bayes_table.find_results([tmp_path]))
    table = bayes_table.sinusoid_markdown(rows).splitlines()[2:]
    assert table == [
        "| dkt (spectral) |  | 0.08 ± 0.01 | 0.50 ± 0.01 | [5, 10] | 0.02 | 50000 | 10.0 min | 1000 | dkt |",
        "| feature_transfer | 1 | 2.90 ± 0.10 | 7.00 ± 0.20 | [-5, 10] | 2.94 | 50000 | 10.0 min | 1000 | ft |",
        "| feature_transfer | 100 | 2.70 ± 0.01 | 6.50 ± 0.30 | [-5, 10] | 2.67 | 50000 | 10.0 min | 1000 | ft |",
    ]


def test_both_tables_go_between_their_markers_and_the_prose_stays(tmp_path):
    _omniglot(tmp_path / "runs", "maml", 5, 0.92, ece=0.03)
    doc = tmp_path / "bayesian.md"
    o, s = bayes_table.OMNIGLOT, bayes_table.SINUSOID
    doc.write_text(f"# Bayes\nintro\n{o[0]}\nold\n{o[1]}\nmiddle\n{s[0]}\nold\n{s[1]}\nend\n")
    bayes_table.main(["--collect", str(tmp_path / "runs"), "--table", str(doc)])
    text = doc.read_text()
    assert text.startswith(f"# Bayes\nintro\n{o[0]}\n| setting |") and "\nmiddle\n" in text and text.endswith(f"{s[1]}\nend\n")
    assert "| 5-way 1-shot | maml | 92.00 ± 0.42 | 3.00 ± 0.40 |" in text and "old" not in text
    # A file without the markers gets them appended (then filled).
    bare = tmp_path / "bare.md"
    bare.write_text("prose\n")
    bayes_table.main(["--collect", str(tmp_path / "runs"), "--table", str(bare)])
    assert bare.read_text().startswith(f"prose\n\n{o[0]}\n| setting |") and s[1] in bare.read_text()


def test_keep_absent_keeps_old_rows_in_order_and_a_collected_run_replaces_its_row(tmp_path):
    """--keep-absent: rows whose run dirs are gone stay, a re-collected run's row is replaced, order kept."""
    _omniglot(tmp_path / "first", "maml", 5, 0.92, ece=0.03)
    _omniglot(tmp_path / "first", "protonet", 20, 0.95, ece=0.01)
    doc = tmp_path / "bayesian.md"
    bayes_table.main(["--collect", str(tmp_path / "first"), "--table", str(doc)])
    # Later, on a machine holding only a new bmaml run and a re-run of maml:
    _omniglot(tmp_path / "second", "bmaml", 5, 0.91, ece=0.05)
    _omniglot(tmp_path / "second", "maml", 5, 0.93, ece=0.03)
    bayes_table.main(["--collect", str(tmp_path / "second"), "--table", str(doc), "--keep-absent"])
    block = doc.read_text().split(bayes_table.OMNIGLOT[0])[1].split(bayes_table.OMNIGLOT[1])[0]
    rows = [line for line in block.strip().splitlines()[2:]]
    assert [r.split("|")[2].strip() for r in rows] == ["bmaml", "maml", "protonet"]
    assert "93.00 ± 0.42" in rows[1] and "92.00" not in block  # the re-collected maml replaced its row
    assert rows[2].startswith("| 20-way 1-shot | protonet | 95.00")
    # Without the flag the table is exactly the collected runs.
    bayes_table.main(["--collect", str(tmp_path / "second"), "--table", str(doc)])
    assert "protonet" not in doc.read_text()
