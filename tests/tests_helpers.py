"""Small helpers shared by test files (not a test module)."""
from __future__ import annotations

from pathlib import Path


def last_state(cfg, run_dir: Path, like):
    """The newest train state checkpointed in run_dir, restored into the shape of `like`."""
    from metarun.checkpoint import Checkpoints

    ckpts = Checkpoints(Path(run_dir) / "checkpoints", cfg.train.keep_ckpts)
    try:
        return ckpts.restore_latest(like)
    finally:
        ckpts.close()
