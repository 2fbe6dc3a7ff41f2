"""Functional JAX environments for meta-RL (a task is a pytree `env_params`) and their registry."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from metarun.errors import UserError


class Env(NamedTuple):
    """A pure, jit/vmap-able environment whose task lives in `env_params`.

    reset(key, env_params) -> (obs, state)
    step(key, state, action, env_params) -> (obs, state, reward, done)
        `done` is natural termination OR the env's own time limit (`max_steps`); step never
        auto-resets, so after `done` the caller masks (rollout) or calls reset itself (RL² trials).
    sample_task(key) -> env_params, one task from the env's task distribution.

    obs_size: length of the flat float32 observation.
    action_size: action dimension (continuous) or number of actions (discrete; actions are int32 scalars).
    discrete: whether actions are discrete.
    max_steps: the episode's time limit.
    """

    name: str
    reset: Callable[[jax.Array, Any], tuple[jax.Array, Any]]
    step: Callable[[jax.Array, Any, jax.Array, Any], tuple[jax.Array, Any, jax.Array, jax.Array]]
    sample_task: Callable[[jax.Array], Any]
    obs_size: int
    action_size: int
    discrete: bool
    max_steps: int


# ----------------------------------------------------------------------------------------------
# 2D navigation (Finn et al. 2017, Sec. 5.3), following pytorch-maml-rl's 2DNavigation-v0:
# start at the origin, action = velocity clipped to [-0.1, 0.1] per coordinate, reward = minus the
# L2 distance to the goal AFTER the move, goal ~ U[-0.5, 0.5]^2, time limit 100, and the episode
# ends early when both coordinates are within 0.01 of the goal.


class NavigationParams(NamedTuple):
    """A navigation task: the goal position [2]."""

    goal: jax.Array


class NavigationState(NamedTuple):
    """Agent position [2] and step count."""

    pos: jax.Array
    t: jax.Array


NAV_MAX_ACTION = 0.1
NAV_GOAL_LOW, NAV_GOAL_HIGH = -0.5, 0.5
NAV_SUCCESS_TOL = 0.01
NAV_MAX_STEPS = 100


def navigation2d(max_steps: int = NAV_MAX_STEPS, observe_goal: bool = False) -> Env:
    """The MAML paper's 2D point navigation with goals drawn uniformly from [-0.5, 0.5]².

    observe_goal: the observation is [position, goal] instead of the position alone — the paper's "oracle"
    policy, which receives the goal as input, is a policy trained jointly on this env (no adaptation needed).
    """

    def observe(pos, env_params):
        return jnp.concatenate([pos, env_params.goal.astype(jnp.float32)]) if observe_goal else pos

    def reset(key, env_params):
        del key  # deterministic start at the origin
        state = NavigationState(pos=jnp.zeros(2, jnp.float32), t=jnp.zeros((), jnp.int32))
        return observe(state.pos, env_params), state

    def step(key, state, action, env_params):
        del key
        pos = state.pos + jnp.clip(action, -NAV_MAX_ACTION, NAV_MAX_ACTION)
        diff = pos - env_params.goal
        reward = -jnp.sqrt(jnp.sum(diff**2))
        t = state.t + 1
        done = jnp.all(jnp.abs(diff) < NAV_SUCCESS_TOL) | (t >= max_steps)
        return observe(pos, env_params), NavigationState(pos=pos, t=t), reward, done

    def sample_task(key):
        return NavigationParams(goal=jax.random.uniform(key, (2,), jnp.float32, NAV_GOAL_LOW, NAV_GOAL_HIGH))

    return Env("navigation2d", reset, step, sample_task, obs_size=4 if observe_goal else 2, action_size=2,
               discrete=False, max_steps=max_steps)


# ----------------------------------------------------------------------------------------------
# gymnax meta-RL envs. gymnax samples the task inside reset_env and keeps it in the env STATE (its
# EnvParams hold only the prior's hyper-parameters), and its `step` auto-resets on done, which would
# draw a new task. So here: sample_task runs gymnax's own reset_env and keeps the task fields of the
# state; reset overwrites those fields with the given task; step calls step_env (no auto-reset).

# name -> (state fields that make up the task, whether gymnax's is_terminated is a real terminal)
GYMNAX_TASK_FIELDS = {
    "PointRobot-misc": (("goal",), True),  # goal on the unit upper semicircle
    "BernoulliBandit-misc": (("reward_probs", "exp_reward_best"), True),  # probs [p, 1-p], p in {0.1, 0.9}
    "GaussianBandit-misc": (("mu",), True),  # arm 1 mean mu ~ N(-1, 1); arm 0 pays exactly 0
    # MetaMaze respawns the agent at a random cell on reaching the goal; gymnax's is_terminated
    # (pos == goal) is then only true when the respawn lands on the goal, which would cut the trial
    # at random, so only the time limit ends a MetaMaze episode here.
    "MetaMaze-misc": (("goal",), False),
}


def gymnax_env(name: str, **param_overrides) -> Env:
    """Wrap one of gymnax's meta-RL envs (GYMNAX_TASK_FIELDS) into the Env interface.

    Args:
        name: gymnax id, e.g. "PointRobot-misc".
        **param_overrides: replaced fields of the gymnax EnvParams (e.g. dense_reward=True).

    Returns:
        The Env; its env_params is a dict {task field: array} taken from gymnax's reset state.
    """
    try:
        import gymnax
    except ImportError as err:
        raise UserError(f"env {name!r} needs gymnax (pip install gymnax)") from err
    fields, natural_termination = GYMNAX_TASK_FIELDS[name]
    genv, gparams = gymnax.make(name)
    gparams = gparams.replace(**param_overrides)

    def canonical(state):
        # gymnax mixes Python scalars (weak types) and int32/float32 arrays in its states; fixed
        # dtypes keep lax.scan carries and jnp.where between reset and stepped states consistent.
        def fix(x):
            x = jnp.asarray(x)
            if jnp.issubdtype(x.dtype, jnp.floating):
                return x.astype(jnp.float32)
            if jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_:
                return x.astype(jnp.int32)
            return x

        return jax.tree.map(fix, state)

    def sample_task(key):
        _, state = genv.reset_env(key, gparams)
        return {f: canonical(getattr(state, f)) for f in fields}

    def reset(key, env_params):
        _, state = genv.reset_env(key, gparams)
        state = canonical(state.replace(**env_params))
        return genv.get_obs(state, gparams).astype(jnp.float32), state

    def step(key, state, action, env_params):
        del env_params  # the task rides in the state since reset
        obs, state, reward, terminated, _ = genv.step_env(key, state, action, gparams)
        done = genv.is_truncated(state, gparams)
        if natural_termination:
            done = done | terminated
        return obs.astype(jnp.float32), canonical(state), jnp.asarray(reward, jnp.float32), done

    discrete = name != "PointRobot-misc"
    obs_size = int(genv.observation_space(gparams).shape[0])
    return Env(name, reset, step, sample_task, obs_size=obs_size, action_size=genv.num_actions,
               discrete=discrete, max_steps=int(gparams.max_steps_in_episode))


ENVS: dict[str, Callable[[], Env]] = {
    "navigation2d": navigation2d,
    **{name: (lambda name=name: gymnax_env(name)) for name in GYMNAX_TASK_FIELDS},
}


def get_env(name: str) -> Env:
    """The environment registered under `name` (see ENVS).

    Raises:
        UserError: unknown name; the message lists the valid ones.
    """
    if name not in ENVS:
        raise UserError(f"env.name={name!r} is not a known environment; expected one of {sorted(ENVS)}")
    return ENVS[name]()
