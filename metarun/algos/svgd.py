"""Stein variational gradient descent (Liu & Wang 2016) over particle pytrees, and BMAML's chaser loss."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree


def flatten_particles(particles) -> Tuple[jax.Array, Callable]:
    """A pytree whose leaves stack M particles on axis 0 -> ([M, D] matrix, unflatten: [M, D] -> pytree).

    Each particle is raveled with jax.flatten_util.ravel_pytree, so D is the total number of weights.
    """
    first = jax.tree.map(lambda a: a[0], particles)
    _, unravel_one = ravel_pytree(first)
    flat = jax.vmap(lambda p: ravel_pytree(p)[0])(particles)
    return flat, jax.vmap(unravel_one)


def median_bandwidth(particles_flat) -> jax.Array:
    """The median heuristic h = med(||x_i - x_j||^2) / log(M + 1) for k(x, y) = exp(-||x - y||^2 / h).

    med is over all M^2 pairs, the diagonal's zeros included, and log(M + 1) as in Liu & Wang's code,
    which keeps M = 1 defined. h is a constant for autodiff (stop_gradient), as in BMAML, and floored so
    that coincident particles give k = 1 rather than 0/0.
    """
    m = particles_flat.shape[0]
    med = jnp.median(_sq_dists(particles_flat))
    return jax.lax.stop_gradient(jnp.maximum(med, 1e-12) / jnp.log(m + 1.0))


def _sq_dists(x):
    # Through differences, not |x|^2 + |y|^2 - 2xy: no cancellation when particles are close.
    return jnp.square(x[:, None, :] - x[None, :, :]).sum(-1)


def rbf_kernel(particles_flat, bandwidth: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array]:
    """The RBF kernel matrix K_ij = exp(-||x_i - x_j||^2 / h) over [M, D] particles and the h used.

    Args:
      particles_flat: [M, D] particles.
      bandwidth: h; None uses `median_bandwidth`.
    """
    h = median_bandwidth(particles_flat) if bandwidth is None else bandwidth
    return jnp.exp(-_sq_dists(particles_flat) / h), h


def svgd_direction(particles_flat, grads_logp_flat, bandwidth: Optional[jax.Array] = None) -> jax.Array:
    """The SVGD update direction phi(x_i) = (1/M) sum_j [k(x_j, x_i) grad log p(x_j) + grad_{x_j} k(x_j, x_i)].

    The first term moves particles up the kernel-smoothed log-density; the second repels them from each
    other. With k = exp(-|x_j - x_i|^2 / h), grad_{x_j} k(x_j, x_i) = (2/h) k_ij (x_i - x_j).

    Args:
      particles_flat: [M, D] particles.
      grads_logp_flat: [M, D] grad log p at each particle.
      bandwidth: h; None uses the median heuristic.

    Returns:
      [M, D]; a step is x + step_size * phi.
    """
    m = particles_flat.shape[0]
    k, h = rbf_kernel(particles_flat, bandwidth)
    driving = k @ grads_logp_flat
    repulsive = (2.0 / h) * (particles_flat * k.sum(1, keepdims=True) - k @ particles_flat)
    return (driving + repulsive) / m


def svgd_step(particles, grad_logp, step_size, bandwidth: Optional[jax.Array] = None):
    """One SVGD step x_i <- x_i + step_size * phi(x_i) on a stacked particle pytree.

    Args:
      particles: pytree whose leaves stack M particles on axis 0 (e.g. vmapped learner.init).
      grad_logp: same structure: grad log p at each particle (for a loss, pass -grad loss).
      step_size: the SVGD step size epsilon.
      bandwidth: h; None uses the median heuristic over the flattened particles.
    """
    flat, unflatten = flatten_particles(particles)
    grads, _ = flatten_particles(grad_logp)
    return unflatten(flat + step_size * svgd_direction(flat, grads, bandwidth))


def svgd_steps(particles, grad_logp_fn: Callable, step_size, steps: int, first_order: bool = False):
    """`steps` SVGD steps (a lax.scan, so the step compiles once); BMAML's inner loop for chaser and leader.

    Args:
      particles: stacked particle pytree (M on axis 0).
      grad_logp_fn: stacked particles -> stacked grad log p (e.g. vmap(grad(log_posterior)) over a support set).
      step_size: the SVGD step size.
      steps: how many steps; static.
      first_order: treat grad log p as a constant for the meta-gradient (no second derivatives).
    """

    def step(x, _):
        g = grad_logp_fn(x)
        if first_order:
            g = jax.lax.stop_gradient(g)
        return svgd_step(x, g, step_size), None

    out, _ = jax.lax.scan(step, particles, None, length=steps)
    return out


def chaser_loss(chaser, leader) -> jax.Array:
    """BMAML's meta-loss (Yoon et al. 2018): (1/M) sum_m ||theta_chaser^m - stop_gradient(theta_leader^m)||^2.

    The chaser ran n SVGD steps on the support set, the leader s more steps from there on support + query;
    the leader is a fixed target, so the meta-gradient only flows through the chaser. The paper sums over
    particles; the mean keeps the scale independent of M.

    Args:
      chaser: stacked particle pytree (M on axis 0).
      leader: same structure.
    """
    c, _ = flatten_particles(chaser)
    target, _ = flatten_particles(leader)
    return jnp.square(c - jax.lax.stop_gradient(target)).sum(-1).mean()
