"""What `mode=eval` evaluates: the trained weights of `ckpt=RUN_DIR`, of each run in `ckpt=[RUN_A, RUN_B, ...]`,
or of a run's K best validation checkpoints (`eval.ensemble_top_k=K`), each as a Member ready for the
Evaluator; with an evaluation-time algorithm (`algo=finetune|finetune_cosine|finetune_all`) in place of
each run's own.

The command's `algo` section is used only when it names an evaluation-time algorithm (registered with
evaluation_only=True): otherwise every run is evaluated with its own algorithm, as before.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import OmegaConf, open_dict

from metarun.build import initial_state, load_family
from metarun.checkpoint import Checkpoints
from metarun.errors import UserError
from metarun.evaluate import EPISODE_KEYS
from metarun.families import TaskFamily
from metarun.init_from import HEAD
from metarun.registry import lookup

log = logging.getLogger(__name__)


class Member(NamedTuple):
    run: str                # the run directory
    cfg: Any                # the config it is evaluated with: the run's own, this command's eval section (+ algo)
    family: TaskFamily
    params: Any
    algo_state: Any
    checkpoint: str         # "best" | "last"
    step: Optional[int]     # the checkpoint's step (known for best checkpoints)
    val_score: Optional[float]
    run_algo: str           # the algorithm the run was trained with


def ckpt_dirs(cfg) -> List[Path]:
    """The run directories of `ckpt` (one path or a list), checked to hold a run."""
    ckpt = cfg.ckpt
    if not ckpt:
        raise UserError("mode=eval needs ckpt=RUN_DIR (a run directory holding .hydra/ and checkpoints/), "
                        "or ckpt=[RUN_A,RUN_B,...] for an ensemble")
    dirs = [Path(str(c)) for c in (ckpt if OmegaConf.is_list(ckpt) or isinstance(ckpt, (list, tuple)) else [ckpt])]
    for d in dirs:
        if not (d / ".hydra" / "config.yaml").exists() or not (d / "checkpoints").exists():
            raise UserError(f"ckpt={d}: expected a run directory with .hydra/config.yaml and checkpoints/")
    if len(set(dirs)) != len(dirs) and cfg.eval.get("ensemble_top_k") is None:
        log.warning("ckpt lists a run more than once: its members are identical")
    return dirs


def evaluation_only(algo_name: str) -> bool:
    return bool(lookup("algo", algo_name, "algo").meta.get("evaluation_only"))


def run_config(cfg, ckpt_dir: Path):
    """The run's saved config with this command's eval section, test episode shape and data paths."""
    run_cfg = OmegaConf.load(ckpt_dir / ".hydra" / "config.yaml")
    with open_dict(run_cfg):
        run_cfg.eval = cfg.eval
        for key in EPISODE_KEYS:
            if cfg.eval[key] is not None:
                if cfg.eval[key] < 1:
                    raise UserError(f"eval.{key}={cfg.eval[key]} must be >= 1")
                run_cfg.task[f"test_{key}"] = cfg.eval[key]
        if cfg.dataset.get("local_dir"):
            run_cfg.dataset.local_dir = cfg.dataset.local_dir
    return run_cfg


def with_algo(run_cfg, algo_cfg):
    """The run's config evaluated by `algo_cfg` (an evaluation-time algorithm) instead of its own."""
    out = run_cfg.copy()
    with open_dict(out):
        out.algo = algo_cfg
    return out


def body_of(params, algo_state, run_cfg, family: TaskFamily, algo_name: str, ckpt_dir: Path):
    """({"net": the learner body}, {"batch_stats"} or {}) of a run's weights, for an evaluation-time algorithm:
    the head (its own classes) is dropped; the rest must be exactly the learner's body."""
    from metarun.init_from import _flat
    from metarun.learners import build_learner

    if not isinstance(params, dict) or not isinstance(params.get("net"), dict):
        raise UserError(f"algo={algo_name} fine-tunes a learner kept under params['net']; ckpt={ckpt_dir} is a run "
                        f"of algo={run_cfg.algo.name}, which keeps none")
    net = {k: v for k, v in params["net"].items() if k != HEAD}
    example = jnp.zeros((1,) + tuple(family.data["test"].shape[2:]), jnp.float32)
    want = jax.eval_shape(lambda x: build_learner(run_cfg.learner, None).init(jax.random.PRNGKey(0), x),
                          example)["params"]
    mine, theirs = _flat(want), _flat(net)
    for name in sorted(set(mine) | set(theirs)):
        if name not in mine or name not in theirs or tuple(mine[name].shape) != tuple(np.shape(theirs[name])):
            raise UserError(f"algo={algo_name}: ckpt={ckpt_dir}'s params['net'] is not a learner={run_cfg.learner.name} "
                            f"body at {name} (algo={run_cfg.algo.name} keeps other weights there)")
    stats = (algo_state or {}).get("batch_stats") if isinstance(algo_state, dict) else None
    return {"net": net}, ({"batch_stats": stats} if stats else {})


