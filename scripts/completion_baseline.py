"""The context-free reference row of docs/neural_processes.md's Omniglot completion table: a per-pixel Gaussian
with the training images' mean and standard deviation (floored at algo.min_std's 0.01), scored on the very test
episodes a run evaluates (episode i from fold_in(PRNGKey(eval.seed), i)). A model that ignores its context can do
no better than this (up to the per-pixel Gaussian's shape); a Neural Process should beat it.

  python scripts/completion_baseline.py dataset.local_dir=/work/shared/data/omniglot eval.episodes=1000
"""
from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(overrides):
    from hydra import compose, initialize_config_dir

    from metarun.build import load_family
    from metarun.config import register_configs
    from metarun.metrics import mean_ci95

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["algo=cnp", "dataset=omniglot_completion", *overrides])
    family = load_family(cfg)
    train = np.asarray(family.data["train"]["images"], np.float64) / 255.0
    mean, std = train.mean(0), np.maximum(train.std(0), 0.01)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(cfg.eval.seed), i))(jnp.arange(cfg.eval.episodes))
    tasks = jax.jit(jax.vmap(family.sampler("test"), in_axes=(None, 0)))(family.data["test"], keys)
    y = np.asarray(tasks.query.y[..., 0], np.float64)
    log_likelihood = (-0.5 * np.square((y - mean) / std) - np.log(std) - 0.5 * np.log(2 * np.pi)).mean(1)
    ll, mse = mean_ci95(log_likelihood), mean_ci95(np.square(y - mean).mean(1))
    print(f"mean-image reference on {cfg.eval.episodes} test episodes (eval.seed={cfg.eval.seed}): "
          f"log-likelihood/pixel {ll['mean']:.3f} ± {ll['ci95']:.3f}, mse {mse['mean']:.4f} ± {mse['ci95']:.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
