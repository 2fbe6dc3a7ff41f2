"""Stochastic policies for meta-RL: Gaussian and categorical MLPs (MAML-RL) and a GRU policy (RL²)."""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# pytorch-maml-rl initialises its policies with Xavier-uniform weights and zero biases.
_KERNEL_INIT = nn.initializers.xavier_uniform()


class DiagGaussian(NamedTuple):
    """Diagonal Gaussian over actions [..., A]; a pytree, so it passes through jit/vmap/scan."""

    mean: jax.Array
    log_std: jax.Array

    def sample(self, key: jax.Array) -> jax.Array:
        """One action per leading index, shape of `mean` (unclipped; the env clips)."""
        return self.mean + jnp.exp(self.log_std) * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def log_prob(self, action: jax.Array) -> jax.Array:
        """log π(a), summed over the action dimensions: shape [...]."""
        z = (action - self.mean) * jnp.exp(-self.log_std)
        return jnp.sum(-0.5 * z**2 - self.log_std - 0.5 * math.log(2 * math.pi), axis=-1)

    def entropy(self) -> jax.Array:
        """Differential entropy, shape [...]."""
        return jnp.sum(self.log_std + 0.5 * math.log(2 * math.pi * math.e), axis=-1)


class Categorical(NamedTuple):
    """Categorical over `logits` [..., n_actions]; actions are int32 indices [...]."""

    logits: jax.Array

    def sample(self, key: jax.Array) -> jax.Array:
        """One int32 action per leading index."""
        return jax.random.categorical(key, self.logits).astype(jnp.int32)

    def log_prob(self, action: jax.Array) -> jax.Array:
        """log π(a), shape [...]."""
        logp = jax.nn.log_softmax(self.logits)
        return jnp.take_along_axis(logp, action[..., None].astype(jnp.int32), axis=-1)[..., 0]

    def entropy(self) -> jax.Array:
        """Entropy, shape [...]."""
        logp = jax.nn.log_softmax(self.logits)
        return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def _mlp(x: jax.Array, hidden_sizes: Sequence[int]) -> jax.Array:
    for i, width in enumerate(hidden_sizes):
        x = nn.relu(nn.Dense(width, kernel_init=_KERNEL_INIT, name=f"dense{i}")(x))
    return x


class GaussianMLPPolicy(nn.Module):
    """π(a|s) = N(MLP(s), diag(exp(log_std))²) with a state-independent learned log-std (Finn et al. 2017: 2x100 ReLU).

    Called on obs [..., obs_size]; returns a DiagGaussian with mean and log_std [..., action_size].
    """

    action_size: int
    hidden_sizes: Sequence[int] = (100, 100)
    init_log_std: float = 0.0  # std 1, as pytorch-maml-rl's init_std=1.0

    @nn.compact
    def __call__(self, obs: jax.Array) -> DiagGaussian:
        mean = nn.Dense(self.action_size, kernel_init=_KERNEL_INIT, name="mean")(_mlp(obs, self.hidden_sizes))
        log_std = self.param("log_std", nn.initializers.constant(self.init_log_std), (self.action_size,))
        return DiagGaussian(mean, jnp.broadcast_to(log_std, mean.shape))


class CategoricalMLPPolicy(nn.Module):
    """π(a|s) = softmax(MLP(s)) over `n_actions` discrete actions."""

    n_actions: int
    hidden_sizes: Sequence[int] = (100, 100)

    @nn.compact
    def __call__(self, obs: jax.Array) -> Categorical:
        return Categorical(nn.Dense(self.n_actions, kernel_init=_KERNEL_INIT, name="logits")(_mlp(obs, self.hidden_sizes)))


class GRUPolicy(nn.Module):
    """RL² policy (Duan et al. 2016): a GRU over (obs, previous action, previous reward, previous done).

    The hidden state is NOT reset when an episode ends: it persists across the episodes of one trial
    (one task), and `prev_done` tells the GRU that a new episode began. Reset it only between trials.

    Called as (carry [..., hidden_size], obs [..., obs_size], prev_action [...] int (discrete) or
    [..., action_size] float, prev_reward [...], prev_done [...]) -> (new carry, DiagGaussian | Categorical).
    """

    action_size: int  # number of actions when discrete
    discrete: bool
    hidden_size: int = 128
    init_log_std: float = 0.0

    def initial_carry(self, batch_shape: tuple[int, ...] = ()) -> jax.Array:
        """Zero hidden state for a new trial."""
        return jnp.zeros((*batch_shape, self.hidden_size), jnp.float32)

    @nn.compact
    def __call__(self, carry, obs, prev_action, prev_reward, prev_done):
        if self.discrete:
            prev_action = jax.nn.one_hot(prev_action, self.action_size)
        x = jnp.concatenate([obs, prev_action, prev_reward[..., None], prev_done[..., None].astype(obs.dtype)], -1)
        carry, h = nn.GRUCell(self.hidden_size, name="gru")(carry, x)
        if self.discrete:
            return carry, Categorical(nn.Dense(self.action_size, kernel_init=_KERNEL_INIT, name="logits")(h))
        mean = nn.Dense(self.action_size, kernel_init=_KERNEL_INIT, name="mean")(h)
        log_std = self.param("log_std", nn.initializers.constant(self.init_log_std), (self.action_size,))
        return carry, DiagGaussian(mean, jnp.broadcast_to(log_std, mean.shape))
