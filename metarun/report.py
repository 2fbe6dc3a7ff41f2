"""`metarun-report PATH`: one table (Markdown + CSV) and learning curves for a run or a multirun sweep."""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from metarun.time_to_accuracy import plot_against_wall, time_to_table

FAILURE_FILE = "failure.json"
RESULTS_FILE = "results.json"
METRICS_FILE = "metrics.jsonl"
SEED = re.compile(r"^\+{0,2}seed=(-?\d+)$")
CSV_COLUMNS = ["config", "metric", "mean", "ci95", "ci_over", "n_seeds", "seeds", "best_val", "steps",
               "train_wall_s", "failed", "unfinished"]


# ---- the failure record a sweep job leaves behind (written by the CLI) -----------------------
def write_failure(run_dir: Path, exc: BaseException, overrides: Sequence[str] = ()) -> Path:
    """Record why a job failed in `run_dir/failure.json`, atomically; returns the path."""
    from metarun.errors import UserError
    from metarun.metrics import atomic_write_json

    user_error = isinstance(exc, UserError)
    record = {
        "error": type(exc).__name__,
        "message": str(exc),
        "user_error": user_error,
        "overrides": list(overrides),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "traceback": None if user_error else "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    }
    path = Path(run_dir) / FAILURE_FILE
    atomic_write_json(path, record)
    return path


# ---- reading run directories ----------------------------------------------------------------
@dataclass
class Job:
    path: Path
    overrides: List[str]
    seed: Optional[int]
    status: str                      # finished | failed | unfinished
    results: Optional[dict] = None
    failure: Optional[dict] = None
    rows: List[dict] = field(default_factory=list)

    config: str = ""                 # its overrides that vary between jobs, seed excluded (see label_configs)

    @property
    def non_seed_overrides(self) -> List[str]:
        return [o for o in self.overrides if not SEED.match(o)]


def label_configs(jobs: Sequence[Job]) -> List[str]:
    """Name each job's config by the overrides not shared by every job (seed excluded), so jobs
    that differ only in seed form one config; returns the shared overrides."""
    common = set.intersection(*(set(j.non_seed_overrides) for j in jobs)) if jobs else set()
    for job in jobs:
        job.config = " ".join(o for o in job.non_seed_overrides if o not in common) or "(common only)"
    return [o for o in (jobs[0].non_seed_overrides if jobs else []) if o in common]


def _natural_key(path: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_run_dirs(root: Path) -> List[Path]:
    """Every directory under `root` (itself included) holding a Hydra `.hydra/` folder."""
    root = Path(root)
    found = []
    if (root / ".hydra").is_dir():
        found.append(root)
    for hydra_dir in root.rglob(".hydra"):
        if hydra_dir.is_dir() and hydra_dir.parent != root and "checkpoints" not in hydra_dir.parts:
            found.append(hydra_dir.parent)
    return sorted(set(found), key=_natural_key)


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_rows(path: Path) -> List[dict]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass  # a half-written last line of a job still running
    return rows


def load_job(path: Path) -> Job:
    from omegaconf import OmegaConf

    overrides_file = path / ".hydra" / "overrides.yaml"
    overrides = [str(o) for o in OmegaConf.load(overrides_file)] if overrides_file.exists() else []
    seed = None
    for o in overrides:
        m = SEED.match(o)
        if m:
            seed = int(m.group(1))
    results = _read_json(path / RESULTS_FILE)
    failure = _read_json(path / FAILURE_FILE) if (path / FAILURE_FILE).exists() else None
    if failure is None and (path / FAILURE_FILE).exists():
        failure = {"error": "?", "message": f"unreadable {FAILURE_FILE}"}
    if seed is None:
        seed = (results or {}).get("seed")
        if seed is None and (path / ".hydra" / "config.yaml").exists():
            seed = OmegaConf.load(path / ".hydra" / "config.yaml").get("seed")
    status = "failed" if failure is not None else "finished" if results is not None else "unfinished"
    return Job(path, overrides, seed, status, results, failure, _read_rows(path / METRICS_FILE))


# ---- summarising ----------------------------------------------------------------------------
def _t95(dof: int) -> float:
    """Two-sided 95% Student-t critical value (1.96 as dof grows)."""
    try:
        from scipy.stats import t
        return float(t.ppf(0.975, dof))
    except ImportError:  # pragma: no cover - scipy comes with jax
        table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
        return table.get(dof, 2.0 if dof < 30 else 1.96)


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else None


def summarise(jobs: Sequence[Job]) -> List[dict]:
    """One row per config, in order of first appearance."""
    groups: Dict[str, List[Job]] = {}
    for job in jobs:
        groups.setdefault(job.config, []).append(job)
    table = []
    for config, members in groups.items():
        done = [j for j in members if j.status == "finished"]
        means = [j.results.get("mean") for j in done]
        finite = [m for m in means if m is not None and math.isfinite(m)]
        metric = done[0].results.get("metric") if done else None
        mean = ci = None
        ci_over = ""
        if len(finite) >= 2:
            mean = float(np.mean(finite))
            ci = _t95(len(finite) - 1) * float(np.std(finite, ddof=1)) / math.sqrt(len(finite))
            ci_over = "seeds"
        elif len(finite) == 1:
            only = next(j for j in done if j.results.get("mean") is not None)
            mean, ci, ci_over = float(finite[0]), only.results.get("ci95"), "episodes"
        table.append({
            "config": config, "metric": metric, "mean": mean, "ci95": ci, "ci_over": ci_over,
            "n_seeds": len(finite),
            "seeds": " ".join(str(j.seed) for j in done),
            "best_val": _mean(j.results.get("best_val_score") for j in done),
            "steps": max((j.results.get("steps") or 0 for j in done), default=None) if done else None,
            "train_wall_s": _mean(j.results.get("train_wall_s") for j in done),
            "failed": sum(j.status == "failed" for j in members),
            "unfinished": sum(j.status == "unfinished" for j in members),
        })
    return table


def _fmt(value, metric: Optional[str] = None, digits: int = 4) -> str:
    if value is None:
        return "-"
    if metric == "accuracy":
        return f"{100 * value:.2f}%"
    return f"{value:.{digits}g}"


def markdown_table(table: Sequence[dict]) -> str:
    head = ["config", "test metric (mean ± 95% CI)", "CI over", "n seeds", "best val", "steps", "train wall s",
            "failed", "unfinished"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        if r["mean"] is None:
            result = "-"
        else:
            ci = _fmt(r["ci95"], r["metric"]) if r["ci95"] is not None else "?"
            result = f"{r['metric']} {_fmt(r['mean'], r['metric'])} ± {ci}"
        cells = [f"`{r['config']}`", result, r["ci_over"] or "-", str(r["n_seeds"]),
                 _fmt(r["best_val"], r["metric"]),
                 "-" if r["steps"] is None else str(r["steps"]),
                 "-" if r["train_wall_s"] is None else f"{r['train_wall_s']:.1f}",
                 str(r["failed"]), str(r["unfinished"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_text(table: Sequence[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in table:
        writer.writerow({k: "" if r[k] is None else r[k] for k in CSV_COLUMNS})
    return buf.getvalue()


def problems_text(jobs: Sequence[Job], root: Path) -> str:
    lines = []
    for job in jobs:
        rel = job.path.relative_to(root) if job.path != root else Path(".")
        if job.status == "failed":
            f = job.failure
            lines.append(f"- failed: `{rel}` ({job.config}, seed {job.seed}): {f.get('error')}: {f.get('message')}")
        elif job.status == "unfinished":
            last = job.rows[-1]["step"] if job.rows else 0
            lines.append(f"- unfinished: `{rel}` ({job.config}, seed {job.seed}): no {RESULTS_FILE}; "
                         f"last logged step {last}")
    return "\n".join(lines)


def optuna_text(root: Path) -> str:
    path = root / "optimization_results.yaml"
    if not path.exists():
        return ""
    from omegaconf import OmegaConf
    best = OmegaConf.to_container(OmegaConf.load(path))
    params = " ".join(f"{k}={v}" for k, v in (best.get("best_params") or {}).items())
    return f"Optuna best: value {best.get('best_value')} with `{params}`"


# ---- learning curves ------------------------------------------------------------------------
def _curve(jobs: Sequence[Job], key: str):
    """Mean over the jobs (seeds) of `key` at each logged step that any of them has."""
    by_step: Dict[int, List[float]] = {}
    for job in jobs:
        for row in job.rows:
            v = row.get(key)
            if v is not None and math.isfinite(v):
                by_step.setdefault(int(row["step"]), []).append(v)
    steps = sorted(by_step)
    return steps, [float(np.mean(by_step[s])) for s in steps]


def plot_curves(jobs: Sequence[Job], path: Path) -> Optional[Path]:
    """train/loss and the validation metric against step, one line per config (mean over seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: Dict[str, List[Job]] = {}
    for job in jobs:
        if job.rows:
            groups.setdefault(job.config, []).append(job)
    if not groups:
        return None
    val_keys = sorted({k for j in jobs for r in j.rows for k in r
                       if k.startswith("val/") and not k.endswith("_ci95")})
    val_key = val_keys[0] if val_keys else None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for config, members in groups.items():
        label = f"{config} (n={len(members)})"
        steps, values = _curve(members, "train/loss")
        axes[0].plot(steps, values, label=label)
        if val_key:
            steps, values = _curve(members, val_key)
            axes[1].plot(steps, values, marker="o", markersize=3, label=label)
    axes[0].set(title="train loss (mean over seeds)", xlabel="meta-step", ylabel="train/loss")
    axes[1].set(title=f"{val_key or 'validation'} (mean over seeds)", xlabel="meta-step", ylabel=val_key or "")
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(2, len(labels)), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * math.ceil(len(labels) / 2), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _job_name(job: Job, jobs: Sequence[Job]) -> str:
    """A job's label in the time-to table: its config label (its run dir's name when it has none)."""
    return (job.config or job.path.name) + (f" seed={job.seed}" if len(jobs) > 1 and job.seed is not None else "")


def _runs_by_name(jobs: Sequence[Job]) -> Dict[str, List[dict]]:
    return {_job_name(job, jobs): job.rows for job in jobs}


def time_to_section(jobs: Sequence[Job], thresholds: Sequence[float]) -> str:
    """The Markdown section of `--time-to`: wall time to each validation threshold, per job."""
    higher = {_job_name(job, jobs): (job.results or {}).get("higher_is_better", True) for job in jobs}
    return "\n".join(["## Time to validation threshold", "",
                      "Wall time since the run started (validation and checkpoints included, summed over "
                      "resumed segments) at the first validation that reached each threshold.", "",
                      time_to_table(_runs_by_name(jobs), thresholds, higher_is_better=higher)])


# ---- the command ----------------------------------------------------------------------------
def report(root: Path, out: Optional[Path] = None, plot: bool = True, time_to: Sequence[float] = ()) -> dict:
    """Summarise every run dir under `root`; writes report.md, report.csv and curves.png into `out`;
    with `time_to` thresholds also the wall time each run took to reach them and time_to_accuracy.png."""
    from metarun.errors import UserError
    from metarun.metrics import atomic_write_text

    root = Path(root).resolve()
    if not root.is_dir():
        raise UserError(f"{root} is not a directory: give a run dir or a multirun sweep dir")
    dirs = find_run_dirs(root)
    if not dirs:
        raise UserError(f"no run directories (folders with .hydra/) under {root}")
    jobs = [load_job(d) for d in dirs]
    common = label_configs(jobs)
    table = summarise(jobs)
    out = Path(out).resolve() if out is not None else root
    out.mkdir(parents=True, exist_ok=True)
    png = plot_curves(jobs, out / "curves.png") if plot else None
    counts = {s: sum(j.status == s for j in jobs) for s in ("finished", "failed", "unfinished")}
    parts = [f"# metarun report: {root}", "",
             f"{len(jobs)} jobs: {counts['finished']} finished, {counts['failed']} failed, "
             f"{counts['unfinished']} unfinished. Test metric: mean over seeds ± 95% CI "
             f"(Student t over seeds; with one seed, the episode CI from {RESULTS_FILE}).", "",
             f"Overrides common to every job: `{' '.join(common) or '(none)'}`", "",
             markdown_table(table)]
    problems = problems_text(jobs, root)
    if problems:
        parts += ["", "## Failed or unfinished jobs", "", problems]
    best = optuna_text(root)
    if best:
        parts += ["", best]
    if png is not None:
        parts += ["", f"![learning curves]({png.name})"]
    wall_png = None
    if time_to:
        parts += ["", time_to_section(jobs, time_to)]
        if plot:
            wall_png = plot_against_wall(_runs_by_name(jobs), out / "time_to_accuracy.png", time_to)
            if wall_png is not None:
                parts += ["", f"![validation against wall time]({wall_png.name})"]
    markdown = "\n".join(parts) + "\n"
    atomic_write_text(out / "report.md", markdown)
    atomic_write_text(out / "report.csv", csv_text(table))
    return {"markdown": markdown, "table": table, "jobs": jobs, "png": png, "wall_png": wall_png,
            "md_path": out / "report.md", "csv_path": out / "report.csv"}


def _thresholds(text: str) -> List[float]:
    from metarun.errors import UserError
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--time-to={text!r}: expected comma-separated numbers, e.g. --time-to 0.95,0.97,0.98") from None


def main(argv: Optional[Sequence[str]] = None) -> None:
    from metarun.errors import UserError

    parser = argparse.ArgumentParser(prog="metarun-report", description=__doc__.split(":", 1)[-1].strip())
    parser.add_argument("path", type=Path, help="a run dir or a multirun dir (searched for .hydra/ folders)")
    parser.add_argument("--out", type=Path, default=None, help="where report.md/.csv/curves.png go (default: PATH)")
    parser.add_argument("--no-plot", action="store_true", help="skip the learning-curve PNG")
    parser.add_argument("--time-to", default="", metavar="T1,T2,...",
                        help="validation thresholds (e.g. 0.95,0.97,0.98): wall time to reach each, and "
                             "time_to_accuracy.png (the validation metric against wall time)")
    args = parser.parse_args(argv)
    try:
        thresholds = _thresholds(args.time_to)
        result = report(args.path, args.out, plot=not args.no_plot, time_to=thresholds)
    except UserError as e:
        print(f"metarun-report: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(result["markdown"], end="")
    written = [result["md_path"], result["csv_path"]] + [result[k] for k in ("png", "wall_png") if result[k]]
    print("wrote " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    main()
