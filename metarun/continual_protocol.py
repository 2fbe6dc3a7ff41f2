"""The continual evaluation protocol of OML / ANML (`eval.protocol=continual`; the stream family's default).

On the evaluated split's classes (the meta-test classes, disjoint from meta-training): for each K in
eval.continual_classes, `eval.continual_runs` runs each learn K classes one after another — each class's
first `eval.continual_shots` images, one image per optimiser step, one pass — with the representation
frozen and the prediction network (PLN) learning from the meta-learned one (its final layer re-initialised
for K outputs with eval.continual_head=reset, as the authors' evaluation code does), then are scored on
those classes' held-out images. The class orders come from eval.seed and K alone, so every algorithm is
scored on the same orders. The learning rate is picked per K from eval.continual_lrs by the mean final
accuracy of `eval.continual_val_runs` runs on the validation classes (min(K, their number) classes per run).

results.json gets `continual`: per K, accuracy / forgetting / backward transfer (mean ± 95% CI over runs,
metarun.continual_metrics), the learning rate picked and the validation accuracy of every rate tried; the
run dir gets continual_curve.png.
"""
from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from metarun import continual_metrics
from metarun.algos.base import Collaborators
from metarun.continual_learn import make_runs, segment_ends
from metarun.errors import UserError
from metarun.fast_slow import FastSlow, fast_slow_builder
from metarun.learners import build_learner

log = logging.getLogger(__name__)

PROTOCOLS = ("auto", "episodes", "continual")
OPTIMIZERS = ("adam", "sgd")
HEADS = ("reset", "meta")
RUN_MEMORY = 256 * 2 ** 20   # bytes of per-run state (PLN, optimiser moments, gradients) vmapped at once
FEATURE_BATCH = 8            # classes embedded per device call
VAL_STREAM, TEST_STREAM = 1, 0
# Published Omniglot figures drawn beside a run's curve (accuracy by classes learned; issue 14's references)
REFERENCE = {"anml": {"ANML (higherANML)": {10: 0.90, 50: 0.89, 75: 0.86, 100: 0.85, 200: 0.80, 300: 0.76,
                                            400: 0.72, 600: 0.65}},
             "oml": {"OML released model (mrcl #8)": {10: 0.847, 50: 0.668, 75: 0.586, 100: 0.525, 150: 0.444,
                                                      200: 0.364}}}


def check_continual_config(eval_cfg) -> None:
    """One-line refusals of the protocol's settings, before any data is read."""
    protocol = eval_cfg.get("protocol", "auto")
    if protocol not in PROTOCOLS:
        raise UserError(f"eval.protocol={protocol} is unknown; expected one of: {', '.join(PROTOCOLS)}")
    ks = list(eval_cfg.get("continual_classes", []))
    if not ks or any(k < 1 for k in ks):
        raise UserError(f"eval.continual_classes={ks} must be a non-empty list of class counts >= 1")
    for key in ("continual_runs", "continual_shots"):
        if eval_cfg.get(key, 1) < 1:
            raise UserError(f"eval.{key}={eval_cfg[key]} must be >= 1")
    lrs = list(eval_cfg.get("continual_lrs", []))
    if not lrs or any(not lr > 0 for lr in lrs):
        raise UserError(f"eval.continual_lrs={lrs} must be a non-empty list of learning rates > 0")
    if len(lrs) > 1 and eval_cfg.get("continual_val_runs", 1) < 1:
        raise UserError(f"eval.continual_val_runs={eval_cfg.continual_val_runs} must be >= 1 to choose among "
                        f"eval.continual_lrs={lrs} (or give a single rate)")
    if eval_cfg.get("continual_optimizer", "adam") not in OPTIMIZERS:
        raise UserError(f"eval.continual_optimizer={eval_cfg.continual_optimizer} is unknown; expected one of: "
                        f"{', '.join(OPTIMIZERS)}")
    if eval_cfg.get("continual_head", "reset") not in HEADS:
        raise UserError(f"eval.continual_head={eval_cfg.continual_head} is unknown; expected one of: "
                        f"{', '.join(HEADS)}")


