"""The continual protocol of regression streams: OML's incremental sine evaluation (mrcl's evaluate_regression.py).

Each of `eval.continual_runs` runs draws `task.test_ways` fresh sine functions (amplitude, phase) and their points
from numpy `default_rng([eval.seed, stream, functions, run])` alone — every algorithm is scored on the same functions
— and learns them one after another with the representation frozen: the PLN, starting from the meta-learned one,
takes one optimiser step (eval.continual_optimizer; mrcl: SGD) per `dataset.step_batch` consecutive points of
`task.test_shots` per function, one pass. After each function it is scored on `task.test_queries` held-out
points of every function of the run: an [F, F] MSE matrix per run, A[i, j] = MSE on function j after learning
functions 0..i. The rate is picked from eval.continual_lrs by the mean final MSE of `eval.continual_val_runs`
validation runs (another stream of draws). The same protocol is run on the untrained network (the learner's
initialisation from the run's seed: a random RLN and PLN) as the baseline.

Reported (lower MSE is better): `mse` = the mean MSE over all functions after the last one (the paper's
figure), `mse_by_function` after the last, `mse_after` = mean MSE over the functions learned so far after each
one (mrcl's incremental curve), and metarun.continual_metrics on the score -MSE, so the signs read as for
accuracy: `forgetting` = mean over functions but the last of (final MSE - its best MSE before the end), >= 0,
larger = more forgotten; `backward_transfer` = mean of (MSE just after learning a function - its final MSE),
negative when learning later functions raised the MSE of earlier ones.
"""
from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from metarun import continual_metrics
from metarun.algos.base import Collaborators
from metarun.continual_learn import make_optimizer
from metarun.data.incremental_sine import sine_inputs
from metarun.fast_slow import fast_slow_builder
from metarun.learners import build_learner
from metarun.learners.continual_nets import pln_apply
from metarun.metrics import mean_ci95

log = logging.getLogger(__name__)

VAL_STREAM, TEST_STREAM = 1, 0


def function_draws(seed: int, functions: int, runs: int, shots: int, held_out: int, amplitude, phase, x_range,
                   stream: int = TEST_STREAM) -> dict:
    """The runs' functions and points: amplitude/phase [R, F], x_train [R, F, shots], x_held [R, F, held_out]
    (float32). Run r's come from numpy default_rng([seed, stream, functions, r]) alone: the first runs are the
    same whatever the number of runs."""
    def one(run):
        rng = np.random.default_rng([int(seed), int(stream), int(functions), run])
        return {"amplitude": rng.uniform(*amplitude, functions), "phase": rng.uniform(*phase, functions),
                "x_train": rng.uniform(*x_range, (functions, shots)), "x_held": rng.uniform(*x_range, (functions, held_out))}

    runs_drawn = [one(r) for r in range(int(runs))]
    return {k: np.stack([d[k] for d in runs_drawn]).astype(np.float32) for k in runs_drawn[0]}


