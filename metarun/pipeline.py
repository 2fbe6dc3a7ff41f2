"""`metarun pipeline=NAME ...`: several metarun runs chained in one run directory — pre-train, meta-train from the
pre-trained body, fine-tune and evaluate — each stage a normal run in its own subdirectory, then a summary
table of every stage's test result (summary.md, pipeline.json).

A stage is `python -m metarun <its args> <the command's own overrides> <its extra> hydra.run.dir=RUN/<stage>`
in a child process: each stage keeps everything a run has (its .hydra snapshot, lock, checkpoints, resume,
one-line errors), and Hydra allows one app per process. A stage is skipped when its results.json exists and
resumed (resume=true) when it has checkpoints, so rerunning the same command continues an interrupted
pipeline where it stopped.

The `pipeline` section (conf/pipeline/*.yaml):
  name: a label
  stages: {NAME: {args: [overrides], extra: [overrides], init_from: STAGE, evaluate: STAGE}}
    args       the stage's own choices, ideally an experiment preset (experiment=...), so that debug=smoke and
               the command line still apply on top of it
    extra      more overrides for this stage only, applied last (`pipeline.stages.NAME.extra=["train.steps=500"]`)
    init_from  a training stage starting its learner from that stage's run (init.from=RUN/STAGE)
    evaluate   an evaluation stage: mode=eval ckpt=RUN/STAGE (with args such as algo=finetune_cosine)
"""
from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

from omegaconf import OmegaConf

from metarun.errors import UserError
from metarun.metrics import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

STAGE_KEYS = {"args", "extra", "init_from", "evaluate"}
RESULTS = "results.json"
# Rows whose results agree on these were scored on the same test episodes (the evaluator's fixed-seed protocol).
EPISODE_FACTS = ("dataset", "split", "class_split", "ways", "shots", "queries", "eval_seed", "episodes")
# Overrides of the pipeline command that are not forwarded to its stages (they choose the pipeline itself,
# or a stage's mode and source, which the pipeline sets).
NOT_FORWARDED = ("pipeline", "hydra")
REFUSED = ("mode", "ckpt", "resume", "experiment", "init.from")


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def stages_of(spec) -> Dict[str, dict]:
    """The stages in order, checked: known keys, sources that name an earlier stage."""
    stages = spec.stages
    stages = OmegaConf.to_container(stages, resolve=True) if OmegaConf.is_config(stages) else dict(stages)
    if not stages:
        raise UserError("pipeline.stages is empty: a pipeline needs at least one stage")
    seen: List[str] = []
    for name, stage in stages.items():
        stage = stage or {}
        unknown = sorted(set(stage) - STAGE_KEYS)
        if unknown:
            raise UserError(f"pipeline.stages.{name}.{unknown[0]} is unknown; a stage has: "
                            f"{', '.join(sorted(STAGE_KEYS))}")
        for key in ("init_from", "evaluate"):
            if stage.get(key) is not None and stage[key] not in seen:
                raise UserError(f"pipeline.stages.{name}.{key}={stage[key]} must name an earlier stage "
                                f"(earlier: {', '.join(seen) or 'none'})")
        if stage.get("init_from") and stage.get("evaluate"):
            raise UserError(f"pipeline.stages.{name}: init_from (a training stage) and evaluate (an evaluation "
                            f"stage) exclude each other")
        stages[name] = {"args": list(stage.get("args") or []), "extra": list(stage.get("extra") or []),
                        "init_from": stage.get("init_from"), "evaluate": stage.get("evaluate")}
        seen.append(name)
    return stages


def forwarded(overrides: Optional[List[str]]) -> List[str]:
    """The pipeline command's overrides that every stage receives (data paths, debug=smoke, seed, learner, ...)."""
    out = []
    for o in overrides or []:
        key = _key(o)
        if key.split(".")[0] in NOT_FORWARDED:
            continue
        if key in REFUSED:
            raise UserError(f"{o}: a pipeline sets {key} per stage (pipeline.stages.NAME.args); "
                            f"leave it off the pipeline command")
        out.append(o)
    return out


def stage_command(run_dir: Path, name: str, stage: dict, base: List[str]) -> List[str]:
    """The `metarun` arguments of one stage (without the interpreter)."""
    stage_dir = Path(run_dir) / name
    args = list(stage["args"])
    if stage["evaluate"]:
        args = ["mode=eval", f"ckpt={Path(run_dir) / stage['evaluate']}"] + args
    if stage["init_from"]:
        args.append(f"init.from={Path(run_dir) / stage['init_from']}")
    return args + base + stage["extra"] + [f"hydra.run.dir={stage_dir}"]


def stage_status(stage_dir: Path, evaluation: bool) -> str:
    """done (results.json written), resume (a training stage with checkpoints) or fresh."""
    if (stage_dir / RESULTS).exists():
        return "done"
    if not evaluation and any((stage_dir / "checkpoints" / "last").glob("*")):
        return "resume"
    return "fresh"


