"""Run a chosen set of experiment presets (or collect finished runs) and write docs/results.md.

  python scripts/results_table.py --run maml_omniglot_5w1s protonet_omniglot_5w1s \
      --override train.steps=2000 --override dataset.local_dir=../shared/data/omniglot
  python scripts/results_table.py --collect outputs/results      # tabulate finished run dirs

Each row is read from a run's results.json and .hydra/config.yaml: ours (mean ± 95% CI over
the evaluation episodes) beside the paper's figure, with split, seed, steps, wall time, machine,
and the last validation accuracies from metrics.jsonl (whether the run had stopped improving).
With --table FILE, a file holding the markers below gets only the part between them replaced
(the prose around the table is kept); any other file is overwritten with the table. --keep-absent keeps
the rows already there whose run dirs are not collected (run on another machine, or cleaned up).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

from metarun.metrics import MetricsLog

REPO = Path(__file__).resolve().parents[1]

# Omniglot accuracy (%) reported by each paper: (5w1s, 5w5s, 20w1s, 20w5s).
PAPER = {
    "maml": (98.7, 99.9, 95.8, 98.9), "fomaml": (98.3, 99.2, 89.4, 97.9),
    "reptile": (95.39, 98.90, 88.14, 96.65), "metasgd": (99.53, 99.93, 95.93, 98.97),
    "protonet": (98.8, 99.7, 96.0, 98.9), "matchingnet": (98.1, 98.9, 93.8, 98.5),
    "relationnet": (99.6, 99.8, 97.6, 99.1), "mamlpp": (99.47, 99.93, 97.65, 99.33),
}
# Reptile's paper reports both; the figures above are its non-transductive ones, and a run scored
# transductively (algo.transductive=true, BatchNorm over the query batch) stands beside these.
PAPER_TRANSDUCTIVE = {"reptile": (97.68, 99.48, 89.43, 97.12)}
SETTINGS = {(5, 1): 0, (5, 5): 1, (20, 1): 2, (20, 5): 3}
BEGIN, END = "<!-- results-table:begin -->", "<!-- results-table:end -->"
VAL_TRAIL = 3  # validation points shown per row


def run_presets(presets, overrides, out_root: Path) -> list[Path]:
    dirs = []
    for preset in presets:
        run_dir = out_root / preset
        cmd = [sys.executable, "-m", "metarun", f"experiment={preset}", f"hydra.run.dir={run_dir}",
               "train.progress=false", *overrides]
        print("+", " ".join(cmd[2:]), flush=True)
        proc = subprocess.run(cmd, cwd=REPO)
        if proc.returncode != 0:
            print(f"  {preset} failed (exit {proc.returncode}); its row is left out", file=sys.stderr)
            continue
        dirs.append(run_dir)
    return dirs


def find_runs(roots) -> list[Path]:
    """Run dirs under `roots` with a classification result (this table is the Omniglot one)."""
    return sorted({p.parent for root in roots for p in Path(root).rglob("results.json")
                   if (p.parent / ".hydra" / "config.yaml").exists()
                   and json.loads(p.read_text()).get("metric") == "accuracy"})


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, validation accuracy) pairs from the run's metrics.jsonl."""
    rows = MetricsLog(run_dir / "metrics.jsonl").read()
    return [(r["step"], r["val/accuracy"]) for r in rows if r.get("val/accuracy") is not None]


def val_trail(run_dir: Path, n: int = VAL_TRAIL) -> str:
    """The last n validation accuracies (%), oldest first, as 'acc (step)' items."""
    points = val_curve(run_dir)[-n:]
    return " → ".join(f"{acc * 100:.1f} ({step // 1000}k)" if step % 1000 == 0 else f"{acc * 100:.1f} ({step})"
                      for step, acc in points)


def _hydra(run_dir: Path):
    cfg = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    return cfg, (yaml.safe_load(overrides_file.read_text()) or []) if overrides_file.exists() else []


