"""One read model: every SQL statement of the package lives in `lora_service/journal/`.

Scans the source, so a new `journal.query("SELECT ...")` in the daemon or the CLI fails here
with its file and line, whether it is reached by a test or not."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "lora_service"
SQL = re.compile(
    r"\b(SELECT\b.*\bFROM|INSERT\s+INTO|UPDATE\b.*\bSET|DELETE\s+FROM|CREATE\s+(TABLE|INDEX)"
    r"|PRAGMA)\b", re.DOTALL)
OUTSIDE = sorted(p for p in PACKAGE.rglob("*.py") if "journal" not in p.relative_to(PACKAGE).parts)


def _findings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    where = path.relative_to(PACKAGE.parent)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.search(
                node.value):
            found.append(f"{where}:{node.lineno}: SQL text {node.value[:60]!r}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and (
                node.func.attr in ("query", "execute", "executemany")):
            found.append(f"{where}:{node.lineno}: .{node.func.attr}(...) call")
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                node.module or ""]
            found += [f"{where}:{node.lineno}: imports {n}" for n in names
                      if n.split(".")[0] in ("sqlite3", "sqlite_utils")]
    return found


@pytest.mark.parametrize("path", OUTSIDE, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_sql_outside_the_journal(path: Path) -> None:
    assert _findings(path) == []


def test_the_scan_finds_sql_where_there_is_some() -> None:
    """The scan itself works: the journal's own modules are full of it."""
    assert _findings(PACKAGE / "journal" / "queries.py")
    assert _findings(PACKAGE / "journal" / "sqlite.py")
