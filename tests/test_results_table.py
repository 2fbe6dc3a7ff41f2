"""scripts/results_table.py: a row per finished run beside the paper, written between markers."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import yaml

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "results_table.py"
spec = importlib.util.spec_from_file_location("results_table", SCRIPT)
results_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(results_table)


def fake_run(run_dir: Path, mean=0.975, val=(0.95, 0.97, 0.972, 0.973), algo="protonet", algo_cfg=None,
             transductive=True) -> Path:
    """A finished run as train.run leaves it: `transductive` is its eval.transductive (results.json records it)."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps({
        "metric": "accuracy", "algo": algo, "ways": 5, "shots": 1, "mean": mean, "ci95": 0.0021,
        "episodes": 1000, "class_split": "vinyals", "seed": 0, "steps": 4000, "train_wall_s": 600.0,
        "backend": "cpu", "device": "cpu", "transductive": transductive}))
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"train": {"meta_batch": 1},
                                                                   "algo": {"name": algo, **(algo_cfg or {})},
                                                                   "eval": {"transductive": transductive}}))
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(
        ["experiment=protonet_omniglot_5w1s", "train.steps=4000", "dataset.local_dir=/data", "train.progress=false"]))
    rows = [{"step": 1000 * (i + 1), "val/accuracy": v} for i, v in enumerate(val)]
    rows.insert(1, {"step": 1500, "train/loss": 0.3})   # train-only rows are skipped
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def test_row_stands_beside_the_paper_with_the_last_validations(tmp_path):
    r = results_table.row(fake_run(tmp_path / "run"))
    assert (r["run"], r["setting"], r["paper"]) == ("protonet_omniglot_5w1s", "5-way 1-shot", 98.8)
    assert r["overrides"] == "train.steps=4000"
    assert r["val"] == "97.0 (2k) → 97.2 (3k) → 97.3 (4k)"
    line = results_table.markdown([r]).splitlines()[2]
    assert "| 97.50 ± 0.21 | 98.8 | -1.30 | 1000 | vinyals | 0 | 4000 | 1 | 10.0 min |" in line


def test_write_table_replaces_only_the_marked_part(tmp_path):
    doc = tmp_path / "results.md"
    doc.write_text(f"# Title\nprose before\n{results_table.BEGIN}\nold table\n{results_table.END}\nprose after\n")
    results_table.write_table(doc, "| new |\n")
    assert doc.read_text() == (f"# Title\nprose before\n{results_table.BEGIN}\n| new |\n"
                               f"{results_table.END}\nprose after\n")
    bare = tmp_path / "bare.md"
    results_table.write_table(bare, "| only |\n")
    assert bare.read_text() == "| only |\n"


def test_curves_plot_is_written(tmp_path):
    fake_run(tmp_path / "run")
    results_table.main(["--collect", str(tmp_path), "--curves", str(tmp_path / "curves.png")])
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_a_re_tested_run_takes_its_training_facts_from_the_evaluated_run(tmp_path):
    trained = fake_run(tmp_path / "run")
    eval_dir = tmp_path / "eval_20w"
    (eval_dir / ".hydra").mkdir(parents=True)
    (eval_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"train": {"meta_batch": 32}}))
    (eval_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(
        ["mode=eval", f"ckpt={trained}", "eval.ways=20"]))
    results = json.loads((trained / "results.json").read_text())
    results.update(ways=20, mean=0.93, evaluated_run=str(trained), checkpoint="best")
    del results["steps"], results["train_wall_s"]
    (eval_dir / "results.json").write_text(json.dumps(results))
    r = results_table.row(eval_dir)
    assert (r["run"], r["setting"], r["paper"]) == ("protonet_omniglot_5w1s (re-tested)", "20-way 1-shot", 96.0)
    assert (r["steps"], r["meta_batch"], r["wall"]) == (4000, 1, 600.0)
    assert r["overrides"] == "train.steps=4000 eval.ways=20"
    assert r["val"].endswith("97.3 (4k)")


def test_reptile_scored_transductively_stands_beside_the_transductive_figure(tmp_path):
    # eval.transductive (default true) replaced algo.transductive; the paper has a figure for each setting.
    transductive = fake_run(tmp_path / "t", algo="reptile", algo_cfg={"inner_state": "carry"}, transductive=True)
    inductive = fake_run(tmp_path / "n", algo="reptile", algo_cfg={"inner_state": "carry"}, transductive=False)
    assert (results_table.row(transductive)["paper"], results_table.row(inductive)["paper"]) == (97.68, 95.39)


def test_keep_absent_keeps_rows_of_runs_not_on_this_machine_and_replaces_a_re_collected_one(tmp_path):
    doc = tmp_path / "results.md"
    old_row = ("| matchingnet_omniglot_5w1s | 5-way 1-shot | 97.25 ± 0.21 | 98.1 | -0.85 | 1000 | vinyals | 0 | 10000 "
               "| 1 | 8.1 min | 97.6 (10k) | cpu:cpu | `algo.distance=l2` |")
    stale = ("| protonet_omniglot_5w1s | 5-way 1-shot | 90.00 ± 0.50 | 98.8 | -8.80 | 1000 | vinyals | 0 | 4000 | 1 "
             "| 10.0 min | 90.0 (4k) | cpu:cpu | `train.steps=4000` |")
    header = results_table.markdown([]).rstrip("\n")
    doc.write_text(f"intro\n{results_table.BEGIN}\n{header}\n{stale}\n{old_row}\n{results_table.END}\nend\n")
    fake_run(tmp_path / "runs" / "run")  # protonet_omniglot_5w1s with train.steps=4000: replaces `stale`
    results_table.main(["--collect", str(tmp_path / "runs"), "--table", str(doc), "--keep-absent"])
    block = doc.read_text().split(results_table.BEGIN)[1].split(results_table.END)[0].strip().splitlines()
    assert block[2] == old_row and "97.50 ± 0.21" in block[3] and "90.00" not in "\n".join(block)
    assert len(block) == 4 and doc.read_text().endswith(f"{results_table.END}\nend\n")
