"""Meta-algorithms by name: each module's from_config builds a MetaAlgorithm from the config."""
from __future__ import annotations

from metarun.algos import maml
from metarun.algos import anil, metasgd, reptile
from metarun.algos import matching, protonet, relation
from metarun.algos.base import OBJECTIVES, PRIMARY_METRIC, MetaAlgorithm
from metarun.errors import UserError
from metarun.learners import build_learner

# name -> (from_config, whether the learner has a classifier head of `ways` outputs)
ALGORITHMS = {
    "maml": (maml.from_config, True),
    "fomaml": (maml.from_config, True),
    "reptile": (reptile.from_config, True),
    "metasgd": (metasgd.from_config, True),
    "anil": (anil.from_config, True),
    "protonet": (protonet.from_config, False),
    "matchingnet": (matching.from_config, False),
    "relationnet": (relation.from_config, False),
}


def build_algo(cfg, kind: str, phase: str = "train") -> MetaAlgorithm:
    """The algorithm `cfg.algo.name` over learner `cfg.learner` for a task `kind`."""
    if cfg.algo.name not in ALGORITHMS:
        raise UserError(f"algo={cfg.algo.name} is unknown; expected one of: {', '.join(sorted(ALGORITHMS))}")
    from_config, has_head = ALGORITHMS[cfg.algo.name]
    out_dim = None
    if has_head:
        if kind == "regression":
            out_dim = 1
        else:
            test_ways = cfg.task.test_ways or cfg.task.ways
            if test_ways != cfg.task.ways:
                raise UserError(f"algo={cfg.algo.name} has a {cfg.task.ways}-way head: task.test_ways="
                                f"{test_ways} must equal task.ways (only metric learners can change ways)")
            out_dim = cfg.task.ways
    return from_config(cfg, build_learner(cfg.learner, out_dim), OBJECTIVES[kind], phase)


__all__ = ["ALGORITHMS", "MetaAlgorithm", "PRIMARY_METRIC", "build_algo"]
