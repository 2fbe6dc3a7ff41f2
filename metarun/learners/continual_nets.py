"""The continual-learning papers' Omniglot networks, split into a representation and a prediction network.

* `oml_net` (Javed & White 2019, the mrcl code's "omniglot" model): RLN = 6 valid 3x3 convolutions of 256
  channels with strides 2,1,2,1,2,2 and ReLU (84x84 -> 3x3x256 = 2304 features); PLN = Dense 1024 + ReLU +
  Dense out (`pln_hidden=[]` gives a linear PLN).
* `anml_net` (Beaulieu et al. 2020, as higherANML): a neuromodulatory (NM) network of 3 conv blocks (112
  channels) + Dense + sigmoid gates the features of a prediction network's 3 conv blocks (256 channels;
  28x28 -> 3x3x256 = 2304) element-wise; PLN = Dense out. A block = valid 3x3 conv, instance norm (affine;
  ANML's BatchNorm on one image at a time is the same thing), ReLU, 2x2 max-pool (not after the third).

Params are {"rln": ..., "pln": ...} (+ "nm"); `represent(x)` is the slow part (frozen at meta-test time),
`pln_apply(params["pln"], features)` the fast one. Every layer is per-example (no batch statistics).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from metarun.errors import UserError
from metarun.learners import im2col
from metarun.learners.conv4 import max_pool_2x2
from metarun.registry import register

HEAD = "head"


def conv3x3_valid(x: jax.Array, kernel: jax.Array, stride: int = 1, impl: str = "xla") -> jax.Array:
    """A 'VALID' 3x3 convolution with a stride (torch's padding=0), as XLA's conv or nine slices + a matmul."""
    if impl == "xla":
        return jax.lax.conv_general_dilated(x, kernel, (stride, stride), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return im2col.conv(x, kernel, stride, "VALID")


def valid_side(side: int, strides: Sequence[int], pools: Sequence[bool] = ()) -> int:
    """The feature map's side after valid 3x3 convolutions with `strides` (and a 2x2 pool after those flagged)."""
    pools = list(pools) + [False] * (len(strides) - len(pools))
    for stride, pool in zip(strides, pools):
        side = (side - 3) // stride + 1
        if side < 1:
            return 0
        if pool:
            side //= 2
    return side


class ConvValid(nn.Module):
    features: int
    stride: int = 1
    impl: str = "xla"

    @nn.compact
    def __call__(self, x):
        # He-normal weights, zero bias: the kaiming init of the authors' code (mrcl's Learner)
        kernel = self.param("kernel", nn.initializers.he_normal(), (3, 3, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return conv3x3_valid(x, kernel, self.stride, self.impl) + bias


class InstanceNorm(nn.Module):
    """Per-example, per-channel normalisation over H, W with a learned scale and shift (eps 1e-5, as torch)."""

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        mean = x.mean(axis=(1, 2), keepdims=True)
        var = jnp.square(x - mean).mean(axis=(1, 2), keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias


class OMLRepresentation(nn.Module):
    channels: int = 256
    strides: Sequence[int] = (2, 1, 2, 1, 2, 2)
    impl: str = "xla"

    @nn.compact
    def __call__(self, x):
        for i, stride in enumerate(self.strides):
            x = nn.relu(ConvValid(self.channels, stride, self.impl, name=f"conv{i}")(x))
        return x.reshape(x.shape[0], -1)


class ANMLBlocks(nn.Module):
    """ANML's 3 conv blocks: conv, instance norm, ReLU, 2x2 max-pool after the first two."""
    channels: int
    impl: str = "xla"

    @nn.compact
    def __call__(self, x):
        for i in range(3):
            x = ConvValid(self.channels, 1, self.impl, name=f"conv{i}")(x)
            x = nn.relu(InstanceNorm(name=f"norm{i}")(x))
            if i < 2:
                x = max_pool_2x2(x)
        return x.reshape(x.shape[0], -1)


class PLN(nn.Module):
    """Dense layers (ReLU between) and a final Dense `head`: the same tree `pln_apply` reads."""
    out_dim: int
    hidden: Sequence[int] = ()

    @nn.compact
    def __call__(self, z):
        for i, width in enumerate(self.hidden):
            z = nn.relu(nn.Dense(width, kernel_init=nn.initializers.he_normal(), name=f"hidden{i}")(z))
        return nn.Dense(self.out_dim, kernel_init=nn.initializers.he_normal(), name=HEAD)(z)


def pln_apply(pln, z: jax.Array) -> jax.Array:
    """Logits of a PLN params tree {"hidden0".., "head"} on features z [n, D] (pure; no flax module needed)."""
    hidden = sorted((k for k in pln if k != HEAD), key=lambda k: int(k.removeprefix("hidden")))
    for name in hidden:
        z = jax.nn.relu(z @ pln[name]["kernel"] + pln[name]["bias"])
    return z @ pln[HEAD]["kernel"] + pln[HEAD]["bias"]


class OMLNet(nn.Module):
    out_dim: Optional[int] = None
    channels: int = 256
    strides: Sequence[int] = (2, 1, 2, 1, 2, 2)
    pln_hidden: Sequence[int] = (1024,)
    impl: str = "xla"

    def setup(self):
        self.rln = OMLRepresentation(self.channels, tuple(self.strides), self.impl)
        if self.out_dim is not None:
            self.pln = PLN(self.out_dim, tuple(self.pln_hidden))

    def represent(self, x):
        return self.rln(x)

    def __call__(self, x, train: bool = False, step=0):
        z = self.represent(x)
        return z if self.out_dim is None else self.pln(z)


class NeuromodulatoryNet(nn.Module):
    """ANML's NM network: conv blocks, then a Dense to one sigmoid gate per representation feature."""
    channels: int = 112
    impl: str = "xla"

    @nn.compact
    def __call__(self, x, width: int):
        h = ANMLBlocks(self.channels, self.impl, name="blocks")(x)
        return jax.nn.sigmoid(nn.Dense(width, kernel_init=nn.initializers.he_normal(), name="gate")(h))


class ANMLNet(nn.Module):
    out_dim: Optional[int] = None
    channels: int = 256
    nm_channels: int = 112
    impl: str = "xla"

    def setup(self):
        self.rln = ANMLBlocks(self.channels, self.impl)
        self.nm = NeuromodulatoryNet(self.nm_channels, self.impl)
        if self.out_dim is not None:
            self.pln = PLN(self.out_dim, ())

    def feature_dim(self, x) -> int:
        return self.channels * valid_side(x.shape[1], (1, 1, 1), (True, True, False)) ** 2

    def gates(self, x):
        """The NM network's sigmoid gates [n, D], one per feature of the prediction network."""
        return self.nm(x, self.feature_dim(x))

    def features(self, x):
        """The prediction network's conv features [n, D] (ungated)."""
        return self.rln(x)

    def represent(self, x):
        return self.features(x) * self.gates(x)

    def __call__(self, x, train: bool = False, step=0):
        z = self.represent(x)
        return z if self.out_dim is None else self.pln(z)


def min_side(strides: Sequence[int], pools: Sequence[bool] = (), final: int = 1) -> int:
    """The smallest input side that leaves a feature map of at least final x final."""
    side = 1
    while valid_side(side, strides, pools) < final:
        side += 1
    return side


@dataclass
class OMLNetConfig:
    name: str = "oml_net"
    channels: int = 256
    strides: List[int] = field(default_factory=lambda: [2, 1, 2, 1, 2, 2])
    pln_hidden: List[int] = field(default_factory=lambda: [1024])  # [] : a linear PLN
    conv_impl: str = "auto"
    width_factor: float = 1.0    # multiplies every layer's width (debug=smoke sets it for any learner)


@dataclass
class ANMLNetConfig:
    name: str = "anml_net"
    channels: int = 256
    nm_channels: int = 112
    conv_impl: str = "auto"
    width_factor: float = 1.0


def _width(value: int, factor: float) -> int:
    return max(1, round(value * factor))


def _check(cfg, widths) -> str:
    from metarun.learners.conv4 import ConvImpl, resolve_conv_impl
    if any(w < 1 for w in widths) or not cfg.width_factor > 0:
        raise UserError(f"learner={cfg.name}: widths {list(widths)} must be >= 1 and learner.width_factor="
                        f"{cfg.width_factor} > 0")
    if cfg.conv_impl not in ConvImpl.choices:
        raise UserError(f"learner.conv_impl={cfg.conv_impl} is unknown; expected one of: {', '.join(ConvImpl.choices)}")
    return resolve_conv_impl(cfg.conv_impl)


@register("learner", "oml_net", schema=OMLNetConfig)
def build_oml(cfg, out_dim: Optional[int], **overrides) -> OMLNet:
    if not cfg.strides or any(s < 1 for s in cfg.strides):
        raise UserError(f"learner.strides={list(cfg.strides)} must be a non-empty list of strides >= 1")
    impl = _check(cfg, [cfg.channels, *cfg.pln_hidden])
    kwargs = dict(out_dim=out_dim, channels=_width(cfg.channels, cfg.width_factor), strides=tuple(cfg.strides),
                  pln_hidden=tuple(_width(h, cfg.width_factor) for h in cfg.pln_hidden), impl=impl)
    return OMLNet(**{**kwargs, **overrides})


@register("learner", "anml_net", schema=ANMLNetConfig)
def build_anml(cfg, out_dim: Optional[int], **overrides) -> ANMLNet:
    impl = _check(cfg, [cfg.channels, cfg.nm_channels])
    kwargs = dict(out_dim=out_dim, channels=_width(cfg.channels, cfg.width_factor),
                  nm_channels=_width(cfg.nm_channels, cfg.width_factor), impl=impl)
    return ANMLNet(**{**kwargs, **overrides})


def min_image_side(module) -> int:
    """The smallest image side a continual net reads (valid convolutions shrink the map)."""
    if isinstance(module, OMLNet):
        return min_side(tuple(module.strides))
    # instance norm over a 1x1 map outputs its bias alone: ANML needs a final map of at least 2x2
    return min_side((1, 1, 1), (True, True, False), final=2)
