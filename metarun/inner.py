"""The one inner loop: any optax GradientTransformation run for k steps by one lax.scan.

MAML, FOMAML, Meta-SGD, ANIL, MAML++ and Reptile differ in what they differentiate, which
parameters they adapt and which transform makes the step — not in the loop. The transforms
here are the inner updates optax does not ship: Meta-SGD's learned per-parameter rates and
MAML++'s learned per-layer, per-step rates (both meta-parameters, so gradients flow into them).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax


class StepCount(NamedTuple):
    count: jax.Array  # int32: inner steps taken so far (selects per-step rates)


def scale_by_learned_rates(rates) -> optax.GradientTransformation:
    """Meta-SGD: update = -α ∘ g, α a pytree shaped like the params (a meta-parameter)."""
    return optax.GradientTransformation(
        lambda params: optax.EmptyState(),
        lambda grads, state, params=None: (jax.tree.map(lambda a, g: -a * g, rates, grads), state))


def scale_by_per_step_rates(rates) -> optax.GradientTransformation:
    """MAML++ LSLR: update = -α[l, i] g at inner step i, one rate per parameter tensor l and step.

    Each leaf of `rates` has shape [rate_steps]; a longer loop than rate_steps reuses the last rate.
    """

    def update(grads, state, params=None):
        n = jax.tree.leaves(rates)[0].shape[0]
        i = jnp.minimum(state.count, n - 1)
        return jax.tree.map(lambda r, g: -r[i] * g, rates, grads), StepCount(state.count + 1)

    return optax.GradientTransformation(lambda params: StepCount(jnp.zeros((), jnp.int32)), update)


def inner_loop(step_loss: Callable, params, opt: optax.GradientTransformation, steps: int,
               opt_state=None, xs=None, first_order=False, trace: bool = False):
    """Run `steps` updates of `opt` on `step_loss(params, step, x) -> (loss, aux)`.

    Args:
      step_loss: the loss at inner step `step` (an int32 array) on the step's input `x`
        (a minibatch, or None); `aux` is any pytree (e.g. batch statistics), stacked per step.
      params: the pytree adapted (all weights, a head, per-task variational parameters, ...).
      opt: the inner update (optax.sgd, scale_by_learned_rates, optax.adam(b1=0), ...).
      steps: how many updates (0 returns params unchanged).
      opt_state: the transform's starting state (default: opt.init(params)); Reptile passes the
        moments it carries across tasks.
      xs: per-step inputs with a leading axis of length `steps` (e.g. minibatch indices).
      first_order: a bool, or a traced bool (MAML++'s annealed order): treat the inner
        gradients as constants, so no second derivatives flow back.
      trace: also return the params after every step (MAML++'s multi-step loss).

    Returns:
      (params, opt_state, aux [steps, ...], params_trace [steps, ...] or None)
    """
    if opt_state is None:
        opt_state = opt.init(params)
    constant = isinstance(first_order, bool)

    def one(carry, inputs):
        p, s = carry
        step, x = inputs
        (_, aux), grads = jax.value_and_grad(step_loss, has_aux=True)(p, step, x)
        if constant:
            grads = jax.lax.stop_gradient(grads) if first_order else grads
        else:
            grads = jax.lax.cond(first_order, jax.lax.stop_gradient, lambda g: g, grads)
        updates, s = opt.update(grads, s, p)
        p = optax.apply_updates(p, updates)
        return (p, s), (aux, p if trace else None)

    (params, opt_state), (aux, path) = jax.lax.scan(one, (params, opt_state), (jnp.arange(steps), xs),
                                                    length=steps)
    return params, opt_state, aux, path


def make_inner_opt(name: str, lr: float, beta1: float = 0.9) -> optax.GradientTransformation:
    """A named inner optimiser: sgd, or adam (Reptile's authors use β1 = 0)."""
    if name == "sgd":
        return optax.sgd(lr)
    if name == "adam":
        return optax.adam(lr, b1=beta1)
    raise ValueError(f"inner optimiser {name!r}: expected sgd or adam")


def minibatch_indices(key, n: int, batch: Optional[int], steps: int) -> jax.Array:
    """[steps, batch] indices into n examples: shuffled passes without replacement (supervised-reptile's
    `_mini_batches`); batch=None or >= n gives the whole set at every step."""
    if batch is None or batch >= n:
        return jnp.broadcast_to(jnp.arange(n), (steps, n))
    passes = -(-steps * batch // n)
    perms = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, passes))
    return perms.reshape(-1)[: steps * batch].reshape(steps, batch)
