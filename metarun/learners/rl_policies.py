"""Policies as learners: `learner=gaussian_mlp`, `categorical_mlp` (MAML-RL) and `gru` (RL²).

Thin wrappers over metarun.rl.policies that follow the learner contract `__call__(x, train, step)`
(there is no mode-dependent layer, so `train` and `step` are ignored) and return action
distributions. Each registers which actions it produces (`actions=`), so the `rl` family can refuse
a discrete policy on a continuous environment in one line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from metarun.errors import UserError
from metarun.registry import register
from metarun.rl.policies import CategoricalMLPPolicy, GaussianMLPPolicy, GRUPolicy


class GaussianMLP(nn.Module):
    """obs [..., obs_size] -> DiagGaussian over action_size continuous actions."""
    action_size: Optional[int]
    hidden: Sequence[int] = (100, 100)
    init_log_std: float = 0.0

    @nn.compact
    def __call__(self, obs, train: bool = False, step=0):
        del train, step
        return GaussianMLPPolicy(self.action_size, tuple(self.hidden), self.init_log_std, name="policy")(obs)


class CategoricalMLP(nn.Module):
    """obs [..., obs_size] -> Categorical over action_size discrete actions."""
    action_size: Optional[int]
    hidden: Sequence[int] = (100, 100)

    @nn.compact
    def __call__(self, obs, train: bool = False, step=0):
        del train, step
        return CategoricalMLPPolicy(self.action_size, tuple(self.hidden), name="policy")(obs)


class RL2Inputs(NamedTuple):
    """One step's inputs of a recurrent policy, batched over trials: the hidden state and what the
    agent saw last (obs, its previous action, reward and whether that ended an episode)."""
    carry: Any
    obs: jax.Array
    prev_action: jax.Array
    prev_reward: jax.Array
    prev_done: jax.Array


class GRU(nn.Module):
    """RL2Inputs -> (new carry, distribution); the carry persists across the episodes of a trial."""
    action_size: Optional[int]
    discrete: bool = True
    hidden_size: int = 128
    init_log_std: float = 0.0

    @nn.compact
    def __call__(self, x: RL2Inputs, train: bool = False, step=0):
        del train, step
        return GRUPolicy(self.action_size, self.discrete, self.hidden_size, self.init_log_std, name="policy")(*x)

    def initial_carry(self, batch_shape=()) -> jax.Array:
        """Zero hidden state for a new trial."""
        return jnp.zeros((*batch_shape, self.hidden_size), jnp.float32)


@dataclass
class GaussianMLPConfig:
    name: str = "gaussian_mlp"
    hidden: List[int] = field(default_factory=lambda: [100, 100])  # Finn et al. 2017: 2 x 100 ReLU
    width_factor: float = 1.0   # multiplies every width (debug=smoke sets it for any learner)
    init_log_std: float = 0.0   # std 1 at the start, as pytorch-maml-rl


@dataclass
class CategoricalMLPConfig:
    name: str = "categorical_mlp"
    hidden: List[int] = field(default_factory=lambda: [100, 100])
    width_factor: float = 1.0


@dataclass
class GRUConfig:
    name: str = "gru"
    hidden_size: int = 128
    width_factor: float = 1.0
    init_log_std: float = 0.0   # continuous actions only


def _widths(cfg, widths) -> tuple:
    if any(w < 1 for w in widths) or not cfg.width_factor > 0:
        raise UserError(f"learner widths {list(widths)} must be >= 1 and learner.width_factor > 0")
    return tuple(max(1, round(w * cfg.width_factor)) for w in widths)


@register("learner", "gaussian_mlp", schema=GaussianMLPConfig, actions="continuous")
def build_gaussian(cfg, out_dim: Optional[int], **overrides) -> GaussianMLP:
    return GaussianMLP(**{"action_size": out_dim, "hidden": _widths(cfg, cfg.hidden),
                          "init_log_std": cfg.init_log_std, **overrides})


@register("learner", "categorical_mlp", schema=CategoricalMLPConfig, actions="discrete")
def build_categorical(cfg, out_dim: Optional[int], **overrides) -> CategoricalMLP:
    return CategoricalMLP(**{"action_size": out_dim, "hidden": _widths(cfg, cfg.hidden), **overrides})


@register("learner", "gru", schema=GRUConfig, actions="any")
def build_gru(cfg, out_dim: Optional[int], **overrides) -> GRU:
    """`discrete` comes from the algorithm (overrides), which knows the environment."""
    return GRU(**{"action_size": out_dim, "hidden_size": _widths(cfg, [cfg.hidden_size])[0],
                  "init_log_std": cfg.init_log_std, **overrides})
