"""The mutants (tests/mutants.py) cover every promise: each row of README's Guarantees has at least
one mutant caught by a test that row names, and docs/testing.md lists every mutant. The mutants
themselves run in CI (`python tests/mutants.py`); this only checks that the list keeps up with the
promises and that each mutant still applies to the code (its text occurs exactly once)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
import mutants  # noqa: E402


def _rows() -> list[tuple[str, str]]:
    """(promise, tests cell) of each row of README's Guarantees table."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("## Guarantees"):]
    table = table[:table.index("\n## ", 1)]
    rows = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and len(cells) == 2 and cells[0] not in ("promise",):
            rows.append((cells[0], cells[1]))
    return rows


def _names(node: str) -> tuple[str, str]:
    """(file name, test function) of a pytest node id (function '' for a whole file)."""
    path, _, rest = node.partition("::")
    return Path(path).name, re.sub(r"\[.*", "", rest)


def _covers(m: mutants.Mutant, cell: str) -> bool:
    for node in m.tests:
        file, func = _names(node)
        if func and re.search(rf"\b{re.escape(func)}\b", cell):
            return True
        if not func and file in cell:
            return True
        # a whole file named in the row ("tests/system/test_hostile.py") covers each of its tests
        if re.search(rf"{re.escape(file)}`", cell) and not re.search(rf"{re.escape(file)}::", cell):
            return True
    return False


def test_every_promise_has_a_mutant_its_tests_catch():
    rows = _rows()
    assert len(rows) > 30, "README's Guarantees table was not found whole"
    bare = [promise[:90] for promise, cell in rows if not any(_covers(m, cell) for m in mutants.MUTANTS)]
    assert not bare, f"promises with no mutant caught by their tests (add one to tests/mutants.py): {bare}"


def test_docs_list_every_mutant():
    doc = (ROOT / "docs" / "testing.md").read_text()
    missing = [m.name for m in mutants.MUTANTS if f"`{m.name}`" not in doc and f"| {m.name} |" not in doc]
    assert not missing, f"docs/testing.md does not list these mutants: {missing}"


@pytest.mark.parametrize("m", mutants.MUTANTS, ids=lambda m: m.name)
def test_each_mutant_still_applies_once(m):
    text = (ROOT / m.file).read_text()
    assert text.count(m.old) == 1, f"{m.file}: the text to replace occurs {text.count(m.old)} times, not once"
    for node in m.tests:
        assert (ROOT / node.partition("::")[0]).exists(), node
