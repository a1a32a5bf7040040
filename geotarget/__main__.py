"""``python -m geotarget``: the command line (see :mod:`geotarget.cli`)."""
from .cli import main

raise SystemExit(main())
