"""Orbax checkpoints: the last k train states, plus the best on validation, each saved atomically."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import jax
import orbax.checkpoint as ocp


def _manager(directory: Path, **options) -> ocp.CheckpointManager:
    # Synchronous saves: a checkpoint is complete on disk (orbax writes to a temporary
    # directory and renames it) before training goes on, so a kill never leaves half of one.
    return ocp.CheckpointManager(
        directory.absolute(),
        options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False, **options))


class Checkpoints:
    """`checkpoints/last/<step>` (keep the newest `keep`) and `checkpoints/best/<step>` (keep one)."""

    def __init__(self, directory: Path, keep: int):
        self.directory = Path(directory)
        self.last = _manager(self.directory / "last", max_to_keep=keep)
        self.best = _manager(self.directory / "best", max_to_keep=1, best_fn=lambda m: m["score"],
                             best_mode="max")

    def save(self, state, step: int) -> None:
        if step not in self.last.all_steps():
            self.last.save(step, args=ocp.args.StandardSave(state))

    def save_scored(self, params, step: int, score: float) -> None:
        """Offer `params` with a validation `score` (higher is better); orbax keeps the best one."""
        if step not in self.best.all_steps():
            self.best.save(step, args=ocp.args.StandardSave(params), metrics={"score": float(score)})

    def latest_step(self) -> Optional[int]:
        return self.last.latest_step()

    def restore_latest(self, like):
        """The newest saved train state, shaped like `like`; None if there is none."""
        step = self.last.latest_step()
        if step is None:
            return None
        return self.last.restore(step, args=ocp.args.StandardRestore(_abstract(like)))

    def restore_best(self, like_params):
        step = self.best.best_step()
        if step is None:
            return None
        return self.best.restore(step, args=ocp.args.StandardRestore(_abstract(like_params)))

    def drop_best_after(self, step: int) -> None:
        """On resume, forget best checkpoints newer than the restored state; they will be redone."""
        for s in self.best.all_steps():
            if s > step:
                self.best.delete(s)

    def close(self) -> None:
        self.last.close()
        self.best.close()


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
