"""The package's layers: every import points down (or within its own layer), no file grows unbounded.

The layers, low to high, are the table below; a module's layer is its first path component under
``achilles`` (a root module is its own name). An import from a higher layer is a cycle waiting to
happen and makes the owner of a concern impossible to find from the folder names, so it fails here,
whether it sits at the top of the file or inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import achilles

ROOT = Path(achilles.__file__).parent

LAYERS: list[set[str]] = [
    {"errors", "version", "data"},
    {"results", "config"},
    {"model"},
    {"method"},
    {"evaluation"},
    {"analysis", "explain", "experiments", "plots"},
    {"weights"},
    {"report"},
    {"scale"},
    {"commands"},
    {"cli", "__init__", "__main__"},
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}

# The longest files, each with the reason it is one file.
LONG_FILES: dict[str, str] = {
    "explain/run.py": "explain() is one measured pass whose steps share its trace and rows",
}
MAX_LINES = 450


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        out.append((".".join(("achilles", *rel.parts)), path))
    return out


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "achilles":
                found += [(node.lineno, f"achilles.{a.name}") for a in node.names]
            elif node.module.startswith("achilles."):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("achilles.")]
    return found


def test_every_layer_is_known():
    unknown = {_layer(m) for m, _ in _modules()} - set(RANK)
    assert not unknown, f"add these to LAYERS: {sorted(unknown)}"


def test_imports_point_down():
    upward = []
    for module, path in _modules():
        here = RANK[_layer(module)]
        for line, target in _imports(path):
            layer = _layer(target)
            if layer == "__init__" or layer not in RANK:
                continue
            if RANK[layer] > here:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_the_layer_test_sees_an_upward_import(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from achilles.commands.common import progress\n")
    assert _imports(bad) == [(2, "achilles.commands.common")]
    assert RANK[_layer("achilles.commands.common")] > RANK[_layer("achilles.model.units")]


def test_no_file_over_the_limit_without_a_reason():
    long = {str(p.relative_to(ROOT)): n for _, p in _modules()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    unexplained = {p: n for p, n in long.items() if p not in LONG_FILES}
    assert not unexplained, f"files over {MAX_LINES} lines (split, or give a reason): {unexplained}"
