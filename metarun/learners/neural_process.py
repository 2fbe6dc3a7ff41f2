"""Neural Process family as flax.linen modules: CNP, latent NP, attentive NP, attentive CNP and ConvCNP (1D), with
context masks."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import distrax
import flax.linen as nn
import jax
import jax.numpy as jnp

from metarun.learners import im2col

# Name of the flax RNG stream the latent models draw z from: apply(..., rngs={LATENT_RNG: key}).
LATENT_RNG = "latent"


class Normal(NamedTuple):
    """Independent Gaussians, elementwise (loc and scale of one shape). A NamedTuple, so a pytree that jit, vmap
    and scan pass through; the densities and KLs are distrax.Normal's."""
    loc: jax.Array
    scale: jax.Array

    def as_distrax(self) -> distrax.Normal:
        return distrax.Normal(self.loc, self.scale)

    def log_prob(self, x):
        return self.as_distrax().log_prob(x)

    def kl_divergence(self, other: "Normal"):
        """Elementwise KL(self || other)."""
        return self.as_distrax().kl_divergence(other.as_distrax())


class LatentOutput(NamedTuple):
    """What a latent model returns: enough to form an ELBO, an ML or an importance-weighted objective.

    predictive: p(y_t | z_s, context) for each sample, loc/scale [S, m, dy].
    prior:      q(z | context), loc/scale [dz] (the conditional prior).
    posterior:  q(z | context and targets), [dz], when y_tgt was given; else None.
    z:          the samples [S, dz]: from the posterior when there is one (ELBO, importance
                weighting), else from the prior (prediction, ML objective).
    """
    predictive: Normal
    prior: Normal
    posterior: Optional[Normal]
    z: jax.Array


class MLP(nn.Module):
    """ReLU MLP applied on the last axis; no activation after the last layer."""
    widths: Sequence[int]

    @nn.compact
    def __call__(self, h):
        for i, width in enumerate(self.widths):
            h = nn.Dense(width, name=f"dense{i}")(h)
            if i < len(self.widths) - 1:
                h = nn.relu(h)
        return h


def clean_context(x_ctx, y_ctx, ctx_mask):
    """Zero the padding (even NaN or inf junk), so that nothing downstream can pick it up."""
    keep = ctx_mask[:, None] > 0
    return jnp.where(keep, x_ctx, 0.0), jnp.where(keep, y_ctx, 0.0), (ctx_mask > 0).astype(x_ctx.dtype)


def masked_mean(h, mask):
    """Mean over the rows of h [n, f] where mask [n] is 1; zeros when there are none (an empty context)."""
    return jnp.sum(h * mask[:, None], 0) / jnp.maximum(jnp.sum(mask), 1.0)


def gaussian_head(h, y_dim: int, min_std: float, name: str = "head") -> Normal:
    """Dense to (loc, raw) per output; scale = min_std + softplus(raw) keeps it positive and away from 0."""
    out = nn.Dense(2 * y_dim, name=name)(h)
    return Normal(out[..., :y_dim], min_std + nn.softplus(out[..., y_dim:]))


class CNP(nn.Module):
    """Conditional Neural Process (Garnelo et al. 2018a): mean of encoded (x, y) pairs, then an MLP decoder.

    __call__(x_ctx [n, dx], y_ctx [n, dy], ctx_mask [n], x_tgt [m, dx], tgt_mask=None) -> Normal [m, dy].
    tgt_mask is accepted for a uniform signature: targets are decoded independently, so it has no use.
    """
    hidden: int = 128
    encoder_layers: int = 3
    decoder_layers: int = 3
    min_std: float = 0.01

    @nn.compact
    def __call__(self, x_ctx, y_ctx, ctx_mask, x_tgt, tgt_mask=None):
        del tgt_mask
        x_ctx, y_ctx, mask = clean_context(x_ctx, y_ctx, ctx_mask)
        r_i = MLP([self.hidden] * self.encoder_layers, name="encoder")(jnp.concatenate([x_ctx, y_ctx], -1))
        r = masked_mean(r_i, mask)
        h = jnp.concatenate([jnp.broadcast_to(r, (x_tgt.shape[0], r.shape[-1])), x_tgt], -1)
        h = nn.relu(MLP([self.hidden] * (self.decoder_layers - 1), name="decoder")(h))
        return gaussian_head(h, y_ctx.shape[-1], self.min_std)