def row(run_dir: Path) -> dict:
    """A table row; a `mode=eval` dir (results.json names the evaluated_run) takes the training
    facts (preset, steps, meta-batch, wall, validations) from the run it evaluated."""
    results = json.loads((run_dir / "results.json").read_text())
    trained_dir = Path(results["evaluated_run"]) if results.get("evaluated_run") else run_dir
    trained = json.loads((trained_dir / "results.json").read_text()) if trained_dir != run_dir else results
    cfg, overrides = _hydra(trained_dir)
    eval_overrides = _hydra(run_dir)[1] if trained_dir != run_dir else []
    preset = next((o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")), None)
    algo = "mamlpp" if preset and preset.startswith("mamlpp") else results["algo"]
    ways, shots = results["ways"], results["shots"]
    # How the run was scored: results.json says so (eval.transductive); older runs kept it in algo.transductive.
    transductive = results.get("transductive", (cfg.get("algo") or {}).get("transductive"))
    papers = PAPER_TRANSDUCTIVE if transductive and algo in PAPER_TRANSDUCTIVE else PAPER
    paper = papers.get(algo, (None,) * 4)[SETTINGS[(ways, shots)]] if (ways, shots) in SETTINGS else None
    ours = results["mean"] * 100 if results["mean"] is not None else None
    return {
        "run": f"{preset or trained_dir.name}{' (re-tested)' if trained_dir != run_dir else ''}", "algo": algo, "setting": f"{ways}-way {shots}-shot",
        "ours": ours, "ci": results["ci95"] * 100 if results["ci95"] is not None else None,
        "paper": paper, "episodes": results["episodes"], "split": results.get("class_split"),
        "seed": results["seed"], "steps": trained.get("steps"), "meta_batch": cfg["train"]["meta_batch"],
        "wall": trained.get("train_wall_s"), "machine": f"{results.get('backend')}:{results.get('device')}",
        "val": val_trail(trained_dir),
        "overrides": " ".join(o for o in [*overrides, *eval_overrides]
                              if not o.startswith(("experiment=", "hydra.", "dataset.local_dir", "train.progress",
                                                   "ckpt=", "mode="))),
    }


def markdown(rows) -> str:
    lines = ["| run | setting | ours (%) | paper (%) | ours − paper | episodes | split | seed | steps | "
             "meta-batch | train wall | last validations (step) | machine | overrides |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ours = f"{r['ours']:.2f} ± {r['ci']:.2f}" if r["ours"] is not None else "diverged"
        diff = f"{r['ours'] - r['paper']:+.2f}" if r["ours"] is not None and r["paper"] is not None else ""
        wall = f"{r['wall'] / 60:.1f} min" if r["wall"] else ""
        lines.append(f"| {r['run']} | {r['setting']} | {ours} | {r['paper'] or ''} | {diff} | {r['episodes']} | "
                     f"{r['split']} | {r['seed']} | {r['steps']} | {r['meta_batch']} | {wall} | {r['val']} | {r['machine']} | "
                     f"`{r['overrides']}` |")
    return "\n".join(lines) + "\n"


def write_table(path: Path, table: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the table between `begin` and `end` in `path` (keeping the prose), else write it whole."""
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text.split(begin, 1)[1]:
        head, rest = text.split(begin, 1)
        text = f"{head}{begin}\n{table}{end}{rest.split(end, 1)[1]}"
    else:
        text = table
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def table_cells(line: str) -> list[str]:
    """The cells of one Markdown table row."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


def merge_absent(path: Path, table: str, key, sort_key, begin: str = BEGIN, end: str = END) -> str:
    """`table` plus the data rows already between `begin` and `end` in `path` whose key(cells) no row of
    `table` has (runs whose dirs are not on this machine), every data row ordered by sort_key(cells)."""
    text = path.read_text() if path.exists() else ""
    if begin not in text or end not in text.split(begin, 1)[1]:
        return table
    old = text.split(begin, 1)[1].split(end, 1)[0].strip().splitlines()[2:]
    header, rows = table.splitlines()[:2], table.splitlines()[2:]
    present = {key(table_cells(r)) for r in rows}
    rows += [r for r in old if r.startswith("|") and key(table_cells(r)) not in present]
    return "\n".join(header + sorted(rows, key=lambda r: sort_key(table_cells(r)))) + "\n"


def results_row_key(cells: list[str]):
    """A results-table row is one run (preset name) at one setting with one set of overrides."""
    return cells[0], cells[1], cells[-1]


def plot_curves(dirs, rows, path: Path) -> None:
    """Validation accuracy against meta-steps, one line per run (did it plateau?)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4), dpi=90)
    for run_dir, r in zip(dirs, rows):
        curve = [] if r["run"].endswith("(re-tested)") else val_curve(run_dir)
        if curve:
            steps, accs = zip(*curve)
            algo_overrides = " ".join(o for o in r["overrides"].split() if o.startswith("algo."))
            label = f"{r['algo']} {r['setting']} {algo_overrides} ({r['meta_batch']} task/step)".replace("  ", " ")
            ax.plot(steps, [100 * a for a in accs], "o-", ms=3, label=label)
    ax.set_xlabel("meta-step")
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", nargs="*", default=[], help="experiment presets to run (conf/experiment/)")
    p.add_argument("--override", action="append", default=[], help="a Hydra override for every run")
    p.add_argument("--out-root", default=str(REPO / "outputs" / "results"))
    p.add_argument("--collect", nargs="*", default=[], help="run or multirun dirs to tabulate")
    p.add_argument("--table", default=None, help="write the table here (default: print only)")
    p.add_argument("--curves", default=None, help="also plot validation accuracy per run to this PNG")
    p.add_argument("--keep-absent", action="store_true",
                   help="keep --table's rows whose run is not collected here (same run, setting and overrides: "
                        "replaced)")
    a = p.parse_args(argv)
    dirs = run_presets(a.run, a.override, Path(a.out_root)) if a.run else []
    dirs += find_runs(a.collect)
    rows = [row(d) for d in dirs]
    table = markdown(rows)
    if a.keep_absent and a.table:
        table = merge_absent(Path(a.table), table, results_row_key, results_row_key)
    print(table)
    if a.table:
        write_table(Path(a.table), table)
    if a.curves:
        plot_curves(dirs, rows, Path(a.curves))


if __name__ == "__main__":
    main()
