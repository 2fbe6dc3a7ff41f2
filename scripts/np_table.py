"""Write docs/neural_processes.md's generated table from finished run dirs (issue 11).

  python scripts/np_table.py --collect outputs/np                               # print the table
  python scripts/np_table.py --collect outputs/np --table docs/neural_processes.md

One row per run on `dataset=gp` (each kernel) or `dataset=sawtooth`: the test log-likelihood, KL to the exact GP
posterior (GP data) and MSE per target point, each mean ± 95% CI over the run's test tasks, beside the published
figure (Bruinsma 2022, interpolation), with the training steps, the train wall time, the training throughput
(tasks/s = steps × meta-batch / train wall, validation included) and the command. The reference rows (exact GP,
diagonal GP, trivial) come from the runs' own results.json: every run records them on the tasks it was scored
on, so they are the same numbers for every row of one kernel when the test tasks are the same (eval.seed,
eval.episodes) — the table prints each kernel's once and says from how many runs they agree.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bayes_table import _config, _load, _markdown, _stat, find_results, write_block  # noqa: E402
from results_table import _hydra  # noqa: E402

MARKERS = ("<!-- np-table:begin -->", "<!-- np-table:end -->")
DATA_ORDER = ("eq", "matern52", "weakly_periodic", "sawtooth")
ALGO_ORDER = ("cnp", "acnp", "np", "anp", "convcnp", "maml", "metasgd")
# Bruinsma (2022), 1-D synthetic, interpolation: KL per target point on GP data, log-likelihood per target on
# sawtooth (as quoted in issue 11). ANP's is its ML-objective figure; ours train the ELBO unless the row says.
PUBLISHED_KL = {"cnp": (0.54, 0.54, 0.67), "acnp": (0.45, 0.42, 0.65), "np": (0.34, 0.36, 0.61), "anp": (0.31, 0.30, 0.53),
                "convcnp": (0.41, 0.40, 0.40)}
PUBLISHED_SAWTOOTH_LL = {"cnp": -0.18, "anp": 0.20, "convcnp": 3.17}
PUBLISHED_REFERENCE_KL = {"diagonal GP": (0.40, 0.40, 0.38), "trivial": (1.19, 1.08, 0.82)}
REFERENCES = (("exact GP", "exact_gp_log_likelihood", None), ("diagonal GP", "diagonal_gp_log_likelihood",
              "diagonal_gp_kl"), ("trivial", "trivial_log_likelihood", "trivial_kl"))


def data_name(results: dict, cfg: dict) -> str:
    """eq / matern52 / weakly_periodic for GP runs, sawtooth for sawtooth runs."""
    if results.get("dataset") == "sawtooth":
        return "sawtooth"
    return str((cfg.get("dataset") or {}).get("kernel", "eq"))


def published(algo: str, data: str) -> str:
    if data == "sawtooth":
        value = PUBLISHED_SAWTOOTH_LL.get(algo)
        return "" if value is None else f"log-lik. {value:g}"
    value = PUBLISHED_KL.get(algo)
    return "" if value is None else f"KL {value[DATA_ORDER.index(data)]:g}"


def label(data: str, regime: str) -> str:
    """The table's data cell: the dataset (kernel), with the test regime when it is not interpolation."""
    return data + ("" if regime in ("interpolation", "") else f" ({regime})")


def command(run_dir: Path) -> str:
    if not (run_dir / ".hydra" / "overrides.yaml").exists():
        return ""
    shown = [o for o in _hydra(run_dir)[1] if not o.startswith(("hydra.", "train.progress"))]
    return "`python -m metarun " + " ".join(shown) + "`"


