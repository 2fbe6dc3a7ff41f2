"""Resume takes the run's own saved config; command-line overrides may change only what is safe to change."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, List, Optional

from omegaconf import OmegaConf, open_dict

from metarun.errors import UserError
from metarun.metrics import atomic_write_text

SAVED_CONFIG = "run_config.yaml"  # metarun's own copy, written once when a run starts; Hydra's .hydra/ may be rewritten
SAVED_CHOICES = "run_choices.yaml"  # the config-group choices the run started with (experiment=..., debug=...)
# Keys a resumed run may change: its length, logging, where the data is read from, the final evaluation,
# and how many processes run it.
SAFE_PREFIXES = ("train.steps", "train.progress", "train.log_every", "train.tensorboard", "train.keep_ckpts",
                 "dataset.local_dir", "dataset.cache_dir", "eval.", "resume", "mode", "ckpt",
                 "distributed.")  # a resumed run may be spread over other processes (same meta_batch)
GROUPS = ("algo", "dataset", "learner", "task", "meta_opt", "experiment", "debug", "hparams_search")


def saved_config_path(run_dir: Path) -> Path:
    return Path(run_dir) / SAVED_CONFIG


def save_config(run_dir: Path, cfg) -> None:
    atomic_write_text(saved_config_path(run_dir), OmegaConf.to_yaml(cfg))


def save_choices(run_dir: Path) -> None:
    """Record the group choices of a starting run (Hydra's runtime.choices), so a resume that repeats
    them (`metarun experiment=X resume=true ...`) is recognised as the same run."""
    try:
        from hydra.core.hydra_config import HydraConfig
        choices = {k: v for k, v in HydraConfig.get().runtime.choices.items() if not k.startswith("hydra")}
    except Exception:  # no Hydra app (a direct call): group overrides cannot be repeated anyway
        return
    atomic_write_text(Path(run_dir) / SAVED_CHOICES, OmegaConf.to_yaml(OmegaConf.create(choices)))


def _saved_choices(run_dir: Path) -> dict:
    path = Path(run_dir) / SAVED_CHOICES
    return dict(OmegaConf.to_container(OmegaConf.load(path))) if path.exists() else {}


def _flatten(cfg, prefix: str = "") -> dict:
    out = {}
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        if hasattr(value, "items"):
            out.update(_flatten(value, path + "."))
        else:
            out[path] = getattr(value, "value", value)  # an enum compares by its config value
    return out


def _safe(key: str) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) or key.startswith(p + ".") for p in SAFE_PREFIXES)


def _apply_overrides(saved, overrides: Iterable[str], choices: dict):
    """The saved config with the command line's `key=value` overrides applied; a group choice must
    repeat the run's own (`choices`), any other is refused."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = saved.copy()
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        key = o.key_or_group
        if key.startswith("hydra") or key in ("resume", "mode", "ckpt"):
            continue
        if key in GROUPS:
            name = saved.get(key, {}).get("name") if key in ("algo", "dataset", "learner") else None
            if str(o.value()) in (choices.get(key), name) and str(o.value()) != "None":
                continue
            raise UserError(f"resume=true takes the run's saved config: the group override {key}={o.value()} "
                            f"cannot change it; start a new run (another hydra.run.dir) instead")
        with open_dict(cfg):
            OmegaConf.update(cfg, key, o.value(), force_add=True)
    return cfg


def resume_config(run_dir: Path, requested, overrides: Optional[List[str]] = None):
    """The config a resumed run continues with.

    `overrides`: the command line's overrides (from Hydra), applied to the saved config; None
    (a direct call) compares `requested` as a whole with the saved config. Either way a changed key
    outside SAFE_PREFIXES is refused in one line naming the keys.
    """
    path = saved_config_path(run_dir)
    if not path.exists():
        legacy = Path(run_dir) / ".hydra" / "config.yaml"
        raise UserError(f"resume=true: {run_dir} holds no metarun run ({path.name} not found"
                        + (", and .hydra/config.yaml is not a run's own" if legacy.exists() else "")
                        + "); start it without resume=true, or point hydra.run.dir at a run directory")
    saved = OmegaConf.load(path)
    effective = _apply_overrides(saved, overrides, _saved_choices(run_dir)) if overrides is not None else requested
    old, new = _flatten(saved), _flatten(effective)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and not _safe(k))
    if changed:
        shown = ", ".join(f"{k} (run: {old.get(k)!r}, given: {new.get(k)!r})" for k in changed[:5])
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        raise UserError(f"resume=true would change the run's config: {shown}{more}; only train.steps, logging, "
                        f"data paths and eval.* may change on resume (the run's config is {path})")
    with open_dict(effective):
        effective.resume = True
    return effective


def restore_hydra_config(run_dir: Path) -> None:
    """Put the run's saved config back into .hydra/config.yaml (Hydra rewrote it before metarun ran)."""
    path = saved_config_path(run_dir)
    hydra_cfg = Path(run_dir) / ".hydra" / "config.yaml"
    if path.exists() and hydra_cfg.parent.exists():
        atomic_write_text(hydra_cfg, path.read_text())
