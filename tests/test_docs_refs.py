"""Every test the docs cite exists: a file (``tests/test_x.py``), a test in it
(``tests/test_x.py::test_y``) or a test by name (``test_y``). A renamed or removed test
must take its citation with it; whether the test checks what the doc says is for the
reader of both, this only keeps the pointer from dangling."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _defined() -> dict[str, set[str]]:
    """test file name -> names of the tests it defines."""
    found: dict[str, set[str]] = {}
    for path in sorted(TESTS.glob("*.py")):
        text = path.read_text()
        found[path.name] = set(re.findall(r"^(?:async )?def (test_\w+)", text, re.M))
    return found


def test_every_test_the_docs_cite_exists() -> None:
    defined = _defined()
    every_test = set().union(*defined.values())
    stems = {name.removesuffix(".py") for name in defined}
    dangling = []
    for doc in DOCS:
        text = doc.read_text()
        for file, name in re.findall(r"tests/(\w+\.py)(?:::(\w+))?", text):
            if file not in defined or (name and name not in defined[file]):
                dangling.append(f"{doc.name}: tests/{file}{'::' + name if name else ''}")
        for name in re.findall(r"(?<![/\w:])(test_\w+)", text):
            if name not in every_test and name not in stems:
                dangling.append(f"{doc.name}: {name}")
    assert dangling == []
