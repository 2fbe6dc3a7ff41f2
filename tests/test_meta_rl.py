"""Meta-RL in the core (issue 13): maml_rl's inner step by hand, learning checks for maml_rl and rl2,
the trainer's run dir for the rl family, and one-line refusals of mismatched pieces."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import compose
from metarun.build import initial_state, load_family, make_algo
from metarun.core import make_eval_batch, make_train_chunk
from metarun.errors import UserError
from metarun.learners import build_learner

# Trains through the real trainer several times (minutes on 2 cores): run in CI's second pass (--runslow).
pytestmark = pytest.mark.slow

KEY = jax.random.PRNGKey(0)


def small(*overrides):
    return compose(["train.progress=false", *overrides])


# ---- maml_rl's inner step against a REINFORCE step computed by hand -----------------------------------
def hand_advantages(obs, rewards, valid, gamma, lam, reg):
    """Returns -> ridge-fitted linear feature baseline -> GAE(λ) -> normalised, in float64 numpy."""
    T, N = rewards.shape
    returns = np.zeros((T + 1, N))
    for t in reversed(range(T)):
        returns[t] = valid[t] * (rewards[t] + gamma * returns[t + 1])
    returns = returns[:T]
    v = valid[..., None]
    t = np.arange(T, dtype=np.float64)[:, None, None] * v / 100.0
    x = np.concatenate([obs * v, (obs * v) ** 2, t, t ** 2, t ** 3, v], -1).reshape(T * N, -1)
    w = np.linalg.solve(x.T @ x + reg * np.eye(x.shape[1]), x.T @ returns.reshape(-1))
    values = np.concatenate([(x @ w).reshape(T, N) * valid, np.zeros((1, N))])
    adv, running = np.zeros((T, N)), np.zeros(N)
    for t in reversed(range(T)):
        delta = rewards[t] * valid[t] + gamma * values[t + 1] - values[t]
        running = delta + gamma * lam * running
        adv[t] = running
    adv *= valid
    mean = (adv * valid).sum() / valid.sum()
    std = np.sqrt((((adv - mean) ** 2) * valid).sum() / valid.sum())
    return (adv - mean) / (std + 1e-8) * valid


def test_maml_rl_inner_step_is_a_reinforce_step_with_the_linear_baseline():
    """A linear Gaussian policy (learner.hidden=[]): ∇ log π has a closed form, so θ' = θ − α∇L is computed by hand."""
    cfg = small("algo=maml_rl", "dataset=navigation2d", "learner=gaussian_mlp", "learner.hidden=[]",
                "dataset.horizon=12", "dataset.fast_batch=5", "dataset.gae_lambda=0.9", "algo.inner_lr=0.1")
    family = load_family(cfg)
    algo = make_algo(cfg, family, "train")
    task = family.sampler("train")({}, jax.random.PRNGKey(3))
    params, _ = algo.init(KEY, task)
    # a non-trivial starting point: a visible mean map and std != 1
    params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.PRNGKey(7), a.shape), params)
    adapt_key = jax.random.PRNGKey(11)
    fast = algo.adapt(params, {}, task.support, adapt_key)["params"]

    # The recorded rollout of step 0 (adapt's documented keys) - the data a hand step works on.
    module = build_learner(cfg.learner, family.head_dim("train"))
    apply = lambda p, o: module.apply({"params": p}, o)  # noqa: E731
    traj = jax.device_get(family.rollout(apply, params, task.support.env_params, jax.random.split(adapt_key, 1)[0]))
    obs, act = np.asarray(traj.obs, np.float64), np.asarray(traj.actions, np.float64)
    rew, valid = np.asarray(traj.rewards, np.float64), np.asarray(traj.valid, np.float64)
    adv = hand_advantages(obs, rew, valid, 0.99, 0.9, 1e-5)

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)["policy"]
    kernel, bias, log_std = p["mean"]["kernel"], p["mean"]["bias"], p["log_std"]
    mu = obs @ kernel + bias
    z = (act - mu) / np.exp(2 * log_std)                       # ∂ log π / ∂μ
    weight = (valid * adv)[..., None] / valid.sum()            # −∂L/∂ log π_t
    grad_kernel = -np.einsum("tni,tnj->ij", obs * weight, z)   # ∂L/∂W, μ = o W + b
    grad_bias = -(weight * z).sum((0, 1))
    grad_log_std = -(weight * ((act - mu) ** 2 / np.exp(2 * log_std) - 1.0)).sum((0, 1))
    got = jax.tree.map(np.asarray, fast)["policy"]
    np.testing.assert_allclose(got["mean"]["kernel"], kernel - 0.1 * grad_kernel, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(got["mean"]["bias"], bias - 0.1 * grad_bias, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(got["log_std"], log_std - 0.1 * grad_log_std, rtol=2e-4, atol=2e-5)
    assert np.abs(got["mean"]["kernel"] - kernel).max() > 1e-3  # the step moved something


def test_first_order_maml_rl_is_the_query_gradient_at_the_adapted_weights():
    """FO-MAML-RL's meta-gradient = ∇_φ L_query(φ) at φ = the adapted weights; second order differs."""
    from metarun.algos.base import task_grad
    from metarun.rl.policy_gradient import reinforce_loss
    from metarun.rl.rollout import policy_log_probs

    base = ["algo=maml_rl", "dataset=navigation2d", "learner=gaussian_mlp", "learner.hidden=[8]",
            "dataset.horizon=10", "dataset.fast_batch=4"]
    cfg = small(*base, "algo.first_order=true")
    family = load_family(cfg)
    algo = make_algo(cfg, family, "train")
    task = family.sampler("train")({}, jax.random.PRNGKey(5))
    params, _ = algo.init(KEY, task)
    key = jax.random.PRNGKey(9)
    grads, _ = jax.jit(lambda p: task_grad(algo, p, {}, task, key))(params)

    module = build_learner(cfg.learner, family.head_dim("train"))
    apply = lambda p, o: module.apply({"params": p}, o)  # noqa: E731
    adapt_key, loss_key = jax.random.split(key)  # metarun.algos.base.task_loss's split
    fast = algo.adapt(params, {}, task.support, adapt_key)["params"]
    traj = family.rollout(apply, fast, task.query.env_params, loss_key)
    expected = jax.grad(lambda p: reinforce_loss(policy_log_probs(apply, p, traj), family.advantages(traj),
                                                 traj.valid))(fast)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)

    second = make_algo(small(*base), family, "train")
    second_grads, _ = jax.jit(lambda p: task_grad(second, p, {}, task, key))(params)
    gap = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(second_grads), jax.tree.leaves(grads)))
    assert gap > 1e-4  # the inner step's Hessian term is really there in the second-order version


