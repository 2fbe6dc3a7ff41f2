"""Every config group option composes, presets pass the cross-group checks, and typos fail early."""
from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from conftest import CONF_DIR, compose
from metarun.train import check_config

GROUPS = ["algo", "dataset", "learner", "task", "meta_opt", "debug", "experiment"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes(group, option):
    cfg = compose([f"{group}={option}"])
    assert cfg.algo.name and cfg.dataset.name and cfg.learner.name


@pytest.mark.parametrize("preset", [o for g, o in OPTIONS if g == "experiment"])
def test_every_experiment_preset_passes_the_config_checks(preset):
    check_config(compose([f"experiment={preset}"]))


def test_default_is_maml_omniglot_5way_1shot_with_the_paper_settings():
    cfg = compose([])
    assert (cfg.algo.name, cfg.dataset.name, cfg.learner.name) == ("maml", "omniglot", "conv4")
    assert (cfg.task.ways, cfg.task.shots) == (5, 1)
    assert (cfg.algo.inner_lr, cfg.algo.inner_steps, cfg.algo.eval_inner_steps) == (0.4, 1, 3)
    assert (cfg.train.meta_batch, cfg.train.steps, cfg.meta_opt.lr) == (32, 60000, 1e-3)
    assert compose(["algo=maml", "dataset=omniglot"]) == cfg


@pytest.mark.parametrize("overrides", [["algo.inner_lrr=0.1"], ["train.stepz=3"], ["task.ways=five"], ["mode=serve"],
                                       ["learner.batch_norm=sometimes"],
                                       # the removed key (now eval.transductive) is refused, not silently ignored
                                       ["algo=reptile", "algo.transductive=false"]])
def test_misspelt_keys_and_wrong_types_fail_at_composition(overrides):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        compose(overrides)


def test_step_schedule_multiplies_the_lr_by_the_factor_every_decay_every_steps():
    from metarun.optim import make_schedule
    lr = make_schedule(compose(["meta_opt.schedule=step", "meta_opt.decay_every=2000"]).meta_opt, 20000)
    assert [float(lr(s)) for s in (0, 1999, 2000, 3999, 4000)] == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4])


@pytest.mark.parametrize("overrides,message", [
    (["meta_opt.schedule=step"], r"meta_opt\.decay_every > 0"),
    (["meta_opt.schedule=step", "meta_opt.decay_every=10", "meta_opt.decay_factor=2"], r"decay_factor must be in"),
    (["meta_opt.schedule=halving"], r"schedule=halving is unknown.*step"),
])
def test_bad_schedule_settings_name_the_key(overrides, message):
    from metarun.errors import UserError
    from metarun.optim import make_schedule
    with pytest.raises(UserError, match=message):
        make_schedule(compose(overrides).meta_opt, 100)


def test_check_config_rejects_a_bad_schedule_before_any_data_is_read():
    from metarun.errors import UserError
    with pytest.raises(UserError, match=r"decay_every"):
        check_config(compose(["meta_opt.schedule=step", "dataset.local_dir=/nonexistent"]))
