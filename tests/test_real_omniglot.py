"""Brief training on the real Omniglot, one algorithm per family that has an Omniglot path (gradient: MAML;
metric: ProtoNets; Bayesian: DKT): each must clear an accuracy floor far above chance (20%) and beat the
untrained model on the very same test episodes by a wide margin.

Skipped without the data (METARUN_OMNIGLOT_DIR, ../shared/data/omniglot beside the repo, or
/work/shared/data/omniglot). Slow: each compiles and trains a small Conv-4 (16 filters) for 200 steps.

Measured on the 2-core CPU (load average ~12 from other jobs, so times are inflated), 5-way 1-shot,
5 queries, 200 fixed test episodes of the Vinyals test characters (seed 0 / seed 1):

| algorithm | trained | untrained, same episodes | train.run wall |
|---|---|---|---|
| maml (meta-batch 4, Adam 3e-3) | 81.7% / 80.0% | 41.8% / 41.9% | 76 s / 47 s |
| protonet (meta-batch 1, Adam 3e-3) | 77.1% / 80.0% | 44.0% / 43.0% | 44 s / 24 s |
| dkt (meta-batch 4, Adam 1e-3) | 80.8% / 82.3% | 45.4% / 39.8% | 69 s / 43 s |

(the second runs reused the first's compiled programs from JAX's cache). Floors: 65% (12+ points below
every measured run, whose 95% CI is ±1.7) and 25 points above the untrained model (measured 33-42).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import compose

pytestmark = [pytest.mark.slow, pytest.mark.realdata]

ROOT = Path(__file__).resolve().parents[1]
CHANCE = 1 / 5
FLOOR = 0.65         # trained accuracy on the test episodes
MARGIN = 0.25        # over the untrained model on the same episodes
STEPS = 200
EPISODES = 200

CASES = {  # family -> the algorithm's overrides
    "gradient": ["algo=maml", "train.meta_batch=4", "meta_opt.lr=3e-3"],
    "metric": ["algo=protonet", "train.meta_batch=1", "meta_opt.lr=3e-3"],
    "bayes": ["algo=dkt", "train.meta_batch=4"],
}


@pytest.fixture(scope="module")
def omniglot_dir() -> Path:
    candidates = [os.environ.get("METARUN_OMNIGLOT_DIR"), ROOT.parent / "shared" / "data" / "omniglot",
                  "/work/shared/data/omniglot"]
    for path in filter(None, candidates):
        if (Path(path) / "images_background.zip").exists() or (Path(path) / "images_background").is_dir():
            return Path(path)
    pytest.skip("the real Omniglot is not here (METARUN_OMNIGLOT_DIR, ../shared/data/omniglot)")


def overrides(data_dir: Path, family: str) -> list:
    return ["dataset=omniglot", f"dataset.local_dir={data_dir}", "dataset.split=vinyals",
            "learner.width_factor=0.25", "task.ways=5", "task.shots=1", "task.queries=5",
            f"train.steps={STEPS}", "train.steps_per_call=50", f"train.log_every={STEPS}", "train.val_every=0",
            f"train.ckpt_every={STEPS}", "train.progress=false", f"eval.episodes={EPISODES}", "eval.batch=100",
            "seed=0", *CASES[family]]


@pytest.mark.parametrize("family", list(CASES))
def test_brief_training_on_real_omniglot_beats_the_untrained_model(omniglot_dir, tmp_path, family):
    from metarun import train
    from metarun.build import initial_state, load_family
    from metarun.evaluate import Evaluator

    cfg = compose(overrides(omniglot_dir, family))
    train.run(cfg, tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["split"] == "test" and results["episodes"] == EPISODES and results["steps"] == STEPS

    # The untrained model (the run's own initial state) on the same fixed-seed test episodes.
    family_ = load_family(cfg)
    start = initial_state(cfg, family_)[2]
    evaluator = Evaluator(cfg, family_, cfg.eval.split, cfg.eval.episodes, cfg.eval.seed, cfg.eval.batch)
    untrained = evaluator(start.params, start.algo_state)[evaluator.inner_steps]["mean"]

    trained = results["mean"]
    print(f"{cfg.algo.name}: trained {trained:.4f} ± {results['ci95']:.4f}, untrained {untrained:.4f}, "
          f"chance {CHANCE:.2f}; train.run compile {results['compile_s']} s, train {results['train_wall_s']} s")
    assert trained >= FLOOR, f"{cfg.algo.name} reached {trained:.3f} on real Omniglot, below the floor {FLOOR}"
    assert trained >= untrained + MARGIN, (
        f"{cfg.algo.name}: trained {trained:.3f} is not {MARGIN} above the untrained model's {untrained:.3f}")