class SelfAttention(nn.Module):
    """Transformer encoder blocks (multi-head self-attention + MLP, residuals, LayerNorm) over a masked set."""
    hidden: int
    num_heads: int
    layers: int

    @nn.compact
    def __call__(self, h, mask):
        h = nn.Dense(self.hidden, name="embed")(h)
        # Every row attends only to real points; padding rows compute junk that is masked out later.
        attend = jnp.broadcast_to(mask[None, None, :] > 0, (1, h.shape[0], h.shape[0]))
        for i in range(self.layers):
            a = nn.MultiHeadDotProductAttention(self.num_heads, qkv_features=self.hidden, name=f"attention{i}")(
                h, h, mask=attend)
            h = nn.LayerNorm(name=f"norm{i}a")(h + a)
            h = nn.LayerNorm(name=f"norm{i}b")(h + MLP([self.hidden, self.hidden], name=f"mlp{i}")(h))
        return h


class LatentEncoder(nn.Module):
    """(x, y) set -> q(z | set) = N(loc, 0.1 + 0.9 sigmoid(raw)) (Kim et al. 2019's bounded scale)."""
    hidden: int
    latent_dim: int
    layers: int
    attention: bool
    num_heads: int
    attention_layers: int

    @nn.compact
    def __call__(self, xy, mask):
        if self.attention:
            s_i = SelfAttention(self.hidden, self.num_heads, self.attention_layers, name="self_attention")(xy, mask)
        else:
            s_i = MLP([self.hidden] * self.layers, name="mlp")(xy)
        s = nn.relu(nn.Dense(self.hidden, name="pool")(masked_mean(s_i, mask)))
        out = nn.Dense(2 * self.latent_dim, name="head")(s)
        return Normal(out[: self.latent_dim], 0.1 + 0.9 * nn.sigmoid(out[self.latent_dim:]))


