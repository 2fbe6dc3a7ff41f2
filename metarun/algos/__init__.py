"""Meta-algorithms, registered by name: each module's `@register("algo", ...)` builder makes a MetaAlgorithm."""
from __future__ import annotations

from metarun.algos.base import Collaborators, MetaAlgorithm
from metarun.registry import lookup


def build_algo(algo_cfg, collaborators: Collaborators) -> MetaAlgorithm:
    """The algorithm `algo.name` from its own config section and its collaborators."""
    return lookup("algo", algo_cfg.name, "algo").build(algo_cfg, collaborators)


__all__ = ["Collaborators", "MetaAlgorithm", "build_algo"]
