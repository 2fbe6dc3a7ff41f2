"""The meta-algorithm interface (optax's shape: a bundle of pure functions) and the task objectives."""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax.numpy as jnp
import optax


class MetaAlgorithm(NamedTuple):
    """A meta-learning algorithm as pure functions; the trainer never looks inside.

    init:      (key, example_task) -> meta_params
    adapt:     (meta_params, support, key) -> task_state   (adapted weights, prototypes, ...)
    loss:      (meta_params, task_state, query, key) -> (loss, metrics)
    meta_grad: (meta_params, task, key) -> (grads, metrics) for one task; None means
               the gradient of loss(adapt(...)) with respect to meta_params.
    at_step:   (meta_step) -> MetaAlgorithm for that training step (a traced int32), for
               schedules inside the algorithm (MAML++'s annealing); None: the same at every step.
    """
    init: Callable
    adapt: Callable
    loss: Callable
    meta_grad: Optional[Callable] = None
    at_step: Optional[Callable] = None


def classification_objective(logits, labels):
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = (jnp.argmax(logits, -1) == labels).mean()
    return loss, {"loss": loss, "accuracy": accuracy}


def regression_objective(predictions, targets):
    mse = jnp.square(predictions - targets).mean()
    return mse, {"loss": mse, "mse": mse}


OBJECTIVES = {"classification": classification_objective, "regression": regression_objective}
# The metric that results.json reports, per task kind.
PRIMARY_METRIC = {"classification": "accuracy", "regression": "mse"}