class LatentNP(nn.Module):
    """Neural Process (Garnelo et al. 2018b) with a deterministic path beside the latent one, as in Kim et al. 2019.

    __call__(x_ctx [n, dx], y_ctx [n, dy], ctx_mask [n], x_tgt [m, dx], tgt_mask=None, y_tgt=None,
             num_samples=1) -> LatentOutput. With y_tgt ([m, dy]; padding per tgt_mask), z is drawn from
    the posterior q(z | context and targets) for an ELBO; without, from the prior q(z | context). Draws
    use the flax RNG stream LATENT_RNG. `attention=True` gives the ANP (subclass below).
    """
    hidden: int = 128
    latent_dim: int = 128
    encoder_layers: int = 3
    decoder_layers: int = 3
    deterministic_path: bool = True
    min_std: float = 0.01
    attention: bool = False
    num_heads: int = 8
    attention_layers: int = 2

    def deterministic_representation(self, x_ctx, y_ctx, mask, x_tgt):
        """The deterministic representation per target, [m, hidden]."""
        xy = jnp.concatenate([x_ctx, y_ctx], -1)
        if not self.attention:
            r = masked_mean(MLP([self.hidden] * self.encoder_layers, name="deterministic_encoder")(xy), mask)
            return jnp.broadcast_to(r, (x_tgt.shape[0], self.hidden))
        r_i = SelfAttention(self.hidden, self.num_heads, self.attention_layers, name="deterministic_encoder")(xy, mask)
        # Cross-attention (Kim et al. 2019): queries and keys are the same MLP of the inputs, values the r_i.
        embed_x = MLP([self.hidden, self.hidden], name="input_embedding")
        attend = jnp.broadcast_to(mask[None, None, :] > 0, (1, x_tgt.shape[0], x_ctx.shape[0]))
        r = nn.MultiHeadDotProductAttention(self.num_heads, qkv_features=self.hidden, out_features=self.hidden,
                                            name="cross_attention")(embed_x(x_tgt), embed_x(x_ctx), r_i, mask=attend)
        # With no context every key is masked and attention would average the padding: use 0 instead.
        return r * (jnp.sum(mask) > 0)

    @nn.compact
    def __call__(self, x_ctx, y_ctx, ctx_mask, x_tgt, tgt_mask=None, y_tgt=None, num_samples: int = 1):
        x_ctx, y_ctx, mask = clean_context(x_ctx, y_ctx, ctx_mask)
        latent = LatentEncoder(self.hidden, self.latent_dim, self.encoder_layers, self.attention, self.num_heads,
                               self.attention_layers, name="latent_encoder")
        prior = latent(jnp.concatenate([x_ctx, y_ctx], -1), mask)
        posterior = None
        q = prior
        if y_tgt is not None:
            t_mask = jnp.ones(x_tgt.shape[:1], x_tgt.dtype) if tgt_mask is None else tgt_mask
            x_t, y_t, t_mask = clean_context(x_tgt, y_tgt, t_mask)
            posterior = latent(jnp.concatenate([jnp.concatenate([x_ctx, y_ctx], -1),
                                                jnp.concatenate([x_t, y_t], -1)]), jnp.concatenate([mask, t_mask]))
            q = posterior
        eps = jax.random.normal(self.make_rng(LATENT_RNG), (num_samples, self.latent_dim), x_tgt.dtype)
        z = q.loc + q.scale * eps

        m = x_tgt.shape[0]
        parts = [jnp.broadcast_to(z[:, None, :], (num_samples, m, self.latent_dim)),
                 jnp.broadcast_to(x_tgt, (num_samples,) + x_tgt.shape)]
        if self.deterministic_path:
            r = self.deterministic_representation(x_ctx, y_ctx, mask, x_tgt)
            parts.insert(0, jnp.broadcast_to(r, (num_samples,) + r.shape))
        h = nn.relu(MLP([self.hidden] * (self.decoder_layers - 1), name="decoder")(jnp.concatenate(parts, -1)))
        return LatentOutput(gaussian_head(h, y_ctx.shape[-1], self.min_std), prior, posterior, z)


class ANP(LatentNP):
    """Attentive Neural Process (Kim et al. 2019): self-attention in both encoders, multi-head
    cross-attention from the targets to the context on the deterministic path. Same call as LatentNP."""
    attention: bool = True


class AttentiveCNP(nn.Module):
    """Attentive CNP (Kim et al. 2019's deterministic path alone; Bruinsma 2022's "ACNP"): self-attention over
    the context pairs, multi-head cross-attention from the targets, an MLP decoder to a Gaussian per target.
    No latent variable: the same call and output as CNP. The representation is ANP's own code (same
    parameter names), so an ACNP is an ANP without its latent path."""
    hidden: int = 128
    decoder_layers: int = 3
    min_std: float = 0.01
    num_heads: int = 8
    attention_layers: int = 2
    attention = True  # read by LatentNP.deterministic_representation (a class constant, not a field)

    deterministic_representation = LatentNP.deterministic_representation

    @nn.compact
    def __call__(self, x_ctx, y_ctx, ctx_mask, x_tgt, tgt_mask=None):
        del tgt_mask
        x_ctx, y_ctx, mask = clean_context(x_ctx, y_ctx, ctx_mask)
        r = self.deterministic_representation(x_ctx, y_ctx, mask, x_tgt)
        h = nn.relu(MLP([self.hidden] * (self.decoder_layers - 1), name="decoder")(jnp.concatenate([r, x_tgt], -1)))
        return gaussian_head(h, y_ctx.shape[-1], self.min_std)


def _rbf_weights(a, b, lengthscale):
    """exp(-(a_i - b_j)^2 / (2 l^2)) [len(a), len(b)] for 1D points a [p], b [q]."""
    return jnp.exp(-0.5 * jnp.square((a[:, None] - b[None, :]) / lengthscale))