def test_lvc_inner_estimator_adapts_alike_and_changes_only_the_second_order_meta_gradient():
    """algo.inner_estimator=lvc (ProMP): the adapted weights and the first-order meta-gradient equal plain
    REINFORCE's; the second-order meta-gradient differs (the exploration term is in it)."""
    from metarun.algos.base import task_grad

    base = ["algo=maml_rl", "dataset=navigation2d", "learner=gaussian_mlp", "learner.hidden=[8]",
            "dataset.horizon=10", "dataset.fast_batch=4"]
    family = load_family(small(*base))
    task = family.sampler("train")({}, jax.random.PRNGKey(5))
    key = jax.random.PRNGKey(9)

    def build(*extra):
        return make_algo(small(*base, *extra), family, "train")

    params, _ = build().init(KEY, task)
    adapted = [build(*e).adapt(params, {}, task.support, key)["params"]
               for e in ([], ["algo.inner_estimator=lvc"])]
    for a, b in zip(*(jax.tree.leaves(p) for p in adapted)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

    def meta_grad(*extra):
        algo = build(*extra)
        return jax.tree.leaves(jax.jit(lambda p: task_grad(algo, p, {}, task, key))(params)[0])

    for a, b in zip(meta_grad("algo.first_order=true"), meta_grad("algo.first_order=true", "algo.inner_estimator=lvc")):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    gap = max(float(jnp.abs(a - b).max()) for a, b in zip(meta_grad(), meta_grad("algo.inner_estimator=lvc")))
    assert gap > 1e-4


def test_the_navigation_oracle_moves_straight_to_the_goal_at_full_speed():
    from metarun.rl.references import navigation_oracle_return
    from metarun.rl.envs import navigation2d

    env = navigation2d()
    # goal (0.5, 0.5): positions k·(0.1, 0.1), distances (5 − k)·0.1·√2 after the moves, then done at the goal
    assert float(navigation_oracle_return(env, jnp.array([0.5, 0.5]))) == pytest.approx(-0.1 * np.sqrt(2) * 10, 1e-5)
    # goal (0.3, −0.2): the y coordinate arrives one step early
    expected = -(np.hypot(0.2, 0.1) + 0.1)
    assert float(navigation_oracle_return(env, jnp.array([0.3, -0.2]))) == pytest.approx(expected, 1e-5)


def test_observe_goal_appends_the_goal_and_leaves_the_dynamics_and_the_oracle_unchanged():
    """dataset.observe_goal (the paper's oracle policy's input): observations are [position, goal]; positions,
    rewards and the analytic oracle's return are those of the plain env."""
    from metarun.rl.envs import NavigationParams, navigation2d
    from metarun.rl.references import navigation_oracle_return

    plain, seeing = navigation2d(), navigation2d(observe_goal=True)
    assert (plain.obs_size, seeing.obs_size) == (2, 4)
    goal = jnp.array([0.3, -0.2])
    params, key = NavigationParams(goal=goal), jax.random.PRNGKey(0)
    (o1, s1), (o2, s2) = plain.reset(key, params), seeing.reset(key, params)
    np.testing.assert_allclose(np.asarray(o2), [0.0, 0.0, 0.3, -0.2], rtol=1e-6)
    for action in ([0.05, -0.3], [0.2, 0.01]):
        o1, s1, r1, _ = plain.step(key, s1, jnp.array(action), params)
        o2, s2, r2, _ = seeing.step(key, s2, jnp.array(action), params)
        np.testing.assert_allclose(np.asarray(o2), np.concatenate([np.asarray(o1), [0.3, -0.2]]), rtol=1e-6)
        assert float(r1) == float(r2)
    assert float(navigation_oracle_return(seeing, goal)) == pytest.approx(float(navigation_oracle_return(plain, goal)))


def test_bandit_summaries_carry_oracle_thompson_and_regret_rows_on_the_same_tasks():
    family = load_family(small("experiment=rl2_bernoulli_bandit", "dataset.horizon=50"))
    tasks = np.array([[0.9, 0.1, 0.9], [0.9, 0.9, 0.1]] * 10, np.float32)  # exp_reward_best, reward_probs
    returns = np.arange(20, dtype=np.float64) + 20.0
    out = family.summarize({"return": returns, "_task": tasks})
    m = out["metrics"]
    assert "_task" not in m and out["mean"] == pytest.approx(returns.mean())
    assert m["oracle_return"]["mean"] == pytest.approx(45.0) and m["regret"]["mean"] == pytest.approx(45.0 - returns.mean())
    # Thompson sampling learns the arms: well above random play (25), below the oracle
    assert 35.0 < m["thompson_return"]["mean"] < 45.0
    assert m["thompson_regret"]["mean"] == pytest.approx(45.0 - m["thompson_return"]["mean"])
    assert 30.0 < m["ucb_return"]["mean"] < 45.0 and m["ucb_regret"]["mean"] > 0


def numpy_ucb1_rewards(probs, uniforms):
    """UCB1 in plain numpy: every arm once in index order, then argmax mean + sqrt(2 ln t / n)."""
    sums, counts, rewards = np.zeros(len(probs)), np.zeros(len(probs)), []
    for t, u in enumerate(uniforms):
        if (counts == 0).any():
            arm = int(np.argmax(counts == 0))
        else:
            arm = int(np.argmax(sums / counts + np.sqrt(2.0 * np.log(max(t, 1)) / counts)))
        r = float(u < probs[arm])
        sums[arm] += r
        counts[arm] += 1
        rewards.append(r)
    return np.array(rewards)


def test_ucb_on_given_draws_equals_a_numpy_ucb1_and_thompson_pays_only_what_the_draws_allow():
    from metarun.rl.references import bernoulli_thompson_rewards, bernoulli_ucb_rewards

    probs = np.array([0.35, 0.55], np.float32)
    uniforms = np.asarray(jax.random.uniform(jax.random.PRNGKey(3), (200,)))
    np.testing.assert_array_equal(np.asarray(bernoulli_ucb_rewards(jnp.asarray(probs), jnp.asarray(uniforms))),
                                  numpy_ucb1_rewards(probs, uniforms))
    # a draw pays iff u < p[arm]: draws above both probabilities pay nothing, below both always pay
    high, low = jnp.full((50,), 0.6), jnp.full((50,), 0.3)
    assert float(bernoulli_thompson_rewards(jnp.asarray(probs), high, KEY).sum()) == 0.0
    assert float(bernoulli_thompson_rewards(jnp.asarray(probs), low, KEY).sum()) == 50.0


def test_bandit_summaries_replay_the_recorded_draws_as_paired_differences():
    family = load_family(small("experiment=rl2_bernoulli_bandit", "dataset.horizon=50"))
    tasks = np.array([[0.9, 0.1, 0.9], [0.9, 0.9, 0.1]] * 5, np.float32)
    returns = np.arange(10, dtype=np.float64) + 30.0
    uniforms = np.asarray(jax.random.uniform(KEY, (10, 50, 4)))  # [tasks, T, trials]
    m = family.summarize({"return": returns, "_task": tasks, "_reward_uniforms": uniforms})["metrics"]
    # UCB is deterministic given the draws: its return is the numpy UCB1's, averaged over the 4 trials
    ucb = np.array([np.mean([numpy_ucb1_rewards(t[1:], u[:, n]).sum() for n in range(4)])
                    for t, u in zip(tasks, uniforms)])
    assert m["ucb_return"]["mean"] == pytest.approx(ucb.mean(), rel=1e-6)
    assert m["return_minus_ucb"]["mean"] == pytest.approx((returns - ucb).mean(), rel=1e-6)
    assert m["return_minus_thompson"]["mean"] == pytest.approx(returns.mean() - m["thompson_return"]["mean"], rel=1e-6)
    # draws that never pay: both references score 0 on them (they are read, not redrawn)
    m0 = family.summarize({"return": returns, "_task": tasks, "_reward_uniforms": np.full((10, 50, 4), 0.95)})["metrics"]
    assert m0["thompson_return"]["mean"] == 0.0 and m0["ucb_return"]["mean"] == 0.0


def test_rl2_evaluation_records_the_trials_reward_draws():
    cfg = small("experiment=rl2_bernoulli_bandit", "dataset.horizon=30", "dataset.fast_batch=3")
    family = load_family(cfg)
    algo = make_algo(cfg, family, "eval")
    task = family.sampler("test")({}, jax.random.PRNGKey(5))
    params, state = algo.init(KEY, task)
    key = jax.random.PRNGKey(9)
    traj, draws = algo.adapt(params, state, task.support, key)
    _, metrics = algo.loss(params, state, (traj, draws), task.query, key)
    u = np.asarray(metrics["_reward_uniforms"])
    assert u.shape == (30, 3)
    probs = np.asarray(task.support.env_params["reward_probs"])
    np.testing.assert_array_equal(np.asarray(traj.rewards), (u < probs[np.asarray(traj.actions)]).astype(np.float32))


# ---- learning -------------------------------------------------------------------------------------------
def train_and_score(cfg, steps: int, episodes: int = 40):
    """(metrics of the untrained and the trained meta-parameters on the same fixed test tasks)."""
    family = load_family(cfg)
    algo, optimizer, state = initial_state(cfg, family)
    eval_batch = make_eval_batch(make_algo(cfg, family, "eval"), family.sampler("test"))
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(1234), i))(jnp.arange(episodes))
    before = jax.tree.map(np.mean, jax.device_get(eval_batch(state.params, state.algo_state, {}, keys)))
    chunk = make_train_chunk(algo, optimizer, family.sampler("train"), cfg.train.meta_batch, steps)
    state, _ = chunk(state, {})
    after = jax.tree.map(np.mean, jax.device_get(eval_batch(state.params, state.algo_state, {}, keys)))
    return before, after


