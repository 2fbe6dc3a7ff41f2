"""The outer (meta) optimizer from the `meta_opt` config: optax transforms and schedules."""
from __future__ import annotations

import optax

from metarun.errors import UserError


def make_schedule(cfg, total_steps: int):
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    end = cfg.lr * cfg.end_lr_fraction
    if cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.end_lr_fraction)
    elif cfg.schedule == "linear":
        main = optax.linear_schedule(cfg.lr, end, decay_steps)
    elif cfg.schedule == "step":
        # ProtoNets / Relation Nets: "halve the learning rate every N episodes" (a staircase).
        if cfg.decay_every <= 0:
            raise UserError(f"meta_opt.schedule=step needs meta_opt.decay_every > 0 (got {cfg.decay_every})")
        if not 0.0 < cfg.decay_factor <= 1.0:
            raise UserError(f"meta_opt.decay_factor must be in (0, 1] (got {cfg.decay_factor})")
        main = optax.exponential_decay(cfg.lr, cfg.decay_every, cfg.decay_factor, staircase=True)
    else:
        raise UserError(f"meta_opt.schedule={cfg.schedule} is unknown; expected constant, cosine, linear or step")
    if cfg.warmup_steps:
        return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps), main],
                                    [cfg.warmup_steps])
    return main


def make_optimizer(cfg, total_steps: int, weight_decay: float = 0.0) -> optax.GradientTransformation:
    """Adam (default), AdamW or SGD with the configured schedule and optional global-norm clipping.

    weight_decay (regularize.weight_decay): decoupled decay of the kernels (metarun.regularize.decay_mask)
    chained between the optimiser's direction and the learning rate, as optax.adamw does, so it follows
    the schedule and works for adam and sgd alike. 0 builds exactly the optimiser without it.
    """
    from metarun.regularize import decay_mask

    lr = make_schedule(cfg, total_steps)
    if weight_decay and cfg.name == "adamw":
        raise UserError(f"regularize.weight_decay={weight_decay} and meta_opt.name=adamw both decay the weights; "
                        f"use meta_opt.name=adam with regularize.weight_decay, or meta_opt.weight_decay alone")
    if cfg.name == "adam":
        opt = optax.adam(lr)
        direction = optax.scale_by_adam()
    elif cfg.name == "adamw":
        opt = optax.adamw(lr, weight_decay=cfg.weight_decay)
    elif cfg.name == "sgd":
        opt = optax.sgd(lr, momentum=cfg.momentum)
        direction = optax.trace(decay=cfg.momentum) if cfg.momentum is not None else optax.identity()
    else:
        raise UserError(f"meta_opt.name={cfg.name} is unknown; expected adam, adamw or sgd")
    if weight_decay:
        opt = optax.chain(direction, optax.add_decayed_weights(weight_decay, decay_mask),
                          optax.scale_by_learning_rate(lr))
    if cfg.grad_clip:
        opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
    return opt
