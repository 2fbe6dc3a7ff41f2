"""ReLU MLP (2 x 40 hidden units for sinusoid regression, Finn et al. 2017)."""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn


class MLP(nn.Module):
    hidden: Sequence[int] = (40, 40)
    out_dim: Optional[int] = 1

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, name=f"dense{i}")(x))
        if self.out_dim is not None:
            x = nn.Dense(self.out_dim, name="head")(x)
        return x