def resolve_protocol(eval_cfg, family) -> str:
    """eval.protocol, with `auto` meaning the family's own (continual for streams, episodes otherwise)."""
    protocol = eval_cfg.get("protocol", "auto")
    return family.protocol if protocol == "auto" else protocol


def class_orders(seed: int, classes: int, available: int, runs: int, stream: int = TEST_STREAM) -> np.ndarray:
    """[runs, classes] distinct class indices of a split, in the order learned: from (seed, stream, K) alone."""
    if classes > available:
        raise ValueError(f"{classes} classes asked of {available}")
    rng = np.random.default_rng([int(seed), int(stream), int(classes)])
    return np.stack([rng.permutation(available)[:classes] for _ in range(runs)]).astype(np.int32)


def run_keys(seed: int, classes: int, runs: int, stream: int = TEST_STREAM) -> jax.Array:
    """[runs] keys of the runs' fresh heads: from (seed, stream, K, run) alone."""
    base = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), stream), classes)
    return jax.vmap(lambda r: jax.random.fold_in(base, r))(jnp.arange(runs))


def split_features(represent, images, shots: int) -> Tuple[jax.Array, jax.Array]:
    """(learned [C, shots, D], held out [C, E-shots, D]) features of a split's images [C, E, H, W, C]; each
    class's learned images form one batch and its held-out images another (a BatchNorm body sees no mix)."""

    @jax.jit
    def embed(chunk):
        x = chunk.astype(jnp.float32) / 255.0
        return jax.vmap(represent)(x[:, :shots]), jax.vmap(represent)(x[:, shots:])

    images = np.asarray(images)
    learned, held = [], []
    for start in range(0, images.shape[0], FEATURE_BATCH):
        chunk = images[start:start + FEATURE_BATCH]
        pad = FEATURE_BATCH - chunk.shape[0]  # one compiled shape: pad the last chunk, drop its rows after
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
        a, b = jax.device_get(embed(chunk))
        learned.append(a[:FEATURE_BATCH - pad])
        held.append(b[:FEATURE_BATCH - pad])
    return jnp.asarray(np.concatenate(learned)), jnp.asarray(np.concatenate(held))


