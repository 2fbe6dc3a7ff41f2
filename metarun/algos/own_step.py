"""Algorithms that make the whole outer step themselves (maml_rl's outer=trpo, rl2's objective=ppo).

The core hands an algorithm's meta-step result ("grads") to the run's outer optimiser (`meta_opt`). These
algorithms finish the step inside their meta-step (a trust-region step with its line search; PPO's epochs)
and return −step, which only `meta_opt=sgd` with lr 1.0 and nothing else applies unchanged: Adam would
rescale it, momentum or a schedule would change its length, clipping would cut it, weight decay would add
to it. Their config sections carry read-only views of the run's meta_opt (`outer_meta_opt`,
`outer_weight_decay`: interpolations, as `dataset.metric` reads `algo.metric`) so the builder can refuse
any other setting in one line instead of training silently with a distorted step.
"""
from __future__ import annotations

from metarun.errors import UserError

# Schema defaults of the two views (copy into the algorithm's config dataclass as `Any` fields).
META_OPT_VIEW = "${oc.select:meta_opt,null}"
WEIGHT_DECAY_VIEW = "${oc.select:regularize.weight_decay,0.0}"


def check_applies_step_unchanged(algo_cfg, what: str) -> None:
    """UserError (one line) unless the run's meta_opt is plain SGD with lr 1.0; `what` names the setting
    that made the step (e.g. "algo.outer=trpo"). Built outside a run config (no view): nothing to check."""
    m = algo_cfg.get("outer_meta_opt")
    if m is None:
        return
    decay = algo_cfg.get("outer_weight_decay")
    plain_sgd = (m.name == "sgd" and float(m.lr) == 1.0 and m.schedule == "constant" and not m.warmup_steps
                 and not m.momentum and not m.grad_clip and not decay)
    if not plain_sgd:
        raise UserError(f"{what} makes the whole step itself and needs meta_opt=sgd meta_opt.lr=1.0 (constant, "
                        f"no momentum, warmup, grad_clip or regularize.weight_decay) to apply it unchanged; got "
                        f"meta_opt={m.name} lr={m.lr} schedule={m.schedule} momentum={m.momentum} "
                        f"grad_clip={m.grad_clip} warmup_steps={m.warmup_steps} regularize.weight_decay={decay}")
