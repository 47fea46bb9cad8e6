"""`python -m qcompiler ...` runs the `qcompile` command line."""
from __future__ import annotations

from .cli import main

raise SystemExit(main())
