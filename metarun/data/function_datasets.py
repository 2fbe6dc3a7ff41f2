"""`dataset=gp` and `dataset=sawtooth`: the Neural Process benchmark's 1D function tasks for the regression family.

The samplers themselves are metarun.data.function_tasks (pure, on the device); this module reads the
dataset config, picks the input ranges per split (train and val interpolate on [-2, 2]; the test split
interpolates or extrapolates per `dataset.test_regime`), and hands the regression family a `FunctionTasks`:
the family's `sampler_for(split, shots, queries, min_shots)` plus the dataset's own episode shape (the
benchmark fixes the context and target sizes, so `task.*` is not read) and, for GP data, the kernel and
noise the tasks were drawn from (the exact-GP reference the Neural Processes' KL metric needs).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from metarun.data.function_tasks import (FAMILY_DEFAULTS, SPLITS, MaskedExamples, make_function_sampler,
                                         make_task_kernel)
from metarun.data.tasks import Examples, Task
from metarun.errors import UserError
from metarun.registry import register

TEST_REGIMES = ("interpolation", "extrapolation")
TASK_KERNELS = ("eq", "matern52", "weakly_periodic")  # the benchmark's; function_tasks knows a few more


@dataclass
class FunctionDatasetConfig:
    """Keys shared by gp and sawtooth. Sizes left at None take the benchmark's (function_tasks.FAMILY_DEFAULTS)."""
    name: str = "gp"
    kind: str = "regression"
    test_regime: str = "interpolation"       # interpolation: test targets on [-2, 2]; extrapolation: on [2, 6]
    min_context: int = 0
    max_context: Optional[int] = None        # gp 30, sawtooth 75
    num_targets: Optional[int] = None        # gp 50, sawtooth 100
    noise_var: Optional[float] = None        # gp 0.05, sawtooth 0
    # The primary metric of results.json (mse | log_likelihood | kl); the YAML makes it the algorithm's
    # own choice (`algo.metric`, log_likelihood for the Neural Processes) and mse otherwise.
    metric: str = "mse"
    # False when the algorithm builds its own model (`algo.uses_learner`, the Neural Processes): the
    # regression family then does not check the learner section, which nothing reads.
    uses_learner: bool = True


@dataclass
class GPDatasetConfig(FunctionDatasetConfig):
    name: str = "gp"
    kernel: str = "eq"                       # eq | matern52 | weakly_periodic (lengthscales as in the benchmark)
    kernel_params: Dict[str, Any] = field(default_factory=dict)  # overrides, e.g. {lengthscale: 0.5}


@dataclass
class SawtoothDatasetConfig(FunctionDatasetConfig):
    name: str = "sawtooth"
    freq_range: List[float] = field(default_factory=lambda: [2.0, 4.0])


class FunctionTasks:
    """What the regression family receives from a function dataset.

    Called as `sampler_for(split, shots, queries, min_shots)` (the family's contract; the sizes it passes
    are the `episode` below). Attributes:
      episode:  {"shots": max context, "queries": targets, "min_shots": min context}: the dataset's own
                episode shape, which the family uses instead of `task.*`.
      gp_prior: (kernel_fn, noise_var) the GP tasks are drawn from, or None (sawtooth): the exact
                posterior with the very kernel of the tasks, for the KL metric and the reference curves.
      regimes:  split -> the function_tasks input-range protocol it uses.
    """

    def __init__(self, name: str, options: Dict[str, Any], episode: Dict[str, int], gp_prior, regimes):
        self.name, self.options, self.episode, self.gp_prior, self.regimes = name, options, episode, gp_prior, regimes

    def __call__(self, split: str, shots: int, queries: int, min_shots: Optional[int] = None) -> Callable:
        options = {**self.options, "max_context": shots, "num_targets": queries,
                   "min_context": 0 if min_shots is None else min_shots}
        masked = make_function_sampler(self.name, self.regimes[split], **options)

        def sample(data, key) -> Task:
            # function_tasks' MaskedExamples -> the families' Examples (same three fields).
            t = masked(data, key)
            return Task(Examples(*t.support), Examples(*t.query))

        return sample


def _options(cfg) -> Dict[str, Any]:
    """function_tasks options from the config: the family's own keys and the sizes that are set."""
    options = {k: cfg[k] for k in ("noise_var",) if cfg.get(k) is not None}
    if cfg.name == "gp":
        if cfg.kernel not in TASK_KERNELS:
            raise UserError(f"dataset.kernel={cfg.kernel} is unknown; expected one of: {', '.join(TASK_KERNELS)}")
        options["kernel"] = cfg.kernel
        options["kernel_params"] = dict(cfg.kernel_params or {})
    else:
        low, high = cfg.freq_range
        if not 0 < low <= high:
            raise UserError(f"dataset.freq_range={list(cfg.freq_range)} must be [low, high] with 0 < low <= high")
        options["freq_range"] = (float(low), float(high))
    return options


def load(cfg, seed: int = 0) -> FunctionTasks:
    """Check the config (one-line errors) and describe the tasks; nothing is generated until sampled."""
    del seed  # tasks come from the keys the trainer and the evaluator pass
    defaults = FAMILY_DEFAULTS[cfg.name]
    episode = {"shots": cfg.max_context if cfg.max_context is not None else defaults["max_context"],
               "queries": cfg.num_targets if cfg.num_targets is not None else defaults["num_targets"],
               "min_shots": cfg.min_context}
    if episode["shots"] < 1:
        raise UserError(f"dataset.max_context={episode['shots']} must be >= 1")
    if not 0 <= episode["min_shots"] <= episode["shots"]:
        raise UserError(f"dataset.min_context={cfg.min_context} must be between 0 and "
                        f"dataset.max_context={episode['shots']}")
    if episode["queries"] < 1:
        raise UserError(f"dataset.num_targets={episode['queries']} must be >= 1")
    if cfg.test_regime not in TEST_REGIMES:
        raise UserError(f"dataset.test_regime={cfg.test_regime} is unknown; expected one of: {', '.join(TEST_REGIMES)}")
    if cfg.get("noise_var") is not None and cfg.noise_var < 0:
        raise UserError(f"dataset.noise_var={cfg.noise_var} must be >= 0")
    options = _options(cfg)
    gp_prior = None
    if cfg.name == "gp":
        noise = options.get("noise_var", defaults["noise_var"])
        if not noise > 0:  # the exact posterior's Cholesky (and a finite log-likelihood) need noise
            raise UserError(f"dataset.noise_var={noise} must be > 0 for GP tasks")
        gp_prior = (make_task_kernel(cfg.kernel, **options["kernel_params"]), float(noise))
    regimes = {"train": "interpolation", "val": "interpolation", "test": cfg.test_regime}
    assert set(regimes.values()) <= set(SPLITS)
    return FunctionTasks(cfg.name, options, episode, gp_prior, regimes)


register("dataset", "gp", schema=GPDatasetConfig, family="regression")(load)
register("dataset", "sawtooth", schema=SawtoothDatasetConfig, family="regression")(load)

__all__ = ["FunctionTasks", "GPDatasetConfig", "MaskedExamples", "SawtoothDatasetConfig", "load"]
