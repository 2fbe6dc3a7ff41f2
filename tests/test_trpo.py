"""TRPO's outer step for maml_rl (metarun.rl.trpo, algo.outer=trpo): the KL against closed forms, the CG step
against a direct solve with the Hessian from jax.hessian, the line search on hand-made cases, one meta-step
checked against its definition, and the refusal of a meta_opt that would change the step."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from conftest import compose
from metarun.build import load_family, make_algo
from metarun.errors import UserError
from metarun.rl.policies import Categorical, DiagGaussian, GaussianMLPPolicy
from metarun.rl.trpo import (TRPOSettings, backtracking_fractions, conjugate_gradient, hessian_vector_product,
                             kl_divergence, kl_hessian_vector_product, line_search, natural_gradient_step)



# ---- the KL ---------------------------------------------------------------------------------------------
def test_kl_divergence_matches_the_closed_forms():
    rng = np.random.default_rng(0)
    m0, m1, s0, s1 = (rng.normal(size=(4, 3)) for _ in range(4))
    got = kl_divergence(DiagGaussian(jnp.array(m0), jnp.array(s0)), DiagGaussian(jnp.array(m1), jnp.array(s1)))
    # KL(N0 ‖ N1) per dimension: log σ1/σ0 + (σ0² + (μ0 − μ1)²) / (2σ1²) − ½, summed over the action dims
    want = (s1 - s0 + (np.exp(2 * s0) + (m0 - m1) ** 2) / (2 * np.exp(2 * s1)) - 0.5).sum(-1)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    l0, l1 = rng.normal(size=(2, 5, 4))
    p0, p1 = (np.exp(x) / np.exp(x).sum(-1, keepdims=True) for x in (l0, l1))
    got = kl_divergence(Categorical(jnp.array(l0)), Categorical(jnp.array(l1)))
    np.testing.assert_allclose(got, (p0 * np.log(p0 / p1)).sum(-1), rtol=1e-5)
    with pytest.raises(TypeError):
        kl_divergence(jnp.zeros(3), jnp.zeros(3))


# ---- the step direction: CG on the KL's Hessian-vector products ----------------------------------------------
def linear_policy_kl():
    """A linear Gaussian policy on 2D observations (8 parameters) and its mean KL(π_old ‖ π_θ) on fixed states."""
    policy = GaussianMLPPolicy(action_size=2, hidden_sizes=())
    obs = jax.random.normal(jax.random.PRNGKey(1), (64, 2))
    params = policy.init(jax.random.PRNGKey(2), obs)["params"]
    params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.PRNGKey(3), a.shape), params)
    dist_fn = lambda p: policy.apply({"params": p}, obs)  # noqa: E731
    old = dist_fn(params)
    kl_of_dist = lambda d: kl_divergence(old, d).mean()  # noqa: E731
    return params, dist_fn, kl_of_dist


def test_cg_step_solves_the_damped_kl_hessian_system_and_fills_the_trust_region():
    params, dist_fn, kl_of_dist = linear_policy_kl()
    flat, unravel = ravel_pytree(params)
    hessian = np.asarray(jax.jit(jax.hessian(lambda f: kl_of_dist(dist_fn(unravel(f)))))(flat), np.float64)
    damping, max_kl = 1e-5, 0.01
    g = np.asarray(jax.random.normal(jax.random.PRNGKey(4), flat.shape), np.float64)
    want = np.linalg.solve(hessian + damping * np.eye(flat.size), g)

    hvps = (lambda: kl_hessian_vector_product(dist_fn, kl_of_dist, params, damping),         # what maml_rl uses
            lambda: hessian_vector_product(lambda p: kl_of_dist(dist_fn(p)), params, damping))  # the plain one

    @jax.jit
    def solve(b):
        return [(conjugate_gradient(hvp, b, iters=10), natural_gradient_step(b, hvp, max_kl, cg_iters=10)[0])
                for hvp in (make() for make in hvps)]

    for got, step in solve(unravel(jnp.asarray(g))):
        got, step = (np.asarray(ravel_pytree(x)[0], np.float64) for x in (got, step))
        # 8 parameters: CG is exact after 8 iterations (up to float32)
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-4 * np.abs(want).max())
        np.testing.assert_allclose(step, want * np.sqrt(2 * max_kl / (want @ (hessian + damping * np.eye(8)) @ want)),
                                   rtol=2e-3, atol=1e-5)
        # the quadratic model of the KL is max_kl at the full step
        assert 0.5 * step @ hessian @ step == pytest.approx(max_kl, rel=1e-3)


def test_a_degenerate_direction_gives_no_step():
    zero = {"w": jnp.zeros(3)}
    step, shs = natural_gradient_step(zero, lambda v: v, 0.01, cg_iters=5)
    assert float(shs) == 0.0 and np.all(np.asarray(step["w"]) == 0.0)


# ---- the line search --------------------------------------------------------------------------------------
def table(losses, kls, ratio=0.8):
    """evaluate(β) for the line search from per-candidate tables (β_k = ratio^k -> row k)."""
    fractions = backtracking_fractions(len(losses), ratio)
    return lambda f: (jnp.asarray(losses)[jnp.argmin(jnp.abs(fractions - f))],
                      jnp.asarray(kls)[jnp.argmin(jnp.abs(fractions - f))])


def test_line_search_takes_the_first_candidate_inside_the_trust_region_that_improves():
    np.testing.assert_allclose(backtracking_fractions(4, 0.8), [1.0, 0.8, 0.64, 0.512], rtol=1e-6)
    search = jax.jit(line_search, static_argnums=(0, 2, 3, 4))
    losses = (-1.0, -0.5, -0.2, -0.1)
    # the full step improves most but leaves the trust region: rejected, 0.8 taken
    out = search(table(losses, (0.05, 0.008, 0.004, 0.002)), 0.0, 0.01, 4, 0.8)
    assert bool(out.accepted) and float(out.fraction) == pytest.approx(0.8) and int(out.candidate) == 1
    assert float(out.loss) == -0.5 and float(out.kl) == pytest.approx(0.008)
    # every candidate breaks max_kl: no move, the old loss is kept
    out = search(table(losses, (0.02,) * 4), 0.0, 0.01, 4, 0.8)
    assert not bool(out.accepted) and float(out.fraction) == 0.0 and float(out.loss) == 0.0 and int(out.candidate) == 4
    # inside the region but no improvement (or NaN): rejected too
    out = search(table((0.1, np.nan, 0.0, -0.3), (0.001,) * 4), 0.0, 0.01, 4, 0.8)
    assert float(out.fraction) == pytest.approx(0.512) and int(out.candidate) == 3


def test_line_search_on_a_quadratic_kl_stops_where_the_kl_drops_below_max_kl():
    """Surrogate gᵀx, KL ½xᵀHx: the step is sized for KL 0.02 and searched with max_kl 0.01, so the candidate
    β must have 0.02·β² < 0.01, i.e. β < 0.707: β = 0.64 (the third), whatever the loss gains at β = 1, 0.8."""
    h = jnp.array([[2.0, 0.3], [0.3, 1.0]])
    g = jnp.array([1.0, -2.0])
    step, _ = natural_gradient_step(g, lambda v: h @ v, 0.02, cg_iters=5)

    def evaluate(fraction):
        x = -fraction * step
        return x @ g, 0.5 * x @ h @ x

    out = line_search(evaluate, 0.0, 0.01, 15, 0.8)
    assert float(out.fraction) == pytest.approx(0.64) and float(out.kl) == pytest.approx(0.02 * 0.64 ** 2, rel=1e-4)


# ---- maml_rl's TRPO pieces and meta-step ---------------------------------------------------------------------
def tiny(*overrides):
    return compose(["algo=maml_rl", "dataset=navigation2d", "learner=gaussian_mlp", "learner.hidden=[]",
                    "dataset.horizon=6", "dataset.fast_batch=3", "train.progress=false", "algo.outer=trpo",
                    "meta_opt=sgd", "meta_opt.lr=1.0", *overrides])


def pieces_of(cfg):
    from metarun.algos.maml_rl import trpo_pieces
    from metarun.learners import build_learner

    family = load_family(cfg)
    module = build_learner(cfg.learner, family.head_dim("train"))
    apply = lambda p, o: module.apply({"params": p}, o)  # noqa: E731
    task = family.sampler("train")({}, jax.random.PRNGKey(3))
    params = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 2)))["params"]
    return family, apply, task, params, trpo_pieces(apply, family, cfg.algo.inner_lr, cfg.algo.inner_steps,
                                                    cfg.algo.first_order)


@pytest.mark.slow  # compiles rollouts, jax.hessian through the inner step and two curvature products (~25 s here)
def test_maml_rl_kl_curvature_through_the_inner_step_is_the_exact_hessian():
    """The Gauss-Newton product maml_rl uses equals jax.hessian of KL(π_old ‖ π_adapt(θ)) through the inner step
    (second order); the KL's gradient at the sampling parameters is 0, which is what makes it exact."""
    _, _, task, params, pieces = pieces_of(tiny())
    batch, _ = pieces.sample(params, task, jax.random.PRNGKey(5))
    flat, unravel = ravel_pytree(params)
    kl = lambda f: pieces.surrogate_and_kl(unravel(f), batch)[1]  # noqa: E731
    hessian = jax.jit(jax.hessian(kl))(flat)
    assert float(jnp.abs(jax.grad(kl)(flat)).max()) < 1e-5 and float(kl(flat)) == pytest.approx(0.0, abs=1e-6)
    products = jax.jit(jax.vmap(lambda e: ravel_pytree(pieces.kl_hvp(params, batch, unravel(e)))[0]))(jnp.eye(flat.size))
    np.testing.assert_allclose(products, hessian, rtol=1e-3, atol=1e-5 * float(jnp.abs(hessian).max()))
    # the inner step is really in it: the curvature at the adapted weights alone (first order) differs
    _, _, _, _, first = pieces_of(tiny("algo.first_order=true"))
    fo = jax.vmap(lambda e: ravel_pytree(first.kl_hvp(params, batch, unravel(e)))[0])(jnp.eye(flat.size))
    assert float(jnp.abs(fo - hessian).max()) > 1e-3 * float(jnp.abs(hessian).max())