def _restore(cfg, run_cfg, ckpt_dir: Path, like) -> List[tuple]:
    """[(params, algo_state, checkpoint, step, val score)]: the best (or last) checkpoint, or the top-K best."""
    ckpts = Checkpoints(ckpt_dir / "checkpoints", keep=run_cfg.train.keep_ckpts,
                        keep_best=run_cfg.train.get("keep_best", 1))
    target = {"params": like.params, "algo_state": like.algo_state}
    top_k = cfg.eval.get("ensemble_top_k")
    try:
        if top_k is not None:
            kept = ckpts.best_steps()
            if len(kept) < top_k:
                raise UserError(f"eval.ensemble_top_k={top_k}: ckpt={ckpt_dir} keeps {len(kept)} best checkpoint(s) "
                                f"(its train.keep_best={run_cfg.train.get('keep_best', 1)}); train with "
                                f"train.keep_best>={top_k}")
            out = []
            for step, score in kept[:top_k]:
                tree = ckpts.restore_best_step(step, target)
                out.append((tree["params"], tree["algo_state"], "best", step, score))
            return out
        if cfg.eval.use_best:
            kept = ckpts.best_steps()
            restored = ckpts.restore_best(target)
            if restored is not None:
                return [(restored["params"], restored["algo_state"], "best", kept[0][0] if kept else None,
                         kept[0][1] if kept else None)]
        state = ckpts.restore_latest(like)
        if state is None:
            raise UserError(f"ckpt={ckpt_dir}: no checkpoint found under {ckpt_dir / 'checkpoints'}")
        return [(state.params, state.algo_state, "last", int(state.step), None)]
    finally:
        ckpts.close()


def load_members(cfg) -> List[Member]:
    """Every member this mode=eval command evaluates, in the order of `ckpt` (top-K: best first)."""
    top_k = cfg.eval.get("ensemble_top_k")
    dirs = ckpt_dirs(cfg)
    if top_k is not None:
        if top_k < 1:
            raise UserError(f"eval.ensemble_top_k={top_k} must be >= 1")
        if len(dirs) > 1:
            raise UserError("eval.ensemble_top_k ensembles the best checkpoints of one run: give ckpt=RUN_DIR, "
                            "or list the runs in ckpt=[...] without it")
        if not cfg.eval.use_best:
            raise UserError("eval.ensemble_top_k reads the best checkpoints: leave eval.use_best=true")
    swap = evaluation_only(cfg.algo.name)
    families: Dict[str, TaskFamily] = {}
    members = []
    continual = cfg.eval.get("protocol") == "continual"
    if continual and (swap or len(dirs) > 1 or top_k not in (None, 1)):
        raise UserError("eval.protocol=continual scores one run with its own algorithm: leave out ensembles "
                        "(ckpt=[...], eval.ensemble_top_k) and evaluation-time algorithms (algo=finetune*)")
    for ckpt_dir in dirs:
        run_cfg = run_config(cfg, ckpt_dir)
        if continual:
            from metarun.fast_slow import fast_slow_builder
            fast_slow_builder(run_cfg.algo.name)  # the evaluated run's algorithm, refused before its data loads
        # One family per distinct data config: top-K members and runs of one setting share the arrays.
        data_key = OmegaConf.to_yaml(OmegaConf.create({k: run_cfg.get(k) for k in
                                                       ("dataset", "task", "seed", "augment", "regularize")})
                                     ) + run_cfg.algo.name
        if data_key not in families:
            families[data_key] = load_family(run_cfg)
        family = families[data_key]
        # The restore target needs only shapes: no initialisation is computed.
        like = jax.eval_shape(lambda: initial_state(run_cfg, family)[2])
        for params, algo_state, which, step, score in _restore(cfg, run_cfg, ckpt_dir, like):
            eval_cfg = run_cfg
            if swap:
                params, algo_state = body_of(params, algo_state, run_cfg, family, cfg.algo.name, ckpt_dir)
                eval_cfg = with_algo(run_cfg, cfg.algo)
            members.append(Member(str(ckpt_dir), eval_cfg, family, params, algo_state, which, step, score,
                                  str(run_cfg.algo.name)))
    return members
