"""From a composed config to the objects of a run: the one place that reads the whole config and hands
each piece its own section (the family gets `dataset` and `task`, an algorithm gets `algo` and its
collaborators, the outer optimiser gets `meta_opt`)."""
from __future__ import annotations

from dataclasses import fields
from functools import partial
from typing import Optional

from omegaconf import OmegaConf

from metarun.algos import Collaborators, MetaAlgorithm, build_algo
from metarun.core import TrainState, init_state
from metarun.errors import UserError
from metarun.families import TaskFamily, build_family
from metarun.init_from import apply_init_from, check_source, init_dir
from metarun.learners import build_learner
from metarun.optim import make_optimizer
from metarun.registry import entries, lookup
from metarun.regularize import check_regularize


def load_family(cfg) -> TaskFamily:
    """The task family of `cfg`, with the issue-15 techniques it owns: augmentation of training tasks and
    label smoothing (`.get`: configs saved before those sections existed have neither)."""
    regularize = cfg.get("regularize")
    check_regularize(regularize)
    check_dropout_keys(cfg, "train")  # before the data is read
    # An algorithm registered with train_tasks="batches" (pretrain) trains on labelled minibatches, not episodes.
    train_tasks = lookup("algo", cfg.algo.name, "algo").meta.get("train_tasks", "episodes")
    family = build_family(with_test_x_range(cfg), cfg.task, cfg.seed, augment=cfg.get("augment"),
                          label_smoothing=regularize.get("label_smoothing", 0.0) if regularize is not None else 0.0,
                          train_tasks=train_tasks, algo=cfg.algo.name)
    family.check_learner(cfg.learner)
    return family


def with_test_x_range(cfg):
    """The dataset section with `eval.x_range` as its test split's input range (`dataset.test_x_range`); the
    other splits are untouched. One line for a dataset that has no such key."""
    x_range = (cfg.get("eval") or {}).get("x_range")
    if x_range is None:
        return cfg.dataset
    schema = lookup("dataset", cfg.dataset.name, "dataset").schema
    if schema is None or "test_x_range" not in {f.name for f in fields(schema)}:
        raise UserError(f"eval.x_range={list(x_range)}: dataset={cfg.dataset.name} has no test input range to set "
                        f"(datasets with dataset.test_x_range: sinusoid)")
    # A plain copy (a run saved before the key existed lacks it in its struct config).
    dataset = OmegaConf.create(OmegaConf.to_container(cfg.dataset, resolve=True))
    dataset.test_x_range = list(x_range)
    return dataset


def make_algo(cfg, family: TaskFamily, phase: str, inner_steps: Optional[int] = None) -> MetaAlgorithm:
    """The algorithm for `phase` ("train" | "eval"); `inner_steps` overrides the test-time inner steps."""
    collaborators = Collaborators(family=family, learner=partial(build_learner, cfg.learner),
                                  learner_cfg=cfg.learner, phase=phase,
                                  transductive=bool(cfg.eval.get("transductive", True)) if phase == "eval" else True,
                                  inner_steps=inner_steps)
    check_dropout_keys(cfg, phase)
    algo = build_algo(cfg.algo, collaborators)
    source = init_dir(cfg)
    if source:  # results.json's algo_config records where the learner started from
        algo = algo._replace(info={**algo.info, "init_from": str(source)})
    return algo


def check_dropout_keys(cfg, phase: str) -> None:
    """learner.dropout > 0 needs an algorithm that passes dropout keys to its learner in training
    (registered with dropout_keys=True); evaluation runs learners without dropout."""
    if phase == "train" and cfg.learner.get("dropout"):
        if not lookup("algo", cfg.algo.name, "algo").meta.get("dropout_keys"):
            able = sorted(n for n, e in entries("algo").items() if e.meta.get("dropout_keys"))
            raise UserError(f"learner.dropout={cfg.learner.dropout}: algo={cfg.algo.name} does not pass dropout keys "
                            f"to its learner; use learner.dropout=0 or one of: {', '.join(able)}")


def initial_state(cfg, family: TaskFamily, init_from: bool = False):
    """(train algo, optimizer, the train state a run of `cfg` starts from): also the restore target
    that a run's checkpoints are read into (resume, mode=eval).

    init_from: take the learner from `init.from`'s best checkpoint (metarun.init_from). Off by default:
    a restore target only needs the shapes, and evaluating or resuming a run must not need its source
    run on disk; the trainer turns it on for a fresh run.
    """
    algo = make_algo(cfg, family, "train")
    if init_from and init_dir(cfg):
        check_source(cfg)  # refuse another learner's run before paying for an init
    regularize = cfg.get("regularize")
    optimizer = make_optimizer(cfg.meta_opt, cfg.train.steps,
                               weight_decay=regularize.get("weight_decay", 0.0) if regularize is not None else 0.0)
    state: TrainState = init_state(algo, optimizer, family.sampler("train"), family.data["train"], cfg.seed)
    if init_from and init_dir(cfg):
        params, algo_state, _ = apply_init_from(cfg, state.params, state.algo_state)
        state = state._replace(params=params, opt_state=optimizer.init(params), algo_state=algo_state)
    return algo, optimizer, state
