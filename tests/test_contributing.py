"""docs/contributing.md's worked examples run as written, and each stays under 50 lines."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "contributing.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def test_the_page_has_its_two_examples():
    assert len(BLOCKS) == 2
    assert "register_pass" in BLOCKS[0] and "register_backend" in BLOCKS[1]


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=["a pass", "a backend"][: len(BLOCKS)])
def test_example_runs(index, tmp_path, monkeypatch):
    code = BLOCKS[index]
    assert len(code.strip().splitlines()) < 50
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{DOC.name} example {index + 1}", "exec"), {"__name__": f"contributing_example_{index}"})
