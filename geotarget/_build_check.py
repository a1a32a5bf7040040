"""A plain error when geotarget is imported without its compiled kernels.

Python imports ``geotarget`` from the first ``sys.path`` entry that holds it.  Inside a
source checkout that is the checkout itself (the current directory comes first, and Ray
puts the driver's working directory first on its workers' path), so an installed copy is
shadowed by a source tree that has never been compiled.  Left alone, the import then
fails deep inside with "partially initialized module ... (most likely due to a circular
import)", which names the wrong cause.  NumPy answers the same trap the same way.
"""
from __future__ import annotations

import importlib
import importlib.machinery
from pathlib import Path

KERNELS = ("_kernels", "_array_kernels", "_refresh_kernels", "_store_kernels")


def _built(package_dir: Path, name: str) -> bool:
    return any((package_dir / (name + suffix)).exists()
               for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def require_kernels(package_dir: str) -> None:
    """Import every compiled module, or raise one ImportError that says why and what to do."""
    pkg = Path(package_dir)
    root = pkg.parent
    missing = [name for name in KERNELS if not _built(pkg, name)]
    if missing:
        checkout = (root / "setup.py").exists()
        where = "a source checkout" if checkout else "a directory"
        raise ImportError(
            f"geotarget's compiled kernels are missing from {pkg} (not built: {', '.join(missing)}).\n"
            f"Python imported geotarget from {where} ({root}), not from an installed copy: "
            "a source directory on sys.path (the current directory, or a Ray worker's working "
            "directory) shadows the installed package.\n"
            "Either run Python from another directory so the installed package is used "
            "(install it with `pip install .`), or build the kernels in place: "
            f"`cd {root} && python setup.py build_ext --inplace -j 2`.")
    for name in KERNELS:
        try:
            importlib.import_module(f"geotarget.{name}")
        except ImportError as exc:
            raise ImportError(
                f"geotarget's compiled module geotarget.{name} exists in {pkg} but cannot be "
                f"loaded: {exc}.\nIt was probably built for another Python or NumPy version; "
                f"rebuild it: `cd {root} && python setup.py build_ext --inplace -j 2` "
                "(or `pip install --force-reinstall .` for an installed copy).") from exc
