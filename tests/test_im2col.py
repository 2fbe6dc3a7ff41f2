"""The shared im2col convolution (metarun.learners.im2col) is XLA's convolution: 1-D and 2-D, "SAME" with odd and
even kernels, "VALID" with a stride, values and gradients; every learner's convolution goes through it."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metarun.learners import im2col

CASES = [  # (input shape [batch, *spatial, C], kernel size, stride, padding)
    ((2, 9, 3), (5,), 1, "SAME"), ((2, 9, 3), (4,), 1, "SAME"), ((2, 7, 6, 3), (3, 3), 1, "SAME"),
    ((2, 7, 6, 3), (4, 2), 1, "SAME"), ((2, 9, 8, 3), (3, 3), 2, "VALID"), ((2, 9, 8, 3), (3, 3), 1, "VALID"),
]


def xla_conv(x, kernel, stride, padding):
    nd = kernel.ndim - 2
    spec = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC")}[nd]
    return jax.lax.conv_general_dilated(x, kernel, (stride,) * nd, padding, dimension_numbers=spec)


@pytest.mark.parametrize("shape,size,stride,padding", CASES)
def test_im2col_conv_equals_xla_conv_values_and_gradients(shape, size, stride, padding):
    kx, kk = jax.random.split(jax.random.PRNGKey(len(shape) * 10 + sum(size) + stride))
    x = jax.random.normal(kx, shape)
    kernel = jax.random.normal(kk, (*size, shape[-1], 4))
    ours = im2col.conv(x, kernel, stride, padding)
    ref = xla_conv(x, kernel, stride, padding)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    # A nonlinear read-out, so that every output position gets its own cotangent.
    grads = [jax.grad(lambda x, k, f=f: jnp.sum(jnp.sin(f(x, k, stride, padding))), (0, 1))(x, kernel)
             for f in (im2col.conv, xla_conv)]
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_im2col_refuses_what_it_does_not_define():
    x = jnp.zeros((1, 5, 5, 1))
    with pytest.raises(ValueError, match="stride 1 only"):
        im2col.windows(x, (3, 3), stride=2, padding="SAME")
    with pytest.raises(ValueError, match="'SAME' or 'VALID'"):
        im2col.windows(x, (3, 3), padding="FULL")
