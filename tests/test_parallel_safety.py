"""The suite runs on two pytest-xdist workers (README, .ci/run): what two workers could share must be per worker."""
from __future__ import annotations

import os
from pathlib import Path


def test_dataset_and_compilation_caches_are_private_to_this_worker(tmp_path_factory):
    # .ci/run exports one METARUN_CACHE for the whole job; conftest replaces it (and the XLA cache dir the
    # subprocess tests inherit) with a dir under this session's basetemp, which xdist makes per worker
    # (.../popen-gw0, .../popen-gw1): two workers never prepare one dataset cache or write one XLA cache.
    basetemp = tmp_path_factory.getbasetemp().resolve()
    for var in ("METARUN_CACHE", "JAX_COMPILATION_CACHE_DIR"):
        assert Path(os.environ[var]).resolve().is_relative_to(basetemp), (var, os.environ[var], basetemp)
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:  # under xdist the basetemp itself names the worker
        assert basetemp.name == f"popen-{worker}", basetemp