def test_maml_rl_training_improves_the_post_adaptation_return_on_navigation2d():
    cfg = small("algo=maml_rl", "dataset=navigation2d", "learner=gaussian_mlp", "learner.hidden=[32,32]",
                "dataset.horizon=20", "dataset.fast_batch=10", "train.meta_batch=5", "meta_opt.lr=0.01")
    before, after = train_and_score(cfg, steps=30)
    # horizon 20, measured: untrained -11.0 after adaptation, trained -4.7 (from -8.7 before adaptation)
    assert after["return"] > before["return"] + 3.0, (before, after)
    assert after["return"] > after["return_before"], after  # adaptation itself helps the trained policy


def test_rl2_beats_random_play_on_the_bernoulli_bandit():
    cfg = small("experiment=rl2_bernoulli_bandit", "dataset.horizon=20", "learner.hidden_size=16",
                "dataset.fast_batch=8", "train.meta_batch=8", "meta_opt.lr=0.01")
    before, after = train_and_score(cfg, steps=60)
    # 20 pulls: random play earns 10, always pulling the better arm 18; measured 11.4 -> 16.2
    assert after["return"] > 13.0 and after["return"] > before["return"] + 2.0, (before, after)


# ---- the trainer's path ---------------------------------------------------------------------------------
def test_maml_rl_smoke_run_writes_results_with_returns_before_and_after(tmp_path, monkeypatch):
    from metarun.plots import rl_trajectories
    from metarun.train import run

    drawn = []
    original = rl_trajectories.navigation_paths
    monkeypatch.setattr(rl_trajectories, "navigation_paths", lambda paths, *a, **k: drawn.append(
        np.asarray(paths).shape) or original(paths, *a, **k))
    cfg = small("algo=maml_rl", "dataset=navigation2d", "learner=gaussian_mlp", "debug=smoke",
                "dataset.horizon=20", "dataset.fast_batch=5", "eval.report_steps=[0,1,2]")
    run(cfg, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["metric"] == "return" and results["higher_is_better"] and results["task_family"] == "rl"
    assert results["episodes"] == 20 and results["ci95"] >= 0 and results["inner_steps"] == 1
    assert set(results["by_inner_steps"]) == {"0", "1", "2"}
    # the trajectory figure draws the 2-step evaluation: stages 0, 1 and 2 (not only the main 1-step one)
    assert drawn[-1][:2] == (20, 3)
    assert "return_before" in results["metrics"] and results["env"] == "navigation2d" and results["horizon"] == 20
    # the oracle on the same goals: with horizon 20 it always arrives, so its return is a few tenths
    assert -2.0 < results["metrics"]["oracle_return"]["mean"] < 0.0 < results["metrics"]["oracle_return"]["ci95"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert all("train/return" in r and "train/return_before" in r for r in rows) and "val/return" in rows[1]
    assert any(p.name.isdigit() for p in (tmp_path / "checkpoints" / "last").iterdir())
    assert results["plots"] == ["returns.png", "trajectories.png"]
    assert all((tmp_path / name).stat().st_size > 0 for name in results["plots"])


def test_a_resumed_maml_rl_run_ends_where_an_uninterrupted_one_does(tmp_path):
    """Rollout keys come from fold_in(run key, step): a run stopped at step 10 and resumed to 20 equals one run."""
    from metarun.train import run

    base = ["algo=maml_rl", "dataset=navigation2d", "learner=gaussian_mlp", "debug=smoke", "dataset.horizon=10",
            "dataset.fast_batch=4", "eval.episodes=10"]
    run(small(*base, "train.steps=20"), tmp_path / "whole")
    run(small(*base, "train.steps=10"), tmp_path / "split")
    run(small(*base, "train.steps=20", "resume=true"), tmp_path / "split", overrides=["train.steps=20", "resume=true"])

    def rows(d):
        lines = (tmp_path / d / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in ("wall_s", "steps_per_s")} for line in lines]

    assert rows("split") == rows("whole")
    whole, split = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("whole", "split"))
    assert split["mean"] == pytest.approx(whole["mean"]) and split["ci95"] == pytest.approx(whole["ci95"])


