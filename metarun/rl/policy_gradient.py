"""REINFORCE pieces: discounted returns, the linear feature baseline, GAE, masked means and the surrogate loss."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import rlax

from metarun.rl.rollout import Trajectories


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Mean of x over the entries where mask is 1 (0 when there are none)."""
    mask = jnp.broadcast_to(mask, x.shape).astype(x.dtype)
    return jnp.sum(x * mask, axis) / jnp.maximum(jnp.sum(mask, axis), 1.0)


def discounted_returns(rewards: jax.Array, valid: jax.Array, gamma: float,
                       dones: Optional[jax.Array] = None) -> jax.Array:
    """G_t = valid_t * (r_t + γ (1 - done_t) G_{t+1}), with G_T = 0; time-major [T, ...].

    Args:
        rewards: [T, N] rewards (already zero where not valid).
        valid: [T, N] mask of real steps; a feed-forward rollout's mask alone ends the sums.
        gamma: discount.
        dones: optional [T, N]; cuts the sums at episode ends inside an RL² trial. Leave it None to
            discount across episodes, as RL² does (the trial is one long episode).

    Returns:
        [T, N] discounted returns-to-go.
    """
    cont = jnp.ones_like(rewards) if dones is None else 1.0 - dones

    def body(g_next, xs):
        r, v, c = xs
        g = v * (r + gamma * c * g_next)
        return g, g

    _, returns = jax.lax.scan(body, jnp.zeros_like(rewards[0]), (rewards, valid, cont), reverse=True)
    return returns


def linear_baseline_features(obs: jax.Array, valid: jax.Array) -> jax.Array:
    """Duan et al. (2016) features [obs, obs², t, t², t³, 1] (t = step/100), zeroed where not valid.

    Args:
        obs: [T, N, obs_size].
        valid: [T, N].

    Returns:
        [T, N, 2 * obs_size + 4].
    """
    ones = valid[..., None].astype(obs.dtype)
    obs = obs * ones
    t = jnp.arange(obs.shape[0], dtype=obs.dtype).reshape(-1, 1, 1) * ones / 100.0
    return jnp.concatenate([obs, obs**2, t, t**2, t**3, ones], axis=-1)


def fit_linear_baseline(obs: jax.Array, returns: jax.Array, valid: jax.Array, reg_coeff: float = 1e-5) -> jax.Array:
    """Ridge fit w = argmin ‖Xw − G‖² + λ‖w‖² = (XᵀX + λI)⁻¹XᵀG of the returns on the baseline features.

    rllab / pytorch-maml-rl solve the normal equations and retry with λ·10 when XᵀX + λI is singular.
    Here the same ridge solution is computed by SVD least squares on X stacked over √λ·I, which never
    squares X's condition number and so needs no retry loop (none could run under jit; with constant
    observations of size 1e3, float32 Cholesky solves of the normal equations gave NaN for all five λ).

    Args:
        obs: [T, N, obs_size].
        returns: [T, N] discounted returns to regress on.
        valid: [T, N]; invalid steps have zero features and targets, so they do not enter the fit.
        reg_coeff: λ.

    Returns:
        weights [2 * obs_size + 4].
    """
    n_features = 2 * obs.shape[-1] + 4
    x = linear_baseline_features(obs, valid).reshape(-1, n_features)
    y = (returns * valid).reshape(-1)
    x_aug = jnp.concatenate([x, jnp.sqrt(reg_coeff) * jnp.eye(n_features, dtype=x.dtype)])
    y_aug = jnp.concatenate([y, jnp.zeros(n_features, y.dtype)])
    # Unit-norm columns (an exact change of variables, norms >= √λ > 0): obs² and t³ differ in scale by
    # orders of magnitude, and SVD's float32 cutoff would otherwise drop the small columns.
    scale = jnp.linalg.norm(x_aug, axis=0)
    return jnp.linalg.lstsq(x_aug / scale, y_aug)[0] / scale


def linear_baseline_values(weights: jax.Array, obs: jax.Array, valid: jax.Array) -> jax.Array:
    """Baseline predictions [T, N] (zero where not valid)."""
    return linear_baseline_features(obs, valid) @ weights


def gae(rewards: jax.Array, values: jax.Array, valid: jax.Array, gamma: float, lam: float,
        dones: Optional[jax.Array] = None) -> jax.Array:
    """Generalised advantage estimates (Schulman et al. 2016) via rlax, time-major [T, N].

    Values after termination are masked to 0 and the value past the horizon is 0, as in
    pytorch-maml-rl; `dones` (RL² trials) additionally stops bootstrapping across episode ends.

    Args:
        rewards: [T, N].
        values: [T, N] baseline values V(s_t).
        valid: [T, N].
        gamma: discount γ.
        lam: GAE λ (1 gives returns − values).
        dones: optional [T, N] episode ends.

    Returns:
        [T, N] advantages, zero where not valid.
    """
    values = jnp.concatenate([values * valid, jnp.zeros_like(values[:1])], axis=0)
    discounts = gamma * jnp.ones_like(rewards) if dones is None else gamma * (1.0 - dones)
    adv = jax.vmap(rlax.truncated_generalized_advantage_estimation, (1, 1, None, 1), 1)(
        rewards * valid, discounts, lam, values)
    return adv * valid


