"""Attentive Conditional Neural Process: `algo=acnp` (Kim et al. 2019's deterministic path without the latent one;
the "ACNP" row of Bruinsma 2022's tables). Self-attention over the context, multi-head cross-attention from the
targets; a Gaussian per target, trained on the target log-likelihood like CNP (np_common.conditional_np)."""
from __future__ import annotations

from dataclasses import dataclass

from metarun.algos.base import Collaborators, MetaAlgorithm
from metarun.algos.np_common import NPBaseConfig, check_attention, check_common, conditional_np
from metarun.families.base import check_positive
from metarun.learners.neural_process import AttentiveCNP
from metarun.registry import register


@dataclass
class ACNPConfig(NPBaseConfig):
    name: str = "acnp"
    hidden: int = 128           # as ANP (DeepMind's code: 128 units)
    decoder_layers: int = 3     # MLP on (r, x_target); the last layer is the Gaussian head
    num_heads: int = 8          # Kim et al.: 8-head multihead attention
    attention_layers: int = 2   # self-attention blocks in the encoder


@register("algo", "acnp", schema=ACNPConfig)
def build(a, c: Collaborators) -> MetaAlgorithm:
    check_common(a, c)
    check_positive("algo", a, ("hidden", "decoder_layers"))
    check_attention(a)
    model = AttentiveCNP(hidden=a.hidden, decoder_layers=a.decoder_layers, min_std=a.min_std,
                         num_heads=a.num_heads, attention_layers=a.attention_layers)
    info = {"name": "acnp", "model": "attentive CNP (Kim et al. 2019, deterministic path)", "hidden": a.hidden,
            "decoder_layers": a.decoder_layers, "num_heads": a.num_heads, "attention_layers": a.attention_layers,
            "min_std": a.min_std, "learner": "none (model from algo.*)", "metric": a.metric}
    return conditional_np(model, c.family, c.phase, info)
