"""The training loop and all its side effects: progress, metrics, validation, checkpoints, results."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import List, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from metarun import distributed, sharding
from metarun.build import initial_state, load_family
from metarun.checkpoint import Checkpoints
from metarun.core import make_train_chunk
from metarun.errors import UserError
from metarun.evaluate import EPISODE_KEYS, Evaluator, check_eval_config, format_result, write_results
from metarun.learners import build_learner
from metarun.metrics import MetricsLog
from metarun.online import check_schedule, schedule
from metarun.optim import make_optimizer
from metarun.resume import restore_hydra_config, resume_config, save_choices, save_config
from metarun.runlock import RunLock

log = logging.getLogger(__name__)


class DivergedError(UserError):
    """Training produced a non-finite loss, gradient or parameter (train.on_nonfinite=stop)."""


def check_config(cfg) -> None:
    """Checks a schema cannot express, before any data is read; each failure names the keys to change."""
    t = cfg.train
    for key in ("steps", "meta_batch", "steps_per_call", "log_every", "ckpt_every", "keep_ckpts", "task_chunk"):
        if t[key] < 1:
            raise UserError(f"train.{key}={t[key]} must be >= 1")
    for key in ("val_every", "val_episodes"):
        if t[key] < 0:
            raise UserError(f"train.{key}={t[key]} must be >= 0")
    if t.get("keep_best", 1) < 1:
        raise UserError(f"train.keep_best={t.keep_best} must be >= 1")
    check_eval_config(cfg)
    for key in EPISODE_KEYS:
        if cfg.eval.get(key) is not None:
            raise UserError(f"eval.{key} sets the test episodes of mode=eval; a training run takes task.test_{key}")
    if cfg.eval.get("ensemble_top_k") is not None:
        raise UserError("eval.ensemble_top_k ensembles a finished run's best checkpoints: "
                        "use it with mode=eval ckpt=RUN_DIR")
    build_learner(cfg.learner, None)  # a bad learner section (filters=0, ...) fails here
    side, blocks = cfg.dataset.get("image_size"), cfg.learner.get("blocks")
    # Only when the learner reads the images (dataset.uses_learner false: the Neural Processes' own model).
    if side is not None and blocks is not None and cfg.dataset.get("uses_learner", True) and side < 2 ** blocks:
        raise UserError(f"dataset.image_size={side} is too small for learner.blocks={blocks} (each block halves "
                        f"the image): use dataset.image_size >= {2 ** blocks} or fewer learner.blocks")
    make_optimizer(cfg.meta_opt, t.steps)  # a bad meta_opt fails here
    check_schedule(cfg)  # train.schedule and, when online, train.online.*
    check_cpu_vmap_conv(cfg)


def check_cpu_vmap_conv(cfg) -> None:
    """Refuses the one combination known to give wrong meta-gradients: on XLA's CPU backend (jax 0.10.2) a
    jitted meta-step that vmaps tasks (task_batching=vmap, or task_chunk > 1 inside lax.map) through XLA's
    convolution disagrees with the per-task gradients' mean by up to 0.8 (eager or lax.map: 1e-7);
    tests/test_fast_paths.py keeps the reproducer. Defaults never pick it on CPU (auto: im2col, map)."""
    from metarun.core import resolve_task_batching
    from metarun.learners.conv4 import resolve_conv_impl

    t, impl = cfg.train, cfg.learner.get("conv_impl")
    if impl is None or jax.default_backend() != "cpu" or resolve_conv_impl(impl) != "xla":
        return
    if resolve_task_batching(t.task_batching) == "vmap" or t.task_chunk > 1:
        raise UserError(f"learner.conv_impl=xla with train.task_batching={t.task_batching}, train.task_chunk="
                        f"{t.task_chunk} vmaps tasks through XLA's CPU convolution, which gives wrong "
                        "meta-gradients on this backend (docs/performance.md): use learner.conv_impl=im2col "
                        "(or auto), or train.task_batching=map with train.task_chunk=1")


def chunk_size(cfg) -> int:
    """Meta-steps per host call: divides every logging, validation and checkpoint interval,
    so those happen exactly on schedule and the program compiles once."""
    t = cfg.train
    n = math.gcd(t.steps_per_call, t.steps)
    for every in (t.log_every, t.ckpt_every, t.val_every):
        if every > 0:
            n = math.gcd(n, every)
    return n


def tested_state(cfg, state, ckpts, validator):
    """(params, algo_state, "best"|"last"): what the final test evaluates — the best validation checkpoint
    when eval.use_best and validation ran and one was saved, else the last state."""
    if cfg.eval.use_best and validator is not None:
        best = ckpts.restore_best({"params": state.params, "algo_state": state.algo_state})
        if best is not None:
            return best["params"], best["algo_state"], "best"
    return state.params, state.algo_state, "last"


def itstime(step: int, every: int, last: int) -> bool:
    return every > 0 and (step % every == 0 or step == last)


def _tensorboard(run_dir: Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError as e:
        raise UserError("train.tensorboard=true needs tensorboardX: pip install tensorboardX") from e
    return SummaryWriter(str(run_dir / "tensorboard"))


def run(cfg, run_dir: Path, overrides: Optional[List[str]] = None) -> Optional[float]:
    """Train per `cfg` into `run_dir` (one run per directory: a lock); returns the best validation
    score, higher is better (the sweep objective). `overrides`: the command line's, for resume."""
    run_dir = Path(run_dir)
    distributed.initialize(cfg.get("distributed"))  # several processes: join them before JAX starts
    primary = distributed.is_primary()  # process 0 alone writes the run directory's files
    distributed.require_same("hydra.run.dir", str(run_dir))  # one run dir (shared by all hosts)
    try:
        with RunLock(run_dir) if primary else contextlib.nullcontext():
            return _train(cfg, run_dir, overrides)
    except UserError:
        if primary:
            restore_hydra_config(run_dir)  # Hydra rewrote .hydra/config.yaml before metarun ran: put the run's own back
        raise


