"""Dependencies point down: a package imports only packages below it in the README's layout.

Parsed with ``ast`` (nothing is imported), so the test sees lazy imports inside functions too.
Also: no ``_private`` name is used outside the module that defines it, and no module-level
``__getattr__`` hides an import.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "deepshrink"

#: Lowest first. A unit may import itself and any unit before it. Keep in the README's order.
LAYERS: list[str] = [
    "errors", "config", "fileio", "progress", "distributed", "modeling",
    "data", "models", "checkpoint", "train", "measure",
    "coding", "dsz",
    "pruning", "quantization", "distill", "sharing", "redesign", "early_exit",
    "workflow", "report", "demo", "cli",
]
RANK = {name: i for i, name in enumerate(LAYERS)}

def unit_of(module: str) -> str | None:
    """``deepshrink.pruning.graph`` -> ``pruning``; the package root itself -> None."""
    parts = module.split(".")
    if parts[0] != "deepshrink" or len(parts) < 2:
        return None
    return parts[1]


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(tree: ast.AST, here: str, is_pkg: bool) -> list[tuple[str, list[str], int]]:
    """(absolute module, imported names, line) for every import in ``tree``."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = here.split(".") if is_pkg else here.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join([*pkg, base]) if base else ".".join(pkg)
            out.append((base, [a.name for a in node.names], node.lineno))
    return out


def sources() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py"))


def upward_edges() -> list[str]:
    bad = []
    for path in sources():
        here = module_name(path)
        src_unit = unit_of(here)
        if src_unit is None:
            continue  # deepshrink/__init__.py re-exports the public API of every unit
        assert src_unit in RANK, f"{src_unit} is not in LAYERS: add it in the README's order"
        for mod, names, line in imports(ast.parse(path.read_text()), here, path.name == "__init__.py"):
            # ``from deepshrink import pruning`` names the unit in the imported names
            candidates = [mod] + [f"{mod}.{n}" for n in names]
            dst_unit = next((u for u in map(unit_of, candidates) if u), None)
            if dst_unit is None or dst_unit == src_unit:
                continue
            if RANK.get(dst_unit, -1) > RANK[src_unit]:
                bad.append(f"{here}:{line} imports {mod} ({src_unit} -> {dst_unit})")
    return bad


def private_uses() -> list[str]:
    bad = []
    for path in sources():
        here = module_name(path)
        tree = ast.parse(path.read_text())
        aliases: set[str] = set()
        for mod, names, line in imports(tree, here, path.name == "__init__.py"):
            if not mod.startswith("deepshrink"):
                continue
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    bad.append(f"{here}:{line} imports private {mod}.{n}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("deepshrink"):
                aliases.update(a.asname or a.name for a in node.names)
            elif isinstance(node, ast.Import):
                aliases.update(a.asname for a in node.names if a.asname and a.name.startswith("deepshrink"))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                bad.append(f"{here}:{node.lineno} uses private {node.value.id}.{node.attr}")
    return bad


def module_getattr() -> list[str]:
    return [module_name(p) for p in sources()
            if any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__"
                   for n in ast.parse(p.read_text()).body)]


def test_dependencies_point_down() -> None:
    assert upward_edges() == []


def test_no_private_name_used_across_modules() -> None:
    assert private_uses() == []


def test_no_module_getattr() -> None:
    assert module_getattr() == []


def test_the_checker_catches_an_upward_import(tmp_path: Path) -> None:
    """The rule is live: an import of a technique from a foundation is reported."""
    pkg = tmp_path / "deepshrink"
    (pkg / "data").mkdir(parents=True)
    (pkg / "pruning").mkdir()
    (pkg / "data" / "x.py").write_text("from deepshrink.pruning import prune\n")
    (pkg / "data" / "y.py").write_text("def f():\n    from ..pruning import graph\n")
    (pkg / "pruning" / "z.py").write_text(
        "from deepshrink.data.x import _hidden\nimport deepshrink.data.x as dx\ndx._h\n")
    globals()["SRC"], old = pkg, SRC
    try:
        edges = upward_edges()
        assert any("deepshrink.data.x:1 imports deepshrink.pruning" in e for e in edges)
        assert any("deepshrink.data.y:2" in e for e in edges)
        assert len(private_uses()) == 2
    finally:
        globals()["SRC"] = old
