"""BatchNorm with its mode said out loud: transductive batch statistics, or running statistics (per step)."""
from __future__ import annotations

import enum

import flax.linen as nn
import jax
import jax.numpy as jnp


class BatchNormMode(enum.Enum):
    transductive = "transductive"  # statistics of whatever batch is seen, train and eval (original MAML)
    running = "running"            # batch statistics in training, running averages at evaluation
    none = "none"                  # no normalisation layers


class BatchNorm(nn.Module):
    """Scale and bias are params; `running` mode keeps `steps` copies of running mean/var in `batch_stats`.

    In `running` mode a training forward pass normalises with the batch's statistics and, when the
    `batch_stats` collection is mutable, moves copy `step` towards them (momentum as in flax: new =
    momentum * old + (1 - momentum) * batch). An evaluation forward pass normalises with copy `step`:
    queries are then scored one by one, independent of each other (non-transductive). MAML++ keeps one
    copy per inner step (its BNRS); `steps` = 1 is ordinary running BatchNorm.
    """
    mode: str = "transductive"
    steps: int = 1
    momentum: float = 0.9
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x, train: bool = False, step=0):
        axes = tuple(range(x.ndim - 1))
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        if self.mode == "running":
            ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (self.steps, channels))
            ra_var = self.variable("batch_stats", "var", jnp.ones, (self.steps, channels))
            i = jnp.minimum(step, self.steps - 1)
            if train:
                mean = x.mean(axes)
                var = jnp.square(x - mean).mean(axes)
                if self.is_mutable_collection("batch_stats") and not self.is_initializing():
                    m = self.momentum
                    ra_mean.value = ra_mean.value.at[i].set(m * ra_mean.value[i] + (1 - m) * jax.lax.stop_gradient(mean))
                    ra_var.value = ra_var.value.at[i].set(m * ra_var.value[i] + (1 - m) * jax.lax.stop_gradient(var))
            else:
                mean, var = ra_mean.value[i], ra_var.value[i]
        else:
            mean = x.mean(axes)
            var = jnp.square(x - mean).mean(axes)
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
