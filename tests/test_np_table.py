"""scripts/np_table.py on fake run dirs: the Neural Process table (log-likelihood / KL / MSE beside the published
figure), one set of reference rows per kernel with the same-tasks check, MAML's MSE-only row, sawtooth without
KL, throughput and the command, written between its markers."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import yaml

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "np_table.py"
spec = importlib.util.spec_from_file_location("np_table", SCRIPT)
np_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(np_table)


def _stat(mean, ci=0.01):
    return {"mean": mean, "ci95": ci}


def _run(root: Path, name: str, algo: str, dataset: str, kernel: str = "eq", exact_ll: float = -0.247,
         metric: str = "log_likelihood", mean: float = -1.0, extra: dict = None, context_ll: float = None) -> Path:
    run_dir = root / name
    (run_dir / ".hydra").mkdir(parents=True)
    metrics = {"mse": _stat(0.5)} if metric == "log_likelihood" else {}
    if metric == "log_likelihood":
        metrics["log_likelihood"] = _stat(mean)
    if context_ll is not None:
        metrics["context_log_likelihood"] = _stat(context_ll)
    if dataset == "gp":
        metrics.update(kl=_stat(0.9), exact_gp_log_likelihood=_stat(exact_ll), diagonal_gp_log_likelihood=_stat(-0.667),
                       diagonal_gp_kl=_stat(0.417), trivial_log_likelihood=_stat(-1.438), trivial_kl=_stat(1.191))
    results = {"algo": algo, "dataset": dataset, "split": "test", "metric": metric, "mean": mean, "ci95": 0.02,
               "metrics": metrics, "steps": 2000, "train_wall_s": 100.0, "episodes": 2048, "eval_seed": 1234,
               "test_regime": "interpolation", "algo_config": extra or {}}
    (run_dir / "results.json").write_text(json.dumps(results))
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"train": {"meta_batch": 16},
                                                                    "dataset": {"kernel": kernel}}))
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(
        [f"experiment={algo}_{dataset}", "train.steps=2000", "train.progress=false", "hydra.run.dir=x"]))
    return run_dir


def test_rows_references_and_markers(tmp_path):
    runs = tmp_path / "runs"
    _run(runs, "np_eq", "np", "gp", mean=-1.25, extra={"objective": "elbo"})
    _run(runs, "cnp_eq", "cnp", "gp", mean=-1.27)
    _run(runs, "acnp_eq", "acnp", "gp", mean=-0.9, context_ll=0.25)
    _run(runs, "cnp_eq_other_tasks", "cnp", "gp", exact_ll=-0.30)  # scored on other tasks: the check must say so
    _run(runs, "maml_saw", "maml", "sawtooth", metric="mse", mean=0.083)
    _run(runs, "cnp_saw", "cnp", "sawtooth", mean=-0.177)
    rows = np_table.np_rows(np_table.find_results([runs]))
    assert [(r["data"], r["algo"]) for r in rows] == [("eq", "cnp"), ("eq", "cnp"), ("eq", "acnp"), ("eq", "np (ELBO)"),
                                                       ("sawtooth", "cnp"), ("sawtooth", "maml")]
    assert rows[0]["tasks_per_s"] == "320"  # 2000 steps x 16 tasks / 100 s
    assert rows[0]["command"] == "`python -m metarun experiment=cnp_gp train.steps=2000`"
    lines = np_table.np_markdown(rows).splitlines()
    refs = [line for line in lines if "(reference)" in line]
    assert len(refs) == 3 and all(line.startswith("| eq |") for line in refs)  # once per kernel, none for sawtooth
    assert "| -0.667 ± 0.010 |  | 0.417 ± 0.010 |" in refs[1] and "| KL 0.4 |" in refs[1]
    assert "same tasks in 3/4 runs" in refs[0]
    acnp = next(line for line in lines if "| acnp |" in line)
    assert acnp.startswith("| eq | acnp | -0.900 ± 0.010 | 0.250 ± 0.010 | 0.900 ± 0.010 |") and "| KL 0.45 |" in acnp
    maml = next(line for line in lines if "| maml |" in line)
    assert maml.startswith("| sawtooth | maml | — | — | — | 0.083 ± 0.020 |")  # MSE only: no likelihood, no KL
    assert "| log-lik. -0.18 |" in next(line for line in lines if line.startswith("| sawtooth | cnp |"))
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n{np_table.MARKERS[0]}\nold\n{np_table.MARKERS[1]}\noutro\n")
    np_table.main(["--collect", str(runs), "--table", str(doc)])
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text and "| np (ELBO) |" in text


def test_curves_plot_reads_tasks_seen_and_converts_published_kl(tmp_path):
    spec_c = importlib.util.spec_from_file_location("np_curves", SCRIPT.with_name("np_curves.py"))
    np_curves = importlib.util.module_from_spec(spec_c)
    spec_c.loader.exec_module(np_curves)
    runs = tmp_path / "runs"
    run_dir = _run(runs, "cnp_eq", "cnp", "gp", mean=-1.0)
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"step": 100, "train/log_likelihood": -1.3}, {"step": 200, "train/log_likelihood": -1.2,
                                                      "val/log_likelihood": -1.25})) + "\n")
    assert np_curves.curve(run_dir, "train/log_likelihood", 16) == ([1600, 3200], [-1.3, -1.2])
    assert np_curves.curve(run_dir, "val/log_likelihood", 16) == ([3200], [-1.25])
    # Bruinsma reports KL: the published CNP EQ figure 0.54 is exact-GP log-likelihood - 0.54 on our tasks.
    assert abs(np_curves.published_log_likelihood("cnp", "eq", -0.247) - (-0.787)) < 1e-9
    assert np_curves.published_log_likelihood("convcnp", "sawtooth", None) == 3.17
    assert np_curves.published_log_likelihood("maml", "eq", -0.247) is None
    out = tmp_path / "curves.png"
    np_curves.main(["--collect", str(runs), "--out", str(out)])
    assert out.stat().st_size > 10_000
