"""The training loop and all its side effects: progress, metrics, validation, checkpoints, results."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Optional

import jax
import numpy as np
from tqdm import tqdm

from metarun.algos import build_algo
from metarun.checkpoint import Checkpoints
from metarun.core import init_state, make_train_chunk
from metarun.data.sources import episode_shapes, load_task_source
from metarun.errors import UserError
from metarun.evaluate import EPISODE_KEYS, Evaluator, format_result, score, write_results
from metarun.metrics import MetricsLog
from metarun.optim import make_optimizer
from metarun import sharding

log = logging.getLogger(__name__)


def check_config(cfg) -> None:
    """Cross-group checks that a schema cannot express; each failure names the keys to change."""
    t = cfg.train
    for key in ("steps", "meta_batch", "steps_per_call", "log_every", "ckpt_every", "keep_ckpts"):
        if t[key] < 1:
            raise UserError(f"train.{key}={t[key]} must be >= 1")
    for key in ("ways", "shots", "queries"):
        if cfg.task[key] < 1:
            raise UserError(f"task.{key}={cfg.task[key]} must be >= 1")
    if cfg.eval.episodes < 1:
        raise UserError(f"eval.episodes={cfg.eval.episodes} must be >= 1")
    for key in EPISODE_KEYS:
        if cfg.eval.get(key) is not None:
            raise UserError(f"eval.{key} sets the test episodes of mode=eval; a training run takes task.test_{key}")
    regression = cfg.dataset.kind == "regression"
    if regression and cfg.learner.name != "mlp":
        raise UserError(f"dataset={cfg.dataset.name} is a regression dataset and needs learner=mlp task=regression "
                        f"(got learner={cfg.learner.name}); or take the recipe whole: experiment=maml_sinusoid")
    if not regression and cfg.learner.name == "mlp":
        raise UserError(f"learner=mlp is for regression; dataset={cfg.dataset.name} has images: use learner=conv4")
    make_optimizer(cfg.meta_opt, t.steps)  # a bad meta_opt fails here, before any data is read


def chunk_size(cfg) -> int:
    """Meta-steps per host call: divides every logging, validation and checkpoint interval,
    so those happen exactly on schedule and the program compiles once."""
    t = cfg.train
    n = math.gcd(t.steps_per_call, t.steps)
    for every in (t.log_every, t.ckpt_every, t.val_every):
        if every > 0:
            n = math.gcd(n, every)
    return n


def itstime(step: int, every: int, last: int) -> bool:
    return every > 0 and (step % every == 0 or step == last)


def _tensorboard(run_dir: Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError as e:
        raise UserError("train.tensorboard=true needs tensorboardX: pip install tensorboardX") from e
    return SummaryWriter(str(run_dir / "tensorboard"))


def initial_state(cfg, source):
    """(algo, optimizer, the train state a run of `cfg` starts from): also the restore target
    that a run's checkpoints are read into (resume, mode=eval)."""
    algo = build_algo(cfg, source.kind, "train")
    optimizer = make_optimizer(cfg.meta_opt, cfg.train.steps)
    sampler = source.sampler("train", episode_shapes(cfg.task)["train"])
    return algo, optimizer, init_state(algo, optimizer, sampler, source.data["train"], cfg.seed)


