"""The `metarun` command: Hydra composes the config, then train.run or evaluate.run does the work."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from metarun.config import Mode, register_configs
from metarun.errors import UserError

# conf/ sits beside the package in a source checkout and inside it (metarun/conf) once installed.
_HERE = Path(__file__).resolve().parent
CONF_DIR = _HERE / "conf" if (_HERE / "conf" / "config.yaml").exists() else _HERE.parent / "conf"

log = logging.getLogger("metarun")


def run(cfg: DictConfig, run_dir: Path, overrides=None):
    """Dispatch on cfg.mode; tests call this directly with a composed config. Returns the score
    (higher is better: a sweep maximises it whatever the metric)."""
    if cfg.get("pipeline"):  # pipeline=NAME: stages as child runs in subdirectories (metarun.pipeline)
        from metarun import pipeline
        return pipeline.run(cfg, run_dir, overrides)
    if cfg.mode == Mode.eval or cfg.mode == "eval":
        from metarun import evaluate
        return evaluate.run(cfg, run_dir)["score"]
    from metarun import train
    return train.run(cfg, run_dir, overrides)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig):
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    # orbax logs every save at INFO through absl; keep the run log about the run.
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    try:
        return run(cfg, run_dir, list(HydraConfig.get().overrides.task))
    except UserError as e:
        if _multirun():
            # One bad combination must not end the sweep: record it in the job's dir and return
            # NaN (Optuna marks the trial failed and goes on; the basic sweeper ignores it).
            path = _record_failure(run_dir, e)
            _log_file_only(f"{e} (job failed; recorded in {path})")
            print(f"metarun: error: {e}", file=sys.stderr)
            return float("nan")
        # A user mistake: one line, no traceback, exit status 2.
        _log_file_only(str(e))
        print(f"metarun: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        # A bug: in a sweep, record it and re-raise. Hydra's launchers catch it per job, finish
        # the other jobs, then the sweep exits non-zero; failure.json keeps the traceback.
        if _multirun():
            _record_failure(run_dir, e)
        raise


def _log_file_only(message: str) -> None:
    """Log an error to the run's log file but not the console, where the one stderr line says it."""
    root = logging.getLogger()
    console = [h for h in root.handlers if type(h) is logging.StreamHandler]  # FileHandler is a subclass
    for h in console:
        root.removeHandler(h)
    try:
        log.error("%s", message)
    finally:
        for h in console:
            root.addHandler(h)


def _multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # no Hydra app running (a test calling the function directly)
        return False


def _record_failure(run_dir: Path, exc: BaseException) -> Path:
    from metarun.report import write_failure
    return write_failure(run_dir, exc, HydraConfig.get().overrides.task)


USAGE = """metarun: meta-learning experiments from Hydra configs (JAX).

Usage:
  metarun [GROUP=OPTION ...] [KEY=VALUE ...]      train (default mode=train)
  metarun mode=eval ckpt=RUN_DIR [eval.KEY=...]   re-evaluate a finished run
  metarun mode=eval ckpt=[RUN_A,RUN_B]            the ensemble of several runs (eval.ensemble_top_k=K: one run's K best)
  metarun mode=eval ckpt=RUN_DIR algo=finetune    a new head fitted on each support set (finetune_cosine, finetune_all)
  metarun pipeline=protonet_omniglot              pre-train -> meta-train -> fine-tune, one dir, resumable
  metarun resume=true hydra.run.dir=RUN_DIR       continue an interrupted run with its own config
  metarun -m KEY=A,B seed=0,1,2                   a sweep (multirun); then: metarun-report multirun/...
  metarun --cfg job [overrides]                   print the composed config and exit
  metarun --hydra-help                            Hydra's own options

Examples:
  metarun algo=maml dataset=omniglot dataset.local_dir=PATH
  metarun experiment=protonet_omniglot_5w1s dataset.local_dir=PATH
  metarun experiment=maml_sinusoid debug=smoke

Config groups (GROUP=OPTION):
"""


def _group_options() -> str:
    """The options of every config group, from the YAML files (the *_schema entries are internal)."""
    lines = []
    for group in sorted(p for p in CONF_DIR.iterdir() if p.is_dir()):
        names = sorted(f.stem for f in group.glob("*.yaml"))
        if names:
            lines.append(f"  {group.name}: {', '.join(names)}")
    return "\n".join(lines)


def main() -> None:
    if any(a in ("--help", "-h") for a in sys.argv[1:]):
        print(USAGE + _group_options() + "\n\nEvery key of the composed config can be overridden; "
              "see `metarun --cfg job` and the README.")
        return
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