def normalize_advantages(advantages: jax.Array, valid: jax.Array, eps: float = 1e-8) -> jax.Array:
    """(A − mean) / (std + eps) with mean and std over the batch's valid steps; zero elsewhere."""
    mean = masked_mean(advantages, valid)
    std = jnp.sqrt(masked_mean((advantages - mean) ** 2, valid))
    return (advantages - mean) / (std + eps) * valid


def linear_baseline_advantages(traj: Trajectories, gamma: float = 0.99, lam: float = 1.0,
                               reg_coeff: float = 1e-5, normalize: bool = True,
                               dones: Optional[jax.Array] = None) -> jax.Array:
    """pytorch-maml-rl's advantage pipeline for one task's batch: returns → linear baseline fitted on
    this batch → GAE → (optionally) normalised. Treated as data: wrap in stop_gradient upstream if needed.

    Returns:
        [T, N] advantages.
    """
    returns = discounted_returns(traj.rewards, traj.valid, gamma, dones)
    weights = fit_linear_baseline(traj.obs, returns, traj.valid, reg_coeff)
    values = linear_baseline_values(weights, traj.obs, traj.valid)
    adv = gae(traj.rewards, values, traj.valid, gamma, lam, dones)
    return normalize_advantages(adv, traj.valid) if normalize else adv


def reinforce_loss(log_probs: jax.Array, advantages: jax.Array, valid: jax.Array,
                   behaviour_log_probs: Optional[jax.Array] = None) -> jax.Array:
    """REINFORCE surrogate −E[log π(a_t|s_t) · A_t] averaged over the valid steps of the batch.

    Its gradient is the policy-gradient estimate; advantages are treated as constants. Note:
    pytorch-maml-rl averages per episode and then over episodes; with equal lengths the two agree.
    behaviour_log_probs is ignored (accepted so the inner estimators share one signature): a replay from other
    parameters is not importance-weighted, as in pytorch-maml-rl's TRPO.
    """
    del behaviour_log_probs
    return -masked_mean(log_probs * jax.lax.stop_gradient(advantages), valid)


def lvc_loss(log_probs: jax.Array, advantages: jax.Array, valid: jax.Array,
             behaviour_log_probs: Optional[jax.Array] = None) -> jax.Array:
    """ProMP's low-variance curvature surrogate (Rothfuss et al. 2019, eq. 9): −E[π/⊥π · A_t].

    The ratio exp(log π − stop_gradient(log π)) is 1 in value, so the gradient equals REINFORCE's
    (`reinforce_loss`); the second derivative differs. REINFORCE's Hessian is Σ_t A_t ∇²log π_t — it
    treats the sampled actions as fixed data. LVC's is Σ_t A_t (∇log π_t ∇log π_tᵀ + ∇²log π_t). The
    added outer product is the per-step score-function term: how the pre-update policy's sampling
    distribution shapes the inner step. As MAML's inner objective, its meta-gradient therefore credits the
    pre-update policy's exploration, which the plain surrogate does not. Per-step ratios, not products
    over the trajectory: the variance-reduced (biased) form the ProMP paper proposes over DiCE.

    behaviour_log_probs: the sampling policy's log π of the actions (the rollout's recorded `log_probs`). Given,
    the ratio is π/π_behaviour: equal in value and derivatives at the sampling parameters, and importance-weighted
    when the inner step is replayed from other parameters (PPO's later epochs, TRPO's line search), as ProMP's
    inner objective. None: the ratio to the current log π itself, always 1 in value (on-policy adaptation).
    """
    reference = jax.lax.stop_gradient(log_probs if behaviour_log_probs is None else behaviour_log_probs)
    ratio = jnp.exp(log_probs - reference)
    return -masked_mean(ratio * jax.lax.stop_gradient(advantages), valid)


INNER_ESTIMATORS = {"reinforce": reinforce_loss, "lvc": lvc_loss}


def clipped_surrogate_loss(log_probs: jax.Array, old_log_probs: jax.Array, advantages: jax.Array, valid: jax.Array,
                           clip_eps: float):
    """PPO-clip (Schulman et al. 2017) over the valid steps: −mean(min(r·A, clip(r, 1 ± ε)·A)), r = π/π_old.

    Returns (loss, the fraction of valid steps whose ratio lies outside 1 ± ε).
    """
    ratio = jnp.exp(log_probs - jax.lax.stop_gradient(old_log_probs))
    adv = jax.lax.stop_gradient(advantages)
    objective = jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv)
    clipped = (jnp.abs(ratio - 1.0) > clip_eps).astype(ratio.dtype)
    return -masked_mean(objective, valid), masked_mean(clipped, valid)
