"""The meta-algorithm interface (optax's shape: pure functions plus a state pytree) and its default meta-step.

An algorithm is built once per phase ("train" or "eval") from its own config section and its
collaborators (`Collaborators`): the task family, and a factory for its learner. See docs/design.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, NamedTuple, Optional

import jax

# metrics key under which `loss` may return per-task updates of algo_state (e.g. running BatchNorm
# statistics); the default meta-step averages them over the meta-batch and merges them into the state.
STATE_UPDATES = "_state"


class MetaAlgorithm(NamedTuple):
    """A meta-learning algorithm as pure functions; the trainer never looks inside.

    init:      (key, example_task) -> (meta_params, algo_state). algo_state is any pytree that is
               not trained by the outer optimiser but travels with the run (checkpointed, restored
               for evaluation): Reptile's inner Adam moments, running BatchNorm statistics, ...
    adapt:     (meta_params, algo_state, support, key) -> task_state  (adapted weights, prototypes, ...)
    loss:      (meta_params, algo_state, task_state, query, key) -> (loss, metrics)
    meta_step: (meta_params, algo_state, tasks, key, map_tasks) -> (grads, algo_state, metrics) over a
               whole meta-batch (`tasks` has a leading task axis; `map_tasks(fn, tasks, keys)` maps a
               per-task function in the run's batching mode). None: `default_meta_step`.
    at_step:   (meta_step) -> MetaAlgorithm for that training step (a traced int32), for schedules
               inside the algorithm (MAML++'s annealing); None: the same at every step.
    info:      the configuration actually run (results.json's `algo_config`).
    """
    init: Callable
    adapt: Callable
    loss: Callable
    meta_step: Optional[Callable] = None
    at_step: Optional[Callable] = None
    info: Dict[str, Any] = {}


def task_loss(algo: MetaAlgorithm, params, algo_state, task, key):
    adapt_key, loss_key = jax.random.split(key)
    task_state = algo.adapt(params, algo_state, task.support, adapt_key)
    return algo.loss(params, algo_state, task_state, task.query, loss_key)


def task_grad(algo: MetaAlgorithm, params, algo_state, task, key):
    """(grads, metrics) of loss∘adapt for one task with respect to the meta-parameters."""
    (_, metrics), grads = jax.value_and_grad(task_loss, argnums=1, has_aux=True)(algo, params, algo_state, task, key)
    return grads, metrics


def mean_over_tasks(tree):
    return jax.tree.map(lambda a: a.mean(0), tree)


def merge_state_updates(algo_state, metrics):
    """Pop `metrics[STATE_UPDATES]` (stacked per task), average it and merge it into algo_state."""
    if STATE_UPDATES not in metrics:
        return algo_state, metrics
    metrics = dict(metrics)
    updates = mean_over_tasks(metrics.pop(STATE_UPDATES))
    return {**algo_state, **updates}, metrics


def default_meta_step(algo: MetaAlgorithm, params, algo_state, tasks, key, map_tasks):
    """Mean meta-gradient of loss∘adapt over the tasks; algo_state changes only through STATE_UPDATES."""
    keys = jax.random.split(key, jax.tree.leaves(tasks)[0].shape[0])
    grads, metrics = map_tasks(lambda t, k: task_grad(algo, params, algo_state, t, k), tasks, keys)
    algo_state, metrics = merge_state_updates(algo_state, metrics)
    return mean_over_tasks(grads), algo_state, mean_over_tasks(metrics)


def meta_step(algo: MetaAlgorithm, params, algo_state, tasks, key, map_tasks):
    """The algorithm's own meta-step, or the default one."""
    if algo.meta_step is not None:
        return algo.meta_step(params, algo_state, tasks, key, map_tasks)
    return default_meta_step(algo, params, algo_state, tasks, key, map_tasks)


@dataclass(frozen=True)
class Collaborators:
    """What an algorithm's builder receives besides its own config section.

    family:       the task family (its objective, its head size per phase, its kind).
    learner:      `learner(out_dim, **overrides) -> flax Module` from the `learner` config section
                  (out_dim None: an embedding network without a head).
    learner_cfg:  the `learner` config section itself (for algorithms that build their own modules).
    phase:        "train" or "eval": the eval build runs learners in eval mode and uses test-time
                  settings (inner steps, ways).
    transductive: eval only: score the query set as one batch (False: each query example with the
                  support set as its only batch context; see metarun.learners.Net).
    inner_steps:  eval only: test-time inner steps overriding the algorithm's own (the evaluator's
                  extra step counts, eval.report_steps); None: the config's.
    """
    family: Any
    learner: Callable
    learner_cfg: Any
    phase: str
    transductive: bool = True
    inner_steps: Optional[int] = None

    @property
    def train(self) -> bool:
        return self.phase == "train"

    @property
    def records_regression(self) -> bool:
        """Whether a regression algorithm's eval build should keep its predictions for the
        predictions plot (eval builds on regression families only: training never pays for it)."""
        return not self.train and self.family.kind == "regression"

    def inner_steps_for(self, algo_cfg) -> int:
        """The inner steps of this build: the evaluator's override, else the config's training or
        test-time count (`algo.inner_steps` / `algo.eval_inner_steps`)."""
        if self.inner_steps is not None:
            return self.inner_steps
        return algo_cfg.inner_steps if self.train else algo_cfg.eval_inner_steps
