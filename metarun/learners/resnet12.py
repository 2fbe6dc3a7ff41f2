"""ResNet-12 of few-shot learning (Oreshkin et al. 2018; Lee et al. 2019): 4 residual blocks, 64-160-320-640, DropBlock."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from metarun.learners.conv4 import conv3x3_im2col, conv3x3_xla, max_pool_2x2

LEAK = 0.1
# Kaiming normal, fan_out, gain sqrt(2): torch's kaiming_normal_(mode="fan_out", nonlinearity="leaky_relu")
# as in the reference implementations (its default slope 0 gives the ReLU gain).
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def block_mask(seeds: jax.Array, block_size: int) -> jax.Array:
    """1 where a block_size x block_size block anchored (top-left) at a seed covers, else 0.

    Args:
      seeds: {0,1} [n, H - b + 1, W - b + 1, C]: block corners, each block then lies inside the map.
      block_size: b.

    Returns:
      float [n, H, W, C].
    """
    b = block_size
    padded = jnp.pad(seeds.astype(jnp.float32), ((0, 0), (b - 1, b - 1), (b - 1, b - 1), (0, 0)))
    # out[r] = max(seeds[r - b + 1 .. r]): the seeds whose block reaches row r (likewise columns).
    return jax.lax.reduce_window(padded, 0.0, jax.lax.max, (1, b, b, 1), (1, 1, 1, 1), "VALID")


def drop_block(key: jax.Array, x: jax.Array, drop_rate: float, block_size: int) -> jax.Array:
    """DropBlock (Ghiasi et al. 2018) on x [n, H, W, C]: zero random blocks, rescale to keep the sum.

    Every channel of every example gets its own mask. Seeds fall with probability
    gamma = drop_rate / b^2 * H W / ((H - b + 1)(W - b + 1)) on the positions where a whole block
    fits, so about drop_rate of the units are dropped (fewer where blocks overlap). The block side b
    is clipped to the map size (e.g. the 2x2 last map of a 32x32 input).

    Args:
      key: PRNG key; the same key gives the same mask.
      x: feature maps [n, H, W, C].
      drop_rate: 1 - keep_prob of the paper.
      block_size: b.

    Returns:
      x * mask * (mask.size / mask.sum()), the shape of x.
    """
    n, h, w, c = x.shape
    b = max(1, min(block_size, h, w))
    gamma = min(1.0, drop_rate / b**2 * (h * w) / ((h - b + 1) * (w - b + 1)))
    seeds = jax.random.bernoulli(key, gamma, (n, h - b + 1, w - b + 1, c))
    keep = 1.0 - block_mask(seeds, b)
    return x * keep.astype(x.dtype) * (keep.size / jnp.maximum(keep.sum(), 1.0)).astype(x.dtype)


class Conv(nn.Module):
    """A bias-free k x k 'SAME' convolution, k in {1, 3} (BatchNorm follows, so a bias would be redundant)."""
    features: int
    size: int = 3
    impl: str = "xla"
    kernel_init: Callable = _conv_init   # learner.init (resnet12_learner); the reference implementations' by default

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (self.size, self.size, x.shape[-1], self.features))
        if self.size == 1:
            return x @ kernel[0, 0]
        return (conv3x3_im2col if self.impl == "im2col" else conv3x3_xla)(x, kernel)


class ResBlock(nn.Module):
    """3 x [3x3 conv, BN, leaky ReLU] with a 1x1 conv + BN shortcut added before the last leaky ReLU, then 2x2 max-pool."""
    features: int
    momentum: float = 0.9
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x, train: bool):
        norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=self.momentum,  # noqa: E731
                                         epsilon=1e-5, name=name)
        shortcut = norm("norm_shortcut")(Conv(self.features, 1, name="conv_shortcut")(x))
        h = x
        for j in range(3):
            h = norm(f"norm{j}")(Conv(self.features, 3, self.conv_impl, name=f"conv{j}")(h))
            if j < 2:
                h = nn.leaky_relu(h, LEAK)
        return max_pool_2x2(nn.leaky_relu(h + shortcut, LEAK))


class ResNet12(nn.Module):
    """Returns logits when out_dim is set, else the globally average-pooled embedding (640-d at full width).

    Call as `apply(variables, x, train=bool, rngs={"dropout": key})`. BatchNorm keeps running statistics
    in the `batch_stats` collection: train=True normalises with batch statistics and updates them (pass
    mutable=["batch_stats"]), train=False uses them. With drop_rate > 0 and train=True, blocks from
    `drop_block_from` on apply DropBlock after pooling and earlier blocks plain dropout at the same rate,
    as in Lee et al.'s (MetaOptNet) and Tian et al.'s (RFS) code; both draw from the 'dropout' rng and
    are the identity when train=False. Unlike that code the rate is fixed (no linear ramp-up of keep_prob).
    """
    out_dim: Optional[int] = None
    widths: Sequence[int] = (64, 160, 320, 640)
    drop_rate: float = 0.0
    block_size: int = 5          # Lee et al. use 5 for miniImageNet/tieredImageNet, 2 for CIFAR-FS/FC100
    drop_block_from: int = 2     # index of the first block using DropBlock (the last two by default)
    momentum: float = 0.9        # flax convention: new = momentum * old + (1 - momentum) * batch (torch's 0.1)
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, width in enumerate(self.widths):
            x = ResBlock(width, self.momentum, self.conv_impl, name=f"block{i}")(x, train)
            if train and self.drop_rate > 0:
                if i >= self.drop_block_from:
                    x = drop_block(self.make_rng("dropout"), x, self.drop_rate, self.block_size)
                else:
                    x = nn.Dropout(self.drop_rate, deterministic=False)(x)
        x = x.mean(axis=(1, 2))
        if self.out_dim is not None:
            x = nn.Dense(self.out_dim, name="head")(x)
        return x
