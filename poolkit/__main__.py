"""``python -m poolkit``: the same command as ``poolkit``."""

from .cli import main

raise SystemExit(main())
