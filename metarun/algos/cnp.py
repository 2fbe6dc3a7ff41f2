"""Conditional Neural Process (Garnelo et al. 2018a): `algo=cnp`. The model and what it shares with the other
Neural Processes (no inner loop, no learner, metrics) are in metarun/learners/neural_process.py and np_common.py."""
from __future__ import annotations

from dataclasses import dataclass

from metarun.algos.base import Collaborators, MetaAlgorithm
from metarun.algos.np_common import NPBaseConfig, check_common, conditional_np
from metarun.families.base import check_positive
from metarun.learners.neural_process import CNP
from metarun.registry import register


@dataclass
class CNPConfig(NPBaseConfig):
    name: str = "cnp"
    hidden: int = 128          # DeepMind's CNP code: 128 units per layer
    encoder_layers: int = 4    # MLP on (x, y) pairs, then the mean over the context
    decoder_layers: int = 3    # MLP on (r, x_target); the last layer is the Gaussian head


@register("algo", "cnp", schema=CNPConfig)
def build(a, c: Collaborators) -> MetaAlgorithm:
    check_common(a, c)
    check_positive("algo", a, ("hidden", "encoder_layers", "decoder_layers"))
    model = CNP(hidden=a.hidden, encoder_layers=a.encoder_layers, decoder_layers=a.decoder_layers, min_std=a.min_std)
    info = {"name": "cnp", "model": "CNP (Garnelo et al. 2018a)", "hidden": a.hidden, "encoder_layers": a.encoder_layers,
            "decoder_layers": a.decoder_layers, "min_std": a.min_std, "learner": "none (model from algo.*)",
            "metric": a.metric}
    return conditional_np(model, c.family, c.phase, info)
