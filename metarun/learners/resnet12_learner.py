"""`learner=resnet12`: the few-shot ResNet-12 (metarun.learners.resnet12) as a learner with modes.

The pure module in resnet12.py always keeps running BatchNorm statistics (flax's nn.BatchNorm); a
learner must instead honour `learner.batch_norm` (transductive / running with `bn_steps` copies /
none) and take `apply(variables, x, train=..., step=...)` like Conv-4, so every algorithm can call it
through `metarun.learners.Net`. Parameter names match resnet12.ResNet12 (block{i}/conv{j}, norm{j},
conv_shortcut, norm_shortcut, head), so weights move between the two.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import flax.linen as nn

from metarun.errors import UserError
from metarun.learners.batchnorm import BatchNorm, BatchNormMode
from metarun.learners.conv4 import max_pool_2x2, resolve_conv_impl
from metarun.learners.initializers import check_init, kernel_init
from metarun.learners.resnet12 import LEAK, Conv, _conv_init
from metarun.registry import register


class ModeResBlock(nn.Module):
    """resnet12.ResBlock with mode-aware BatchNorm: 3 x [3x3 conv, BN, leaky ReLU] + 1x1 shortcut, 2x2 pool."""
    features: int
    batch_norm: str = "transductive"
    bn_steps: int = 1
    conv_impl: str = "xla"
    initializer: str = "default"

    @nn.compact
    def __call__(self, x, train: bool, step):
        def norm(h, name):
            if self.batch_norm == "none":
                return h
            return BatchNorm(self.batch_norm, self.bn_steps, name=name)(h, train, step)

        init = kernel_init(self.initializer, _conv_init)
        shortcut = norm(Conv(self.features, 1, kernel_init=init, name="conv_shortcut")(x), "norm_shortcut")
        h = x
        for j in range(3):
            h = norm(Conv(self.features, 3, self.conv_impl, init, name=f"conv{j}")(h), f"norm{j}")
            if j < 2:
                h = nn.leaky_relu(h, LEAK)
        return max_pool_2x2(nn.leaky_relu(h + shortcut, LEAK))


class ResNet12Learner(nn.Module):
    """Logits when out_dim is set, else the globally average-pooled embedding (widths[-1] features)."""
    out_dim: Optional[int] = None
    widths: Sequence[int] = (64, 160, 320, 640)
    batch_norm: str = "transductive"
    bn_steps: int = 1
    conv_impl: str = "xla"
    initializer: str = "default"  # learner.init (metarun.learners.initializers); the head's default: LeCun normal

    @nn.compact
    def __call__(self, x, train: bool = False, step=0):
        for i, width in enumerate(self.widths):
            x = ModeResBlock(width, self.batch_norm, self.bn_steps, self.conv_impl, self.initializer,
                             name=f"block{i}")(x, train, step)
        x = x.mean(axis=(1, 2))
        if self.out_dim is not None:
            x = nn.Dense(self.out_dim, kernel_init=kernel_init(self.initializer, nn.initializers.lecun_normal()),
                         name="head")(x)
        return x


@dataclass
class ResNet12Config:
    name: str = "resnet12"
    widths: List[int] = field(default_factory=lambda: [64, 160, 320, 640])
    # DropBlock / dropout rate (resnet12.drop_block). Off: no algorithm passes per-step dropout keys to
    # its learner yet, so a rate > 0 is refused rather than silently ignored.
    drop_rate: float = 0.0
    width_factor: float = 1.0    # multiplies every block's width (debug=smoke sets it for any learner)
    batch_norm: BatchNormMode = BatchNormMode.transductive
    bn_steps: int = 1
    conv_impl: str = "auto"
    init: str = "default"        # default (Kaiming normal, fan_out) | lecun | xavier | kaiming | orthogonal


@register("learner", "resnet12", schema=ResNet12Config)
def build(cfg, out_dim: Optional[int], **overrides) -> ResNet12Learner:
    if not cfg.widths or any(w < 1 for w in cfg.widths) or not cfg.width_factor > 0:
        raise UserError(f"learner.widths={list(cfg.widths)}: every width must be >= 1 (and learner.width_factor > 0)")
    if cfg.drop_rate != 0:
        raise UserError(f"learner.drop_rate={cfg.drop_rate}: dropout needs per-step keys that no algorithm passes "
                        f"to its learner yet; use learner.drop_rate=0")
    widths = tuple(max(1, round(w * cfg.width_factor)) for w in cfg.widths)
    kwargs = dict(out_dim=out_dim, widths=widths, batch_norm=getattr(cfg.batch_norm, "value", cfg.batch_norm),
                  bn_steps=cfg.bn_steps, conv_impl=resolve_conv_impl(cfg.conv_impl),
                  initializer=check_init(cfg.get("init")))
    return ResNet12Learner(**{**kwargs, **overrides})

