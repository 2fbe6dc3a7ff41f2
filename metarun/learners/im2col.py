"""Convolutions as shifted slices and one matmul (im2col), for every learner that convolves on CPU.

Why not XLA's convolution: on XLA CPU (jax 0.10.2) it is ~3x slower than a matmul of the same size, its
*gradients* take a ~60x slower path inside any loop body (the trainer's lax.scan over steps; jax-ml/jax#12868),
and under vmap with per-task weights it becomes a grouped convolution (a batched matmul here). Layouts follow
XLA / flax: input [..., *spatial, C_in], kernel [*k, C_in, C_out]; "SAME" pads (k - 1) // 2 before and k // 2
after each spatial axis, as XLA does for stride 1.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import jax
import jax.numpy as jnp


def windows(x: jax.Array, kernel_size: Sequence[int], stride: int = 1, padding: str = "SAME") -> jax.Array:
    """[..., *out_spatial, prod(kernel_size) * C]: every output position's neighbourhood in x [..., *spatial, C],
    tap-major then channel — the order of a kernel [*k, C_in, C_out] reshaped to [prod(k) * C_in, C_out]."""
    nd = len(kernel_size)
    lead, spatial = x.ndim - 1 - nd, x.shape[-1 - nd:-1]
    if padding == "SAME":
        if stride != 1:
            raise ValueError("im2col 'SAME' padding is defined here for stride 1 only")
        x = jnp.pad(x, [(0, 0)] * lead + [((k - 1) // 2, k // 2) for k in kernel_size] + [(0, 0)])
        out = spatial
    elif padding == "VALID":
        out = tuple((n - k) // stride + 1 for n, k in zip(spatial, kernel_size))
    else:
        raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")
    taps = [x[(Ellipsis,) + tuple(slice(o, o + stride * (n - 1) + 1, stride) for o, n in zip(offset, out))
              + (slice(None),)]
            for offset in itertools.product(*(range(k) for k in kernel_size))]
    return jnp.concatenate(taps, axis=-1)


def conv(x: jax.Array, kernel: jax.Array, stride: int = 1, padding: str = "SAME") -> jax.Array:
    """XLA's convolution (cross-correlation) of x [..., *spatial, C_in] with kernel [*k, C_in, C_out], no bias."""
    kernel_size = kernel.shape[:-2]
    patches = windows(x, kernel_size, stride, padding)
    # One 2-D matmul, not a rank-4 @: on XLA CPU (jax 0.10.2) the rank-4 form made the MAML meta-step 1.55x slower
    # (scripts/bench.py --meta-batch 8: 783 vs 505 ms).
    out = patches.reshape(-1, patches.shape[-1]) @ kernel.reshape(-1, kernel.shape[-1])
    return out.reshape(*patches.shape[:-1], kernel.shape[-1])
