"""Flax learners, registered by name (each module's `@register("learner", ...)`), and `Net`: a learner in a mode."""
from __future__ import annotations

from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from metarun.registry import lookup


def build_learner(cfg, out_dim: Optional[int], **overrides) -> nn.Module:
    """The Flax module named by `learner.name`; out_dim=None gives an embedding network."""
    return lookup("learner", cfg.name, "learner").build(cfg, out_dim, **overrides)


def dropout_rngs(key) -> Optional[dict]:
    """The rngs of a training pass with dropout (`learner.dropout`): {"dropout": key}; None without a key."""
    return None if key is None else {"dropout": key}


class Net(NamedTuple):
    """A learner module in a mode: every algorithm calls its network through this.

    train:        training forward passes (batch statistics; dropout when a learner has it).
    transductive: evaluation only: False scores each query example with the support set as its
                  only batch context, so queries cannot inform each other through BatchNorm.
    Every learner's `__call__(x, train, step)` takes the mode and the inner step (per-step BatchNorm).
    """
    module: nn.Module
    train: bool = True
    transductive: bool = True

    def init(self, key, x):
        """(params, batch_stats) — batch_stats is {} unless the learner keeps running statistics."""
        variables = self.module.init(key, x, train=False)
        return variables["params"], variables.get("batch_stats", {})

    def apply(self, params, x, stats=None, step=0, rngs=None):
        variables = {"params": params, **({"batch_stats": stats} if stats else {})}
        return self.module.apply(variables, x, train=self.train, step=step, rngs=rngs)

    def apply_updating(self, params, x, stats, step=0, rngs=None):
        """A training forward pass that also returns the updated running statistics ({} when none)."""
        if not stats:
            return self.apply(params, x, stats, step, rngs), {}
        out, mutated = self.module.apply({"params": params, "batch_stats": stats}, x, train=True, step=step,
                                         rngs=rngs, mutable=["batch_stats"])
        return out, mutated["batch_stats"]

    def apply_query(self, params, x, support_x, stats=None, step=0, rngs=None):
        """Outputs for the query set: one batch (transductive), or each example with the support set.
        `rngs` (e.g. {"dropout": key}) reach training passes; evaluation passes have no randomness."""
        if self.train or self.transductive:
            return self.apply(params, x, stats, step, rngs)
        one = lambda q: self.apply(params, jnp.concatenate([support_x, q[None]]), stats, step)[-1]  # noqa: E731
        return jax.vmap(one)(x)
