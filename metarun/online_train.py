"""train.schedule=online: the stream driver (side effects: progress, metrics rows, checkpoints, results, plot).

At stream step t: score task t after k examples (the buffer holds tasks 0..t-1), add it to the buffer,
then run train.online.meta_steps meta-steps on buffer minibatches with the batch trainer's own jitted
chunk (metarun.core.make_train_chunk over metarun.online's buffer sampler). train.steps counts tasks;
ckpt_every and val_every count tasks too; metrics.jsonl has one row per task, its `step` the meta-steps
done. The checkpoint is the TrainState alone: the stream position is step / meta_steps and the buffer
is the stream's prefix, both recomputed from the run's seed, so resume and mode=eval read it unchanged.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from metarun import online, sharding
from metarun.build import make_algo
from metarun.core import make_train_chunk
from metarun.errors import UserError
from metarun.evaluate import format_result, write_results
from metarun.families.augmenting import augmented
from metarun.metrics import atomic_write_json
from metarun.optim import make_optimizer

log = logging.getLogger(__name__)

PLOT = "online.png"


def online_loop(cfg, run_dir, family, algo, optimizer, state, evaluator, validator, ckpts, metrics_log,
                wall_offset, mesh):
    """train._loop's counterpart for a task stream (same arguments, same return: the sweep score)."""
    from metarun.train import _stop_diverged, _tensorboard, itstime, tested_state  # train imports this module lazily

    o = cfg.train.online
    tasks, meta_steps = cfg.train.steps, o.meta_steps
    shots = sorted(set(int(k) for k in o.shots))
    toe = o.baseline == "toe"
    ways, examples = family.ways("train"), family.examples_per_class
    if shots[-1] + o.held_out > examples:
        raise UserError(f"train.online.shots up to {shots[-1]} plus train.online.held_out={o.held_out} exceed the "
                        f"{examples} examples per class of dataset={family.name}")
    episode = family.shapes["train"]
    stream = online.make_stream(cfg.seed, family.num_classes["train"], ways, examples, tasks)
    start = int(state.step)
    if start % meta_steps:
        raise UserError(f"the checkpoint at meta-step {start} is not at a task boundary of "
                        f"train.online.meta_steps={meta_steps}; resume it with its own config")
    position = start // meta_steps

    # The outer optimiser's schedule spans the stream's meta-steps (initial_state built it for train.steps,
    # which counts tasks here); its state has the same structure, so state.opt_state carries over.
    regularize = cfg.get("regularize")
    optimizer = make_optimizer(cfg.meta_opt, tasks * meta_steps,
                               weight_decay=regularize.get("weight_decay", 0.0) if regularize is not None else 0.0)
    train_algo = make_algo(cfg, family, "train", inner_steps=0) if toe else algo
    sampler = online.make_buffer_sampler(ways, episode.shots, episode.queries, shuffle_labels=not toe)
    if family.augment is not None:
        sampler = augmented(sampler, family.augment)
    on_nonfinite = getattr(cfg.train.on_nonfinite, "value", cfg.train.on_nonfinite)

    state = sharding.replicate(state, mesh)
    images = family.data["train"]
    classes = jnp.asarray(stream.classes)
    order = jnp.asarray(stream.order)
    method = "toe" if toe else cfg.algo.name
    log.info("online stream: %d tasks of %d classes, %d meta-steps on the buffer after each (%s), scored after "
             "%s shots on %d held-out examples per class", tasks, ways, meta_steps, method, shots, o.held_out)
    compile_start = time.perf_counter()
    train_chunk = make_train_chunk(train_algo, optimizer, sampler, cfg.train.meta_batch, meta_steps,
                                   task_batching=cfg.train.task_batching, task_chunk=cfg.train.task_chunk,
                                   skip_nonfinite=on_nonfinite == "skip_step")
    # Compiled for the shapes alone (an empty buffer): the buffer's size is a traced value.
    train_chunk = train_chunk.lower(state, online.buffer_data(images, classes, online.buffer_before(0, tasks))
                                    ).compile()
    eval_algo = make_algo(cfg, family, "eval")
    scorers = {k: online.make_scorer(eval_algo, k, o.held_out) for k in shots}
    score_base = jax.random.PRNGKey(cfg.eval.seed)
    compile_s = time.perf_counter() - compile_start
    log.info("compiled in %.1f s; stream tasks %d..%d", compile_s, position, tasks)

    writer = _tensorboard(run_dir) if cfg.train.tensorboard else None
    skipped = 0
    t0 = time.perf_counter()
    bar = tqdm(total=tasks, initial=position, unit="task", dynamic_ncols=True, disable=not cfg.train.progress,
               desc=f"{method}/{cfg.dataset.name} online")
    for t in range(position, tasks):
        task_start = time.perf_counter()
        # 1. Score task t with the learner as it is: the buffer holds tasks 0..t-1 only.
        key = jax.random.fold_in(score_base, t)
        scored = {k: jax.device_get(scorers[k](state.params, state.algo_state, images, classes[t], order[t], key))
                  for k in shots}
        accuracy = {k: float(scored[k]["accuracy"]) for k in shots}
        # 2. Task t joins the buffer; 3. follow the meta leader on buffer minibatches.
        buffer = online.buffer_before(t + 1, tasks)
        state, metrics = train_chunk(state, online.buffer_data(images, classes, buffer))
        metrics = jax.device_get(metrics)
        step = (t + 1) * meta_steps
        bad = np.asarray(metrics["nonfinite"])
        if bad.any():
            if on_nonfinite == "stop":
                bar.close()
                _stop_diverged(run_dir, ckpts, t * meta_steps + int(np.argmax(bad)) + 1, cfg)
            skipped += int(bad.sum())
        now = time.perf_counter()
        row = {"step": step, "task": t, "buffer_tasks": t, "wall_s": round(wall_offset + now - t0, 3),
               "task_s": round(now - task_start, 3),
               **{online.accuracy_key(k): accuracy[k] for k in shots},
               online.THRESHOLD_KEY: online.shots_to_threshold(accuracy, o.threshold)}
        row.update({f"train/{k}": float(np.mean(v)) for k, v in metrics.items() if not k.startswith("_")})
        if skipped:
            row["skipped_steps"] = skipped
        if validator is not None and itstime(t + 1, cfg.train.val_every, tasks):
            val = validator(state.params, state.algo_state)[validator.inner_steps]
            row.update({f"val/{validator.metric}": val["mean"], f"val/{validator.metric}_ci95": val["ci95"]})
            val_score = family.score(val["mean"])
            if val_score > float(state.best_score):
                state = sharding.replicate(state._replace(best_score=jnp.float32(val_score),
                                                          best_step=jnp.int32(step)), mesh)
            ckpts.save_scored({"params": state.params, "algo_state": state.algo_state}, step, val_score)
        metrics_log.append(row)
        if writer is not None:
            for k, v in row.items():
                if k not in ("step", "task") and v is not None:
                    writer.add_scalar(k, v, t)
        if itstime(t + 1, cfg.train.ckpt_every, tasks):
            ckpts.save(state, step)
        bar.update(1)
        bar.set_postfix({f"k{k}": f"{accuracy[k]:.3f}" for k in shots})
    bar.close()
    train_wall = wall_offset + time.perf_counter() - t0

    # The stream's numbers come from metrics.jsonl: a resumed run's earlier tasks are read back, not redone.
    summary = online.summarize_stream(metrics_log.read(), shots, o.threshold)
    summary.update({"method": method, "baseline": o.baseline, "ways": ways, "held_out": o.held_out,
                    "meta_steps_per_task": meta_steps, "meta_batch": cfg.train.meta_batch,
                    "train_episode": {"shots": episode.shots, "queries": episode.queries},
                    "labels": "fixed per task" if toe else "shuffled per episode", "split": "train"})
    try:
        from metarun.plots.online_curves import online_curves

        online_curves({method: summary}, Path(run_dir) / PLOT, title=f"{method} on a {family.name} stream")
        summary["plot"] = PLOT
    except Exception as e:  # a figure must not cost the run its results.json
        log.warning("online plot failed: %s", e)
        summary["plot_error"] = f"{type(e).__name__}: {e}"

    params, algo_state, which = tested_state(cfg, state, ckpts, validator)
    has_best = int(state.best_step) >= 0
    results = write_results(run_dir, cfg, evaluator, params, algo_state, {
        "schedule": "online", "online": summary,
        "checkpoint": which, "steps": tasks * meta_steps, "train_wall_s": round(train_wall, 3),
        "compile_s": round(compile_s, 3), "best_val_score": float(state.best_score) if has_best else None,
        "best_val_step": int(state.best_step) if has_best else None, "skipped_steps": skipped,
        "val_metric": validator.metric if validator else None})
    if "plot" in summary:  # the run dir's figures in one list, as for a batch run
        results["plots"] = list(results.get("plots", [])) + [PLOT]
        atomic_write_json(Path(run_dir) / "results.json", results)
    if writer is not None:
        writer.close()
    head = summary["second_half"]["accuracy"][str(shots[0])]
    need = summary["second_half"]["shots_to_threshold"]
    log.info("online, tasks %d..%d: accuracy after %d shots %.3f ± %.3f; shots to %.2f: %s ± %s (%d censored); "
             "final learner %s", summary["second_half_from_task"], tasks - 1, shots[0], head["mean"] or float("nan"),
             head["ci95"] or 0.0, o.threshold, need["mean"], need["ci95"], need["censored"], format_result(results))
    # The sweep objective of an online run: the second half's accuracy after the fewest shots.
    return family.score(head["mean"])