def np_rows(dirs) -> List[dict]:
    rows = []
    for run_dir in dirs:
        r = _load(run_dir)
        if r.get("dataset") not in ("gp", "sawtooth") or r.get("split") != "test":
            continue
        cfg = _config(run_dir)
        metrics = r.get("metrics", {})
        train = cfg.get("train") or {}
        wall = r.get("train_wall_s")
        tasks_per_s = r["steps"] * train.get("meta_batch", 0) / wall if wall and r.get("steps") else None
        objective = (r.get("algo_config") or {}).get("objective")
        mse = metrics.get("mse") or ({"mean": r["mean"], "ci95": r["ci95"]} if r.get("metric") == "mse" else None)
        rows.append({
            "algo": r["algo"] + (f" ({objective.upper()})" if objective else ""), "algo_key": r["algo"],
            "data": data_name(r, cfg), "test_regime": r.get("test_regime", ""),
            "log_likelihood": _stat(metrics.get("log_likelihood") if "log_likelihood" in metrics else (
                {"mean": r["mean"], "ci95": r["ci95"]} if r.get("metric") == "log_likelihood" else None), 1.0, 3),
            "kl": _stat(metrics.get("kl"), 1.0, 3), "mse": _stat(mse, 1.0, 3),
            "context_log_likelihood": _stat(metrics.get("context_log_likelihood"), 1.0, 3),
            "metrics": metrics,
            "steps": r.get("steps"), "meta_batch": train.get("meta_batch"),
            "wall": f"{wall / 60:.1f} min" if wall else "", "tasks_per_s": f"{tasks_per_s:.0f}" if tasks_per_s else "",
            "episodes": f"{r.get('episodes')} (seed {r.get('eval_seed')})", "run": run_dir.name, "run_dir": run_dir,
            "command": command(run_dir),
        })
    algo_order = {a: i for i, a in enumerate(ALGO_ORDER)}
    return sorted(rows, key=lambda x: (DATA_ORDER.index(x["data"]) if x["data"] in DATA_ORDER else 99,
                                       x["test_regime"], algo_order.get(x["algo_key"], 99), x["steps"] or 0, x["run"]))


def reference_cells(rows: List[dict], data: str, regime: str) -> List[list]:
    """The exact / diagonal / trivial rows of one kernel, from the first run that recorded them; the count of
    runs whose figures agree with it to 1e-6 says they were scored on the same tasks."""
    recorded = [x["metrics"] for x in rows if x["data"] == data and x["test_regime"] == regime
                and "exact_gp_log_likelihood" in x["metrics"]]
    if not recorded:
        return []
    first = recorded[0]
    same = sum(abs(m["exact_gp_log_likelihood"]["mean"] - first["exact_gp_log_likelihood"]["mean"]) < 1e-6
               for m in recorded)
    cells = []
    for name, ll_key, kl_key in REFERENCES:
        kl = "0 (by definition)" if kl_key is None else _stat(first.get(kl_key), 1.0, 3)
        pub = PUBLISHED_REFERENCE_KL.get(name)
        cells.append([label(data, regime), f"*{name}* (reference)",
                      _stat(first.get(ll_key), 1.0, 3), "", kl, "—",
                      f"KL {pub[DATA_ORDER.index(data)]:g}" if pub else ("KL 0" if kl_key is None else ""),
                      "", "", "", "", f"same tasks in {same}/{len(recorded)} runs", ""])
    return cells


def np_markdown(rows: List[dict]) -> str:
    cells, seen = [], set()
    for x in rows:
        key = (x["data"], x["test_regime"])
        if key not in seen and x["data"] != "sawtooth":
            seen.add(key)
            cells += reference_cells(rows, *key)
        cells.append([label(x["data"], x["test_regime"]), x["algo"], x["log_likelihood"], x["context_log_likelihood"],
                      x["kl"] if x["data"] != "sawtooth" else "—", x["mse"],
                      published(x["algo_key"], x["data"]), x["steps"] or "", x["meta_batch"] or "", x["wall"],
                      x["tasks_per_s"], x["episodes"], x["command"]])
    return _markdown(["data", "model", "log-lik. / target (↑)", "log-lik. / context point (↑)", "KL / target (↓)", "MSE", "published",
                      "train steps", "tasks / step", "train wall", "tasks/s", "test tasks", "command"], cells)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--collect", nargs="+", required=True, help="run dirs or folders of them (searched recursively)")
    p.add_argument("--table", default=None, help="write the table into this markdown file between its markers")
    a = p.parse_args(argv)
    table = np_markdown(np_rows(find_results(a.collect)))
    print(table)
    if a.table:
        write_block(Path(a.table), MARKERS, table)


if __name__ == "__main__":
    main()
