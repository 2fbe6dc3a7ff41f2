"""From a composed config to the objects of a run: the one place that reads the whole config and hands
each piece its own section (the family gets `dataset` and `task`, an algorithm gets `algo` and its
collaborators, the outer optimiser gets `meta_opt`)."""
from __future__ import annotations

from functools import partial
from typing import Optional

from metarun.algos import Collaborators, MetaAlgorithm, build_algo
from metarun.core import TrainState, init_state
from metarun.families import TaskFamily, build_family
from metarun.learners import build_learner
from metarun.optim import make_optimizer


def load_family(cfg) -> TaskFamily:
    family = build_family(cfg.dataset, cfg.task, cfg.seed)
    family.check_learner(cfg.learner)
    return family


def make_algo(cfg, family: TaskFamily, phase: str, inner_steps: Optional[int] = None) -> MetaAlgorithm:
    """The algorithm for `phase` ("train" | "eval"); `inner_steps` overrides the test-time inner steps."""
    collaborators = Collaborators(family=family, learner=partial(build_learner, cfg.learner),
                                  learner_cfg=cfg.learner, phase=phase,
                                  transductive=bool(cfg.eval.get("transductive", True)) if phase == "eval" else True,
                                  inner_steps=inner_steps)
    return build_algo(cfg.algo, collaborators)


def initial_state(cfg, family: TaskFamily):
    """(train algo, optimizer, the train state a run of `cfg` starts from): also the restore target
    that a run's checkpoints are read into (resume, mode=eval)."""
    algo = make_algo(cfg, family, "train")
    optimizer = make_optimizer(cfg.meta_opt, cfg.train.steps)
    state: TrainState = init_state(algo, optimizer, family.sampler("train"), family.data["train"], cfg.seed)
    return algo, optimizer, state