def make_runs(represent, slots: int, step_batch: int, optimizer: str):
    """A jitted `(pln, draws, lr) -> [R, F, F]` MSE matrices: runs one after another (lax.map; each holds its
    features), functions learned in order, `step_batch` points per step, the RLN (`represent`) frozen."""

    def one_run(pln, amplitude, phase, x_train, x_held, lr):
        functions, shots = x_train.shape
        slot = jnp.repeat(jnp.arange(functions), shots)
        train = represent(sine_inputs(x_train.reshape(-1), slot, slots))
        train = train.reshape(functions, shots // step_batch, step_batch, -1)
        y_train = (amplitude[:, None] * jnp.sin(x_train + phase[:, None])).reshape(functions, -1, step_batch, 1)
        held = represent(sine_inputs(x_held.reshape(-1), jnp.repeat(jnp.arange(functions), x_held.shape[1]), slots))
        y_held = (amplitude[:, None] * jnp.sin(x_held + phase[:, None])).reshape(-1, 1)
        opt = make_optimizer(optimizer, lr)

        def step(carry, batch):
            p, state = carry
            z, y = batch
            grads = jax.grad(lambda q: jnp.mean(jnp.square(pln_apply(q, z) - y)))(p)
            updates, state = opt.update(grads, state, p)
            return (jax.tree.map(lambda a, u: a + u, p, updates), state), None

        def learn_function(carry, batches):
            carry, _ = jax.lax.scan(step, carry, batches)   # one step per batch, in order, one pass
            err = jnp.square(pln_apply(carry[0], held) - y_held).reshape(functions, -1).mean(-1)
            return carry, err

        _, rows = jax.lax.scan(learn_function, (pln, opt.init(pln)), (train, y_train))
        return rows

    @jax.jit
    def runs(pln, draws, lr):
        return jax.lax.map(lambda d: one_run(pln, d["amplitude"], d["phase"], d["x_train"], d["x_held"], lr), draws)

    return runs


def summarize_runs(matrices: np.ndarray) -> dict:
    """Mean ± 95% CI over runs of the final MSE, per function, after each function, forgetting and BWT."""
    matrices = np.asarray(matrices, np.float64)
    functions = matrices.shape[-1]
    scores = continual_metrics.summarize([-m for m in matrices])  # accuracy-style metrics on -MSE
    final = mean_ci95(matrices[:, -1].mean(-1))
    keep = ("mean", "ci95", "std", "n")
    return {"mse": {k: final[k] for k in keep},
            "forgetting": {k: scores["forgetting"][k] for k in keep},
            "backward_transfer": {k: scores["backward_transfer"][k] for k in keep},
            "mse_by_function": [{k: mean_ci95(matrices[:, -1, j])[k] for k in ("mean", "ci95")}
                                for j in range(functions)],
            "mse_after": [{k: mean_ci95(matrices[:, i, :i + 1].mean(-1))[k] for k in ("mean", "ci95")}
                          for i in range(functions)]}


def evaluate_representation(represent, pln, family, eval_cfg) -> dict:
    """The protocol for one (frozen representation, starting PLN); writes no file."""
    functions, shots, held_out = family.shapes["test"]
    source = family.source
    lrs = [float(lr) for lr in eval_cfg.continual_lrs]
    runs_fn = make_runs(represent, family.slots, family.step_batch, eval_cfg.continual_optimizer)

    def matrices(stream, runs, lr):
        draws = function_draws(eval_cfg.seed, functions, runs, shots, held_out, source.amplitude, source.phase,
                               source.x_range, stream)
        return np.asarray(jax.device_get(runs_fn(pln, {k: jnp.asarray(v) for k, v in draws.items()}, jnp.float32(lr))))

    sweep = {}
    if len(lrs) > 1:
        for lr in lrs:
            final = matrices(VAL_STREAM, int(eval_cfg.continual_val_runs), lr)[:, -1].mean()
            sweep[lr] = float(final) if np.isfinite(final) else float("inf")
    best = min(lrs, key=lambda lr: sweep[lr]) if sweep else lrs[0]
    return {**summarize_runs(matrices(TEST_STREAM, int(eval_cfg.continual_runs), best)), "lr": best,
            "val_mse_by_lr": {f"{lr:g}": v for lr, v in sweep.items()}}


def run_continual_regression(cfg, family, params, algo_state, run_dir=None) -> dict:
    """results.json's `continual` section for a regression-stream run: the trained representation and the
    untrained one (the learner's initialisation from cfg.seed) on the same functions."""
    start = time.perf_counter()
    collaborators = Collaborators(family=family, learner=partial(build_learner, cfg.learner), learner_cfg=cfg.learner,
                                  phase="eval")
    fs = fast_slow_builder(cfg.algo.name)(cfg.algo, collaborators, params, algo_state)
    if fs.pln is None:
        from metarun.errors import UserError
        raise UserError(f"dataset={family.name}: the continual protocol starts from the run's meta-learned PLN; "
                        f"algo={cfg.algo.name} has none (use algo=oml)")
    trained = evaluate_representation(fs.represent, fs.pln, family, cfg.eval)
    module = build_learner(cfg.learner, family.head_dim("eval"))
    init = module.init(jax.random.PRNGKey(int(cfg.seed)), jnp.zeros((1, family.input_dim())))["params"]
    untrained = evaluate_representation(lambda x: module.apply({"params": init}, x, method="represent"), init["pln"],
                                        family, cfg.eval)
    functions, shots, held_out = family.shapes["test"]
    for name, r in (("trained", trained), ("untrained", untrained)):
        m = r["mse"]
        log.info("continual %s: MSE on %d functions after the last %s ± %s (lr %g)", name, functions,
                 "n/a" if m["mean"] is None else f"{m['mean']:.4f}", "n/a" if m["ci95"] is None else f"{m['ci95']:.4f}",
                 r["lr"])
    return {**trained, "untrained": untrained, "functions": functions, "points_per_function": shots,
            "points_per_step": family.step_batch, "held_out_per_function": held_out,
            "runs": int(cfg.eval.continual_runs), "val_runs": int(cfg.eval.continual_val_runs) if
            len(cfg.eval.continual_lrs) > 1 else 0, "lrs": [float(v) for v in cfg.eval.continual_lrs],
            "optimizer": cfg.eval.continual_optimizer, "pln": "meta-learned (not reset)",
            "draws": f"numpy default_rng([eval.seed={cfg.eval.seed}, {TEST_STREAM}, functions, run])",
            "metric": "mse (lower is better); forgetting >= 0 = MSE rise from its best; backward_transfer < 0 = "
                      "later functions raised earlier ones' MSE",
            "wall_s": round(time.perf_counter() - start, 3),
            "plots": [] if run_dir is None else mse_curve_plot(cfg, family, trained, untrained, run_dir)}


# OML's Fig. 3 (mrcl README plots/regression.png), MSE over the 10 functions after the last, read off the plot
# (±0.05; no table of numbers was found): drawn as markers beside the measured curves.
PAPER_FINAL_MSE = {"OML (paper, read off Fig. 3)": 0.35, "SR-NN (paper)": 0.87, "pretraining (paper)": 1.45}


def mse_curve_plot(cfg, family, trained: dict, untrained: dict, run_dir) -> list:
    """continual_curve.png: mean MSE over the functions learned so far after each one (`mse_after`), trained and
    untrained representations, 95% CI bands; [] with a warning if drawing fails (the numbers are kept)."""
    try:
        from metarun.plots.continual_curve import continual_curve

        functions = family.shapes["test"][0]
        ks = list(range(1, functions + 1))
        curves = {f"{name} ({int(cfg.eval.continual_runs)} runs, lr {r['lr']:g})":
                  (ks, [a["mean"] for a in r["mse_after"]], [a["ci95"] for a in r["mse_after"]])
                  for name, r in ((f"{cfg.algo.name}, trained", trained), ("untrained network", untrained))}
        reference = {label: {functions: v} for label, v in PAPER_FINAL_MSE.items()} if functions == 10 else None
        path = continual_curve(curves, Path(run_dir) / "continual_curve.png",
                               title=f"{cfg.algo.name} on {family.name}: MSE over the functions learned so far",
                               reference=reference, xlabel="functions learned (one pass)",
                               ylabel="mean MSE on their held-out points", ylim=None, legend_loc="upper left")
        return [path.name]
    except Exception as e:  # a figure must not cost the run its numbers
        log.warning("continual MSE curve failed: %s", e)
        return []
