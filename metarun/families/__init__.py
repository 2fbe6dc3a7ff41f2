"""Task families: each owns its samplers, objective and metrics, primary metric and its direction, protocol, plots."""
from __future__ import annotations

from metarun.families.base import TaskFamily, build_family

__all__ = ["TaskFamily", "build_family"]