@pytest.mark.slow
def test_one_trpo_meta_step_lowers_the_surrogate_inside_the_trust_region():
    """The meta-step's output, applied by optax.sgd(1.0), is θ − β·step with β from the line search: at the new
    parameters the recomputed mean surrogate is lower and the mean KL below max_kl, on the same rollouts."""
    cfg = tiny("learner.hidden=[8]", "dataset.horizon=10", "dataset.fast_batch=4")
    family, _, _, params, pieces = pieces_of(cfg)
    algo = make_algo(cfg, family, "train")
    tasks = jax.vmap(lambda k: family.sampler("train")({}, k))(jax.random.split(jax.random.PRNGKey(8), 3))
    key = jax.random.PRNGKey(9)
    vmap_tasks = lambda fn, t, k: jax.vmap(fn)(t, k)  # noqa: E731
    grads, _, metrics = jax.jit(lambda p: algo.meta_step(p, {}, tasks, key, vmap_tasks))(params)
    updates, _ = optax.sgd(1.0).update(grads, optax.sgd(1.0).init(params), params)
    new = optax.apply_updates(params, updates)

    batches, _ = jax.vmap(lambda t, k: pieces.sample(params, t, k))(tasks, jax.random.split(key, 3))
    before = jax.vmap(lambda b: pieces.surrogate_and_kl(params, b))(batches)
    after = jax.vmap(lambda b: pieces.surrogate_and_kl(new, b))(batches)
    assert float(metrics["trpo_accepted"]) == 1.0
    assert float(after[0].mean()) < float(before[0].mean()) and float(before[1].mean()) == pytest.approx(0, abs=1e-6)
    assert 0.0 < float(after[1].mean()) < TRPOSettings().max_kl
    assert float(after[1].mean()) == pytest.approx(float(metrics["trpo_kl"]), rel=1e-3)
    assert float(after[0].mean()) == pytest.approx(float(metrics["trpo_surrogate_after"]), rel=1e-3, abs=1e-6)


