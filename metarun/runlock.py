"""One run per directory: a lock file holding the owner's pid and host; a stale lock (dead pid) is taken over."""
from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

from metarun.errors import UserError

log = logging.getLogger(__name__)
LOCK_NAME = ".metarun.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """`with RunLock(run_dir):` — refuses (UserError) while another live process holds the directory."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    owner = json.loads(self.path.read_text() or "{}")
                except (OSError, json.JSONDecodeError):
                    owner = {}
                pid, host = owner.get("pid"), owner.get("host")
                if host == me["host"] and isinstance(pid, int) and not _alive(pid):
                    log.warning("taking over the stale lock %s of pid %d (no longer running)", self.path, pid)
                    self.path.unlink(missing_ok=True)
                    continue
                if pid == me["pid"] and host == me["host"]:
                    raise UserError(f"{self.path.parent} is already in use by this process")
                raise UserError(f"{self.path.parent} is in use by pid {pid} on {host} (lock {self.path}); "
                                f"wait for that run to end, or choose another hydra.run.dir")
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise UserError(f"could not take the lock {self.path}; remove it if no run is using {self.path.parent}")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
