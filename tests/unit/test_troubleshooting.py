"""docs/troubleshooting.md lists every field a bad-input error of the package can name, so a new
check cannot land without its row (fields built at run time, like ``stages[{i}].kind``, are
covered by their pattern rows and not checked here)."""

import ast
from pathlib import Path

import megarope

ROOT = Path(megarope.__file__).parent
DOC = (ROOT.parent / "docs" / "troubleshooting.md").read_text()
ERRORS = {"ConfigError", "DataError", "CheckpointError", "EvalConfigError", "RopeConfigError", "SearchConfigError",
          "need"}
PREFIX = {"SearchConfigError": "search."}  # its constructor prefixes the field


def literal_fields() -> set[str]:
    found = set()
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ERRORS):
                continue
            arg = node.args[1] if node.func.id == "need" and len(node.args) > 1 else (node.args or [None])[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.add(PREFIX.get(node.func.id, "") + arg.value)
    return found


def test_every_error_field_has_a_row():
    fields = literal_fields()
    assert len(fields) > 40  # the walk finds the checks
    missing = sorted(f for f in fields if f"`{f}`" not in DOC)
    assert not missing, f"add rows to docs/troubleshooting.md for: {missing}"
