"""MAML (Finn et al. 2017), first-order MAML, and the MAML++ options (Antoniou et al. 2019) as one algorithm."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import jax
import jax.numpy as jnp
import optax

from metarun.algos.base import STATE_UPDATES, Collaborators, MetaAlgorithm
from metarun.algos.prediction_record import regression_record
from metarun.errors import UserError
from metarun.inner import inner_loop, scale_by_per_step_rates
from metarun.learners import Net
from metarun.registry import register


@dataclass(frozen=True)
class MAMLPlusPlus:
    """MAML++'s options; all off is plain MAML.

    msl: multi-step loss: the query loss after every inner step, weighted uniformly, or with
      `msl_last_weight` on the last step, or annealed towards the last step over `msl_anneal_steps`.
    first_order_steps: first-order inner gradients for meta-steps below this, second order after.
    lslr: learned per-layer (per param tensor), per-step inner learning rates, initialised to inner_lr.
    per_step_bn: per-step BatchNorm scale/bias (BNWB), meta-learned and not adapted in the inner loop;
      with learner.batch_norm=running the running statistics are per step too (BNRS).
    """
    msl: bool = False
    msl_anneal_steps: int = 0
    msl_last_weight: Optional[float] = None
    first_order_steps: int = 0
    lslr: bool = False
    per_step_bn: bool = False

    @property
    def any(self) -> bool:
        return any(asdict(self).values())


def msl_weights(inner_steps: int, meta_step, anneal_steps: int):
    """MAML++'s per-step loss weights: uniform at first, moving linearly to the last step over
    `anneal_steps` meta-steps, the others floored at 0.03/N (Antoniou et al.'s code, by steps not epochs)."""
    n = inner_steps
    progress = jnp.minimum(meta_step / anneal_steps, 1.0)
    floor = 0.03 / n
    rest = jnp.maximum((1.0 - progress) / n, floor)
    last = jnp.minimum((1.0 + (n - 1) * progress) / n, 1.0 - (n - 1) * floor)
    return jnp.full((n,), rest).at[-1].set(last)


def fixed_msl_weights(inner_steps: int, last_weight: Optional[float]):
    if last_weight is None or inner_steps == 1:
        return jnp.full((inner_steps,), 1.0 / inner_steps)
    rest = (1.0 - last_weight) / (inner_steps - 1)
    return jnp.full((inner_steps,), rest).at[-1].set(last_weight)


def per_step_updates(stats_trace, steps: int):
    """Running statistics after an inner loop: copy i of every leaf from the forward pass of step i.

    stats_trace leaves are [steps, copies, C]; each step's pass updated only its own copy."""
    def pick(a):
        copies = a.shape[1]
        n = min(steps, copies)
        return a[-1].at[:n].set(a[jnp.arange(n), jnp.arange(n)])
    return jax.tree.map(pick, stats_trace)


def maml(net: Net, objective, inner_lr: float, inner_steps: int, first_order: bool = False,
         options: MAMLPlusPlus = MAMLPlusPlus(), rate_steps: Optional[int] = None, meta_step=None,
         info=None, record: bool = False) -> MetaAlgorithm:
    """Builds MAML over a learner in a mode (`net`).

    meta_params = {"net": params[, "lslr": rates][, "bn": per-step BN params]};
    algo_state = {"batch_stats": running statistics} when the learner keeps them, else {}.

    Args:
      net: the learner and its mode (train / eval, transductive query scoring).
      objective: (outputs, y, mask) -> (loss, metrics), from the task family.
      inner_lr: the inner SGD step size alpha (LSLR's initial rate).
      inner_steps: inner steps on the support set (one lax.scan: metarun.inner.inner_loop).
      first_order: treat inner gradients as constants (FOMAML).
      options: MAML++ options (MAMLPlusPlus).
      rate_steps: per-step rates / BN copies held (the training inner steps); a longer test-time
        loop reuses the last.
      meta_step: the training step the annealed options are for; the trainer supplies it via at_step.
      record: (regression, evaluation) also return predictions.png's `_plot_*` arrays: the adapted
        network's predictions on a grid per task (metarun.algos.prediction_record).
    """
    o = options
    rate_steps = rate_steps or inner_steps
    msl = o.msl and net.train

    def at(tree, step):
        i = jnp.minimum(step, rate_steps - 1)
        return jax.tree.map(lambda a: a[i], tree)

    def full(meta_params, fast, step):
        return {**fast, **at(meta_params["bn"], step)} if o.per_step_bn else fast

    def init(key, task):
        params, stats = net.init(key, task.support.x)
        bn = {k: v for k, v in params.items() if o.per_step_bn and k.startswith("norm")}
        if o.per_step_bn and not bn:
            raise UserError("algo.per_step_bn needs BatchNorm layers (learner.batch_norm=transductive or running)")
        meta = {"net": {k: v for k, v in params.items() if k not in bn}}
        if o.per_step_bn:
            meta["bn"] = jax.tree.map(lambda a: jnp.stack([a] * rate_steps), bn)
        if o.lslr:
            meta["lslr"] = jax.tree.map(lambda a: jnp.full((rate_steps,), inner_lr, a.dtype), meta["net"])
        return meta, ({"batch_stats": stats} if stats else {})

    def forward(meta_params, algo_state, fast, step, x):
        """Outputs and updated running statistics (training with running BatchNorm only)."""
        stats = algo_state.get("batch_stats")
        if net.train and stats:
            return net.apply_updating(full(meta_params, fast, step), x, stats, step)
        return net.apply(full(meta_params, fast, step), x, stats, step), None

    def adapt(meta_params, algo_state, support, key):
        del key

        def step_loss(fast, step, _):
            out, new_stats = forward(meta_params, algo_state, fast, step, support.x)
            return objective(out, support.y, support.mask)[0], new_stats

        opt = scale_by_per_step_rates(meta_params["lslr"]) if o.lslr else optax.sgd(inner_lr)
        order = first_order
        if not first_order and o.first_order_steps and meta_step is not None:
            order = meta_step < o.first_order_steps  # traced: the annealed switch to second order
        fast, _, stats_trace, path = inner_loop(step_loss, meta_params["net"], opt, inner_steps,
                                                first_order=order, trace=msl)
        task_state = {"params": path if msl else fast, "support_x": support.x}
        if record:
            task_state["support"] = support
        if stats_trace is not None and inner_steps > 0:
            task_state["batch_stats"] = per_step_updates(stats_trace, inner_steps)
        return task_state

    def query_loss(meta_params, algo_state, fast, step, query, support_x):
        out = net.apply_query(full(meta_params, fast, step), query.x, support_x, algo_state.get("batch_stats"), step)
        return objective(out, query.y, query.mask)

    def loss(meta_params, algo_state, task_state, query, key):
        del key
        last = max(inner_steps - 1, 0)
        if not msl:
            total, metrics = query_loss(meta_params, algo_state, task_state["params"], last, query,
                                        task_state["support_x"])
            if record:
                params = full(meta_params, task_state["params"], last)
                metrics = {**metrics, **regression_record(task_state["support"], query, lambda x: (net.apply_query(
                    params, x, task_state["support_x"], algo_state.get("batch_stats"), last), None))}
        else:
            losses, per_step = jax.vmap(
                lambda f, s: query_loss(meta_params, algo_state, f, s, query, task_state["support_x"]))(
                task_state["params"], jnp.arange(inner_steps))
            if o.msl_anneal_steps and meta_step is not None:
                weights = msl_weights(inner_steps, meta_step, o.msl_anneal_steps)
            else:
                weights = fixed_msl_weights(inner_steps, o.msl_last_weight)
            total = jnp.dot(weights, losses)
            metrics = {**jax.tree.map(lambda m: m[-1], per_step), "msl_loss": total}
        if "batch_stats" in task_state:
            metrics = {**metrics, STATE_UPDATES: {"batch_stats": task_state["batch_stats"]}}
        return total, metrics

    annealed = (msl and o.msl_anneal_steps) or (o.first_order_steps and not first_order)
    at_step = None
    if annealed and meta_step is None:
        at_step = lambda step: maml(net, objective, inner_lr, inner_steps, first_order, options,  # noqa: E731
                                    rate_steps, meta_step=step, info=info, record=record)
    return MetaAlgorithm(init=init, adapt=adapt, loss=loss, at_step=at_step, info=info or {})


@dataclass
class MAMLConfig:
    name: str = "maml"
    inner_lr: float = 0.4
    inner_steps: int = 1
    eval_inner_steps: int = 3
    first_order: bool = False
    # MAML++ (Antoniou et al. 2019) options; all off = plain MAML. See MAMLPlusPlus.
    msl: bool = False
    msl_anneal_steps: int = 0
    first_order_steps: int = 0
    msl_last_weight: Optional[float] = None
    lslr: bool = False
    per_step_bn: bool = False


def check_inner(a) -> None:
    """One-line errors for the inner-loop keys every gradient-based algorithm has."""
    for key in ("inner_steps", "eval_inner_steps"):
        if a.get(key) is not None and a[key] < 0:
            raise UserError(f"algo.{key}={a[key]} must be >= 0")
    if a.get("inner_lr") is not None and not a.inner_lr > 0:
        raise UserError(f"algo.inner_lr={a.inner_lr} must be > 0")


@register("algo", "fomaml")
@register("algo", "maml", schema=MAMLConfig)
def build(a, c: Collaborators) -> MetaAlgorithm:
    """MAML from its config section; the eval build uses the test-time inner steps."""
    check_inner(a)
    options = MAMLPlusPlus(msl=a.msl, msl_anneal_steps=a.msl_anneal_steps, msl_last_weight=a.msl_last_weight,
                           first_order_steps=a.first_order_steps if c.train else 0, lslr=a.lslr,
                           per_step_bn=a.per_step_bn)
    steps = c.inner_steps_for(a)
    overrides = {}
    if getattr(c.learner_cfg.get("batch_norm"), "value", c.learner_cfg.get("batch_norm")) == "running":
        overrides["bn_steps"] = a.inner_steps if a.per_step_bn else 1
    net = Net(c.learner(c.family.head_dim(c.phase), **overrides), c.train, c.transductive)
    variant = "maml++" if options.any else ("fomaml" if a.first_order else "maml")
    info = {"name": a.name, "variant": variant, "first_order": bool(a.first_order), "inner_lr": a.inner_lr,
            "inner_steps": a.inner_steps, "eval_inner_steps": a.eval_inner_steps, "inner_optimizer": "sgd",
            **({"maml++": asdict(options)} if options.any else {})}
    return maml(net, c.family.objective, a.inner_lr, steps, a.first_order, options, a.inner_steps, info=info,
                record=c.records_regression)