# ---- one-line refusals ----------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, expected", [
    (["algo=maml_rl", "dataset=navigation2d", "learner=conv4"], "learner=conv4 cannot act in dataset=navigation2d"),
    (["algo=maml_rl", "dataset=navigation2d", "learner=categorical_mlp"], "use learner=gaussian_mlp"),
    (["algo=maml_rl", "dataset=bernoulli_bandit", "learner=gaussian_mlp"], "use learner=categorical_mlp"),
    (["algo=maml_rl", "dataset=navigation2d", "learner=gaussian_mlp", "dataset.horizon=0"],
     "dataset.horizon=0 must be >= 1"),
    (["algo=maml_rl", "dataset=navigation2d", "learner=gru"], "learner=gru is for algo=rl2"),
    (["algo=maml_rl", "dataset=navigation2d", "learner=gaussian_mlp", "algo.inner_estimator=dice"],
     "algo.inner_estimator=dice is unknown"),
    (["algo=rl2", "dataset=bernoulli_bandit", "learner=categorical_mlp"], "use learner=gru"),
    (["algo=maml", "dataset=navigation2d", "learner=gaussian_mlp"], "train it with algo=maml_rl or algo=rl2"),
    (["algo=maml_rl", "dataset=sinusoid", "task=regression", "learner=mlp"], "algo=maml_rl needs an RL environment"),
])
def test_mismatched_pieces_are_refused_in_one_line(overrides, expected):
    cfg = small(*overrides)
    with pytest.raises(UserError) as err:
        initial_state(cfg, load_family(cfg))
    assert expected in str(err.value) and "\n" not in str(err.value)
