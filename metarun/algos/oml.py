"""OML (Javed & White 2019, "Meta-Learning Representations for Continual Learning") and the sequential
inner loop it shares with ANML (metarun/algos/anml.py).

meta_params = {"net": {"rln": representation, "pln": prediction network[, "nm": ANML's neuromodulation]}}.
`adapt` learns a trajectory (task.family=stream: classes one after another) with plain SGD, one example per
step, in order (metarun.inner.inner_loop, `xs` = the example indices); `loss` is the cross-entropy of the
adapted network on the trajectory's images plus a remember batch of other classes. Meta-training uses the
default meta-step. At meta-test time the representation is frozen and only the PLN learns
(metarun.continual_protocol; `fast_slow` below tells it which is which).

Before a trajectory, the head's rows of its classes are re-initialised (He-normal; the authors' code calls it
resetting / "lobotomizing" the classifier): the inner loop must learn the class from scratch, so the
meta-gradient goes through it instead of through a memorised row. The authors overwrite the row of the
meta-parameters in place; here the reset is part of `adapt`, so the meta-parameters keep their row and the
outer loop trains it through the remember batch only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

from metarun.algos.base import Collaborators, MetaAlgorithm
from metarun.errors import UserError
from metarun.fast_slow import FastSlow
from metarun.inner import inner_loop
from metarun.learners.continual_mlp import OMLMLP
from metarun.learners.continual_nets import HEAD, ANMLNet, OMLNet, min_image_side, pln_apply
from metarun.registry import register

ADAPTED = ("pln", "prediction")  # what the inner loop trains: the PLN only, or ANML's prediction network (RLN + PLN)


def sequential_sgd(example_loss, params, n: int, lr: float, labels, first_order=False):
    """`n` plain SGD steps, step i on example i alone (`example_loss(params, i)`), in order, in one lax.scan.

    Returns (params, seen): `seen[i]` is the label of the example step i learned (labels[i]) — what the
    tests read to check that every example is seen once, in order."""

    def step_loss(p, step, i):
        return example_loss(p, i), labels[i]

    params, _, seen, _ = inner_loop(step_loss, params, optax.sgd(lr), n, xs=jnp.arange(n), first_order=first_order)
    return params, seen


def he_normal_columns(key, fan_in: int, count: int) -> jax.Array:
    """[fan_in, count] He-normal weights (torch's kaiming_normal_ on a [count, fan_in] weight)."""
    return jax.random.normal(key, (fan_in, count)) * math.sqrt(2.0 / fan_in)


def reset_rows(key, head, classes: jax.Array):
    """The head with the output columns of `classes` re-initialised (the bias kept, as mrcl and ANML do)."""
    fan_in = head["kernel"].shape[0]
    fresh = he_normal_columns(key, fan_in, classes.shape[0])
    return {"kernel": head["kernel"].at[:, classes].set(fresh), "bias": head["bias"]}


def fresh_head(key, fan_in: int, outputs: int):
    """A new final layer: He-normal weights, zero bias (the authors' meta-test reset)."""
    return {"kernel": he_normal_columns(key, fan_in, outputs), "bias": jnp.zeros((outputs,))}


def oml(module, objective, inner_lr: float, adapted: str = "pln", first_order: bool = False, train: bool = True,
        eval_ways: int = 0, info=None, reset_head: bool = True, step_batch: int = 1) -> MetaAlgorithm:
    """Builds OML / ANML over a continual net (`OMLNet` / `ANMLNet` with out_dim = training classes).

    adapted: "pln" (OML: the RLN is fixed inside the inner loop, its features computed once per trajectory)
      or "prediction" (ANML: the prediction network's convolutions and its PLN learn, the NM gates fixed).
    train: the training build resets the trajectory classes' head rows; the evaluation build (stream
      episodes: labels 0..eval_ways-1) learns a fresh `eval_ways`-output head on the frozen representation.
    reset_head: False for regression streams (incremental sine): the PLN starts from the meta-learned one, as
      mrcl's regression code does (no class rows to reset).
    step_batch: examples per inner SGD step, consecutive in the support's order (mrcl's sine: 32 points).
    """
    if adapted not in ADAPTED:
        raise UserError(f"algo.adapt={adapted} is unknown; expected one of: {', '.join(ADAPTED)}")

    def call(params, x, method):
        return module.apply({"params": params}, x, method=method)

    def init(key, task):
        return {"net": module.init(key, task.support.x[:1])["params"]}, {}

    def adapt(meta_params, algo_state, support, key):
        del algo_state
        params = meta_params["net"]
        n = support.y.shape[0]
        if not reset_head:
            head = params["pln"][HEAD]
        elif train:
            head = reset_rows(key, params["pln"][HEAD], support.y)
        else:
            head = fresh_head(key, params["pln"][HEAD]["kernel"].shape[0], eval_ways)
        pln = {**params["pln"], HEAD: head}
        if adapted == "pln" or not train:
            features = call(params, support.x, "represent")   # the RLN does not change inside the loop
            steps = n // step_batch                            # step i learns examples i*B..(i+1)*B-1
            features = features.reshape((steps, step_batch) + features.shape[1:])
            targets = support.y.reshape((steps, step_batch) + support.y.shape[1:])

            def example_loss(p, i):
                return objective(pln_apply(p, features[i]), targets[i])[0]

            pln, seen = sequential_sgd(example_loss, pln, steps, inner_lr, targets[:, 0], first_order)
            return {"net": {**params, "pln": pln}, "seen": seen}
        gates = call(params, support.x, "gates")              # the NM network does not change inside the loop

        def prediction_loss(fast, i):
            features = call({**params, **fast}, support.x[i][None], "features") * gates[i][None]
            return objective(pln_apply(fast["pln"], features), support.y[i][None])[0]

        fast, seen = sequential_sgd(prediction_loss, {"rln": params["rln"], "pln": pln}, n, inner_lr, support.y,
                                    first_order)
        return {"net": {**params, **fast}, "seen": seen}

    def loss(meta_params, algo_state, task_state, query, key):
        del meta_params, algo_state, key
        params = task_state["net"]
        return objective(pln_apply(params["pln"], call(params, query.x, "represent")), query.y, query.mask)

    return MetaAlgorithm(init=init, adapt=adapt, loss=loss, info=info or {})


def fast_slow(algo_cfg, c: Collaborators, params, algo_state) -> FastSlow:
    """The continual protocol's view: the (gated) representation is slow, the PLN fast."""
    del algo_cfg, algo_state
    module = c.learner(c.family.head_dim("train"))
    net = params["net"]
    return FastSlow(represent=lambda x: module.apply({"params": net}, x, method="represent"), pln=net["pln"])


def build_continual(a, c: Collaborators, name: str, needs_gates: bool = False) -> MetaAlgorithm:
    """The shared builder of oml and anml: checks the family and learner, then `oml(...)`."""
    regression = c.family.kind == "regression_stream"
    if c.family.kind != "stream" and not regression:
        raise UserError(f"algo={name} meta-learns from class streams: use task=stream (task.family=stream); "
                        f"dataset={c.family.name} is read as {c.family.kind} tasks (function streams: "
                        f"experiment=oml_incremental_sine)")
    module = c.learner(c.family.head_dim(c.phase))
    nets = (OMLMLP,) if regression and not needs_gates else (ANMLNet,) if needs_gates else (OMLNet, ANMLNet)
    if not isinstance(module, nets):
        wanted = ("learner=oml_mlp" if regression and not needs_gates else "learner=anml_net" if needs_gates
                  else "learner=oml_net or learner=anml_net")
        raise UserError(f"algo={name} needs a representation and a prediction network: {wanted} "
                        f"(learner={c.learner_cfg.name} has no such split)")
    if a.adapt == "prediction" and not isinstance(module, ANMLNet):
        raise UserError("algo.adapt=prediction adapts ANML's prediction network: use learner=anml_net or "
                        "algo.adapt=pln")
    side, need = (1, 1) if regression else (min(c.family.image_shape[:2]), min_image_side(module))
    if side < need:
        raise UserError(f"dataset.image_size={side} is too small for learner={c.learner_cfg.name} (valid convolutions "
                        f"need >= {need} pixels): use dataset.image_size >= {need}")
    if not a.inner_lr > 0:
        raise UserError(f"algo.inner_lr={a.inner_lr} must be > 0")
    step_batch = int(getattr(c.family, "step_batch", 1))
    info = {"name": name, "inner_lr": a.inner_lr, "first_order": bool(a.first_order), "adapt": a.adapt,
            "inner_optimizer": "sgd", "inner_batch": step_batch, "outputs": c.family.head_dim("train"),
            "head_reset": ("none: the PLN starts from the meta-learned one (mrcl's regression)" if regression else
                           "trajectory classes' rows re-initialised inside adapt (meta-parameters keep theirs)")}
    return oml(module, c.family.objective, a.inner_lr, a.adapt, a.first_order, c.train, c.family.ways("eval"), info,
               reset_head=not regression, step_batch=step_batch)


@dataclass
class OMLConfig:
    """mrcl's Omniglot command: --rln 6 --update_lr 0.03 --update_step 20 (trajectory: task.shots), meta lr 1e-4."""
    name: str = "oml"
    inner_lr: float = 0.03
    # mrcl differentiates the query loss, not the inner gradients (torch.autograd.grad without create_graph)
    first_order: bool = True
    adapt: str = "pln"


@register("algo", "oml", schema=OMLConfig, fast_slow=fast_slow)
def build(a, c: Collaborators) -> MetaAlgorithm:
    return build_continual(a, c, "oml")
