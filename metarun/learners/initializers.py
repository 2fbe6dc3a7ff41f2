"""`learner.init`: the kernel initialisation scheme of a learner's convolutions and dense layers, by name.

Biases and normalisation parameters keep their own (zeros, ones). `default` is each learner's published
choice (Conv-4: LeCun normal, flax's default; ResNet-12: Kaiming normal with fan_out, the reference
implementations'); the others apply to every kernel, head included. All draw from the init key: seeded.
"""
from __future__ import annotations

from typing import Callable, Optional

import flax.linen as nn

from metarun.errors import UserError

INITIALIZERS = {
    "lecun": nn.initializers.lecun_normal,         # truncated normal, variance 1 / fan_in
    "xavier": nn.initializers.xavier_uniform,      # uniform, variance 2 / (fan_in + fan_out) (Glorot & Bengio 2010)
    "kaiming": nn.initializers.kaiming_normal,     # truncated normal, variance 2 / fan_in (He et al. 2015)
    "orthogonal": nn.initializers.orthogonal,      # kernel reshaped to [fan_in, out] has orthonormal columns
    # PyTorch's nn.Conv2d / nn.Linear default (kaiming_uniform with a=sqrt(5)): U(+-1/sqrt(fan_in)), variance
    # 1 / (3 fan_in) -- what the PyTorch MAML code (and scripts/peer_maml_train.py) starts from. Biases stay zero.
    "torch": lambda: nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
}
CHOICES = ("default",) + tuple(INITIALIZERS)


def kernel_init(name: str, default: Callable) -> Callable:
    """The initializer `name` (a `learner.init` value); `default` is the learner's own choice."""
    if name == "default":
        return default
    return INITIALIZERS[name]()


def check_init(name: Optional[str]) -> str:
    """`learner.init` checked in one line; None (a config saved before the key existed) is `default`."""
    name = "default" if name is None else name
    if name not in CHOICES:
        raise UserError(f"learner.init={name} is unknown; expected one of: {', '.join(CHOICES)}")
    return name
