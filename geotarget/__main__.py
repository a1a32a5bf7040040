"""``python -m geotarget``: the command line (see :mod:`geotarget.cli`)."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
