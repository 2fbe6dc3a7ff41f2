"""Conv-4 (Vinyals et al. 2016): 4 x [3x3 conv, BatchNorm, ReLU, 2x2 max-pool] + optional linear head;
optional dropout after each block (`learner.dropout`) and the kernel initialisation (`learner.init`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from metarun.learners import im2col
from metarun.learners.batchnorm import BatchNorm, BatchNormMode
from metarun.learners.initializers import check_init, kernel_init
from metarun.registry import register


def conv3x3_im2col(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """'SAME' 3x3 convolution as nine shifted slices and one matmul (metarun.learners.im2col: why)."""
    return im2col.conv(x, kernel)


def conv3x3_xla(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool, stride 2, floor mode (as torch's MaxPool2d(2)): a reshape, not reduce_window."""
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2, :]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def resolve_conv_impl(conv_impl) -> str:
    """'auto' picks im2col matmuls on CPU (XLA's CPU convolution is slow) and XLA's conv elsewhere."""
    impl = getattr(conv_impl, "value", conv_impl)
    if impl == "auto":
        return "im2col" if jax.default_backend() == "cpu" else "xla"
    return impl


class Conv3x3(nn.Module):
    features: int
    impl: str = "xla"
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (3, 3, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        conv = conv3x3_im2col if self.impl == "im2col" else conv3x3_xla
        return conv(x, kernel) + bias


class Conv4(nn.Module):
    """Returns logits when out_dim is set, else the flattened embedding (metric learners, ANIL's body)."""
    out_dim: Optional[int] = None
    filters: int = 64
    blocks: int = 4
    batch_norm: str = "transductive"
    bn_steps: int = 1          # copies of running statistics (batch_norm=running; MAML++ keeps one per inner step)
    conv_impl: str = "xla"
    dropout: float = 0.0       # after each block, training passes only (needs the "dropout" rng: Net.apply's rngs)
    initializer: str = "default"  # learner.init (metarun.learners.initializers); not `init`: Module.init is a method

    @nn.compact
    def __call__(self, x, train: bool = False, step=0):
        init = kernel_init(self.initializer, nn.initializers.lecun_normal())
        for i in range(self.blocks):
            x = Conv3x3(self.filters, self.conv_impl, init, name=f"conv{i}")(x)
            if self.batch_norm != "none":
                x = BatchNorm(self.batch_norm, self.bn_steps, name=f"norm{i}")(x, train, step)
            x = max_pool_2x2(nn.relu(x))
            if self.dropout:
                x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = x.reshape(x.shape[0], -1)
        if self.out_dim is not None:
            x = nn.Dense(self.out_dim, kernel_init=init, name="head")(x)
        return x


class ConvImpl:
    """Names of the convolution implementations (config values)."""
    choices = ("auto", "xla", "im2col")


@dataclass
class Conv4Config:
    name: str = "conv4"
    filters: int = 64
    blocks: int = 4
    batch_norm: BatchNormMode = BatchNormMode.transductive
    bn_steps: int = 1
    conv_impl: str = "auto"
    width_factor: float = 1.0    # multiplies every layer's width (debug=smoke sets it for any learner)
    dropout: float = 0.0         # dropout rate after each block in training (algorithms that pass dropout keys)
    init: str = "default"        # default (LeCun normal) | lecun | xavier | kaiming | orthogonal


@register("learner", "conv4", schema=Conv4Config)
def build(cfg, out_dim: Optional[int], **overrides) -> Conv4:
    from metarun.errors import UserError
    filters = max(1, round(cfg.filters * cfg.width_factor))
    if cfg.filters < 1 or cfg.blocks < 1 or not cfg.width_factor > 0:
        raise UserError(f"learner.filters={cfg.filters}, learner.blocks={cfg.blocks} must be >= 1 and "
                        f"learner.width_factor={cfg.width_factor} > 0")
    if cfg.conv_impl not in ConvImpl.choices:
        raise UserError(f"learner.conv_impl={cfg.conv_impl} is unknown; expected one of: {', '.join(ConvImpl.choices)}")
    dropout = cfg.get("dropout", 0.0)  # .get: configs saved before dropout and init existed
    if not 0 <= dropout < 1:
        raise UserError(f"learner.dropout={dropout} must be in [0, 1)")
    kwargs = dict(out_dim=out_dim, filters=filters, blocks=cfg.blocks,
                  batch_norm=getattr(cfg.batch_norm, "value", cfg.batch_norm), bn_steps=cfg.bn_steps,
                  conv_impl=resolve_conv_impl(cfg.conv_impl), dropout=float(dropout),
                  initializer=check_init(cfg.get("init")))
    return Conv4(**{**kwargs, **overrides})


def min_image_size(blocks: int) -> int:
    """The smallest input side that survives `blocks` 2x2 pools (floor mode) with at least 1 pixel."""
    return 2 ** blocks
