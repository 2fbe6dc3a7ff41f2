"""REINFORCE pieces against numpy loops and closed forms, and REINFORCE actually learning."""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metarun.rl.envs import NavigationParams, get_env
from metarun.rl.policies import Categorical, GaussianMLPPolicy
from metarun.rl.policy_gradient import (discounted_returns, fit_linear_baseline, gae, linear_baseline_advantages,
                                        linear_baseline_features, linear_baseline_values, masked_mean,
                                        lvc_loss, normalize_advantages, reinforce_loss)
from metarun.rl.rollout import rollout

# Compiles many small programs (tens of seconds on 2 cores): run in CI's second pass (--runslow).
pytestmark = pytest.mark.slow

T, N = 12, 5


def random_batch(seed=0):
    """Rewards, values, a valid mask from random termination steps (one trajectory never ends), dones."""
    rng = np.random.default_rng(seed)
    ends = np.array([3, 7, 11, 0, T])  # index of the terminal step; T = runs past the horizon
    valid = (np.arange(T)[:, None] <= ends[None, :]).astype(np.float32)
    rewards = rng.normal(size=(T, N)).astype(np.float32) * valid
    values = rng.normal(size=(T, N)).astype(np.float32)
    dones = (rng.random((T, N)) < 0.2).astype(np.float32)
    return rewards, values, valid, dones


def numpy_returns(rewards, valid, gamma, dones=None):
    out = np.zeros_like(rewards)
    for n in range(rewards.shape[1]):
        g = 0.0
        for t in reversed(range(rewards.shape[0])):
            cont = 1.0 if dones is None else 1.0 - dones[t, n]
            g = valid[t, n] * (rewards[t, n] + gamma * cont * g)
            out[t, n] = g
    return out


def numpy_gae(rewards, values, valid, gamma, lam, dones=None):
    out = np.zeros_like(rewards)
    for n in range(rewards.shape[1]):
        a = 0.0
        for t in reversed(range(rewards.shape[0])):
            if not valid[t, n]:
                a = 0.0
                continue
            cont = 1.0 if dones is None else 1.0 - dones[t, n]
            v_next = values[t + 1, n] * valid[t + 1, n] if t + 1 < rewards.shape[0] else 0.0
            delta = rewards[t, n] + gamma * cont * v_next - values[t, n]
            a = delta + gamma * lam * cont * a
            out[t, n] = a
    return out


@pytest.mark.parametrize("with_dones", [False, True])
def test_discounted_returns_match_numpy_loop(with_dones):
    rewards, _, valid, dones = random_batch()
    d = dones if with_dones else None
    got = discounted_returns(jnp.asarray(rewards), jnp.asarray(valid), 0.9, None if d is None else jnp.asarray(d))
    np.testing.assert_allclose(got, numpy_returns(rewards, valid, 0.9, d), rtol=1e-5, atol=1e-6)
    if not with_dones:  # closed form on one trajectory: 1 + 0.9 + 0.81 + 0.729 for 4 unit rewards
        ones = jnp.ones((4, 1))
        np.testing.assert_allclose(discounted_returns(ones, ones, 0.9)[:, 0], [3.439, 2.71, 1.9, 1.0], rtol=1e-6)


