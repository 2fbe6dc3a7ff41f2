"""Training curves of the Neural Process runs beside their published figures (issue 11): one panel per dataset.

  python scripts/np_curves.py --collect outputs/np --out docs/img/np_curves.png

x: tasks seen (steps × meta-batch, log scale); y: log-likelihood per target point. Per run: the training
log-likelihood (conditional models; latent models log their objective, not a likelihood), the validation
log-likelihood (markers) and the final test figure (a star). Horizontal lines: the exact GP on the test tasks
(black, GP data) and each model's published figure in its colour (dashed), as a log-likelihood: exact GP − KL on
GP data (Bruinsma 2022 reports KL), the published log-likelihood on sawtooth. The gap between a curve and its
dashed line is how far the row is from the paper, and the curve's slope at the end says whether more training
would close it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from np_table import DATA_ORDER, PUBLISHED_KL, PUBLISHED_SAWTOOTH_LL, np_rows  # noqa: E402
from bayes_table import find_results  # noqa: E402

from metarun.metrics import MetricsLog  # noqa: E402

COLOURS = {"cnp": "tab:blue", "acnp": "tab:cyan", "np": "tab:green", "anp": "tab:red", "convcnp": "tab:purple"}


def curve(run_dir: Path, key: str, meta_batch: int):
    """(tasks seen, values) of `key` in metrics.jsonl (MetricsLog: a line cut short by a running job is dropped)."""
    rows = [row for row in MetricsLog(run_dir / "metrics.jsonl").read() if row.get(key) is not None]
    return [row["step"] * meta_batch for row in rows], [row[key] for row in rows]


def published_log_likelihood(algo: str, data: str, exact: float):
    if data == "sawtooth":
        return PUBLISHED_SAWTOOTH_LL.get(algo)
    kl = PUBLISHED_KL.get(algo)
    return None if kl is None or exact is None else exact - kl[DATA_ORDER.index(data)]


def plot(rows, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [d for d in DATA_ORDER if any(r["data"] == d for r in rows)]
    cols = min(2, len(datasets))
    rows_n = -(-len(datasets) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(6.5 * cols, 4.6 * rows_n), squeeze=False)
    for ax in axes.flat[len(datasets):]:
        ax.axis("off")
    for ax, data in zip(axes.flat, datasets):
        these = [r for r in rows if r["data"] == data and r["algo_key"] in COLOURS
                 and r["test_regime"] in ("interpolation", "")]
        exact = next((r["metrics"]["exact_gp_log_likelihood"]["mean"] for r in these
                      if "exact_gp_log_likelihood" in r["metrics"]), None)
        if exact is not None:
            ax.axhline(exact, color="black", lw=1, label="exact GP (test tasks)")
        drawn = set()
        for r in these:
            colour, batch, run_dir = COLOURS[r["algo_key"]], r["meta_batch"] or 1, r["run_dir"]
            label = f"{r['algo']} {r['steps']} steps"
            xs, ys = curve(run_dir, "train/log_likelihood", batch)
            if xs:
                ax.plot(xs, ys, color=colour, lw=0.8, alpha=0.6)
            xs, ys = curve(run_dir, "val/log_likelihood", batch)
            ax.plot(xs, ys, "o-", color=colour, ms=3, lw=1.2, label=label)
            test = r["metrics"].get("log_likelihood") or {}
            if test.get("mean") is not None and r["steps"]:
                ax.plot([r["steps"] * batch], [test["mean"]], "*", color=colour, ms=11, mec="black", mew=0.5)
            pub = published_log_likelihood(r["algo_key"], data, exact)
            if pub is not None and r["algo_key"] not in drawn:
                drawn.add(r["algo_key"])
                ax.axhline(pub, color=colour, ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_title(f"{data}: log-likelihood per target (dashed: published)")
        ax.set_xlabel("tasks seen (steps × meta-batch)")
        ax.set_ylabel("log-likelihood / target")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp" + out.suffix)
    fig.savefig(tmp, dpi=110)
    tmp.replace(out)  # atomic: a reader never sees half a PNG
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--collect", nargs="+", required=True, help="run dirs or folders of them (searched recursively)")
    p.add_argument("--out", required=True, help="the PNG to write")
    a = p.parse_args(argv)
    dirs = find_results(a.collect)
    rows = np_rows(dirs)
    if not rows:
        raise SystemExit(f"np_curves: no gp / sawtooth test runs under {' '.join(a.collect)}")
    plot(rows, Path(a.out))
    print(f"wrote {a.out} ({len(rows)} runs)")


if __name__ == "__main__":
    main()
