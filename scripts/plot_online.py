"""Overlay the online curves of runs on the same stream (e.g. FTML and the TOE baseline) in one PNG.

  python scripts/plot_online.py /tmp/ftml_run /tmp/toe_run -o /tmp/ftml_run/online_vs_toe.png

Each run is labelled with its method (results.json's online.method, e.g. maml or toe) unless --labels
is given. A run still going (no results.json yet) is read from its metrics.jsonl and run_config.yaml.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from omegaconf import OmegaConf

from metarun.metrics import MetricsLog
from metarun.online import summarize_stream
from metarun.plots.online_curves import online_curves


def read_run(run_dir: Path) -> dict:
    results = run_dir / "results.json"
    if results.exists():
        online = json.loads(results.read_text()).get("online")
        if online is None:
            raise SystemExit(f"{run_dir}: results.json has no online section (not a train.schedule=online run)")
        return online
    cfg = OmegaConf.load(run_dir / "run_config.yaml")
    o = cfg.train.online
    summary = summarize_stream(MetricsLog(run_dir / "metrics.jsonl").read(), list(o.shots), o.threshold)
    return {**summary, "method": "toe" if o.baseline == "toe" else cfg.algo.name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories of train.schedule=online runs")
    parser.add_argument("-o", "--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--labels", nargs="*", help="one label per run (default: each run's method)")
    args = parser.parse_args()
    if args.labels and len(args.labels) != len(args.runs):
        raise SystemExit(f"--labels: {len(args.labels)} labels for {len(args.runs)} runs")
    summaries = [read_run(r) for r in args.runs]
    labels = args.labels or [s["method"] for s in summaries]
    if len(set(labels)) != len(labels):
        labels = [f"{label} ({r.name})" for label, r in zip(labels, args.runs)]
    print(online_curves(dict(zip(labels, summaries)), args.out, title="online meta-learning on one stream"))


if __name__ == "__main__":
    main()
