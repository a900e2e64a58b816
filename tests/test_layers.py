"""The package's layers import only downward (docs/contributing.md, "Layout"): a test that reads every module's imports."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "drpo"

README = Path(__file__).resolve().parents[1] / "docs" / "contributing.md"


def layer_table(text: str) -> dict[str, set[str]]:
    """The layer table of docs/contributing.md (between ``<!-- layers`` and ``<!-- /layers -->``): layer -> the layers it
    may import ('-': none, 'every layer': all the others)."""
    block = text.split("<!-- layers")[1].split("<!-- /layers -->")[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in block.splitlines()
            if line.startswith("| `")]
    layers = [r[0].strip("`") for r in rows]
    allowed = {}
    for r in rows:
        layer, may = r[0].strip("`"), r[-1]
        allowed[layer] = (set(layers) - {layer} if may == "every layer" else
                          set() if may == "-" else {x.strip() for x in may.split(",")})
    return allowed


ALLOWED: dict[str, set[str]] = layer_table(README.read_text())


def layer_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def drpo_imports(path: Path) -> list[tuple[int, str]]:
    """(line, first component below drpo) of every `import drpo.x` / `from drpo.x import` in the file,
    function-local (lazy) imports included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names] if node.module == "drpo" else [])
        for n in names:
            parts = n.split(".")
            if parts[0] == "drpo" and len(parts) > 1:
                out.append((node.lineno, parts[1]))
    return out


MODULES = sorted(SRC.rglob("*.py"))


def test_every_layer_is_declared():
    assert {layer_of(p) for p in MODULES} <= set(ALLOWED), "a new package or module needs its place in ALLOWED"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down(path):
    layer = layer_of(path)
    bad = [(line, target) for line, target in drpo_imports(path)
           if target != layer and target in ALLOWED and target not in ALLOWED[layer]]
    assert not bad, f"{path.relative_to(SRC)} ({layer}) imports upward: {bad}"


def test_the_table_is_read_as_written():
    table = "<!-- layers -->\n| layer | what | may import |\n|---|---|---|\n| `a` | x | - |\n| `b` | y | a |\n" \
            "| `c` | z | every layer |\n<!-- /layers -->"
    assert layer_table(table) == {"a": set(), "b": {"a"}, "c": {"a", "b"}}
    assert ALLOWED["models"] == {"utils"} and "training" not in ALLOWED["rollout"] and ALLOWED["utils"] == set()


def test_the_checker_sees_an_upward_import(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from drpo.training.config import RunConfig\n")
    assert drpo_imports(f) == [(2, "training")]
