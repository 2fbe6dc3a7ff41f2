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


def run(cfg: DictConfig, run_dir: Path):
    """Dispatch on cfg.mode; tests call this directly with a composed config."""
    if cfg.mode == Mode.eval or cfg.mode == "eval":
        from metarun import evaluate
        result = evaluate.run(cfg, run_dir)
        return result["mean"]
    from metarun import train
    return train.run(cfg, run_dir)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig):
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    # orbax logs every save at INFO through absl; keep the run log about the run.
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    try:
        return run(cfg, run_dir)
    except UserError as e:
        if _multirun():
            # One bad combination must not end the sweep: record it in the job's dir and return
            # NaN (Optuna marks the trial failed and goes on; the basic sweeper ignores it).
            path = _record_failure(run_dir, e)
            log.error("%s (job failed; recorded in %s)", e, path)
            print(f"metarun: error: {e}", file=sys.stderr)
            return float("nan")
        # A user mistake: one line, no traceback, exit status 2.
        log.error("%s", e)
        print(f"metarun: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        # A bug: in a sweep, record it and re-raise. Hydra's launchers catch it per job, finish
        # the other jobs, then the sweep exits non-zero; failure.json keeps the traceback.
        if _multirun():
            _record_failure(run_dir, e)
        raise


def _multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # no Hydra app running (a test calling the function directly)
        return False


def _record_failure(run_dir: Path, exc: BaseException) -> Path:
    from metarun.report import write_failure
    return write_failure(run_dir, exc, HydraConfig.get().overrides.task)


def main() -> None:
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
