"""The installed qcompiler's version, from its package metadata (pyproject.toml's `version`)."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("qcompiler")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
