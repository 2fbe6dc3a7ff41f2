"""ANML (Beaulieu et al. 2020, "Learning to Continually Learn"): OML's sequential inner loop over a network whose
features are gated by a meta-learned neuromodulatory (NM) network (learner=anml_net).

As the authors' code and higherANML: the inner loop (SGD, lr 0.1, one image per step) trains the prediction
network — its convolutions and its PLN — with the NM network fixed; the outer loop (Adam 1e-3) trains
everything, second order through the inner loop as higherANML's `higher` does. At meta-test time the NM
network and the convolutions are frozen and only the final layer learns (higherANML's test_train).
"""
from __future__ import annotations

from dataclasses import dataclass

from metarun.algos.base import Collaborators, MetaAlgorithm
from metarun.algos.oml import build_continual, fast_slow
from metarun.registry import register


@dataclass
class ANMLConfig:
    name: str = "anml"
    inner_lr: float = 0.1
    first_order: bool = False
    adapt: str = "prediction"   # prediction: the conv features + PLN learn in the inner loop; pln: the PLN only


@register("algo", "anml", schema=ANMLConfig, fast_slow=fast_slow)
def build(a, c: Collaborators) -> MetaAlgorithm:
    return build_continual(a, c, "anml", needs_gates=True)
