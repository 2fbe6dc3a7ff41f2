"""Relation Network modules (Sung et al. 2018): a feature-map embedding and the relation module."""
from __future__ import annotations

import flax.linen as nn
import jax

from metarun.learners.batchnorm import BatchNorm
from metarun.learners.conv4 import Conv3x3, max_pool_2x2


class _Block(nn.Module):
    """3x3 conv (unpadded when `valid`), optional transductive BatchNorm, ReLU, optional 2x2 max-pool."""
    filters: int
    batch_norm: str
    conv_impl: str
    valid: bool
    pool: bool
    train: bool = False

    @nn.compact
    def __call__(self, x):
        x = Conv3x3(self.filters, self.conv_impl, name="conv")(x)
        if self.valid:
            x = x[:, 1:-1, 1:-1, :]          # a 'SAME' 3x3 conv cropped by one pixel is the 'VALID' conv
        if self.batch_norm != "none":
            x = BatchNorm(self.batch_norm, name="norm")(x, self.train)
        x = nn.relu(x)
        if self.pool and min(x.shape[1:3]) >= 2:
            x = max_pool_2x2(x)
        return x


class RelationEmbedding(nn.Module):
    """The paper's embedding: 4 conv blocks, pooling after the first two only; feature maps out.

    As the reference code: the first two convs are unpadded, the last two padded, so 28x28
    Omniglot gives [n, 5, 5, filters] (84x84 gives 19x19). BatchNorm is transductive: batch
    statistics of whatever batch is seen (support or query), no running statistics.
    """
    filters: int = 64
    batch_norm: str = "transductive"
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, step=0) -> jax.Array:
        for i in range(4):
            x = _Block(self.filters, self.batch_norm, self.conv_impl, valid=i < 2, pool=i < 2, train=train,
                       name=f"block{i}")(x)
        return x


class RelationModule(nn.Module):
    """g_phi: 2 x [3x3 conv (padded), BatchNorm, ReLU, 2x2 max-pool], FC `hidden` ReLU, FC 1 sigmoid.

    Input: concatenated (class, query) feature-map pairs [n, h, w, 2C]; output: scores [n] in (0, 1).
    A pool is skipped when the map is already 1x1 (small test images).
    """
    filters: int = 64
    hidden: int = 8
    batch_norm: str = "transductive"
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, pairs: jax.Array, train: bool = False, step=0) -> jax.Array:
        x = pairs
        for i in range(2):
            x = _Block(self.filters, self.batch_norm, self.conv_impl, valid=False, pool=True, train=train,
                       name=f"block{i}")(x)
        x = nn.relu(nn.Dense(self.hidden, name="fc1")(x.reshape(x.shape[0], -1)))
        return nn.sigmoid(nn.Dense(1, name="fc2")(x))[:, 0]
