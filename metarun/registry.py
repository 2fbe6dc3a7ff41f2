"""Registration by name: an algorithm, learner, dataset or task family registers itself in its own file.

big_vision's idea (`import_module(f"...{name}")`), made discoverable: the first lookup of a kind
imports every module of that kind's package, so each module's `@register` decorator has run and
`metarun --help` / error messages can list every name. Adding an algorithm touches only its own
file and its `conf/algo/*.yaml`.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

from metarun.errors import UserError

# kind -> the package whose modules register entries of that kind
PACKAGES = {
    "algo": "metarun.algos",
    "learner": "metarun.learners",
    "dataset": "metarun.data",
    "family": "metarun.families",
}


@dataclass(frozen=True)
class Entry:
    name: str
    build: Callable          # the builder (its signature is the kind's contract)
    schema: Optional[type]   # the structured-config dataclass of its config group (None: no group entry)
    meta: Dict[str, Any]     # kind-specific facts (a dataset's task family, ...)


_ENTRIES: Dict[str, Dict[str, Entry]] = {kind: {} for kind in PACKAGES}
_LOADED: set = set()


def register(kind: str, name: str, schema: Optional[type] = None, **meta) -> Callable:
    """Decorator: `@register("algo", "maml", schema=MAMLConfig)` over the builder function."""
    if kind not in PACKAGES:
        raise ValueError(f"unknown registry kind {kind!r}")

    def decorate(build: Callable) -> Callable:
        old = _ENTRIES[kind].get(name)
        if old is not None and old.build is not build:
            raise ValueError(f"{kind} {name!r} registered twice ({old.build.__module__} and {build.__module__})")
        _ENTRIES[kind][name] = Entry(name, build, schema, meta)
        return build

    return decorate


def load_all(kind: str) -> None:
    """Import every module of the kind's package once (their decorators register them)."""
    if kind in _LOADED:
        return
    package = importlib.import_module(PACKAGES[kind])
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{PACKAGES[kind]}.{info.name}")
    _LOADED.add(kind)


def entries(kind: str) -> Dict[str, Entry]:
    load_all(kind)
    return dict(_ENTRIES[kind])


def lookup(kind: str, name: str, key: Optional[str] = None) -> Entry:
    """The entry `name` of `kind`; a UserError naming the config key and the known names otherwise."""
    found = entries(kind)
    if name not in found:
        raise UserError(f"{key or kind}={name} is unknown; expected one of: {', '.join(sorted(found))}")
    return found[name]
