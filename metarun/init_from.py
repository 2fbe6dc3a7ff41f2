"""`init.from=RUN_DIR`: start a run's learner from another run's best checkpoint.

The body (every learner parameter outside the `head`) is copied exactly and must match in names and
shapes; the head is copied where its shapes fit (same ways) and kept freshly initialised otherwise;
running BatchNorm statistics come along when both runs keep them in the same shapes. Only
`params["net"]` moves: algorithm-specific meta-parameters (MAML++'s rates, ...) start fresh.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from metarun.errors import UserError

log = logging.getLogger(__name__)
HEAD = "head"


def init_dir(cfg) -> Optional[str]:
    """The run directory in `init.from`, or None; unknown keys of the `init` section are refused."""
    section = cfg.get("init") or {}
    unknown = sorted(set(section) - {"from"})
    if unknown:
        raise UserError(f"init.{unknown[0]} is unknown; the init section has one key: init.from=RUN_DIR")
    return section.get("from") or None


def _keystr(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _flat(tree) -> Dict[str, Any]:
    return {_keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def read_best(run_dir: Path) -> Tuple[dict, int]:
    """({"params", "algo_state"} of the run's best checkpoint as saved, its step); UserError when absent."""
    import orbax.checkpoint as ocp

    from metarun.checkpoint import _manager

    # Only the best manager, read-only use: opening the source's `last` with another max_to_keep is no business of ours.
    best = _manager(run_dir / "checkpoints" / "best", max_to_keep=1, best_fn=lambda m: m["score"], best_mode="max")
    try:
        step = best.best_step()
        if step is None:
            raise UserError(f"init.from={run_dir} has no best checkpoint (checkpoints/best/ is empty): "
                            f"start from a run that validated (train.val_every > 0)")
        return best.restore(step, args=ocp.args.StandardRestore()), int(step)
    finally:
        best.close()


def merge_params(own, saved, source: str) -> Tuple[Any, str]:
    """`own` learner params with the saved body (and head where shapes fit); (params, head status)."""
    mine, theirs = _flat(own), _flat(saved)
    body = lambda names: {n for n in names if n.split("/")[0] != HEAD}  # noqa: E731
    missing, extra = sorted(body(mine) - body(theirs)), sorted(body(theirs) - body(mine))
    if missing or extra:
        which = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which this learner lacks"
        raise UserError(f"init.from={source}: the saved learner body {which}; the two learners differ in structure")
    for name in sorted(body(mine)):
        if np.shape(theirs[name]) != np.shape(mine[name]):
            raise UserError(f"init.from={source}: shape mismatch at {name}: saved {tuple(np.shape(theirs[name]))}, "
                            f"this run {tuple(np.shape(mine[name]))} (compare the learner sections, e.g. width_factor)")
    heads = {n for n in mine if n not in body(mine)}
    head_fits = bool(heads) and all(n in theirs and np.shape(theirs[n]) == np.shape(mine[n]) for n in heads)
    status = "none" if not heads else ("loaded" if head_fits else "fresh (shapes differ)")

    def pick(path, leaf):
        name = _keystr(path)
        take = name not in heads or head_fits
        return jnp.asarray(theirs[name], dtype=leaf.dtype) if take else leaf

    return jax.tree_util.tree_map_with_path(pick, own), status


def check_source(cfg):
    """The source run's saved config, after the refusals that need no weights (called before any init)."""
    from omegaconf import OmegaConf

    source = Path(init_dir(cfg)).expanduser()
    if not (source / ".hydra" / "config.yaml").is_file() or not (source / "checkpoints").is_dir():
        raise UserError(f"init.from={source}: expected a run directory with .hydra/config.yaml and checkpoints/")
    saved_cfg = OmegaConf.load(source / ".hydra" / "config.yaml")
    if saved_cfg.learner.name != cfg.learner.name:
        raise UserError(f"init.from={source} is a run of learner={saved_cfg.learner.name}; "
                        f"this run's learner={cfg.learner.name}")
    return saved_cfg


def apply_init_from(cfg, params, algo_state) -> Tuple[Any, Any, dict]:
    """(params, algo_state, record) with the learner taken from init.from's best checkpoint."""
    source = Path(init_dir(cfg)).expanduser()
    saved_cfg = check_source(cfg)
    saved, step = read_best(source)
    if not isinstance(params, dict) or "net" not in params or "net" not in (saved.get("params") or {}):
        raise UserError(f"init.from={source}: both runs' algorithms must keep their learner under params['net'] "
                        f"(algo={cfg.algo.name}, the saved run's algo={saved_cfg.algo.name})")
    net, head = merge_params(params["net"], saved["params"]["net"], str(source))
    params = {**params, "net": net}
    stats = "none"
    own_stats, saved_stats = (algo_state or {}).get("batch_stats"), (saved.get("algo_state") or {}).get("batch_stats")
    if own_stats and saved_stats:
        same = jax.tree.structure(own_stats) == jax.tree.structure(saved_stats) and all(
            np.shape(a) == np.shape(b) for a, b in zip(jax.tree.leaves(own_stats), jax.tree.leaves(saved_stats)))
        if same:
            algo_state = {**algo_state, "batch_stats": jax.tree.map(jnp.asarray, saved_stats)}
            stats = "loaded"
        else:
            stats = "fresh (shapes differ)"
    record = {"from": str(source), "checkpoint": "best", "step": step, "head": head, "batch_stats": stats}
    log.info("init.from: learner body from %s (best checkpoint, step %d); head %s", source, step, head)
    return params, algo_state, record