def summary_row(name: str, stage: dict, results: dict, status: str, wall: Optional[float]) -> dict:
    kind = "eval" if stage["evaluate"] else "train"
    source = stage["evaluate"] or stage["init_from"]
    return {"stage": name, "kind": kind, "from": source, "status": status, "algo": results.get("algo"),
            "dataset": results.get("dataset"), "split": results.get("split"), "class_split": results.get("class_split"),
            "learner": results.get("learner"), "metric": results.get("metric"), "mean": results.get("mean"),
            "ci95": results.get("ci95"), "episodes": results.get("episodes"), "ways": results.get("ways"),
            "shots": results.get("shots"), "queries": results.get("queries"), "eval_seed": results.get("eval_seed"),
            "steps": results.get("steps"), "best_val_score": results.get("best_val_score"),
            "train_wall_s": results.get("train_wall_s"), "eval_wall_s": results.get("eval_wall_s"),
            "stage_wall_s": None if wall is None else round(wall, 3)}


def summary_markdown(name: str, rows: List[dict]) -> str:
    lines = [f"# pipeline {name}", "",
             "| stage | what | test metric (mean ± 95% CI) | episodes | shape | train wall s | stage wall s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        scale, unit = (100.0, "%") if r["metric"] == "accuracy" else (1.0, "")
        result = "n/a" if r["mean"] is None else f"{r['mean'] * scale:.2f} ± {(r['ci95'] or 0) * scale:.2f}{unit}"
        what = f"{r['algo']}" + (f" on {r['from']}" if r["kind"] == "eval" else
                                 (f" from {r['from']}" if r["from"] else ""))
        shape = f"{r['ways']}-way {r['shots']}-shot" if r.get("ways") is not None else "-"
        lines.append(f"| {r['stage']} | {what} | {result} ({r['metric']}) | {r['episodes']} | {shape} | "
                     f"{r['train_wall_s'] if r['train_wall_s'] is not None else '-'} | "
                     f"{r['stage_wall_s'] if r['stage_wall_s'] is not None else '-'} |")
    same = len({tuple(r.get(k) for k in EPISODE_FACTS) for r in rows}) == 1
    lines += ["", "All rows were scored on the same fixed-seed test episodes (same dataset, split, episode shape, "
                  "eval.seed and count)." if same else
              "The rows were NOT all scored on the same test episodes: compare dataset, ways, shots, queries, "
              "eval_seed and episodes in pipeline.json."]
    return "\n".join(lines) + "\n"


def run_stage(argv: List[str]) -> int:
    """Run one stage as a child process and return its exit code. A SIGTERM or SIGHUP sent to the pipeline
    (`kill PID`, a closed terminal, a scheduler's stop) is passed on to the stage and the pipeline waits for it:
    otherwise the stage would go on training, orphaned, in the run dir the user believes stopped. (Ctrl-C
    already reaches both: it signals the whole process group.)"""
    child = subprocess.Popen(argv)
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        return child.wait()
    forwarded_signals = (signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, lambda signum, frame: child.send_signal(signum)) for s in forwarded_signals}
    try:
        return child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run(cfg, run_dir: Path, overrides: Optional[List[str]] = None, python: str = sys.executable) -> Optional[float]:
    """Run (or continue) every stage of cfg.pipeline in order; returns the last stage's score."""
    from metarun.runlock import RunLock

    run_dir = Path(run_dir)
    spec = cfg.pipeline
    stages = stages_of(spec)
    base = forwarded(overrides)
    rows = []
    with RunLock(run_dir):
        for name, stage in stages.items():
            stage_dir = run_dir / name
            status = stage_status(stage_dir, evaluation=bool(stage["evaluate"]))
            command = stage_command(run_dir, name, stage, base)
            wall = None
            if status != "done":
                if status == "resume":
                    command = command + ["resume=true"]
                log.info("pipeline stage %s (%s): metarun %s", name, status, " ".join(command))
                start = time.perf_counter()
                code = run_stage([python, "-m", "metarun", *command])
                wall = time.perf_counter() - start
                if code != 0 or not (stage_dir / RESULTS).exists():
                    raise UserError(f"pipeline stage {name} failed (exit {code}; its error is above, its run dir "
                                    f"{stage_dir}); rerun the same command to continue from this stage")
            else:
                log.info("pipeline stage %s: done (%s exists), skipped", name, stage_dir / RESULTS)
            results = json.loads((stage_dir / RESULTS).read_text())
            rows.append(summary_row(name, stage, results, "ran" if status == "fresh" else status, wall))
            atomic_write_text(stage_dir / "pipeline_command.txt", "metarun " + " ".join(command) + "\n")
    episodes = {tuple(r.get(k) for k in EPISODE_FACTS) for r in rows}
    summary = {"name": spec.get("name"), "run_dir": str(run_dir), "stages": rows,
               "same_test_episodes": len(episodes) == 1,
               "commands": {n: stage_command(run_dir, n, s, base) for n, s in stages.items()}}
    atomic_write_json(run_dir / "pipeline.json", summary)
    atomic_write_text(run_dir / "summary.md", summary_markdown(str(spec.get("name")), rows))
    log.info("pipeline %s done:\n%s", spec.get("name"), summary_markdown(str(spec.get("name")), rows))
    return results.get("score")  # the last stage's (higher is better)
