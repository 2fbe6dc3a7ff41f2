"""Orbax checkpoints: the last k train states, plus the best on validation, each saved atomically.

A step that fails to restore (a torn or damaged directory) is reported in one line and the next
older step is tried, so one bad file never costs the run.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def _manager(directory: Path, **options) -> ocp.CheckpointManager:
    # Synchronous saves: a checkpoint is complete on disk (orbax writes to a temporary
    # directory and renames it) before training goes on, so a kill never leaves half of one.
    return ocp.CheckpointManager(
        directory.absolute(),
        options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False, **options))


class Checkpoints:
    """`checkpoints/last/<step>` (keep the newest `keep`) and `checkpoints/best/<step>` (keep the `keep_best`
    best by validation score: train.keep_best; more than one feeds eval.ensemble_top_k).

    `last` holds whole train states; `best` holds {"params", "algo_state"}: what evaluation needs.
    """

    def __init__(self, directory: Path, keep: int, keep_best: int = 1):
        self.directory = Path(directory)
        self.last = _manager(self.directory / "last", max_to_keep=keep)
        self.best = _manager(self.directory / "best", max_to_keep=keep_best, best_fn=lambda m: m["score"],
                             best_mode="max")

    def save(self, state, step: int) -> None:
        if step not in self.last.all_steps():
            self.last.save(step, args=ocp.args.StandardSave(state))

    def save_scored(self, tree, step: int, score: float) -> None:
        """Offer `tree` with a validation `score` (higher is better); orbax keeps the best one."""
        if step not in self.best.all_steps():
            self.best.save(step, args=ocp.args.StandardSave(tree), metrics={"score": float(score)})

    def latest_step(self) -> Optional[int]:
        return self.last.latest_step()

    def restore_latest(self, like):
        """The newest train state that restores, shaped like `like`; None if there is none.

        Damaged newer steps are skipped with a warning (and left on disk for inspection)."""
        for step in sorted(self.last.all_steps(), reverse=True):
            try:
                return self.last.restore(step, args=ocp.args.StandardRestore(_abstract(like)))
            except Exception as e:  # torn files, a missing manifest, a changed structure
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                log.warning("checkpoint %s cannot be restored (%s: %s); trying the previous step",
                            self.directory / "last" / str(step), type(e).__name__, reason)
        return None

    def restore_best(self, like):
        step = self.best.best_step()
        if step is None:
            return None
        try:
            return self.best.restore(step, args=ocp.args.StandardRestore(_abstract(like)))
        except Exception as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            log.warning("best checkpoint %s cannot be restored (%s); using the last state instead",
                        self.directory / "best" / str(step), reason)
            return None

    def best_steps(self):
        """[(step, validation score)] of the kept best checkpoints, best first (ties: the earlier step)."""
        def score(step) -> float:
            try:
                return float((self.best.metrics(step) or {}).get("score", float("-inf")))
            except Exception:  # a damaged metrics file: rank it last rather than fail (restore reports it)
                return float("-inf")
        return sorted(((int(step), score(step)) for step in self.best.all_steps()), key=lambda s: (-s[1], s[0]))

    def restore_best_step(self, step: int, like):
        """The best-manager checkpoint of `step`, shaped like `like` (errors propagate: the caller names the run)."""
        return self.best.restore(step, args=ocp.args.StandardRestore(_abstract(like)))

    def drop_after(self, step: int) -> None:
        """On resume, forget checkpoints newer than the restored state (damaged or ahead); they will be redone."""
        for manager in (self.last, self.best):
            for s in manager.all_steps():
                if s > step:
                    manager.delete(s)

    def close(self) -> None:
        self.last.close()
        self.best.close()


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
