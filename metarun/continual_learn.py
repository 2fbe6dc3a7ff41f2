"""The continual protocol's learning runs, pure and jitted: a PLN learns K classes one after another from
frozen features, one example per optimiser step, one pass; many runs (class orders) in one call.

A run learns class i (its `shots` training features, label i) after classes 0..i-1, then:
* `diagonal[i]`: accuracy on class i's held-out features just after learning it;
* every `segment` classes (and after the last), one row of accuracies on every class of the run (those not
  learned yet are meaningless and masked by the caller). Rows after every class would cost K^3; rows at
  most ~20 times per run keep the accuracy matrix (forgetting, backward transfer) at the cost of the
  learning itself.
No I/O here; metarun.continual_protocol chooses the class orders, the rates and the split.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from metarun.learners.continual_nets import HEAD, pln_apply

MAX_ROWS = 20  # accuracy rows per run at most (plus the diagonal): a full matrix up to K = 20


class RunOutputs(NamedTuple):
    diagonal: jax.Array   # [R, K] accuracy on class i just after learning it
    rows: jax.Array       # [R, K // segment, K] accuracy on every class after classes 0..(p+1)*segment-1


def segment_length(classes: int, max_rows: int = MAX_ROWS) -> int:
    """The smallest divisor g of `classes` with classes / g <= max_rows: rows after every g classes, no padding."""
    for g in range(max(1, math.ceil(classes / max_rows)), classes + 1):
        if classes % g == 0:
            return g
    return classes


def make_optimizer(name: str, lr) -> optax.GradientTransformation:
    """adam: the OML / ANML evaluation code's torch.optim.Adam (same betas and eps); sgd: plain SGD."""
    if name == "adam":
        return optax.adam(lr)
    if name == "sgd":
        return optax.sgd(lr)
    raise ValueError(f"continual optimizer {name!r}: expected adam or sgd")


def initial_pln(meta_pln: Optional[dict], key, feature_dim: int, classes: int, head: str) -> dict:
    """The PLN a run starts from: the meta-learned one with its final layer re-initialised for `classes`
    outputs (head="reset": He-normal weights, zero bias, as the authors' evaluation) or cut to its first
    `classes` outputs (head="meta"); a fresh linear head when there is no meta-learned PLN."""
    if meta_pln is None:
        return {HEAD: fresh_linear(key, feature_dim, classes)}
    if head == "meta":
        return {**meta_pln, HEAD: jax.tree.map(lambda a: a[..., :classes], meta_pln[HEAD])}
    return {**meta_pln, HEAD: fresh_linear(key, meta_pln[HEAD]["kernel"].shape[0], classes)}


def fresh_linear(key, fan_in: int, outputs: int) -> dict:
    return {"kernel": jax.random.normal(key, (fan_in, outputs)) * math.sqrt(2.0 / fan_in),
            "bias": jnp.zeros((outputs,))}


def make_runs(optimizer: str, head: str, classes: int, run_batch: int = 1) -> Callable:
    """A jitted `(train [C, S, D], held_out [C, Q, D], meta_pln, orders [R, K], keys [R], lr) -> RunOutputs`.

    `orders[r]` are the split's classes of run r in the order learned (class orders[r, i] gets label i).
    Runs go through `lax.map`, `run_batch` of them vmapped at a time (memory: each holds its own PLN and
    optimiser state). `lr` is traced: one compilation serves every rate of a sweep.
    """
    segment = segment_length(classes)

    def one_run(train, held_out, meta_pln, order, key, lr):
        opt = make_optimizer(optimizer, lr)
        pln = initial_pln(meta_pln, key, train.shape[-1], classes, head)
        state = opt.init(pln)
        queries = held_out.shape[1]

        def learn_class(carry, inputs):
            c, label = inputs

            def step(carry, x):
                pln, state = carry
                grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
                    pln_apply(p, x[None]), label[None]).mean())(pln)
                updates, state = opt.update(grads, state, pln)
                return (optax.apply_updates(pln, updates), state), None

            (pln, state), _ = jax.lax.scan(step, carry, train[c])   # one example per step, in order
            just_learned = (jnp.argmax(pln_apply(pln, held_out[c]), -1) == label).mean()
            return (pln, state), just_learned

        def learn_segment(carry, inputs):
            carry, diagonal = jax.lax.scan(learn_class, carry, inputs)
            x = held_out[order].reshape(classes * queries, -1)
            labels = jnp.repeat(jnp.arange(classes), queries)
            row = (jnp.argmax(pln_apply(carry[0], x), -1) == labels).reshape(classes, queries).mean(1)
            return carry, (diagonal, row)

        labels = jnp.arange(classes)
        inputs = (order.reshape(-1, segment), labels.reshape(-1, segment))
        _, (diagonal, rows) = jax.lax.scan(learn_segment, (pln, state), inputs)
        return diagonal.reshape(classes), rows

    @jax.jit
    def runs(train, held_out, meta_pln, orders, keys, lr):
        diagonal, rows = jax.lax.map(lambda ok: one_run(train, held_out, meta_pln, ok[0], ok[1], lr), (orders, keys),
                                     batch_size=run_batch if run_batch > 1 else None)
        return RunOutputs(diagonal, rows)

    return runs


def segment_ends(classes: int) -> list:
    """How many classes had been learned at each row of RunOutputs.rows."""
    g = segment_length(classes)
    return [g * (p + 1) for p in range(classes // g)]