# ---- configuration ----------------------------------------------------------------------------------------
def test_outer_reinforce_keeps_the_default_meta_step():
    """outer=reinforce builds the algorithm as before TRPO existed: adapt/loss through the core's default step."""
    cfg = compose(["algo=maml_rl", "dataset=navigation2d", "learner=gaussian_mlp"])
    family = load_family(cfg)
    assert cfg.algo.outer == "reinforce" and make_algo(cfg, family, "train").meta_step is None
    assert make_algo(tiny(), family, "train").meta_step is not None


@pytest.mark.parametrize("overrides, expected", [
    (["meta_opt=adam"], "needs meta_opt=sgd meta_opt.lr=1.0"),
    (["meta_opt.lr=0.5"], "lr=0.5"),
    (["meta_opt.momentum=0.9"], "momentum=0.9"),
    (["meta_opt.grad_clip=1.0"], "grad_clip=1.0"),
    (["meta_opt.schedule=cosine"], "schedule=cosine"),
    (["regularize.weight_decay=0.01"], "regularize.weight_decay=0.01"),
    (["algo.outer=dice"], "algo.outer=dice is unknown"),
    (["algo.max_kl=0"], "algo.max_kl=0"),
    (["algo.ls_backtrack_ratio=1.0"], "algo.ls_backtrack_ratio=1.0 must be in (0, 1)"),
])
def test_a_trpo_run_refuses_what_would_change_its_step_in_one_line(overrides, expected):
    cfg = tiny(*overrides)
    with pytest.raises(UserError) as err:
        make_algo(cfg, load_family(cfg), "train")
    assert expected in str(err.value) and "\n" not in str(err.value)
