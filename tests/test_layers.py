"""The package's layers import only downward (docs/contributing.md, "Layout"), and no modules import each other in a
circle, inside a layer either: tests that read every module's imports (function-local ones included)."""
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


# ------------------------------------------------------------------ no cycles, inside a layer either

# cycles known and being removed elsewhere (issue 28, the experiments part): drop an entry once its cycle is gone
KNOWN_CYCLES: list[set[str]] = []


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """module -> the drpo modules it imports (``from drpo.a import b`` is drpo.a.b when b is a module, else drpo.a;
    function-local imports included)."""
    modules = {module_name(p, src): p for p in src.rglob("*.py")}

    def resolve(name: str) -> str:
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in modules else ""

    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {resolve(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {resolve(f"{node.module}.{a.name}") or resolve(node.module) for a in node.names}
        graph[name] = {t for t in targets if t and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The groups of modules that import each other in a circle (strongly connected, more than one module)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_modules_import_each_other_in_a_circle():
    found = [c for c in cycles(import_graph()) if c not in KNOWN_CYCLES]
    assert not found, f"modules that import each other (a layer's modules too): {found}"


def test_the_cycle_finder_sees_a_cycle_through_a_lazy_import(tmp_path):
    pkg = tmp_path / "drpo" / "exp"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from drpo.exp.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from drpo.exp import a\n")
    (pkg / "c.py").write_text("from drpo.exp import b\n")
    graph = import_graph(tmp_path / "drpo")
    assert graph["drpo.exp.a"] == {"drpo.exp.b"} and graph["drpo.exp.b"] == {"drpo.exp.a"}
    assert cycles(graph) == [{"drpo.exp.a", "drpo.exp.b"}]


def test_the_trainer_stays_a_one_sitting_read():
    """trainer.py at or under 300 lines (the developers' brief): what grows in it belongs to an owner beside it."""
    lines = (SRC / "training" / "trainer.py").read_text().count("\n")
    assert lines <= 300, f"trainer.py has {lines} lines"