def run(cfg, run_dir: Path) -> Optional[float]:
    """Train per `cfg` into `run_dir`; returns the best validation score (the sweep objective)."""
    run_dir = Path(run_dir)
    check_config(cfg)
    mesh = sharding.task_mesh(cfg.train.meta_batch)  # None on one device; checks meta_batch divides
    source = load_task_source(cfg.dataset, cfg.seed)
    shapes = episode_shapes(cfg.task)
    train_sampler = source.sampler("train", shapes["train"])
    algo, optimizer, state = initial_state(cfg, source)
    evaluator = Evaluator(cfg, source, cfg.eval.split, cfg.eval.episodes, cfg.eval.seed, cfg.eval.batch,
                          list(cfg.eval.report_steps))
    validator = None
    if cfg.train.val_every > 0 and cfg.train.val_episodes > 0:
        validator = Evaluator(cfg, source, "val", cfg.train.val_episodes, cfg.eval.seed + 1, cfg.eval.batch)

    ckpts = Checkpoints(run_dir / "checkpoints", cfg.train.keep_ckpts)
    metrics_log = MetricsLog(run_dir / "metrics.jsonl")
    wall_offset = 0.0
    if ckpts.latest_step() is not None and not cfg.resume:
        raise UserError(f"{run_dir} already holds checkpoints: pass resume=true to continue that run, "
                        f"or choose another hydra.run.dir")
    if cfg.resume:
        restored = ckpts.restore_latest(state)
        start = 0 if restored is None else int(restored.step)
        if restored is not None:
            state = restored
        rows = metrics_log.truncate_after(start)
        ckpts.drop_best_after(start)
        wall_offset = max((r.get("wall_s", 0.0) for r in rows), default=0.0)
        log.info("resuming at step %d from %s", start, run_dir / "checkpoints")
    # More than one device: tasks split over a "tasks" mesh axis, params and data replicated.
    state = sharding.replicate(state, mesh)
    train_data = sharding.replicate(source.data["train"], mesh)
    if mesh is not None:
        log.info("%s", sharding.describe(mesh))
    start = int(state.step)
    total = cfg.train.steps

    chunk = chunk_size(cfg)
    compile_start = time.perf_counter()
    train_chunk = make_train_chunk(algo, optimizer, train_sampler, cfg.train.meta_batch, chunk,
                                   shard_tasks=sharding.task_constraint(mesh),
                                   task_batching=cfg.train.task_batching, task_chunk=cfg.train.task_chunk)
    train_chunk = train_chunk.lower(state, train_data).compile()
    compile_s = time.perf_counter() - compile_start
    log.info("compiled %d meta-steps per call in %.1f s", chunk, compile_s)

    writer = _tensorboard(run_dir) if cfg.train.tensorboard else None
    best_score = None
    pending = []
    t0 = time.perf_counter()
    last_log_time, last_log_step = t0, start
    bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, disable=not cfg.train.progress,
               desc=f"{cfg.algo.name}/{cfg.dataset.name}")
    step = start
    while step < total:
        state, metrics = train_chunk(state, train_data)
        pending.append(metrics)
        step += chunk
        bar.update(chunk)
        row = None
        if itstime(step, cfg.train.log_every, total):
            host = jax.device_get(pending)
            pending = []
            now = time.perf_counter()
            row = {"step": step, "wall_s": round(wall_offset + now - t0, 3),
                   "steps_per_s": round((step - last_log_step) / max(now - last_log_time, 1e-9), 3)}
            row.update({f"train/{k}": float(np.mean([m[k] for m in host]))
                        for k in host[0]})
            last_log_time, last_log_step = now, step
            bar.set_postfix({k.split("/")[1]: f"{v:.4g}" for k, v in row.items() if k.startswith("train/")})
        if validator is not None and itstime(step, cfg.train.val_every, total):
            val = validator(state.params)[validator.inner_steps]
            row = row or {"step": step, "wall_s": round(wall_offset + time.perf_counter() - t0, 3)}
            row.update({f"val/{validator.metric}": val["mean"], f"val/{validator.metric}_ci95": val["ci95"]})
            val_score = score(validator.metric, val["mean"])
            ckpts.save_scored(state.params, step, val_score)
            best_score = val_score if best_score is None else max(best_score, val_score)
        if row is not None:
            metrics_log.append(row)
            if writer is not None:
                for k, v in row.items():
                    if k != "step":
                        writer.add_scalar(k, v, step)
        if itstime(step, cfg.train.ckpt_every, total):
            ckpts.save(state, step)
    bar.close()
    train_wall = wall_offset + time.perf_counter() - t0

    params, which = state.params, "last"
    if cfg.eval.use_best and validator is not None:
        best = ckpts.restore_best(state.params)
        if best is not None:
            params, which = best, "best"
    results = write_results(run_dir, cfg, evaluator, params, {
        "checkpoint": which, "steps": total, "train_wall_s": round(train_wall, 3),
        "compile_s": round(compile_s, 3), "best_val_score": best_score,
        "val_metric": validator.metric if validator else None})
    ckpts.close()
    if writer is not None:
        writer.close()
    message = format_result(results)
    log.info(message)
    print(f"{message}\nrun dir: {run_dir}")
    return best_score if best_score is not None else score(results["metric"], results["mean"])
