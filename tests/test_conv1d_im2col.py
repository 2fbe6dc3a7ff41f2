"""ConvCNP's 1D convolution as im2col (shifted copies + one matmul): equal to XLA's "SAME" conv and nn.Conv."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest


@pytest.mark.parametrize("k", [1, 4, 5])
def test_conv1d_same_equals_xla_conv_values_and_gradients(k):
    """The im2col 1D convolution (ConvCNP's CNN) is XLA's "SAME" conv, padding for even k included."""
    from metarun.learners.neural_process import conv1d_same

    kh, kw = jax.random.split(jax.random.PRNGKey(k))
    h = jax.random.normal(kh, (37, 3))
    w = jax.random.normal(kw, (k, 3, 4))

    def xla(h, w):
        return jax.lax.conv_general_dilated(h[None], w, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))[0]

    np.testing.assert_allclose(conv1d_same(h, w), xla(h, w), rtol=1e-5, atol=1e-5)
    # Gradients of a nonlinear read-out, so that every output position gets a different cotangent.
    grads = [jax.grad(lambda h, w, f=f: jnp.sum(jnp.sin(f(h, w))), (0, 1))(h, w) for f in (conv1d_same, xla)]
    for ours, ref in zip(*grads):
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_conv1d_same_module_has_nn_conv_parameters_and_output():
    """Conv1DSame keeps nn.Conv's parameter names, shapes and initialisation (old checkpoints load) and its output."""
    import flax.linen as nn
    from metarun.learners.neural_process import Conv1DSame

    h = jax.random.normal(jax.random.PRNGKey(0), (20, 3))
    ours, ref = Conv1DSame(6, 5), nn.Conv(6, (5,), padding="SAME")
    p_ours, p_ref = ours.init(jax.random.PRNGKey(1), h), ref.init(jax.random.PRNGKey(1), h)
    assert jax.tree_util.tree_map(jnp.shape, p_ours) == jax.tree_util.tree_map(jnp.shape, p_ref)
    np.testing.assert_allclose(p_ours["params"]["kernel"], p_ref["params"]["kernel"], rtol=1e-6)
    np.testing.assert_allclose(ours.apply(p_ref, h), ref.apply(p_ref, h), rtol=1e-5, atol=1e-5)
