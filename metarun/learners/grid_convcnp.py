"""On-the-grid ConvCNP for images (Gordon et al. 2020, sec. 4): the context as a masked image plus a density
channel, a positive SetConv-like convolution that normalises the signal by the density, a CNN, and a Gaussian
per pixel read out at the target pixels. `algo=convcnp` builds it when the family's inputs are pixel coordinates
(family.input_dim == 2, family.image_size); the 1D ConvCNP is metarun/learners/neural_process.ConvCNP.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from metarun.learners import im2col
from metarun.learners.neural_process import MLP, clean_context, gaussian_head


def pixel_index(x, image_size: int):
    """Flat row-major pixel index [n] of coordinates x [n, 2] = (row, column) each scaled to [-1, 1]."""
    rc = jnp.clip(jnp.round((x + 1.0) * 0.5 * (image_size - 1)), 0, image_size - 1).astype(jnp.int32)
    return rc[:, 0] * image_size + rc[:, 1]


class GridConvCNP(nn.Module):
    """__call__(x_ctx [n, 2], y_ctx [n, dy], ctx_mask [n], x_tgt [m, 2], tgt_mask=None) -> Normal [m, dy].

    x are pixel coordinates on the image_size x image_size grid scaled to [-1, 1] (metarun.data.omniglot_completion).
    Context pixels are scattered (added) onto the grid, so the order of the context and its padding (mask 0) cannot
    matter. The first convolution has positive weights (softplus) shared by the density and the data channels, and
    the data channel is divided by the convolved density (Gordon et al.'s normalised "SetConv" on the grid).
    """
    image_size: int = 28
    channels: int = 32
    num_layers: int = 4
    kernel_size: int = 5
    setconv_size: int = 9
    min_std: float = 0.01

    @nn.compact
    def __call__(self, x_ctx, y_ctx, ctx_mask, x_tgt, tgt_mask=None):
        del tgt_mask  # targets are read out independently
        if x_ctx.shape[-1] != 2 or x_tgt.shape[-1] != 2:
            raise ValueError(f"GridConvCNP reads pixel coordinates [n, 2], got {x_ctx.shape} and {x_tgt.shape}")
        x_ctx, y_ctx, mask = clean_context(x_ctx, y_ctx, ctx_mask)
        s, dy = self.image_size, y_ctx.shape[-1]
        where = pixel_index(x_ctx, s)
        density = jnp.zeros((s * s,), y_ctx.dtype).at[where].add(mask).reshape(s, s, 1)
        data = jnp.zeros((s * s, dy), y_ctx.dtype).at[where].add(y_ctx * mask[:, None]).reshape(s, s, dy)

        k = self.setconv_size
        kernel = nn.softplus(self.param("setconv", nn.initializers.normal(0.1), (k * k,)))  # positive, like RBF weights

        def smooth(z):  # the same positive kernel on every channel (depthwise)
            return jnp.einsum("hwkc,k->hwc", im2col.windows(z, (k, k)).reshape(s, s, k * k, z.shape[-1]), kernel)

        d = smooth(density)
        signal = smooth(data) / (d + 1e-6)
        # The density enters as the fraction of the window observed (<= 1), so that its scale does not grow with k.
        h = nn.Dense(self.channels, name="lift")(jnp.concatenate([d / (k * k), signal], -1))
        kk = self.kernel_size
        for i in range(self.num_layers):  # residual blocks keep the pixel-level detail of the normalised signal
            # A k x k "SAME" convolution as one Dense over im2col windows (metarun.learners.im2col: why not XLA's).
            window = im2col.windows(nn.relu(h), (kk, kk))
            h = h + nn.Dense(self.channels, name=f"conv{i}")(window)
        features = h.reshape(s * s, self.channels)[pixel_index(x_tgt, s)]
        features = nn.relu(MLP([self.channels, self.channels], name="readout")(nn.relu(features)))
        return gaussian_head(features, dy, self.min_std)
