"""Latent Neural Process (Garnelo et al. 2018b): `algo=np`, ELBO by default, `algo.objective=ml|iw` as options.

A deterministic path beside the latent one, as in Kim et al. (2019)'s NP baseline (`algo.deterministic_path`).
The model is metarun/learners/neural_process.py's LatentNP; shared parts in np_common.py."""
from __future__ import annotations

from dataclasses import dataclass

from metarun.algos.base import Collaborators, MetaAlgorithm
from metarun.algos.np_common import LatentConfigMixin, NPBaseConfig, check_common, check_latent, latent_np
from metarun.families.base import check_positive
from metarun.learners.neural_process import LatentNP
from metarun.registry import register


@dataclass
class NPConfig(LatentConfigMixin, NPBaseConfig):
    name: str = "np"
    hidden: int = 128           # DeepMind's NP/ANP code: 128 units, 128 latent dimensions
    latent_dim: int = 128
    encoder_layers: int = 4
    decoder_layers: int = 3
    deterministic_path: bool = True


def check_sizes(a) -> None:
    check_positive("algo", a, ("hidden", "latent_dim", "encoder_layers", "decoder_layers"))


def latent_info(a, model_name: str) -> dict:
    return {"name": a.name, "model": model_name, "objective": a.objective, "train_samples": a.train_samples,
            "eval_samples": a.eval_samples, "hidden": a.hidden, "latent_dim": a.latent_dim,
            "encoder_layers": a.encoder_layers, "decoder_layers": a.decoder_layers,
            "deterministic_path": a.deterministic_path, "min_std": a.min_std,
            "learner": "none (model from algo.*)", "metric": a.metric}


@register("algo", "np", schema=NPConfig)
def build(a, c: Collaborators) -> MetaAlgorithm:
    check_common(a, c)
    check_latent(a)
    check_sizes(a)
    model = LatentNP(hidden=a.hidden, latent_dim=a.latent_dim, encoder_layers=a.encoder_layers,
                     decoder_layers=a.decoder_layers, deterministic_path=a.deterministic_path, min_std=a.min_std)
    return latent_np(model, c.family, c.phase, a.objective, a.train_samples, a.eval_samples, a.plot_samples,
                     latent_info(a, "NP (Garnelo et al. 2018b)"))