def run_batch_for(meta_pln, feature_dim: int, classes: int, held_out: int, runs: int) -> int:
    """Runs vmapped at once: as many as fit RUN_MEMORY (each: PLN x4 for moments and gradients, and the
    held-out features of its classes gathered for a row of accuracies)."""
    pln = 0 if meta_pln is None else sum(int(np.prod(a.shape)) for k, v in meta_pln.items() if k != "head"
                                         for a in jax.tree.leaves(v))
    fan_in = feature_dim if meta_pln is None else meta_pln["head"]["kernel"].shape[0]
    per_run = 4 * (4 * (pln + fan_in * classes) + classes * held_out * feature_dim)
    return int(max(1, min(runs, RUN_MEMORY // max(per_run, 1))))


def _accuracies(runs_fn, train, held_out, meta_pln, orders, keys, lr):
    out = jax.device_get(runs_fn(train, held_out, meta_pln, jnp.asarray(orders), keys, jnp.float32(lr)))
    return np.asarray(out.diagonal), np.asarray(out.rows)


def planned_orders(eval_cfg, available: Dict[str, int], split: str, val_split: str = "val") -> dict:
    """{(split, K): [runs, K] class orders} of every run the protocol makes (test runs; validation runs of
    the rate sweep when there is more than one rate): from eval.seed, K and the split sizes alone."""
    plan = {}
    sweep = len(eval_cfg.continual_lrs) > 1
    for k in eval_cfg.continual_classes:
        plan[(split, k)] = class_orders(eval_cfg.seed, k, available[split], eval_cfg.continual_runs, TEST_STREAM)
        if sweep:
            kv = min(k, available[val_split])
            plan[(val_split, kv)] = class_orders(eval_cfg.seed, kv, available[val_split], eval_cfg.continual_val_runs,
                                                 VAL_STREAM)
    return plan


def evaluate_fast_slow(fs: FastSlow, features: Dict[str, tuple], available: Dict[str, int], eval_cfg,
                       split: str = "test", val_split: str = "val") -> dict:
    """The protocol on precomputed features {split: (learned [c, S, D], held out [c, Q, D], the split's class
    indices of those c rows)} — only the classes some run uses need features. Per K: pick the rate on
    `val_split`, run on `split`, summarise. Writes no file."""
    lrs = [float(lr) for lr in eval_cfg.continual_lrs]
    optimizer, head = eval_cfg.continual_optimizer, eval_cfg.continual_head
    runs, val_runs, seed = int(eval_cfg.continual_runs), int(eval_cfg.continual_val_runs), int(eval_cfg.seed)
    if head == "meta" and fs.pln is None:
        raise UserError("eval.continual_head=meta keeps the meta-learned final layer, but this run has none for new "
                        "classes (a fresh linear head is learned on its body): use eval.continual_head=reset")
    plan = planned_orders(eval_cfg, available, split, val_split)
    train, held_out, _ = features[split]
    shots, feature_dim = train.shape[1:]
    compiled = {}

    def accuracies(which, k, lr):
        """(diagonal [R, K], rows [R, P, K]) of the planned runs of `which` split with K classes at rate lr."""
        f_train, f_held, classes = features[which]
        orders = plan[(which, k)]
        if k not in compiled:
            batch = run_batch_for(fs.pln, feature_dim, k, f_held.shape[1], max(runs, val_runs))
            compiled[k] = make_runs(optimizer, head, k, batch)
        stream = TEST_STREAM if which == split else VAL_STREAM
        rows_of = np.searchsorted(classes, orders).astype(np.int32)   # split class -> its row of features
        return _accuracies(compiled[k], f_train, f_held, fs.pln, rows_of, run_keys(seed, k, len(orders), stream), lr)

    by_classes = {}
    for k in eval_cfg.continual_classes:
        start = time.perf_counter()
        if head == "meta" and fs.pln["head"]["kernel"].shape[-1] < k:
            raise UserError(f"eval.continual_head=meta: the meta-learned head has {fs.pln['head']['kernel'].shape[-1]} "
                            f"outputs, fewer than K={k} classes; use eval.continual_head=reset")
        sweep = {}
        if len(lrs) > 1:
            kv = min(k, available[val_split])
            for lr in lrs:
                _, rows = accuracies(val_split, kv, lr)
                sweep[lr] = float(rows[:, -1].mean())  # the last row: every class of the run learned
        best = max(lrs, key=lambda lr: sweep[lr]) if sweep else lrs[0]
        diagonal, rows = accuracies(split, k, best)
        ends = segment_ends(k)
        matrices = [continual_metrics.accuracy_matrix(diagonal[r], rows[r], ends) for r in range(runs)]
        summary = continual_metrics.summarize(matrices)
        by_classes[str(k)] = {
            **{name: {kk: v[kk] for kk in ("mean", "ci95", "std", "n")} for name, v in summary.items()},
            "lr": best, "val_accuracy_by_lr": {f"{lr:g}": acc for lr, acc in sweep.items()},
            "val_classes": min(k, available[val_split]) if sweep else None, "rows_after": ends,
            "wall_s": round(time.perf_counter() - start, 3)}
        acc = summary["accuracy"]
        log.info("continual K=%d: accuracy %s ± %s (lr %g, %d runs, %.1f s)", k,
                 "n/a" if acc["mean"] is None else f"{acc['mean']:.4f}",
                 "n/a" if acc["ci95"] is None else f"{acc['ci95']:.4f}", best, runs, time.perf_counter() - start)
    return {"split": split, "val_split": val_split if len(lrs) > 1 else None, "classes_available": available[split],
            "shots": int(shots), "held_out": int(held_out.shape[1]), "runs": runs,
            "val_runs": val_runs if len(lrs) > 1 else 0, "lrs": lrs, "optimizer": optimizer, "head": head,
            "pln": "meta-learned" if fs.pln is not None else "fresh linear head on the frozen body",
            "orders": f"numpy default_rng([eval.seed={seed}, {TEST_STREAM}, K]) permutations of the split's classes",
            "by_classes": by_classes}


def check_against_family(eval_cfg, family, split: str) -> None:
    """K within the split's classes, learned images within the examples per class (one line each)."""
    n = family.num_classes[split]
    too_many = [k for k in eval_cfg.continual_classes if k > n]
    if too_many:
        raise UserError(f"eval.continual_classes={list(eval_cfg.continual_classes)} asks for {max(too_many)} classes; "
                        f"the '{split}' split of dataset={family.name} has {n}: choose K <= {n}")
    per_class = family.examples_per_class
    if eval_cfg.continual_shots >= per_class:
        raise UserError(f"eval.continual_shots={eval_cfg.continual_shots} learned images per class leaves none of the "
                        f"{per_class} examples per class of dataset={family.name} held out; choose <= {per_class - 1}")


def run_continual(cfg, family, params, algo_state, run_dir=None) -> dict:
    """The protocol for a trained run of `cfg`: results.json's `continual` section; writes the curve PNG."""
    own = getattr(family, "run_continual", None)
    if own is not None:  # a family with its own protocol (regression streams: metarun.continual_regression)
        return own(cfg, params, algo_state, run_dir)
    split = cfg.eval.split
    check_against_family(cfg.eval, family, split)
    builder = fast_slow_builder(cfg.algo.name)
    start = time.perf_counter()
    collaborators = Collaborators(family=family, learner=partial(build_learner, cfg.learner), learner_cfg=cfg.learner,
                                  phase="eval")
    fs = builder(cfg.algo, collaborators, params, algo_state)
    available = {s: family.num_classes[s] for s in (split, "val")}
    needed = {}
    for (which, _), orders in planned_orders(cfg.eval, available, split, "val").items():
        needed[which] = np.union1d(needed.get(which, []), orders.ravel()).astype(np.int64)
    features = {s: (*split_features(fs.represent, np.asarray(family.data[s])[classes], cfg.eval.continual_shots),
                    classes) for s, classes in needed.items()}
    feature_s = time.perf_counter() - start
    log.info("continual protocol: features of %s classes in %.1f s",
             " + ".join(f"{len(c)} {s}" for s, c in needed.items()), feature_s)
    results = evaluate_fast_slow(fs, features, available, cfg.eval, split, "val")
    results["features_wall_s"] = round(feature_s, 3)
    results["wall_s"] = round(time.perf_counter() - start, 3)
    results["plots"] = []
    if run_dir is not None:
        try:
            from metarun.plots.continual_curve import continual_curve
            ks = [int(k) for k in results["by_classes"]]
            acc = [results["by_classes"][str(k)]["accuracy"] for k in ks]
            path = continual_curve({f"{cfg.algo.name} ({results['runs']} runs, 95% CI)":
                                    (ks, [a["mean"] for a in acc], [a["ci95"] for a in acc])},
                                   Path(run_dir) / "continual_curve.png",
                                   title=f"{cfg.algo.name} on {family.name} {split} classes",
                                   reference=REFERENCE.get(cfg.algo.name) if family.name == "omniglot" else None)
            results["plots"].append(path.name)
        except Exception as e:  # a figure must not cost the run its numbers
            log.warning("continual curve failed: %s", e)
            results["plot_error"] = f"{type(e).__name__}: {e}"
    return results
