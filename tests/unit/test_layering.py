"""Imports run one way: no module of the package imports a layer above its own (docs/extending.md).

Levels: errors/atomic/dist/fields/plotting/progress (0) < rope (1) < mcore (2) < hf, data (3) < search,
eval (4) < run (5) < __main__ (6). Two packages of one level do not import each other either
(level 0's single modules aside), so no cycle can hide there. Imports inside functions count.
"""

import ast
from pathlib import Path

import megarope

ROOT = Path(megarope.__file__).parent
LEVELS = {
    "errors": 0, "atomic": 0, "dist": 0, "fields": 0, "plotting": 0, "progress": 0,
    "rope": 1, "mcore": 2, "hf": 3, "data": 3, "search": 4, "eval": 4, "run": 5, "__main__": 6,
    # the package itself re-exports RopeConfig, from_hf and the layer-spec helpers (rope, mcore, hf)
    "": 3,
}


def _part(module: str) -> str:
    """The layer of dotted ``module`` inside megarope: its first component ('' for the package)."""
    return module.split(".")[1] if "." in module else ""


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, megarope module) of every import in ``path``; ``from megarope import x`` names
    submodule ``megarope.x`` when there is one, else the package."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "megarope"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "megarope":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                is_module = (ROOT.parent / sub.replace(".", "/")).with_suffix(".py").is_file() or \
                    (ROOT.parent / sub.replace(".", "/")).is_dir()
                found.append((node.lineno, sub if is_module else node.module))
    return found


def test_every_module_has_a_level():
    parts = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").is_file())}
    assert parts <= set(LEVELS), f"give these a level in LEVELS and in the docs: {sorted(parts - set(LEVELS))}"


def test_no_module_imports_a_layer_above_it():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        mine = _part(name)
        for line, target in _imports(path):
            theirs = _part(target)
            if theirs == mine:
                continue
            above = LEVELS[theirs] > LEVELS[mine]
            sibling = LEVELS[theirs] == LEVELS[mine] != 0
            if above or sibling:
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} ({mine or 'megarope'}, level {LEVELS[mine]}) "
                           f"imports {target} (level {LEVELS[theirs]})")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)