def _train(cfg, run_dir: Path, overrides: Optional[List[str]]) -> Optional[float]:
    ckpts_dir = run_dir / "checkpoints"
    if cfg.resume:
        cfg = resume_config(run_dir, cfg, overrides)
    elif ckpts_dir.exists() and any(ckpts_dir.glob("last/*")):
        raise UserError(f"{run_dir} already holds checkpoints: pass resume=true to continue that run, "
                        f"or choose another hydra.run.dir")
    check_config(cfg)
    mesh = sharding.task_mesh(cfg.train.meta_batch)  # None on one device; checks meta_batch divides
    log.info("loading dataset=%s ...", cfg.dataset.name)
    family = load_family(cfg)
    # init.from (issue 15): a fresh run starts its learner from another run; a resumed one restores its own.
    algo, optimizer, state = initial_state(cfg, family, init_from=not cfg.resume)
    evaluator = Evaluator(cfg, family, cfg.eval.split, cfg.eval.episodes, cfg.eval.seed, cfg.eval.batch,
                          list(cfg.eval.report_steps))
    validator = None
    if cfg.train.val_every > 0 and cfg.train.val_episodes > 0:
        validator = Evaluator(cfg, family, "val", cfg.train.val_episodes, cfg.eval.seed + 1, cfg.eval.batch)

    ckpts = Checkpoints(ckpts_dir, cfg.train.keep_ckpts, cfg.train.get("keep_best", 1))
    primary = distributed.is_primary()
    metrics_log = MetricsLog(run_dir / "metrics.jsonl") if primary else None
    wall_offset = 0.0
    if cfg.resume:
        restored = ckpts.restore_latest(state)
        start = 0 if restored is None else int(restored.step)
        if restored is not None:
            state = restored
        ckpts.drop_after(start)
        rows = metrics_log.truncate_after(start) if primary else []
        wall_offset = max((r.get("wall_s", 0.0) for r in rows), default=0.0)
        log.info("resuming at step %d from %s", start, ckpts_dir)
    if primary:
        if not cfg.resume:
            save_choices(run_dir)
        save_config(run_dir, cfg)
        restore_hydra_config(run_dir)
    loop = _loop
    if schedule(cfg) == "online":  # a task stream (FTML): metarun.online_train
        if jax.process_count() > 1:
            raise UserError(f"train.schedule=online runs in one process, not {jax.process_count()}: "
                            f"leave distributed.* unset (or distributed.num_processes=1)")
        from metarun.online_train import online_loop as loop
    try:
        return loop(cfg, run_dir, family, algo, optimizer, state, evaluator, validator, ckpts, metrics_log,
                    wall_offset, mesh)
    finally:
        ckpts.close()