def conv1d_same(h, kernel):
    """XLA's "SAME" 1D convolution (cross-correlation, flax nn.Conv's) of h [G, C_in] with kernel [k, C_in, C_out],
    as k shifted copies and one matmul (im2col): XLA's CPU convolutions run ~60x slower inside a lax.scan (the
    trainer's loop over steps) than outside (jax 0.10.2); matmuls do not. Padding as XLA's for any k: (k-1)//2
    zeros before, k//2 after."""
    return im2col.conv(h, kernel)


class Conv1DSame(nn.Module):
    """nn.Conv(features, (kernel_size,), padding="SAME") on [G, C] with the same parameters (names, shapes,
    initialisers), computed by conv1d_same."""
    features: int
    kernel_size: int

    @nn.compact
    def __call__(self, h):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (self.kernel_size, h.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        return conv1d_same(h, kernel) + bias


class ConvCNP(nn.Module):
    """Convolutional CNP for 1D inputs (Gordon et al. 2020).

    A SetConv puts the context on a uniform grid (a density channel and the density-normalised data
    channel, with a learned lengthscale), a CNN maps the grid to features, and a second SetConv reads them
    out at the targets, followed by a pointwise Gaussian head. Shapes are fixed for jit: the grid has
    `grid_size` points at spacing 1 / points_per_unit, centred on the data (the real context and targets)
    and snapped to the spacing, so that shifting all inputs by a grid multiple shifts the grid with them.

    __call__(x_ctx [n, 1], y_ctx [n, dy], ctx_mask [n], x_tgt [m, 1], tgt_mask=None) -> Normal [m, dy];
    tgt_mask keeps padded targets out of the grid placement.
    """
    points_per_unit: int = 32
    grid_size: int = 320
    channels: int = 32
    num_layers: int = 4
    kernel_size: int = 15
    min_std: float = 0.01

    def grid(self, x_ctx, mask, x_tgt, tgt_mask):
        """The grid points [grid_size]."""
        t_keep = jnp.ones(x_tgt.shape[:1], bool) if tgt_mask is None else tgt_mask > 0
        x = jnp.concatenate([x_ctx[:, 0], x_tgt[:, 0]])
        keep = jnp.concatenate([mask > 0, t_keep])
        lo, hi = jnp.min(jnp.where(keep, x, jnp.inf)), jnp.max(jnp.where(keep, x, -jnp.inf))
        centre = jnp.round(0.5 * (lo + hi) * self.points_per_unit)
        return (centre + jnp.arange(self.grid_size) - self.grid_size // 2) / self.points_per_unit

    @nn.compact
    def __call__(self, x_ctx, y_ctx, ctx_mask, x_tgt, tgt_mask=None):
        if x_ctx.shape[-1] != 1 or x_tgt.shape[-1] != 1:
            raise ValueError(f"ConvCNP is 1D: inputs must be [n, 1], got {x_ctx.shape} and {x_tgt.shape}")
        x_ctx, y_ctx, mask = clean_context(x_ctx, y_ctx, ctx_mask)
        grid = self.grid(x_ctx, mask, x_tgt, tgt_mask)
        init_ls = nn.initializers.constant(math.log(2.0 / self.points_per_unit))
        encoder_ls = jnp.exp(self.param("encoder_log_lengthscale", init_ls, ()))
        decoder_ls = jnp.exp(self.param("decoder_log_lengthscale", init_ls, ()))

        w = _rbf_weights(grid, x_ctx[:, 0], encoder_ls) * mask[None, :]  # [G, n]
        density = jnp.sum(w, -1, keepdims=True)
        signal = (w @ y_ctx) / (density + 1e-8)  # normalised: a local average of y, unaffected by the point count
        h = nn.Dense(self.channels, name="lift")(jnp.concatenate([density, signal], -1))
        for i in range(self.num_layers):
            h = nn.relu(h)
            h = Conv1DSame(self.channels, self.kernel_size, name=f"conv{i}")(h)
        features = _rbf_weights(x_tgt[:, 0], grid, decoder_ls) @ h  # [m, channels]
        return gaussian_head(features, y_ctx.shape[-1], self.min_std)
