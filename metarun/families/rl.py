"""Reinforcement learning: a task is an environment's parameters; rollouts run on the device.

The support set is not data: an algorithm produces it inside `adapt` by rolling out its policy
(`RLFamily.rollout`), and `loss` rolls out the adapted policy. Metric: the undiscounted return per
episode, higher is better. See docs/design.md ("Reinforcement learning").
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, List, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from metarun.data.tasks import Task
from metarun.errors import UserError
from metarun.families.base import SPLITS, TaskFamily
from metarun.metrics import MetricsLog, mean_ci95
from metarun.registry import lookup, register
from metarun.rl.envs import Env
from metarun.rl.policy_gradient import linear_baseline_advantages
from metarun.rl.references import (bernoulli_reward_uniforms, bernoulli_thompson_return, bernoulli_thompson_rewards,
                                   bernoulli_ucb_return, bernoulli_ucb_rewards, navigation_oracle_return)
from metarun.rl.rollout import Trajectories, later_episodes_return, rollout, rollout_recurrent, trial_env_keys

POLICY_LEARNERS = ("gaussian_mlp", "categorical_mlp", "gru")


class EnvTask(NamedTuple):
    """One side (support or query) of an RL task: the environment's parameters (a goal, arm probabilities...).

    `x` and `y` exist only to turn a supervised algorithm's first look at the task into one line
    instead of an AttributeError deep inside it.
    """
    env_params: Any

    @property
    def x(self):
        raise UserError("an RL task is an environment, not examples: train it with algo=maml_rl or algo=rl2")

    y = x


class RLSettings(NamedTuple):
    """What a dataset (environment) entry hands its family: the env and its rollout settings."""
    env: Env
    horizon: int        # steps per episode (the env's time limit)
    fast_batch: int     # trajectories per adaptation (and per query rollout)
    gamma: float
    gae_lambda: float


@register("family", "rl")
class RLFamily(TaskFamily):
    """Tasks drawn from an environment's task distribution by the key alone (data = {} per split).

    Every split draws from the same distribution (held-out tasks are fresh draws from fixed seeds,
    as in the MAML and RL² papers); `task` config section is not used.
    """
    kind = "rl"
    metric = "return"
    higher_is_better = True
    plots_all_stages = True  # trajectories.png draws the evaluation with the most inner steps (eval.report_steps)

    def __init__(self, name: str, settings: RLSettings, task_cfg, dataset_cfg):
        del task_cfg  # episode shapes come from the dataset section (horizon, fast_batch)
        super().__init__(name, {s: {} for s in SPLITS})
        self.settings = settings
        self.env = settings.env
        self._references = {}

    # -- what algorithms ask ---------------------------------------------------------------
    def objective(self, outputs, y, mask=None):
        raise UserError(f"dataset={self.name} is an RL environment and has no supervised objective: "
                        f"use algo=maml_rl or algo=rl2")

    def head_dim(self, phase: str) -> int:
        return self.env.action_size

    def rollout(self, policy_apply: Callable, params, env_params, key, n_traj: Optional[int] = None) -> Trajectories:
        """`n_traj` (default fast_batch) episodes of one task with a feed-forward policy, [horizon, n_traj]."""
        return rollout(self.env, policy_apply, params, env_params, key, self.settings.horizon,
                       n_traj or self.settings.fast_batch)

    def rollout_trial(self, policy_apply: Callable, params, env_params, key, episodes: int, init_carry,
                      n_traj: Optional[int] = None) -> Trajectories:
        """`n_traj` RL² trials of `episodes` episodes each (the hidden state carries across them)."""
        return rollout_recurrent(self.env, policy_apply, params, env_params, key, episodes * self.settings.horizon,
                                 n_traj or self.settings.fast_batch, init_carry)

    def trial_draws(self, key, episodes: int, n_traj: Optional[int] = None) -> dict:
        """What an evaluation records so that `summarize` can replay the references on the draws of the
        trials `rollout_trial(..., key, episodes, ...)` ran: the Bernoulli bandit's reward uniforms
        `_reward_uniforms` [steps, n_traj]; {} for other environments."""
        if self.env.name != "BernoulliBandit-misc":
            return {}
        keys = trial_env_keys(key, episodes * self.settings.horizon, n_traj or self.settings.fast_batch)
        return {"_reward_uniforms": bernoulli_reward_uniforms(keys)}

    def advantages(self, traj: Trajectories, reg_coeff: float = 1e-5, normalize: bool = True, dones=None):
        """Linear feature baseline fitted on this batch, then GAE(gamma, gae_lambda); constants for the gradient."""
        adv = linear_baseline_advantages(traj, self.settings.gamma, self.settings.gae_lambda, reg_coeff,
                                         normalize, dones)
        return jax.lax.stop_gradient(adv)

    @property
    def draws_paths(self) -> bool:
        """Whether `plots` draws trajectories (observations are 2D positions: navigation2d)."""
        return self.env.name == "navigation2d"

    @staticmethod
    def task_vector(env_params) -> jax.Array:
        """A task's parameters as one flat vector (navigation2d: the goal)."""
        return jnp.concatenate([jnp.ravel(leaf).astype(jnp.float32) for leaf in jax.tree.leaves(env_params)])

    @staticmethod
    def mean_return(traj: Trajectories) -> jax.Array:
        """Undiscounted return per trajectory, averaged over the batch (a scalar)."""
        return jnp.sum(traj.rewards * traj.valid, 0).mean()

    # -- what the trainer and the evaluator ask ----------------------------------------------
    def sampler(self, split: str):
        if split not in SPLITS:
            raise UserError(f"split {split!r} is unknown; expected one of: {', '.join(SPLITS)}")
        sample_task = self.env.sample_task

        def sample(data, key) -> Task:
            del data
            task = EnvTask(sample_task(key))
            return Task(support=task, query=task)  # the same env for adaptation and for the outer loss

        return sample

    def summarize(self, per_task):
        """The protocol's numbers, plus reference rows on the very tasks evaluated (from the algorithm's
        `_task`): navigation2d's `oracle_return` (straight to the goal at full speed); the Bernoulli
        bandit's `oracle_return` (the better arm's expected return), `thompson_return`, `ucb_return` and the
        regrets (`regret` of the algorithm, `thompson_regret`, `ucb_regret`) against the oracle. When the
        evaluation recorded its trials' reward draws (`_reward_uniforms`, from `trial_draws`), Thompson
        sampling and UCB1 play those very draws, as many runs as the algorithm's trials and as long, scored
        as the algorithm's `return`; `return_minus_thompson` / `return_minus_ucb` are then paired per-task
        differences (present only then: otherwise the references played their own draws)."""
        out = super().summarize(per_task)
        if "_task" not in per_task:
            return out
        tasks = jnp.asarray(np.asarray(per_task["_task"], np.float32))
        extra = {}
        if self.env.name == "navigation2d":
            extra["oracle_return"] = self._reference("nav", lambda g: navigation_oracle_return(self.env, g))(
                tasks[:, :2])
        elif self.env.name == "BernoulliBandit-misc":
            # task_vector leaves in key order: exp_reward_best, reward_probs [2]
            horizon = self.settings.horizon
            oracle = np.asarray(tasks[:, 0]) * horizon
            keys = jax.random.split(jax.random.PRNGKey(0), tasks.shape[0])
            returns = np.asarray(per_task[self.metric], np.float64)
            if "_reward_uniforms" in per_task:  # the algorithm's draws: paired, and return_minus_* say so
                uniforms = jnp.asarray(np.asarray(per_task["_reward_uniforms"], np.float32))  # [tasks, T, N]
                thompson = np.asarray(self._reference("ts_same", lambda p, u, k: self._trial_return(
                    jax.vmap(bernoulli_thompson_rewards, (None, 1, 0))(p, u, jax.random.split(k, u.shape[1]))))(
                    tasks[:, 1:3], uniforms, keys), np.float64)
                ucb = np.asarray(self._reference("ucb_same", lambda p, u: self._trial_return(
                    jax.vmap(bernoulli_ucb_rewards, (None, 1))(p, u)))(tasks[:, 1:3], uniforms), np.float64)
                extra = {"return_minus_thompson": returns - thompson, "return_minus_ucb": returns - ucb}
            else:
                thompson = np.asarray(self._reference("ts", lambda p, k: bernoulli_thompson_return(p, k, horizon))(
                    tasks[:, 1:3], keys))
                ucb = np.asarray(self._reference("ucb", lambda p, k: bernoulli_ucb_return(p, k, horizon))(
                    tasks[:, 1:3], keys))
                extra = {}
            extra = {"oracle_return": oracle, "thompson_return": thompson, "thompson_regret": oracle - thompson,
                     "ucb_return": ucb, "ucb_regret": oracle - ucb, "regret": oracle - returns, **extra}
        for name, values in extra.items():
            stats = mean_ci95(np.asarray(values, np.float64))
            out["metrics"][name] = {"mean": stats["mean"], "ci95": stats["ci95"]}
        return out

    def _trial_return(self, rewards: jax.Array) -> jax.Array:
        """rl2's `return` for reference players' rewards [runs, T] over trials of T / horizon episodes: the
        mean per-episode return over the episodes after the first (the first when there is one)."""
        return later_episodes_return(rewards.reshape(rewards.shape[0], -1, self.settings.horizon).sum(-1).mean(0))

    def _reference(self, name: str, fn):
        """`fn` vmapped over tasks and jitted once per family (validation calls it again and again)."""
        if name not in self._references:
            self._references[name] = jax.jit(jax.vmap(fn))
        return self._references[name]

    def plots(self, run_dir, per_task) -> List[str]:
        """returns.png: the run's return curves (before / after adaptation, validation) from its
        metrics.jsonl (a training run; mode=eval's directory has none); trajectories.png (navigation2d):
        one trajectory per adaptation stage for 4 test goals, when the algorithm recorded them
        (maml_rl's `_paths`, `_task`)."""
        written = []
        log_path = Path(run_dir) / "metrics.jsonl"
        if log_path.exists():
            from metarun.plots.rl_curves import return_curves  # matplotlib only when a plot is drawn

            path = return_curves(MetricsLog(log_path).read(), Path(run_dir) / "returns.png",
                                 title=f"{self.name}: return by meta-step")
            written += [path.name] if path is not None else []
        if self.draws_paths and "_paths" in per_task and "_task" in per_task:
            from metarun.plots.rl_trajectories import navigation_paths

            path = navigation_paths(per_task["_paths"], np.asarray(per_task["_task"])[:, :2],
                                    Path(run_dir) / "trajectories.png", title=f"{self.name}: test goals")
            written.append(path.name)
        return written

    def describe(self, split: str):
        s = self.settings
        return {"env": self.env.name, "horizon": s.horizon, "fast_batch": s.fast_batch, "gamma": s.gamma,
                "gae_lambda": s.gae_lambda, "discrete_actions": self.env.discrete}

    def check_learner(self, learner_cfg) -> None:
        name = learner_cfg.name
        actions = "discrete" if self.env.discrete else "continuous"
        suggest = "categorical_mlp" if self.env.discrete else "gaussian_mlp"
        if name not in POLICY_LEARNERS:
            raise UserError(f"learner={name} cannot act in dataset={self.name} ({actions} actions): "
                            f"use learner={suggest} (or learner=gru with algo=rl2)")
        kind = lookup("learner", name, "learner").meta.get("actions", "any")
        if kind not in ("any", actions):
            raise UserError(f"learner={name} has {kind} actions but dataset={self.name} has {actions} actions: "
                            f"use learner={suggest}")
