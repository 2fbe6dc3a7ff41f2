"""Conv-4 (Vinyals et al. 2016): 4 x [3x3 conv, BatchNorm, ReLU, 2x2 max-pool] + optional linear head."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


def conv3x3_im2col(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """'SAME' 3x3 convolution as nine shifted slices and one matmul.

    XLA's CPU convolution is ~3x slower than a matmul of the same size, and under vmap with
    per-task weights it becomes a grouped convolution; as a matmul it becomes a batched matmul.
    """
    b, h, w, c = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate(
        [padded[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)], axis=-1)
    out = patches.reshape(b * h * w, 9 * c) @ kernel.reshape(9 * c, -1)
    return out.reshape(b, h, w, -1)


def conv3x3_xla(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool, stride 2, floor mode (as torch's MaxPool2d(2)): a reshape, not reduce_window."""
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2, :]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class Conv3x3(nn.Module):
    features: int
    impl: str = "xla"

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        conv = conv3x3_im2col if self.impl == "im2col" else conv3x3_xla
        return conv(x, kernel) + bias


class TransductiveBatchNorm(nn.Module):
    """BatchNorm over whatever batch is seen (support or query), with no running statistics."""
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        mean = x.mean(axis=(0, 1, 2))
        var = jnp.square(x - mean).mean(axis=(0, 1, 2))
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


class Conv4(nn.Module):
    """Returns logits when out_dim is set, else the flattened embedding (metric learners, ANIL's body)."""
    out_dim: Optional[int] = None
    filters: int = 64
    blocks: int = 4
    batch_norm: str = "transductive"
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x):
        for i in range(self.blocks):
            x = Conv3x3(self.filters, self.conv_impl, name=f"conv{i}")(x)
            if self.batch_norm == "transductive":
                x = TransductiveBatchNorm(name=f"norm{i}")(x)
            x = max_pool_2x2(nn.relu(x))
        x = x.reshape(x.shape[0], -1)
        if self.out_dim is not None:
            x = nn.Dense(self.out_dim, name="head")(x)
        return x