@pytest.mark.parametrize("lam,with_dones", [(0.95, False), (1.0, False), (0.8, True)])
def test_gae_matches_numpy_loop(lam, with_dones):
    rewards, values, valid, dones = random_batch(1)
    d = dones if with_dones else None
    got = gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(valid), 0.99, lam,
              None if d is None else jnp.asarray(d))
    np.testing.assert_allclose(got, numpy_gae(rewards, values, valid, 0.99, lam, d), rtol=1e-4, atol=1e-5)
    if lam == 1.0:  # GAE(λ=1) = returns − values on valid steps
        expected = (numpy_returns(rewards, valid, 0.99) - values) * valid
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_linear_baseline_equals_numpy_lstsq():
    rng = np.random.default_rng(2)
    obs = rng.normal(size=(T, N, 3)).astype(np.float32)
    _, _, valid, _ = random_batch()
    returns = (rng.normal(size=(T, N)) * valid).astype(np.float32)
    # Features built independently in numpy: [o, o², t, t², t³, 1] with t = step / 100 on valid steps.
    rows, targets = [], []
    for t in range(T):
        for n in range(N):
            if valid[t, n]:
                o, s = obs[t, n].astype(np.float64), t / 100.0
                rows.append(np.concatenate([o, o**2, [s, s**2, s**3, 1.0]]))
                targets.append(returns[t, n])
    x, y = np.array(rows), np.array(targets)
    # The ridge solution (XᵀX + λI)⁻¹Xᵀy is lstsq's on X stacked over √λ·I (targets padded with zeros).
    lam = 1e-5
    x_aug = np.concatenate([x, np.sqrt(lam) * np.eye(x.shape[1])])
    w_np = np.linalg.lstsq(x_aug, np.concatenate([y, np.zeros(x.shape[1])]), rcond=None)[0]
    feats = linear_baseline_features(jnp.asarray(obs), jnp.asarray(valid))
    np.testing.assert_allclose(feats[jnp.asarray(valid) > 0], x, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(feats[jnp.asarray(valid) == 0], 0.0)
    w = fit_linear_baseline(jnp.asarray(obs), jnp.asarray(returns), jnp.asarray(valid), reg_coeff=lam)
    pred = linear_baseline_values(w, jnp.asarray(obs), jnp.asarray(valid))
    np.testing.assert_allclose(w, w_np, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(pred[jnp.asarray(valid) > 0], x @ w_np, atol=1e-4)
    np.testing.assert_array_equal(pred[jnp.asarray(valid) == 0], 0.0)


def test_linear_baseline_survives_rank_deficient_large_observations():
    # Constant observations of size 1e3: XᵀX is singular up to λ and float32 normal equations give NaN.
    obs, valid = jnp.full((T, N, 2), 1e3), jnp.ones((T, N))
    returns = jnp.broadcast_to(1.0 - jnp.arange(T)[:, None] / 100.0, (T, N))
    pred = linear_baseline_values(fit_linear_baseline(obs, returns, valid), obs, valid)
    np.testing.assert_allclose(pred, returns, atol=1e-4)


def test_masked_mean_and_normalisation_use_valid_steps_only():
    x = jnp.array([[1.0, 2.0], [3.0, 100.0]])
    m = jnp.array([[1.0, 1.0], [1.0, 0.0]])
    assert float(masked_mean(x, m)) == pytest.approx(2.0)
    np.testing.assert_allclose(masked_mean(x, m, axis=0), [2.0, 2.0])
    assert float(masked_mean(x, jnp.zeros_like(m))) == 0.0
    z = normalize_advantages(x, m)
    sd = np.std([1.0, 2.0, 3.0])
    np.testing.assert_allclose(z, [[-1 / sd, 0.0], [1 / sd, 0.0]], rtol=1e-5)


def test_reinforce_gradient_on_two_armed_bandit_points_to_better_arm():
    env = get_env("BernoulliBandit-misc")
    task = {"reward_probs": jnp.array([0.9, 0.1]), "exp_reward_best": jnp.array(0.9)}
    policy_apply = lambda logits, obs: Categorical(jnp.broadcast_to(logits, obs.shape[:-1] + (2,)))
    logits = jnp.zeros(2)

    @jax.jit
    def grads(logits, key):
        traj = rollout(env, policy_apply, logits, task, key, 1, 4000)  # one pull per trajectory

        def loss(lg, adv):
            lp = policy_apply(lg, traj.obs).log_prob(traj.actions)
            return reinforce_loss(lp, adv, traj.valid)

        raw = jax.grad(loss)(logits, traj.rewards)
        normalised = jax.grad(loss)(logits, normalize_advantages(traj.rewards, traj.valid))
        return raw, normalised

    raw, normalised = grads(logits, jax.random.PRNGKey(3))
    # Exact gradient of E[r] for softmax logits at p = (½, ½): p_a (r_a − E r) = (+0.2, −0.2); −∇loss estimates it.
    np.testing.assert_allclose(-raw, [0.2, -0.2], atol=0.03)  # se ≈ 0.008
    assert float(-normalised[0]) > 0 > float(-normalised[1])


def test_reinforce_improves_navigation_with_a_fixed_goal():
    env = get_env("navigation2d")
    task = NavigationParams(goal=jnp.array([0.35, -0.25]))
    policy = GaussianMLPPolicy(action_size=2)
    params = policy.init(jax.random.PRNGKey(0), jnp.zeros((1, 2)))
    opt = optax.adam(1e-2)
    run = partial(rollout, env, policy.apply)

    def mean_return(params, key):
        return jnp.mean(jnp.sum(run(params, task, key, 100, 20).rewards, 0))

    def update(carry, key):
        params, opt_state = carry
        traj = run(params, task, key, 100, 10)
        adv = linear_baseline_advantages(traj, gamma=0.99, lam=1.0)
        g = jax.grad(lambda p: reinforce_loss(policy.apply(p, traj.obs).log_prob(traj.actions), adv, traj.valid))(params)
        updates, opt_state = opt.update(g, opt_state)
        return (optax.apply_updates(params, updates), opt_state), jnp.mean(jnp.sum(traj.rewards, 0))

    @jax.jit
    def train(params, key):
        (params, _), curve = jax.lax.scan(update, (params, opt.init(params)), jax.random.split(key, 100))
        return params, curve

    eval_key = jax.random.PRNGKey(7)
    before = float(jax.jit(mean_return)(params, eval_key))
    trained, curve = train(params, jax.random.PRNGKey(1))
    after = float(jax.jit(mean_return)(trained, eval_key))
    # An untrained policy (std 1, actions clipped to ±0.1) random-walks away: return ≈ −95. The goal is
    # 0.43 away, so a policy heading straight there scores ≈ −1.5; 100 steps get below −20.
    assert after > before + 0.6 * abs(before), (before, after)
    assert float(curve[-10:].mean()) > float(curve[:10].mean())


def test_lvc_has_reinforces_gradient_and_adds_the_score_outer_product_to_its_hessian():
    """ProMP's LVC surrogate: ∇ equal to REINFORCE's; ∇²_LVC − ∇²_REINFORCE = −Σ_t v_t A_t g_t g_tᵀ / Σ_t v_t,
    with g_t = ∇ log π(a_t|s_t) taken per step by jax.jacobian (a softmax-linear policy on random data)."""
    rng = np.random.default_rng(0)
    steps, features, arms = 9, 3, 2
    x = jnp.asarray(rng.normal(size=(steps, features)), jnp.float32)
    actions = jnp.asarray(rng.integers(0, arms, steps))
    adv = jnp.asarray(rng.normal(size=steps), jnp.float32)
    valid = jnp.asarray([1, 1, 1, 1, 1, 1, 1, 0, 0], jnp.float32)
    theta = jnp.asarray(rng.normal(size=features * arms), jnp.float32)

    def log_probs(flat):
        logits = x @ flat.reshape(features, arms)
        return jax.nn.log_softmax(logits)[jnp.arange(steps), actions]

    def lvc(flat):
        return lvc_loss(log_probs(flat), adv, valid)

    def plain(flat):
        return reinforce_loss(log_probs(flat), adv, valid)

    np.testing.assert_allclose(jax.grad(lvc)(theta), jax.grad(plain)(theta), rtol=1e-5, atol=1e-6)
    scores = jax.jacobian(log_probs)(theta)                    # [steps, params]
    outer = jnp.einsum("t,ti,tj->ij", valid * adv, scores, scores) / valid.sum()
    np.testing.assert_allclose(jax.hessian(lvc)(theta) - jax.hessian(plain)(theta), -outer, rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(outer).max()) > 1e-2                  # the term is not vanishing on this data
