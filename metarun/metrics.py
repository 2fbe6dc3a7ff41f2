"""Run-directory writers: atomic JSON, the metrics.jsonl log (truncatable on resume), 95% CIs."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import numpy as np


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file in the same directory, fsync, then rename: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a result file should read like any other
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def strict(obj):
    """`obj` with every non-finite float (NaN, ±inf) replaced by None: strict JSON that any parser reads."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if isinstance(obj, np.generic):
        return strict(obj.item())
    return obj


def dumps(obj, **kwargs) -> str:
    """Strict JSON text (allow_nan=False after `strict`): never NaN or Infinity."""
    return json.dumps(strict(obj), allow_nan=False, sort_keys=True, **kwargs)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, dumps(obj, indent=2) + "\n")


def mean_ci95(values: Iterable[float]) -> Dict[str, Optional[float]]:
    """Mean and the 95% normal-approximation half-width 1.96 * std / sqrt(n) (std with ddof=1).

    A diverged episode (inf/NaN) makes mean, std and ci95 None (JSON null), never a silent
    NaN; `nonfinite` counts such episodes and the median is still given.
    """
    v = np.asarray(list(values), dtype=np.float64)
    n = v.size
    nonfinite = int(np.count_nonzero(~np.isfinite(v)))
    out = {"n": int(n), "nonfinite": nonfinite, "median": float(np.median(v)) if n else None}
    if nonfinite or n == 0:
        return {**out, "mean": None, "ci95": None, "std": None}
    std = float(v.std(ddof=1)) if n > 1 else 0.0
    return {**out, "mean": float(v.mean()), "ci95": 1.96 * std / math.sqrt(n), "std": std}


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step, each with `step`."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> List[dict]:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill: drop it
                break
        return rows

    def truncate_after(self, step: int) -> List[dict]:
        """Keep rows up to `step` (the restored checkpoint), so a resumed log equals an uninterrupted one."""
        rows = [r for r in self.read() if r["step"] <= step]
        atomic_write_text(self.path, "".join(dumps(r) + "\n" for r in rows))
        return rows

    def append(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(dumps(row) + "\n")
            f.flush()
