"""Make ``import geotarget`` find a usable package for the benchmark scripts.

The repository root is put first on ``sys.path`` only if it holds a compiled
extension (an in-place build); otherwise the installed package is used.  A
source checkout without ``_kernels`` cannot run, so it must not shadow
``pip install .``.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if any((ROOT / "geotarget").glob("_kernels*.so")) and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
