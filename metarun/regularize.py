"""The `regularize=` techniques every algorithm accepts: decoupled weight decay and label smoothing.

Weight decay is chained into the outer optimiser (metarun.optim.make_optimizer); label smoothing
enters the classification family's objective. Dropout is the learner's (`learner.dropout`, Conv-4, with the
algorithms that pass dropout keys): this section's key stays off, and a rate > 0 is refused with a pointer there.
"""
from __future__ import annotations

import jax
import optax

from metarun.errors import UserError


def check_regularize(cfg) -> None:
    """One-line refusals of the `regularize` section (None or missing: nothing set)."""
    if cfg is None:
        return
    wd, smoothing, dropout = cfg.get("weight_decay", 0.0), cfg.get("label_smoothing", 0.0), cfg.get("dropout", 0.0)
    if not wd >= 0:
        raise UserError(f"regularize.weight_decay={wd} must be >= 0")
    if not 0 <= smoothing < 1:
        raise UserError(f"regularize.label_smoothing={smoothing} must be in [0, 1)")
    if dropout != 0:
        raise UserError(f"regularize.dropout={dropout}: dropout is a learner setting: use learner.dropout={dropout} "
                        f"(conv4; with algorithms that pass dropout keys: pretrain, protonet) and regularize.dropout=0")


def decay_mask(params):
    """True for the leaves weight decay applies to: conv and dense kernels ("kernel" leaves), not biases,
    normalisation scales, learned inner rates or per-step BatchNorm copies (the usual exclusions)."""
    def is_kernel(path, _):
        last = path[-1] if path else None
        return getattr(last, "key", getattr(last, "name", None)) == "kernel"
    return jax.tree_util.tree_map_with_path(is_kernel, params)


def smoothed_cross_entropy(logits, labels, smoothing: float):
    """Mean cross-entropy against (1 - s) one-hot + s / C uniform targets (Szegedy et al. 2016)."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype), smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()
