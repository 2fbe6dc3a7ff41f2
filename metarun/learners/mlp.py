"""ReLU MLP (2 x 40 hidden units for sinusoid regression, Finn et al. 2017)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import flax.linen as nn

from metarun.registry import register


class MLP(nn.Module):
    hidden: Sequence[int] = (40, 40)
    out_dim: Optional[int] = 1

    @nn.compact
    def __call__(self, x, train: bool = False, step=0):
        del train, step  # no mode-dependent layers
        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, name=f"dense{i}")(x))
        if self.out_dim is not None:
            x = nn.Dense(self.out_dim, name="head")(x)
        return x


@dataclass
class MLPConfig:
    name: str = "mlp"
    hidden: List[int] = field(default_factory=lambda: [40, 40])
    width_factor: float = 1.0    # multiplies every layer's width (debug=smoke sets it for any learner)


@register("learner", "mlp", schema=MLPConfig)
def build(cfg, out_dim: Optional[int], **overrides) -> MLP:
    from metarun.errors import UserError
    if any(w < 1 for w in cfg.hidden) or not cfg.width_factor > 0:
        raise UserError(f"learner.hidden={list(cfg.hidden)}: every width must be >= 1 (and learner.width_factor > 0)")
    hidden = tuple(max(1, round(w * cfg.width_factor)) for w in cfg.hidden)
    return MLP(**{"hidden": hidden, "out_dim": out_dim, **overrides})
