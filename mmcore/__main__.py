"""``python -m mmcore``: the same command as ``mmcore``."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
