"""Progress bars on a terminal, silence elsewhere (tqdm)."""
from __future__ import annotations

import contextlib
import os
import sys

from tqdm.auto import tqdm


def want_progress(enabled=None) -> bool:
    """``enabled`` wins when given; otherwise show bars only when stderr is a terminal."""
    if enabled is not None:
        return bool(enabled)
    if os.environ.get("GEOTARGET_PROGRESS") in ("0", "1"):
        return os.environ["GEOTARGET_PROGRESS"] == "1"
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def bar(total=None, desc="", unit="it", enabled=None, **kw):
    """A tqdm bar that is disabled (and costs nothing) off a terminal."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not want_progress(enabled),
                leave=False, dynamic_ncols=True, **kw)


@contextlib.contextmanager
def progress_steps(total: int, desc: str, enabled=None):
    """Yield ``step(label)``, advancing a bar of ``total`` named steps."""
    with bar(total, desc, unit="step", enabled=enabled) as b:
        def step(label: str):
            b.set_postfix_str(label, refresh=False)
            b.update(1)
        yield step
