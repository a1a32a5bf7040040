"""The modules' names from before the layers (``geotarget.engine``, ``geotarget.store``, ...).

Each old name is the module itself, imported on first use: ``import geotarget.store``,
``from geotarget import log`` and ``gt.signing`` keep working and give the module that now
lives in ``geotarget.spatial`` or ``geotarget.alerts`` (docs/design.md, "The job, end to end").
Code inside the package uses the new names; ``tests/test_package.py`` checks that.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

#: old name -> the module's home
MOVED = {
    **{m: f"geotarget.spatial.{m}" for m in ("store", "index", "audience", "divisions", "population", "cluster",
                                              "outputs")},
    **{m: f"geotarget.alerts.{m}" for m in ("engine", "log", "authority", "schedule", "cap", "signing", "photos",
                                             "stats", "settings", "metrics", "model")},
    **{m: f"geotarget.cli.{m}" for m in ("demo", "maps")},
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``geotarget.<old name>`` and loads it as the module at its home."""

    def find_spec(self, fullname, path=None, target=None):
        head, _, name = fullname.rpartition(".")
        if head == "geotarget" and name in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(MOVED[spec.name.rpartition(".")[2]])

    def exec_module(self, module):
        pass   # the module ran at its home


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())


def attribute(name: str):
    """``gt.<old name>``: the module (imported now if it was not)."""
    if name not in MOVED:
        raise AttributeError(f"module 'geotarget' has no attribute {name!r}")
    return importlib.import_module(f"geotarget.{name}")
