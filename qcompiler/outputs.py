"""Output directories and files of the commands, checked before any long computation."""
from __future__ import annotations

import tempfile
from pathlib import Path

from .errors import QCompileError


def prepare_output_dir(path: Path, what: str) -> None:
    """Create `path` and write a scratch file in it, so that a directory that cannot take the
    results fails at once rather than after minutes of work. `what` names it in errors."""
    if path.exists() and not path.is_dir():
        raise QCompileError(f"{what} {str(path)!r} is a file; give a directory (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise QCompileError(f"{what} {str(path)!r} cannot be written: {exc.strerror or exc}; give a "
                            "directory you can write to") from None


def write_text(path: Path, text: str) -> str:
    """Write `text` (UTF-8) to `path`; a clear error if the file system refuses."""
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise QCompileError(f"cannot write {path}: {exc.strerror or exc}; check the output directory") from None
    return str(path)
