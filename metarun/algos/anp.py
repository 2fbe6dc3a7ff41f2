"""Attentive Neural Process (Kim et al. 2019): `algo=anp`. Self-attention in both encoders, multi-head
cross-attention from the targets to the context on the deterministic path (metarun/learners/neural_process.py's
ANP); the objective and the rest as for `algo=np` (np_common.py)."""
from __future__ import annotations

from dataclasses import dataclass

from metarun.algos.base import Collaborators, MetaAlgorithm
from metarun.algos.np import NPConfig, check_sizes, latent_info
from metarun.algos.np_common import check_attention, check_common, check_latent, latent_np
from metarun.learners.neural_process import ANP
from metarun.registry import register


@dataclass
class ANPConfig(NPConfig):
    name: str = "anp"
    num_heads: int = 8          # Kim et al.: 8-head multihead attention
    attention_layers: int = 2   # self-attention blocks per encoder


@register("algo", "anp", schema=ANPConfig)
def build(a, c: Collaborators) -> MetaAlgorithm:
    check_common(a, c)
    check_latent(a)
    check_sizes(a)
    check_attention(a)
    model = ANP(hidden=a.hidden, latent_dim=a.latent_dim, encoder_layers=a.encoder_layers,
                decoder_layers=a.decoder_layers, deterministic_path=a.deterministic_path, min_std=a.min_std,
                num_heads=a.num_heads, attention_layers=a.attention_layers)
    info = {**latent_info(a, "ANP (Kim et al. 2019)"), "num_heads": a.num_heads, "attention_layers": a.attention_layers}
    return latent_np(model, c.family, c.phase, a.objective, a.train_samples, a.eval_samples, a.plot_samples, info)
