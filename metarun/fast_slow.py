"""A trained run seen as a slow representation (frozen) and a fast prediction network: what the continual
protocol learns with. OML and ANML register their own split (`@register("algo", ..., fast_slow=...)`);
algorithms whose meta-parameters are a plain learner under "net" map to its body plus a fresh linear head
(the papers' "pretraining"/"SR-NN"-style baselines); any other algorithm is refused in one line.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

from metarun.errors import UserError
from metarun.learners import Net
from metarun.registry import lookup

# Algorithms whose meta_params["net"] are the learner's own params (a body and, for head-based ones, a final
# Dense named "head"): the body is the slow part, a fresh linear head the fast one.
BODY_ALGOS = ("maml", "fomaml", "anil", "metasgd", "reptile", "protonet", "pretrain")


class FastSlow(NamedTuple):
    """represent: images [n, H, W, C] -> features [n, D] with the slow part's trained params (pure, jittable).
    pln: the meta-learned prediction network ({"hidden0".., "head"}, read by continual_nets.pln_apply), or
    None where the run has none for new classes (a fresh linear head is then the only choice)."""
    represent: Callable
    pln: Optional[dict]


def body_fast_slow(algo_cfg, collaborators, params, algo_state) -> FastSlow:
    """A learner's body (every module but `head`) with its trained weights and running statistics."""
    net = params["net"]
    if "bn" in params:  # MAML++ per-step BatchNorm parameters: the last inner step's, as its adapted model used
        import jax
        net = {**net, **jax.tree.map(lambda a: a[-1], params["bn"])}
    body = Net(collaborators.learner(None), train=False)
    weights = {k: v for k, v in net.items() if k != "head"}
    stats = algo_state.get("batch_stats") if isinstance(algo_state, dict) else None
    return FastSlow(represent=lambda x: body.apply(weights, x, stats), pln=None)


def fast_slow_builder(algo_name: str) -> Callable:
    """The builder `(algo_cfg, collaborators, params, algo_state) -> FastSlow` of an algorithm; a UserError
    naming the algorithms that have one otherwise."""
    entry = lookup("algo", algo_name, "algo")
    if "fast_slow" in entry.meta:
        return entry.meta["fast_slow"]
    if algo_name in BODY_ALGOS:
        return body_fast_slow
    from metarun.registry import entries
    known = sorted([n for n, e in entries("algo").items() if "fast_slow" in e.meta] + list(BODY_ALGOS))
    raise UserError(f"eval.protocol=continual needs a slow representation and a fast prediction network; "
                    f"algo={algo_name} "
                    f"has no such split to map (expected one of: {', '.join(known)})")
