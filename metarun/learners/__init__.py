"""Flax learners, built from the `learner` config group."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax

from metarun.errors import UserError
from metarun.learners.conv4 import Conv4
from metarun.learners.mlp import MLP


def _enum_value(v):
    return getattr(v, "value", v)


def resolve_conv_impl(conv_impl) -> str:
    """'auto' picks im2col matmuls on CPU (XLA's CPU convolution is slow) and XLA's conv elsewhere."""
    impl = _enum_value(conv_impl)
    if impl == "auto":
        return "im2col" if jax.default_backend() == "cpu" else "xla"
    return impl


def build_learner(cfg, out_dim: Optional[int]) -> nn.Module:
    """The Flax module named by `learner.name`; out_dim=None gives an embedding network."""
    if cfg.name == "conv4":
        return Conv4(out_dim=out_dim, filters=cfg.filters, blocks=cfg.blocks,
                     batch_norm=_enum_value(cfg.batch_norm), conv_impl=resolve_conv_impl(cfg.conv_impl))
    if cfg.name == "mlp":
        return MLP(hidden=tuple(cfg.hidden), out_dim=out_dim)
    raise UserError(f"learner={cfg.name} is unknown; expected one of: conv4, mlp")