def _loop(cfg, run_dir, family, algo, optimizer, state, evaluator, validator, ckpts, metrics_log, wall_offset, mesh):
    # More than one device: tasks split over a "tasks" mesh axis, params and data replicated.
    state = sharding.replicate(state, mesh)
    train_data = sharding.replicate(family.data["train"], mesh)
    if mesh is not None:
        log.info("%s", sharding.describe(mesh))
    start, total = int(state.step), cfg.train.steps
    on_nonfinite = getattr(cfg.train.on_nonfinite, "value", cfg.train.on_nonfinite)

    chunk = chunk_size(cfg)
    log.info("compiling %d meta-steps per call (%s on %s) ...", chunk, cfg.algo.name, jax.default_backend())
    compile_start = time.perf_counter()
    train_chunk = make_train_chunk(algo, optimizer, family.sampler("train"), cfg.train.meta_batch, chunk,
                                   shard_tasks=sharding.task_constraint(mesh), task_batching=cfg.train.task_batching,
                                   task_chunk=cfg.train.task_chunk, skip_nonfinite=on_nonfinite == "skip_step",
                                   sample_tasks=sharding.shard_sampling(mesh))
    train_chunk = train_chunk.lower(state, train_data).compile()
    compile_s = time.perf_counter() - compile_start
    log.info("compiled in %.1f s; training steps %d..%d", compile_s, start, total)

    primary = distributed.is_primary()
    writer = _tensorboard(run_dir) if cfg.train.tensorboard and primary else None
    pending, skipped = [], 0
    t0 = time.perf_counter()
    last_log_time, last_log_step = t0, start
    bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, disable=not (cfg.train.progress and primary),
               desc=f"{cfg.algo.name}/{cfg.dataset.name}")
    step = start
    while step < total:
        state, metrics = train_chunk(state, train_data)
        bad = np.asarray(metrics["nonfinite"])  # one small host sync per chunk
        if bad.any():
            if on_nonfinite == "stop":
                bar.close()
                _stop_diverged(run_dir, ckpts, step + int(np.argmax(bad)) + 1, cfg)
            skipped += int(bad.sum())
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
            # "_"-prefixed metrics are for the evaluator (e.g. calibration bins), not the training log.
            row.update({f"train/{k}": float(np.mean([m[k] for m in host])) for k in host[0] if not k.startswith("_")})
            if skipped:
                row["skipped_steps"] = skipped
            last_log_time, last_log_step = now, step
            bar.set_postfix({k.split("/")[1]: f"{v:.4g}" for k, v in row.items() if k.startswith("train/")})
        if validator is not None and itstime(step, cfg.train.val_every, total):
            val_start = time.perf_counter()
            # Every process validates the same episodes on its own copy; process 0's score decides the
            # best checkpoint everywhere (its save is collective).
            val = validator(*sharding.local_copy((state.params, state.algo_state)))[validator.inner_steps]
            row = row or {"step": step, "wall_s": round(wall_offset + time.perf_counter() - t0, 3)}
            row.update({f"val/{validator.metric}": val["mean"], f"val/{validator.metric}_ci95": val["ci95"]})
            val_score = distributed.agree(family.score(val["mean"]))
            if val_score > float(state.best_score):
                state = sharding.replicate(state._replace(best_score=jnp.float32(val_score),
                                                          best_step=jnp.int32(step)), mesh)
            ckpts.save_scored({"params": state.params, "algo_state": state.algo_state}, step, val_score)
            # Validation (and its first compile) is not training: keep it out of the step rates.
            val_s = time.perf_counter() - val_start
            last_log_time += val_s
            if not bar.disable:
                bar.start_t += val_s
                bar.last_print_t += val_s
        if row is not None and primary:
            metrics_log.append(row)
            if writer is not None:
                for k, v in row.items():
                    if k != "step" and v is not None:
                        writer.add_scalar(k, v, step)
        if itstime(step, cfg.train.ckpt_every, total):
            ckpts.save(state, step)
    bar.close()
    train_wall = wall_offset + time.perf_counter() - t0

    params, algo_state, which = tested_state(cfg, state, ckpts, validator)
    has_best = int(state.best_step) >= 0
    params, algo_state = sharding.local_copy((params, algo_state))
    if not primary:  # the same evaluation, so every process ends together; process 0 writes it
        main = evaluator(params, algo_state)[evaluator.inner_steps]
        return float(state.best_score) if has_best else family.score(main["mean"])
    results = write_results(run_dir, cfg, evaluator, params, algo_state, {
        "checkpoint": which, "steps": total, "train_wall_s": round(train_wall, 3),
        "compile_s": round(compile_s, 3), "best_val_score": float(state.best_score) if has_best else None,
        "best_val_step": int(state.best_step) if has_best else None, "skipped_steps": skipped,
        "val_metric": validator.metric if validator else None, "processes": jax.process_count()})
    if writer is not None:
        writer.close()
    log.info("%s  (run dir: %s)", format_result(results), run_dir)
    return float(state.best_score) if has_best else results["score"]


def _stop_diverged(run_dir: Path, ckpts: Checkpoints, bad_step: int, cfg) -> None:
    from metarun.report import write_failure

    last = ckpts.latest_step()
    kept = f"the last finite checkpoint (step {last}) is kept as last and best" if last is not None else \
        "no checkpoint had been saved yet"
    lrs = [f"algo.{k}={cfg.algo[k]}" for k in ("inner_lr",) if cfg.algo.get(k) is not None] + [f"meta_opt.lr={cfg.meta_opt.lr}"]
    error = DivergedError(f"training diverged at step {bad_step} (non-finite loss, gradient or parameters); {kept}; "
                          f"lower the learning rates ({', '.join(lrs)}) or set train.on_nonfinite=skip_step")
    if distributed.is_primary():
        write_failure(run_dir, error, _overrides())
    raise error


def _overrides() -> list:
    try:
        from hydra.core.hydra_config import HydraConfig
        return list(HydraConfig.get().overrides.task)
    except Exception:  # no Hydra app (a direct call)
        return []
