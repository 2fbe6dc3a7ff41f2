"""Ensembles at evaluation (`mode=eval ckpt=[RUN_A,RUN_B,...]`, `eval.ensemble_top_k=K`): every member adapts to
and scores the same episodes, and the ensemble predicts the average of the members' class probabilities
(MAML++ reports its headline numbers with the top-5 validation checkpoints averaged this way).

No algorithm exposes its logits, so each member's algorithm is built against a family whose objective also
returns the normalised log-probabilities it scored (LOG_PROBS); the ensemble's `loss` averages them. Each
member receives exactly the keys of its own single evaluation, so an ensemble of identical members is
that member.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import List, Sequence

import jax
import jax.numpy as jnp
from omegaconf import open_dict

from metarun.algos.base import MetaAlgorithm
from metarun.errors import UserError
from metarun.metrics import atomic_write_json

LOG_PROBS = "_log_probs"  # "_": a per-query array for the ensemble, not a metric to summarise


class RecordingFamily:
    """`family` whose objective also returns log_softmax(logits) under LOG_PROBS; everything else is the family's."""

    def __init__(self, family):
        self._family = family

    def __getattr__(self, name):
        return getattr(self._family, name)

    def objective(self, logits, labels, mask=None):
        loss, metrics = self._family.objective(logits, labels, mask)
        return loss, {**metrics, LOG_PROBS: jax.nn.log_softmax(logits, -1)}


def ensemble(members: Sequence[MetaAlgorithm], objective, metric: str = "accuracy", info=None) -> MetaAlgorithm:
    """The ensemble of `members` (built against RecordingFamily) as one MetaAlgorithm over tuples of their
    params and states. `loss` scores log(mean_m p_m) with `objective` and adds, per member i, its own
    `member{i}_{metric}` and the paired difference `ensemble_minus_member{i}` on the same episode."""

    def adapt(params, states, support, key):
        return tuple(a.adapt(p, s, support, key) for a, p, s in zip(members, params, states))

    def loss(params, states, task_states, query, key):
        outs = [a.loss(p, s, t, query, key)[1] for a, p, s, t in zip(members, params, states, task_states)]
        for a, out in zip(members, outs):
            if LOG_PROBS not in out:
                raise UserError(f"algo={a.info.get('name')} does not score class probabilities through the family's "
                                f"objective: its runs cannot join an ensemble")
        log_probs = jnp.stack([out[LOG_PROBS] for out in outs])                    # [members, queries, classes]
        mean_log_probs = jax.nn.logsumexp(log_probs, axis=0) - math.log(len(outs))  # log of the mean probability
        value, metrics = objective(mean_log_probs, query.y, query.mask)
        metrics = dict(metrics)
        for i, out in enumerate(outs):
            metrics[f"member{i}_{metric}"] = out[metric]
            metrics[f"ensemble_minus_member{i}"] = metrics[metric] - out[metric]
        return value, metrics

    return MetaAlgorithm(init=None, adapt=adapt, loss=loss, info=info or {})


def _episodes(family, split: str) -> str:
    d = family.describe(split)
    return f"dataset={family.name} {d.get('ways')}-way {d.get('shots')}-shot {d.get('queries')}-query"


def check_same_episodes(members, split: str) -> None:
    """Every member must be scored on the first member's episodes: same dataset, episode shape and images."""
    first = members[0]
    for m in members[1:]:
        if m.family.name != first.family.name or m.family.describe(split) != first.family.describe(split):
            raise UserError(f"ckpt: an ensemble scores its members on the same episodes; {m.run} tests "
                            f"{_episodes(m.family, split)}, {first.run} {_episodes(first.family, split)}")
        if m.family is not first.family:
            a, b = first.family.data[split], m.family.data[split]
            if a.shape != b.shape or not bool(jnp.array_equal(a, b)):
                raise UserError(f"ckpt: an ensemble scores its members on the same episodes; the {split} images of "
                                f"{m.run} differ from those of {first.run} (compare their dataset sections and seeds)")
            m.family.data[split] = a  # identical: keep one copy on the device


def member_row(i: int, m, metric: str, results: dict) -> dict:
    score = results["metrics"].get(f"member{i}_{metric}", {})
    gain = results["metrics"].get(f"ensemble_minus_member{i}", {})
    return {"run": m.run, "checkpoint": m.checkpoint, "step": m.step, "val_score": m.val_score,
            "algo": str(m.cfg.algo.name), "run_algo": m.run_algo, "learner": str(m.cfg.learner.name),
            "seed": m.cfg.get("seed"), metric: score.get("mean"), f"{metric}_ci95": score.get("ci95"),
            "ensemble_minus_member": gain.get("mean"), "ensemble_minus_member_ci95": gain.get("ci95")}


def write_ensemble_results(run_dir: Path, cfg, members: List) -> dict:
    """Evaluate the ensemble of `members` on this command's episodes; results.json names every member with
    its own score on the same episodes (also under metrics: member{i}_{metric}, ensemble_minus_member{i})."""
    from metarun.build import make_algo
    from metarun.evaluate import Evaluator, write_results

    first = members[0]
    if first.family.kind != "classification":
        raise UserError(f"ckpt: an ensemble averages class probabilities; dataset={first.family.name} is "
                        f"{first.family.kind}")
    from metarun.continual_protocol import resolve_protocol
    if resolve_protocol(cfg.eval, first.family) == "continual":
        raise UserError("ckpt: an ensemble is scored on episodes; eval.protocol=continual scores one run")
    check_same_episodes(members, cfg.eval.split)
    algos = [make_algo(m.cfg, RecordingFamily(m.family), "eval") for m in members]
    info = {"name": "ensemble", "combine": "mean of predicted class probabilities",
            "members": [a.info for a in algos]}
    algo = ensemble(algos, first.family.objective, first.family.metric, info)
    ens_cfg = first.cfg.copy()
    with open_dict(ens_cfg):
        ens_cfg.algo = {"name": "ensemble"}
    evaluator = Evaluator(ens_cfg, first.family, cfg.eval.split, cfg.eval.episodes, cfg.eval.seed, cfg.eval.batch,
                          [], algo_for=lambda steps: algo)
    params = tuple(m.params for m in members)
    states = tuple(m.algo_state for m in members)
    results = write_results(run_dir, ens_cfg, evaluator, params, states,
                            {"checkpoint": "ensemble", "evaluated_run": [m.run for m in members]})
    metric = first.family.metric
    results["members"] = [member_row(i, m, metric, results) for i, m in enumerate(members)]
    atomic_write_json(Path(run_dir) / "results.json", results)
    return results
