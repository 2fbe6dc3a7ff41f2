"""Meta-RL environments as datasets of the `rl` task family: `dataset=navigation2d`, `point_robot`,
`bernoulli_bandit`, `gaussian_bandit`, `meta_maze` (the last four are gymnax's meta-RL envs).

Each entry builds the JAX environment (metarun.rl.envs) with its time limit set to `horizon` and
hands it to `metarun.families.rl.RLFamily` with the rollout settings of its config section.
"""
from __future__ import annotations

from dataclasses import dataclass

from metarun.errors import UserError
from metarun.families.rl import RLSettings
from metarun.registry import register
from metarun.rl.envs import gymnax_env, navigation2d


@dataclass
class RLEnvConfig:
    """Settings every environment has (pytorch-maml-rl's names where it has one)."""
    name: str = "navigation2d"
    kind: str = "rl"
    horizon: int = 100          # steps per episode: the env's time limit
    fast_batch: int = 20        # trajectories per adaptation step (and per post-adaptation rollout)
    gamma: float = 0.99         # discount of the returns the baseline and the advantages use
    gae_lambda: float = 1.0     # GAE λ; 1 = Monte-Carlo returns minus the baseline (the MAML paper)


@dataclass
class Navigation2DConfig(RLEnvConfig):
    """Finn et al. 2017 §5.3: goal ~ U[-0.5, 0.5]², actions clipped to ±0.1, reward −distance, horizon 100."""
    name: str = "navigation2d"
    observe_goal: bool = False  # observations [position, goal]: the paper's oracle (experiment=oracle_rl_navigation2d)


@dataclass
class PointRobotConfig(RLEnvConfig):
    """gymnax PointRobot-misc: goal on the unit upper semicircle, sparse reward within goal_radius."""
    name: str = "point_robot"
    dense_reward: bool = False


@dataclass
class BernoulliBanditConfig(RLEnvConfig):
    """gymnax BernoulliBandit-misc (Wang et al. 2016): two arms paying with probabilities p, 1−p, p ∈ {0.1, 0.9}."""
    name: str = "bernoulli_bandit"
    reward_prob: float = 0.1


@dataclass
class GaussianBanditConfig(RLEnvConfig):
    """gymnax GaussianBandit-misc: arm 0 pays 0, arm 1 pays N(μ, σ_l²) with μ ~ N(−1, 1) per task."""
    name: str = "gaussian_bandit"


@dataclass
class MetaMazeConfig(RLEnvConfig):
    """gymnax MetaMaze-misc (Miconi et al.): a goal cell per task, respawn on reaching it."""
    name: str = "meta_maze"
    horizon: int = 200


def _check(cfg) -> None:
    """One line per impossible setting (a schema cannot say "at least 1")."""
    for key in ("horizon", "fast_batch"):
        if cfg[key] < 1:
            raise UserError(f"dataset.{key}={cfg[key]} must be >= 1")
    if not 0.0 <= cfg.gamma <= 1.0 or not 0.0 <= cfg.gae_lambda <= 1.0:
        raise UserError(f"dataset.gamma={cfg.gamma} and dataset.gae_lambda={cfg.gae_lambda} must lie in [0, 1]")


def _settings(cfg, env) -> RLSettings:
    _check(cfg)
    return RLSettings(env=env, horizon=int(cfg.horizon), fast_batch=int(cfg.fast_batch), gamma=float(cfg.gamma),
                      gae_lambda=float(cfg.gae_lambda))


@register("dataset", "navigation2d", schema=Navigation2DConfig, family="rl")
def load_navigation2d(cfg, seed: int = 0) -> RLSettings:
    del seed  # tasks are drawn from the run's keys
    return _settings(cfg, navigation2d(max_steps=int(cfg.horizon), observe_goal=bool(cfg.observe_goal)))


def _gymnax(gymnax_name: str, cfg, time_limit_type=int, **params) -> RLSettings:
    """time_limit_type: the type of gymnax's own max_steps_in_episode (a float in BernoulliBandit, whose
    observation_space selects between it and floats and refuses an int)."""
    _check(cfg)  # before gymnax builds anything with a bad time limit
    return _settings(cfg, gymnax_env(gymnax_name, max_steps_in_episode=time_limit_type(cfg.horizon), **params))


@register("dataset", "point_robot", schema=PointRobotConfig, family="rl")
def load_point_robot(cfg, seed: int = 0) -> RLSettings:
    del seed
    return _gymnax("PointRobot-misc", cfg, dense_reward=bool(cfg.dense_reward))


@register("dataset", "bernoulli_bandit", schema=BernoulliBanditConfig, family="rl")
def load_bernoulli_bandit(cfg, seed: int = 0) -> RLSettings:
    del seed
    # t_max: gymnax scales the time in the observation to [-1, 1] over t_max steps; one trial = horizon.
    return _gymnax("BernoulliBandit-misc", cfg, float, reward_prob=float(cfg.reward_prob), t_max=int(cfg.horizon))


@register("dataset", "gaussian_bandit", schema=GaussianBanditConfig, family="rl")
def load_gaussian_bandit(cfg, seed: int = 0) -> RLSettings:
    del seed
    return _gymnax("GaussianBandit-misc", cfg)


@register("dataset", "meta_maze", schema=MetaMazeConfig, family="rl")
def load_meta_maze(cfg, seed: int = 0) -> RLSettings:
    del seed
    return _gymnax("MetaMaze-misc", cfg)
