"""OML's regression network (Javed & White 2019; mrcl's "old" Sin model with `--width 300 --rln 6`), split into a
representation (RLN) and a prediction network (PLN) like metarun.learners.continual_nets.

RLN = 6 Dense + ReLU layers: 300, 300, 300, 300, 300, 900 units (mrcl: five of `width`, then 3 x width);
PLN = Dense 300 + ReLU, Dense 300 + ReLU, Dense 1 (mrcl's last three layers; `--rln 6` freezes the first six).
Params {"rln": {"dense0".."dense5"}, "pln": {"hidden0", "hidden1", "head"}}: `pln_apply` reads the PLN.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import flax.linen as nn

from metarun.errors import UserError
from metarun.learners.continual_nets import PLN
from metarun.registry import register


class MLPRepresentation(nn.Module):
    widths: Sequence[int] = (300, 300, 300, 300, 300, 900)

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate(self.widths):
            x = nn.relu(nn.Dense(width, kernel_init=nn.initializers.he_normal(), name=f"dense{i}")(x))
        return x


class OMLMLP(nn.Module):
    out_dim: Optional[int] = 1
    widths: Sequence[int] = (300, 300, 300, 300, 300, 900)
    pln_hidden: Sequence[int] = (300, 300)

    def setup(self):
        self.rln = MLPRepresentation(tuple(self.widths))
        if self.out_dim is not None:
            self.pln = PLN(self.out_dim, tuple(self.pln_hidden))

    def represent(self, x):
        return self.rln(x)

    def __call__(self, x, train: bool = False, step=0):
        z = self.represent(x)
        return z if self.out_dim is None else self.pln(z)


@dataclass
class OMLMLPConfig:
    name: str = "oml_mlp"
    rln: List[int] = field(default_factory=lambda: [300, 300, 300, 300, 300, 900])
    pln_hidden: List[int] = field(default_factory=lambda: [300, 300])
    width_factor: float = 1.0    # multiplies every layer's width (debug=smoke sets it for any learner)


@register("learner", "oml_mlp", schema=OMLMLPConfig)
def build(cfg, out_dim: Optional[int], **overrides) -> OMLMLP:
    widths = list(cfg.rln) + list(cfg.pln_hidden)
    if not cfg.rln or any(w < 1 for w in widths) or not cfg.width_factor > 0:
        raise UserError(f"learner=oml_mlp: learner.rln={list(cfg.rln)} (non-empty) and learner.pln_hidden="
                        f"{list(cfg.pln_hidden)} widths must be >= 1 and learner.width_factor={cfg.width_factor} > 0")

    def scale(ws):
        return tuple(max(1, round(w * cfg.width_factor)) for w in ws)

    return OMLMLP(**{"out_dim": out_dim, "widths": scale(cfg.rln), "pln_hidden": scale(cfg.pln_hidden), **overrides})
